"""`entityclip eval`, `classify`, `search-index` and `search` end to end on tiny TFRecords."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from entityclip_jax.cli import main as cli
from entityclip_jax.data.pipeline import make_dataset, numpy_batches
from entityclip_jax.models.clip import CLIPModel, init_params
from entityclip_jax.models.clip_config import PRESETS
from entityclip_jax.models.loading import save_towers
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


def brute_force_recall_at_1(setup):
    """Embeddings by hand, full similarity matrix, argmax: the reference."""
    model = CLIPModel(setup["config"])
    images, texts = [], []
    for batch in numpy_batches(make_dataset(setup["records"], "val", batch_size=16, image_size=64, train=False,
                                            process_index=0, process_count=1)):
        keep = batch["mask"]
        out = model.apply({"params": setup["params"]}, jnp.asarray(batch["query_ids"]),
                          jnp.asarray(batch["pixel_values"]))
        images.append(np.asarray(out.image.embeds)[keep])
        texts.append(np.asarray(out.text.embeds)[keep])
    similarity = np.concatenate(images) @ np.concatenate(texts).T
    n = len(similarity)
    return (100 * np.mean(similarity.argmax(1) == np.arange(n)),
            100 * np.mean(similarity.argmax(0) == np.arange(n)), n)


def test_eval_command_writes_metrics_equal_to_brute_force(setup, capsys):
    out = setup["root"] / "eval_out"
    assert cli(["eval", "--checkpoint", setup["towers"], "--data", setup["records"], "--split", "val",
                "--out", str(out), "--batch-size", "16"]) == 0
    assert "image -> text" in capsys.readouterr().out and (out / "retrieval.md").exists()
    metrics = json.loads((out / "retrieval.json").read_text())
    i2t, t2i, n = brute_force_recall_at_1(setup)
    assert metrics["num_images"] == metrics["num_texts"] == n == 40
    assert metrics["i2t"]["R@1"] == pytest.approx(i2t) and metrics["t2i"]["R@1"] == pytest.approx(t2i)
    assert metrics["ties"] == "pessimistic"
    with Image.open(out / "retrieval.png") as png:
        assert png.size[0] > 200


def test_classify_command(setup, capsys):
    out = setup["root"] / "classify_out"
    assert cli(["classify", "--checkpoint", setup["towers"], "--data", setup["records"], "--split", "val",
                "--out", str(out), "--tokenizer", setup["tokenizer"], "--batch-size", "16"]) == 0
    summary = json.loads((out / "classification.json").read_text())
    assert summary["num_examples"] == 40 and sum(map(sum, summary["confusion_matrix"])) == 40
    assert set(summary["class_names"]) <= {"politics", "sports", "business", "science", "arts"}
    assert "zero-shot accuracy" in capsys.readouterr().out
    with Image.open(out / "classification.png") as png:
        assert png.size[0] > 200


def test_search_commands_find_the_described_image(setup, capsys):
    index = setup["root"] / "index.npz"
    assert cli(["search-index", "--checkpoint", setup["towers"], "--records", setup["records"], "--split", "val",
                "--out", str(index), "--dtype", "float32"]) == 0
    query = json.loads((setup["root"] / "raw" / "val.jsonl").read_text().splitlines()[0])["query"]
    sheet = setup["root"] / "hits.png"
    assert cli(["search", "--checkpoint", setup["towers"], "--index", str(index), "--query", query,
                "-k", "3", "--sheet", str(sheet), "--tokenizer", setup["tokenizer"]]) == 0
    printed = capsys.readouterr().out
    assert printed.count("  1. ") == 1 and " 3. " in printed
    assert sheet.exists() and Image.open(sheet).size[0] > 100


def test_eval_refuses_a_missing_checkpoint(setup, capsys):
    assert cli(["eval", "--checkpoint", str(setup["root"] / "nope"), "--data", setup["records"],
                "--out", str(setup["root"] / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
