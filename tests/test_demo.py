"""The README's main job, `entityclip demo`, runs every stage (in its --quick smoke form)."""
import json
import os

import pytest
from PIL import Image

from entityclip_jax.cli import main as cli
from entityclip_jax.eval.search import load_index

pytestmark = pytest.mark.slow  # the whole pipeline, minutes


def test_quick_demo_runs_every_stage_and_leaves_real_artefacts(tmp_path, capsys):
    workdir = tmp_path / "demo"
    assert cli(["demo", "--workdir", str(workdir), "--quick"]) == 0
    printed = capsys.readouterr().out
    for row in ("| step 0 (no training) |", "| clip_finetune |", "| entityclip |", "export parity"):
        assert row in printed
    metrics = {name: json.loads((workdir / "results" / name / "retrieval.json").read_text())
               for name in ("step0", "clip_finetune", "entityclip")}
    assert all(m["num_texts"] == 32 and m["ties"] == "pessimistic" for m in metrics.values())
    # Even the 8 steps of --quick learn: both trained models beat the untrained towers on the test split
    # (a run of this demo: rsum 144 at step 0, 200 and 206 after training; chance is about 50).
    for name in ("clip_finetune", "entityclip"):
        assert metrics[name]["rsum"] > metrics["step0"]["rsum"] + 25, (name, metrics[name]["rsum"])
    for png in ("results/entityclip/retrieval.png", "results/attention.png",
                "results/classification/classification.png"):
        with Image.open(workdir / png) as image:
            assert image.size[0] > 200, png
    assert {"config.json", "model.safetensors", "vocab.json"} <= set(os.listdir(workdir / "hf_export"))
    # the pages a person reads (tests/test_pages_browser.py opens them in a browser) and the index to serve
    for page in ("results/entityclip/report.html", "results/compare_entityclip_vs_clip_finetune.html"):
        html = (workdir / page).read_text()    # 32 text queries and 32 images
        assert html.count("<tr data-order=") == 64 and "data:image/jpeg;base64," in html, page
    index = load_index(workdir / "search_index.npz")
    assert len(index.ids) == len(index.texts) == 32 and index.source["split"] == "test"
    assert f"entityclip serve --index {workdir / 'search_index.npz'}" in printed
    cache = [json.loads(line) for line in open(workdir / "explanations.jsonl")]
    assert len(cache) == 96 + 32 + 32 + 6 and all(r["status"] == "ok" for r in cache)
    _resume_from_export(workdir)


def _resume_from_export(workdir):
    """`entityclip train --config.model.init=EXPORT` starts from exactly the trained towers and heads."""
    import pathlib

    import jax
    import numpy as np

    from entityclip_jax.checkpoints.model_init import init_entityclip
    from entityclip_jax.checkpoints.towers import load_towers_and_heads
    from entityclip_jax.config import load_config

    assert "entityclip_heads.safetensors" in os.listdir(workdir / "hf_export")
    config = load_config(str(pathlib.Path(__file__).parents[1] / "configs" / "tiny_cpu.py"),
                         [f"--config.model.init={workdir / 'hf_export'}"])
    _, params = init_entityclip(jax.random.key(1), config)
    _, towers, heads = load_towers_and_heads(str(workdir / "run_entityclip"))
    trained = {"clip": towers, "heads": heads}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, trained)


def test_the_demo_deletes_only_a_workdir_it_made(tmp_path, capsys):
    """A workdir without the demo's marker is refused before anything is written, --fresh or not:
    its records/ (a name the demo replaces) survives. An earlier demo's workdir is reused, and
    --fresh deletes it whole."""
    from entityclip_jax.demo import DEMO_MARKER, claim_workdir

    foreign = tmp_path / "mine"
    (foreign / "records").mkdir(parents=True)
    (foreign / "records" / "keep.txt").write_text("the user's")
    (tmp_path / "a_file").write_text("the user's")
    for workdir in (foreign, tmp_path / "a_file"):
        for fresh in ([], ["--fresh"]):
            assert cli(["demo", "--workdir", str(workdir), "--quick", *fresh]) == 2
            assert DEMO_MARKER in capsys.readouterr().err
    assert (foreign / "records" / "keep.txt").read_text() == "the user's"
    assert (tmp_path / "a_file").read_text() == "the user's"
    assert sorted(os.listdir(foreign)) == ["records"]

    ours = tmp_path / "empty"
    ours.mkdir()
    claim_workdir(str(ours))  # an empty directory becomes the demo's
    (ours / "records").mkdir()
    claim_workdir(str(ours))  # a rerun keeps what an earlier demo made
    assert sorted(os.listdir(ours)) == [DEMO_MARKER, "records"]
    claim_workdir(str(ours), fresh=True)
    assert os.listdir(ours) == [DEMO_MARKER]
    claim_workdir(str(tmp_path / "new" / "demo"))
    assert os.listdir(tmp_path / "new" / "demo") == [DEMO_MARKER]
