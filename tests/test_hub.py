"""Checkpoints by Hugging Face hub id, offline, through a local hub cache laid out as
huggingface_hub lays it out (models--org--name/{refs,snapshots}); explicit random towers.

huggingface_hub reads HF_HOME / HF_HUB_OFFLINE into `huggingface_hub.constants` when it
is first imported, so in this process the test points constants.HF_HUB_CACHE at the
cache (conftest already set HF_HUB_OFFLINE=1); the subprocess test sets HF_HOME for real.
"""
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from entityclip_jax import cli
from entityclip_jax.checkpoints.model_init import describe_init, init_entityclip
from entityclip_jax.checkpoints.towers import load_towers
from entityclip_jax.config import random_preset
from entityclip_jax.errors import EntityClipError
from entityclip_jax.hub import resolve_checkpoint
from tests._child_process import child_env
from tests._tiny_training import tiny_config
from tests.conftest import tiny_hf_clip

ROOT = pathlib.Path(__file__).parents[1]
REPO = "tiny-org/tiny-clip"
MAIN, V2 = "a" * 40, "b" * 40  # commit hashes of two revisions


def _token_embedding(model):
    return model.text_model.embeddings.token_embedding.weight.detach().numpy()


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """HF_HOME with REPO at two revisions: main (seed 0) and tag v2 (seed 1)."""
    import torch
    home = tmp_path_factory.mktemp("hf_home")
    storage = home / "hub" / "models--tiny-org--tiny-clip"
    embeddings = {}
    for ref, commit, seed in [("main", MAIN, 0), ("v2", V2, 1)]:
        model = tiny_hf_clip(seed=seed)
        model.save_pretrained(storage / "snapshots" / commit)
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
        embeddings[ref] = _token_embedding(model)
    # A repo with PyTorch weights only (no safetensors), as older hub repos are.
    bin_storage = home / "hub" / "models--tiny-org--tiny-clip-bin"
    model = tiny_hf_clip(seed=2)
    model.config.save_pretrained(bin_storage / "snapshots" / MAIN)
    torch.save(model.state_dict(), bin_storage / "snapshots" / MAIN / "pytorch_model.bin")
    (bin_storage / "refs").mkdir()
    (bin_storage / "refs" / "main").write_text(MAIN)
    embeddings["bin"] = _token_embedding(model)
    return home, embeddings


@pytest.fixture
def offline_hub(hf_home, monkeypatch):
    from huggingface_hub import constants
    home, embeddings = hf_home
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return embeddings


def test_the_cache_is_laid_out_as_huggingface_hub_lays_it_out(hf_home):
    from huggingface_hub import scan_cache_dir
    home, _ = hf_home
    repos = {repo.repo_id: repo for repo in scan_cache_dir(home / "hub").repos}
    assert set(repos) == {REPO, f"{REPO}-bin"}
    assert {rev.commit_hash: set(rev.refs) for rev in repos[REPO].revisions} == {MAIN: {"main"}, V2: {"v2"}}


def test_load_towers_by_hub_id_and_revision(offline_hub):
    for spec, ref in [(REPO, "main"), (f"{REPO}@v2", "v2"), (f"{REPO}@{V2}", "v2"), (f"{REPO}-bin", "bin")]:
        config, params = load_towers(spec)
        assert config.projection_dim == 24 and float(params["logit_scale"]) == pytest.approx(3.1)
        np.testing.assert_array_equal(params["text_model"]["embeddings"]["token_embedding"]["embedding"],
                                      offline_hub[ref])
    assert not np.array_equal(offline_hub["main"], offline_hub["v2"])
    assert resolve_checkpoint(REPO).endswith(os.path.join("snapshots", MAIN))
    assert resolve_checkpoint(str(ROOT)) == str(ROOT)  # a local path stays a local path


def test_unknown_ids_offline_get_a_one_line_fix(offline_hub):
    for spec in ("tiny-org/not-cached", f"{REPO}@no-such-tag"):
        with pytest.raises(EntityClipError) as err:
            load_towers(spec)
        message = str(err.value)
        assert "\n" not in message and "HF_HUB_OFFLINE" in message and "local checkpoint path" in message
    with pytest.raises(EntityClipError, match="does not exist"):
        load_towers("missing_file.pt")  # a file name is never looked up on the hub


def test_training_init_by_hub_id(offline_hub):
    config = tiny_config(**{"model.init": f"{REPO}@v2", "model.vocab_size": None, "model.eos_token_id": None})
    model, params = init_entityclip(jax.random.key(0), config)
    assert model.clip.projection_dim == 24 and set(params) == {"clip", "heads"}
    np.testing.assert_array_equal(params["clip"]["text_model"]["embeddings"]["token_embedding"]["embedding"],
                                  offline_hub["v2"])
    assert describe_init(config.model.init) == f"towers: pretrained, from {REPO}@v2"


def test_import_hf_and_export_hf_by_hub_id(offline_hub, tmp_path, capsys):
    assert cli.main(["import-hf", REPO, str(tmp_path / "towers")]) == 0
    _, towers = load_towers(str(tmp_path / "towers"))
    np.testing.assert_array_equal(towers["text_model"]["embeddings"]["token_embedding"]["embedding"],
                                  offline_hub["main"])
    assert cli.main(["export-hf", f"{REPO}@v2", str(tmp_path / "hf"), "--no-verify"]) == 0
    from safetensors.numpy import load_file
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    np.testing.assert_array_equal(exported["text_model.embeddings.token_embedding.weight"], offline_hub["v2"])
    assert cli.main(["import-hf", "tiny-org/not-cached", str(tmp_path / "nope")]) != 0
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()


def test_import_hf_honours_hf_home_in_a_fresh_process(hf_home, tmp_path):
    home, embeddings = hf_home
    env = child_env(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    out = tmp_path / "towers"
    run = subprocess.run([sys.executable, "-m", "entityclip_jax.cli", "import-hf", f"{REPO}@v2", str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    _, towers = load_towers(str(out))
    np.testing.assert_array_equal(towers["text_model"]["embeddings"]["token_embedding"]["embedding"],
                                  embeddings["v2"])


def test_random_towers_must_be_explicit(capsys, monkeypatch, tmp_path):
    with pytest.raises(EntityClipError, match="random:vit-b-32.*openai/clip-vit-base-patch32"):
        random_preset("vit-b-32")
    with pytest.raises(EntityClipError, match="random:tiny"):
        init_entityclip(jax.random.key(0), tiny_config(**{"model.init": "tiny"}))
    with pytest.raises(EntityClipError, match="unknown architecture"):
        random_preset("random:vit-b-99")
    assert random_preset("random:tiny") == "tiny" and random_preset("openai/clip-vit-base-patch32") is None

    # A training run from random towers says so in its first line.
    from entityclip_jax.train import loop

    class Stop(Exception):
        pass

    def stop(*_):
        raise Stop
    monkeypatch.setattr(loop.input_stream, "steps_per_epoch", lambda *_: 1)
    monkeypatch.setattr(loop, "_check_data_fits", lambda *_: True)
    monkeypatch.setattr(loop.run_format, "write_run_files", stop)  # right after the first line
    with pytest.raises(Stop):
        loop.train(tiny_config(), str(tmp_path / "run"))
    first_line = capsys.readouterr().out.splitlines()[0]
    assert first_line.startswith("towers: RANDOM weights (random:tiny), not pretrained")
