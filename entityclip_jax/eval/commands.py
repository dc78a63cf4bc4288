"""CLI: `entityclip eval` (Recall@K), `entityclip classify` (zero-shot news sections) and
`entityclip compare` (two evaluations of one split, query by query).

Both run the plain CLIP towers only (METHOD.md, Inference): whatever checkpoint
kind the user has (training workdir, towers directory, Hugging Face directory,
OpenAI-layout file).
"""
import dataclasses
import json
import os
import time

import numpy as np

from entityclip_jax.checkpoints import load_towers
from entityclip_jax.data.pipeline import make_dataset, numpy_batches
from entityclip_jax.data.tokenizer import load_tokenizer
from entityclip_jax.eval.classify import (DEFAULT_TEMPLATE, class_prompts, label_indices,
                                          write_classification_report, zero_shot_classify)
from entityclip_jax.eval.compare import compare_results
from entityclip_jax.eval.encode import check_finite, clip_encoders, collecting, encode_dataset
from entityclip_jax.eval.html_report import (DEFAULT_ROWS, THUMBNAIL_LIMIT, TOP_K, images_on_page, rows_on_page,
                                             write_report)
from entityclip_jax.eval.report import markdown_table, write_retrieval_report
from entityclip_jax.eval.retrieval import group_images_by_id, recall_metrics, retrieval_ranks
from entityclip_jax.eval.retrieval_details import make_details, write_details
from entityclip_jax.eval.thumbnails import record_thumbnails
from entityclip_jax.errors import EntityClipError
from entityclip_jax.hub import resolve_checkpoint
from entityclip_jax.models.clip import CLIPModel
from entityclip_jax.train.tokenizer_match import check_eval_data


def _add_common(parser):
    parser.add_argument("--checkpoint", required=True,
                        help="training workdir, towers dir, Hugging Face CLIPModel dir or OpenAI .pt")
    parser.add_argument("--data", required=True, help="TFRecord dataset directory (write-records output)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", required=True, help="directory for the JSON, Markdown and PNG results")
    parser.add_argument("--batch-size", type=int, default=64)


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
    batches = numpy_batches(dataset)
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


def configure_eval(parser):
    _add_common(parser)
    parser.add_argument("--chunk-size", type=int, default=1024, help="similarity rows scored at a time")
    parser.add_argument("--ties", choices=("pessimistic", "optimistic"), default="pessimistic",
                        help="tied scores count against the query (default: a collapsed model scores 0, not 100)")
    parser.add_argument("--report", action="store_true",
                        help="also each query's top 5 (retrieval_details.npz, for `compare`) and report.html, "
                             "a self-contained page of them")
    parser.add_argument("--report-rows", type=int, default=DEFAULT_ROWS,
                        help=f"queries per direction on the page; a larger split shows a random sample "
                             f"(default: {DEFAULT_ROWS})")


def run_eval(args):
    start = time.time()
    if args.report_rows < 1:
        raise EntityClipError(f"--report-rows must be at least 1, got {args.report_rows}")
    metrics, paths = evaluate_retrieval(args.checkpoint, args.data, args.split, args.out,
                                        args.batch_size, args.chunk_size, args.ties, args.report, args.report_rows)
    print(markdown_table(metrics))
    print(f"{metrics['num_images']} images, {metrics['num_texts']} texts in {time.time() - start:.1f}s; "
          f"wrote {', '.join(str(p) for p in _as_list(paths))}")


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


def configure_classify(parser):
    _add_common(parser)
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory or OpenAI .gz vocabulary")
    parser.add_argument("--template", help="class prompt template with {section}")


def run_classify(args):
    paths = zero_shot_classification(args.checkpoint, args.data, args.split, args.out, args.tokenizer,
                                     template=args.template, batch_size=args.batch_size)
    summary = json.loads(paths["json"].read_text())
    print(f"zero-shot accuracy {summary['accuracy']:.1f}% over {summary['num_examples']} articles; "
          f"wrote {paths['json']} and {paths['png']}")


def _as_list(paths):
    return list(paths.values()) if isinstance(paths, dict) else list(paths)


def configure_compare(parser):
    parser.add_argument("results_a", metavar="RESULTS_A", help="an `entityclip eval --report` output directory")
    parser.add_argument("results_b", metavar="RESULTS_B", help="another one, of the same split")
    parser.add_argument("--out", help="the page to write (default: RESULTS_A/compare_<name of B>.html)")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS,
                        help=f"queries per direction on the page, those whose rank moved most "
                             f"(default: {DEFAULT_ROWS})")


def run_compare(args):
    if args.rows < 1:
        raise EntityClipError(f"--rows must be at least 1, got {args.rows}")
    out, summary = compare_results(args.results_a, args.results_b, args.out, max_rows=args.rows)
    for direction in summary:
        s = summary[direction]
        print(f"{s['label']}: {s['name_a']} fixed {s['fixed']} and broke {s['broken']} of {s['total']} "
              f"(rank 1 vs not); ranks better {s['better']}, worse {s['worse']}, same {s['same']}")
    print(f"wrote {out}")
