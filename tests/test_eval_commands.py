"""`entityclip eval`, `classify`, `search-index` and `search` end to end on tiny TFRecords."""
import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from entityclip_jax.checkpoints.towers import save_towers
from entityclip_jax.cli import main as cli
from entityclip_jax.models.clip import init_params
from entityclip_jax.models.clip_config import PRESETS
from tests._tiny_training import write_tiny_records


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    records, vocab, eos = write_tiny_records(root, num_train=16, num_val=40)
    tiny = PRESETS["tiny"]
    config = dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, vocab_size=vocab, eos_token_id=eos))
    params = init_params(config, jax.random.key(3))
    towers = save_towers(params, config, root / "towers")
    return dict(root=root, records=records, towers=str(towers), config=config, params=params,
                tokenizer=str(root / "tokenizer"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny plain-CLIP fine-tuning run on the synthetic entity photos: a model that has learnt something."""
    from entityclip_jax.config import load_config
    from entityclip_jax.train import loop
    root = tmp_path_factory.mktemp("trained")
    records, vocab, eos = write_tiny_records(root, num_train=256, num_val=40)
    overrides = {"data.dir": records, "model.vocab_size": vocab, "model.eos_token_id": eos,
                 "model.mode": "clip_finetune", "num_train_steps": 40, "eval.every_steps": 0,
                 "checkpoint.every_steps": 40}
    config = load_config(str(pathlib.Path(__file__).parents[1] / "configs" / "tiny_cpu.py"),
                         [f"--config.{key}={value}" for key, value in overrides.items()])
    loop.train(config, str(root / "run"))
    return dict(root=root, records=records, run=str(root / "run"), tokenizer=str(root / "tokenizer"))


def reference_confusion_matrix(setup, class_names):
    """Zero-shot predictions of transformers' PyTorch CLIP holding the towers' weights, on the
    records' own pixels and headlines, scored in NumPy."""
    import torch
    import transformers

    from entityclip_jax.weights.layout import flax_to_state_dict
    from entityclip_jax.data.pipeline import make_dataset, numpy_batches
    from entityclip_jax.data.tokenizer import load_tokenizer

    model = transformers.CLIPModel(setup["config"].to_hf()).eval()
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in flax_to_state_dict(setup["params"]).items()},
                          strict=False)
    tokenizer = load_tokenizer(setup["tokenizer"])
    length = setup["config"].text.max_position_embeddings
    batches = list(numpy_batches(make_dataset(setup["records"], "val", batch_size=16, train=False,
                                              image_size=setup["config"].vision.image_size,
                                              process_index=0, process_count=1)))
    keep = np.concatenate([b["mask"] for b in batches])
    pixels = np.concatenate([b["pixel_values"] for b in batches])[keep]
    headlines = [h.decode() for h in np.concatenate([b["headline"] for b in batches])[keep]]
    labels = [x.decode() for x in np.concatenate([b["label"] for b in batches])[keep]]

    def features(output):
        return unit(np.asarray(getattr(output, "pooler_output", output)))
    with torch.no_grad():
        images = features(model.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))))
        texts = {name: features(model.get_text_features(
                     input_ids=torch.from_numpy(tokenizer.encode(strings, length)[0]).long()))
                 for name, strings in (("headlines", headlines),
                                       ("prompts", [f"a news photo about {c}" for c in class_names]))}
    predicted = np.argmax(images @ texts["prompts"].T + texts["headlines"] @ texts["prompts"].T, axis=1)
    matrix = np.zeros((len(class_names),) * 2, np.int64)
    np.add.at(matrix, ([class_names.index(label) for label in labels], predicted), 1)
    return matrix


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force_metrics(setup):
    """The reference: the same embeddings, a full similarity matrix and sorted rows."""
    from entityclip_jax.eval.evaluate import encode_split
    images, texts, _, _, _ = encode_split(setup["towers"], setup["records"], "val", 16)
    similarity = images @ texts.T
    n = len(similarity)
    # pessimistic ties: wrong items scoring >= the correct one count against it
    i2t = np.array([(similarity[i] >= similarity[i, i]).sum() - 1 for i in range(n)])
    t2i = np.array([(similarity[:, t] >= similarity[t, t]).sum() - 1 for t in range(n)])
    return {d: {f"R@{k}": 100 * np.mean(r < k) for k in (1, 5, 10)} | {"mean_rank": r.mean() + 1}
            for d, r in (("i2t", i2t), ("t2i", t2i))}, n


def test_eval_command_writes_metrics_equal_to_brute_force(setup, capsys):
    out = setup["root"] / "eval_out"
    assert cli(["eval", "--checkpoint", setup["towers"], "--data", setup["records"], "--split", "val",
                "--out", str(out), "--batch-size", "16"]) == 0
    assert "image -> text" in capsys.readouterr().out and (out / "retrieval.md").exists()
    metrics = json.loads((out / "retrieval.json").read_text())
    reference, n = brute_force_metrics(setup)
    assert metrics["num_images"] == metrics["num_texts"] == n == 40
    for direction, values in reference.items():
        for key, value in values.items():
            assert metrics[direction][key] == pytest.approx(value), (direction, key)
    assert metrics["ties"] == "pessimistic"
    with Image.open(out / "retrieval.png") as png:
        assert png.size[0] > 200


