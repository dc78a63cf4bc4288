"""The README's main job, `entityclip demo`, runs every stage (in its --quick smoke form)."""
import json
import os

from PIL import Image

from entityclip_jax.cli import main as cli


def test_quick_demo_runs_every_stage_and_leaves_real_artefacts(tmp_path, capsys):
    workdir = tmp_path / "demo"
    assert cli(["demo", "--workdir", str(workdir), "--quick"]) == 0
    printed = capsys.readouterr().out
    for row in ("| step 0 (no training) |", "| clip_finetune |", "| entityclip |", "export parity"):
        assert row in printed
    for name in ("step0", "clip_finetune", "entityclip"):
        metrics = json.loads((workdir / "results" / name / "retrieval.json").read_text())
        assert metrics["num_texts"] == 32 and 0 <= metrics["i2t"]["R@10"] <= 100
    for png in ("results/entityclip/retrieval.png", "results/attention.png",
                "results/classification/classification.png"):
        with Image.open(workdir / png) as image:
            assert image.size[0] > 200, png
    assert {"config.json", "model.safetensors", "vocab.json"} <= set(os.listdir(workdir / "hf_export"))
    cache = [json.loads(line) for line in open(workdir / "explanations.jsonl")]
    assert len(cache) == 96 + 32 + 32 + 6 and all(r["status"] == "ok" for r in cache)
