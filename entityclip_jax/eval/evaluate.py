"""Evaluate a checkpoint on a records split with the plain CLIP towers (METHOD.md, Inference).

Whatever checkpoint kind the user has (training workdir, towers directory, Hugging Face
directory, OpenAI-layout file): Recall@K both ways, and zero-shot news classification
(the paper's Figure 5). With report=True also each query's top 5 and the HTML page of
them (html_report.py), what `entityclip compare` reads. The `entityclip eval` / `classify`
commands call these.
"""
import dataclasses
import os

import numpy as np

from entityclip_jax.checkpoints.run_tokenizer import check_eval_data
from entityclip_jax.checkpoints.towers import load_towers
from entityclip_jax.data.pipeline import make_dataset, numpy_batches
from entityclip_jax.data.tokenizer import load_tokenizer
from entityclip_jax.eval.classify import (DEFAULT_TEMPLATE, class_prompts, label_indices,
                                          write_classification_report, zero_shot_classify)
from entityclip_jax.eval.encode import check_finite, clip_encoders, collecting, encode_dataset
from entityclip_jax.eval.html_report import (DEFAULT_ROWS, THUMBNAIL_LIMIT, TOP_K, images_on_page, rows_on_page,
                                             write_report)
from entityclip_jax.eval.report import write_retrieval_report
from entityclip_jax.eval.retrieval import group_images_by_id, recall_metrics, retrieval_ranks
from entityclip_jax.eval.retrieval_details import make_details, write_details
from entityclip_jax.eval.thumbnails import record_thumbnails
from entityclip_jax.hub import resolve_checkpoint
from entityclip_jax.models.clip import CLIPModel


def encode_split(checkpoint, data_dir, split, batch_size, text_key="query_ids", transform=None, encoders=None):
    """(image_embeds, text_embeds, ids, labels, config) of a whole split, plain CLIP towers.

    transform(batches, config) may add fields to each batch (e.g. tokenized headlines).
    encoders: a list to which the (encode_image, encode_text) pair is appended, for reuse.
    """
    checkpoint = resolve_checkpoint(checkpoint)  # a hub id is looked up once
    config, params = load_towers(checkpoint)
    check_eval_data(checkpoint, data_dir, split, config)  # the records speak the model's tokenizer
    encode_image, encode_text = clip_encoders(CLIPModel(config), params)   # data-parallel over every device
    if encoders is not None:
        encoders.append((encode_image, encode_text))
    dataset = make_dataset(data_dir, split, batch_size=batch_size, image_size=config.vision.image_size,
                           train=False, process_index=0, process_count=1)
    batches = numpy_batches(dataset, (data_dir, split))
    if transform is not None:
        batches = transform(batches, config)
    images, texts, ids, labels = encode_dataset(batches, encode_image, encode_text, text_key=text_key)
    return images, texts, ids, labels, config


def evaluate_retrieval(checkpoint, data_dir, split, out_dir, batch_size=64, chunk_size=1024, ties="pessimistic",
                       report=False, report_rows=DEFAULT_ROWS):
    """Recall@1/5/10/50/100, median and mean rank both ways; writes JSON, Markdown, PNG.

    report: also the top 5 of every query (retrieval_details.npz, what `compare` reads) and
    the HTML page of them (report.html), with thumbnails of the split's images (of just the
    ones the page shows when the split has more than THUMBNAIL_LIMIT images).
    """
    captions = []
    images, texts, ids, _, config = encode_split(checkpoint, data_dir, split, batch_size,
                                                 transform=_collecting_captions(captions) if report else None)
    keep, text_to_image = group_images_by_id(ids)
    ranks = retrieval_ranks(images[keep], texts, text_to_image, chunk_size=chunk_size, ties=ties,
                            top_k=TOP_K if report else 0)
    metrics = recall_metrics(ranks)
    metrics["ties"] = ties
    metrics["checkpoint"], metrics["data"], metrics["split"] = str(checkpoint), str(data_dir), split
    paths = write_retrieval_report(metrics, out_dir, title=f"{split} of {os.path.basename(str(data_dir).rstrip('/'))}")
    if report:
        details = make_details(ranks, ids[keep], ids, np.concatenate(captions), text_to_image)
        shown = rows_on_page(details, report_rows)
        wanted = None if len(keep) <= THUMBNAIL_LIMIT else images_on_page(details, shown)
        details = dataclasses.replace(details, thumbnails=record_thumbnails(
            data_dir, split, config.vision.image_size, ids=wanted, batch_size=batch_size))
        paths["details"] = write_details(details, out_dir)
        paths["html"] = write_report(out_dir, metrics, details, max_rows=report_rows)
    return metrics, paths


def _collecting_captions(sink):
    return lambda batches, config: collecting(batches, "query", sink)


def zero_shot_classification(checkpoint, data_dir, split, out_dir, tokenizer_path, class_names=None,
                             template=None, batch_size=64):
    """The paper's Figure 5: class prompts scored against image and headline, averaged."""
    tokenizer = load_tokenizer(tokenizer_path)

    def with_headline_ids(batches, config):
        for batch in batches:
            headlines = [h.decode("utf-8") if isinstance(h, bytes) else str(h) for h in batch["headline"]]
            yield dict(batch, headline_ids=tokenizer.encode(headlines, config.text.max_position_embeddings)[0])

    encoders = []
    images, headlines, _, labels, config = encode_split(checkpoint, data_dir, split, batch_size,
                                                        text_key="headline_ids", transform=with_headline_ids,
                                                        encoders=encoders)
    labels = np.asarray(labels).astype(str)
    class_names = sorted(set(labels)) if class_names is None else list(class_names)
    prompt_ids, _ = tokenizer.encode(class_prompts(class_names, template or DEFAULT_TEMPLATE),
                                     config.text.max_position_embeddings)
    _, encode_text = encoders[0]
    prompts = check_finite(np.asarray(encode_text(prompt_ids)), "class prompt embeddings")
    predictions = zero_shot_classify(images, headlines, prompts)
    return write_classification_report(label_indices(labels, class_names), np.asarray(predictions),
                                       class_names, out_dir, template=template or DEFAULT_TEMPLATE)
