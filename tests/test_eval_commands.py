"""`entityclip eval`, `classify`, `search-index` and `search` end to end on tiny TFRecords."""
import dataclasses
import json

import jax
import numpy as np
import pytest
from PIL import Image

from entityclip_jax.cli import main as cli
from entityclip_jax.models.clip import init_params
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


def brute_force_metrics(setup):
    """The reference: the same embeddings, a full similarity matrix and sorted rows."""
    from entityclip_jax.eval.commands import encode_split
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