def test_eval_report_keeps_each_query_its_top_5_and_the_pictures(setup, capsys):
    import io

    from entityclip_jax.eval.retrieval_details import load_results
    out = setup["root"] / "report_out"
    assert cli(["eval", "--checkpoint", setup["towers"], "--data", setup["records"], "--split", "val",
                "--out", str(out), "--batch-size", "16", "--report"]) == 0
    assert "report.html" in capsys.readouterr().out
    metrics, details = load_results(out)
    examples = [json.loads(line) for line in (setup["root"] / "raw" / "val.jsonl").read_text().splitlines()]
    assert list(details.texts) == [e["query"] for e in examples]
    assert list(details.text_ids) == list(details.image_ids) == [e["id"] for e in examples]
    t2i = details.direction("t2i")
    assert metrics["t2i"]["R@5"] == pytest.approx(100 * np.mean(t2i["ranks"] < 5))
    for text, (rank, top) in enumerate(zip(t2i["ranks"], t2i["top"])):   # the truth sits at its rank in the top 5
        assert (list(top).index(details.text_image[text]) if details.text_image[text] in top else 5) == min(rank, 5)
    assert sorted(details.thumbnails) == sorted(e["id"] for e in examples)
    with Image.open(io.BytesIO(details.thumbnails[examples[0]["id"]])) as thumbnail:
        assert thumbnail.format == "JPEG" and thumbnail.size == (96, 96)
    assert (out / "report.html").read_text().count("<tr data-order=") == 80


def test_eval_report_of_a_large_split_samples_rows_and_keeps_their_pictures(setup, monkeypatch):
    """Past THUMBNAIL_LIMIT images, thumbnails of just the images the page shows (read by id)."""
    from entityclip_jax.eval import evaluate
    from entityclip_jax.eval.html_report import images_on_page, rows_on_page
    from entityclip_jax.eval.retrieval_details import load_results
    monkeypatch.setattr(evaluate, "THUMBNAIL_LIMIT", 10)
    out = setup["root"] / "sampled_report"
    assert cli(["eval", "--checkpoint", setup["towers"], "--data", setup["records"], "--split", "val",
                "--out", str(out), "--batch-size", "16", "--report", "--report-rows", "4"]) == 0
    _, details = load_results(out)
    shown = images_on_page(details, rows_on_page(details, 4))
    assert len(details.direction("t2i")["ranks"]) == 40 and 4 <= len(shown) < 40
    assert sorted(details.thumbnails) == sorted(shown)
    html = (out / "report.html").read_text()
    assert html.count("<tr data-order=") == 8 and "4 of 40 queries" in html and "random sample" in html


def test_classify_command_predicts_what_the_embeddings_say(setup, capsys):
    out = setup["root"] / "classify_out"
    assert cli(["classify", "--checkpoint", setup["towers"], "--data", setup["records"], "--split", "val",
                "--out", str(out), "--tokenizer", setup["tokenizer"], "--batch-size", "16"]) == 0
    summary = json.loads((out / "classification.json").read_text())
    assert summary["num_examples"] == 40 and sum(map(sum, summary["confusion_matrix"])) == 40
    # The reference: transformers' PyTorch CLIP on the same images, headlines and prompts, scored by hand.
    want = reference_confusion_matrix(setup, summary["class_names"])
    assert summary["confusion_matrix"] == want.tolist()
    assert set(summary["class_names"]) <= {"politics", "sports", "business", "science", "arts"}
    assert "zero-shot accuracy" in capsys.readouterr().out
    with Image.open(out / "classification.png") as png:
        assert png.size[0] > 200


@pytest.mark.slow  # trains a model first
def test_search_commands_find_the_described_image(trained, capsys):
    index = trained["root"] / "index.npz"
    assert cli(["search-index", "--checkpoint", trained["run"], "--records", trained["records"], "--split", "val",
                "--out", str(index), "--dtype", "float32"]) == 0
    examples = [json.loads(line) for line in (trained["root"] / "raw" / "val.jsonl").read_text().splitlines()]
    queries = [e for e in examples if sum(o["query"] == e["query"] for o in examples) == 1][:8]   # unambiguous
    sheet = trained["root"] / "hits.png"
    command = ["search", "--checkpoint", trained["run"], "--index", str(index), "-k", "5", "--sheet", str(sheet),
               "--tokenizer", trained["tokenizer"]]
    assert cli(command + [arg for e in queries for arg in ("--query", e["query"])]) == 0
    printed = capsys.readouterr().out.split("query: ")[1:]
    assert len(printed) == len(queries) == 8
    found = [f" {e['id']}\n" in hits for e, hits in zip(queries, printed)]
    # A trained model finds most described images in its top 5 of 40; chance would find 1 of 8.
    assert sum(found) >= 5, printed
    assert printed[0].count("  1. ") == 1 and " 5. " in printed[0]
    assert (trained["root"] / "hits_1.png").exists() and Image.open(trained["root"] / "hits_1.png").size[0] > 100
    # built from records, the index holds the captions: an image's nearest ones are mostly its own
    from entityclip_jax.eval.search import load_index, nearest_captions
    loaded = load_index(index)
    assert list(loaded.texts) == [e["query"] for e in examples] and list(loaded.text_ids) == list(loaded.ids)
    own = [loaded.text_ids[i] == loaded.ids[row] for row in range(40) for i in nearest_captions(loaded, row, 5)[0]]
    assert sum(own) >= 20, sum(own)     # of 40 images with one caption each; chance: 5


def test_eval_refuses_a_missing_checkpoint(setup, capsys):
    assert cli(["eval", "--checkpoint", str(setup["root"] / "nope"), "--data", setup["records"],
                "--out", str(setup["root"] / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
