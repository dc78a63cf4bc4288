"""Resuming a run end to end: a changed config is refused (or accepted with
--allow-config-change, logged and kept in the history), a damaged latest step is
skipped for the one before it, records written with another tokenizer are refused
before any step or metric, and an unwritable workdir fails before any step."""
import dataclasses
import json
import logging
import os
import pathlib
import shutil

import pytest

from entityclip_jax import cli
from entityclip_jax.config import load_config
from entityclip_jax.errors import EntityClipError
from entityclip_jax.checkpoints import run as ckpt
from entityclip_jax.checkpoints import run_config, run_tokenizer
from entityclip_jax.train import loop
from tests._tiny_training import write_tiny_records
from tests.test_checkpoint_integrity import flip_low_bit

ROOT = pathlib.Path(__file__).parents[1]
CONFIG = str(ROOT / "configs" / "tiny_cpu.py")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return write_tiny_records(tmp_path_factory.mktemp("synthetic"), num_train=64, num_val=16)


def settings(records, **extra):
    data_dir, vocab_size, eos_id = records
    return {"data.dir": data_dir, "model.vocab_size": vocab_size, "model.eos_token_id": eos_id,
            "model.mode": "clip_finetune", "batch_size": 16, "num_train_steps": 4, "checkpoint.every_steps": 2,
            "checkpoint.keep": 3, "checkpoint.async_save": False, "eval.every_steps": 0,
            "optimizer.warmup_steps": 1, **extra}


def overrides(records, **extra):
    return [f"--config.{key}={value}" for key, value in settings(records, **extra).items()]


def config(records, **extra):
    return load_config(CONFIG, overrides(records, **extra))


def trained_steps(workdir):
    return [record["step"] for record in loop.read_metrics(workdir)]


@pytest.fixture(scope="module")
def finished_run(records, tmp_path_factory):
    """A 4-step run with checkpoints at 2 and 4."""
    workdir = tmp_path_factory.mktemp("finished")
    loop.train(config(records), str(workdir))
    return workdir


@pytest.fixture
def run(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


@pytest.mark.slow  # trains on after each change
def test_a_changed_config_is_refused_then_accepted_logged_and_kept(records, run, caplog, capsys):
    saved = (run / ckpt.TRAIN_CONFIG).read_text()
    changed = config(records, **{"optimizer.learning_rate": 2e-3, "num_train_steps": 6, "log.every_steps": 3})
    with pytest.raises(EntityClipError, match=r"trained with: num_train_steps 4 -> 6; optimizer.learning_rate "
                                              r"0.001 -> 0.002\. .*--allow-config-change"):
        loop.train(changed, str(run))
    assert (run / ckpt.TRAIN_CONFIG).read_text() == saved and trained_steps(run) == [1, 2, 3, 4]

    with caplog.at_level(logging.WARNING, logger=run_config.__name__):
        summary = loop.train(changed, str(run), allow_config_change=True)
    assert summary["step"] == 6 and trained_steps(run) == [1, 2, 3, 4, 5, 6]
    assert "resumed from step 4" in capsys.readouterr().out
    accepted = [r.getMessage() for r in caplog.records if r.name == run_config.__name__]
    assert len(accepted) == 3 and "log.every_steps 5 -> 3 (accepted: it does not change" in accepted[0]
    assert "optimizer.learning_rate 0.001 -> 0.002 (accepted: --allow-config-change)" in accepted[2]
    current = json.loads((run / ckpt.TRAIN_CONFIG).read_text())
    assert (current["optimizer"]["learning_rate"], current["num_train_steps"]) == (2e-3, 6)
    history = sorted(os.listdir(run / run_config.HISTORY))
    assert history == ["train_config.0.json", "train_config.4.json"]
    assert json.loads((run / run_config.HISTORY / "train_config.0.json").read_text()) == json.loads(saved)
    assert (run / run_config.HISTORY / "train_config.4.json").read_text() == (run / ckpt.TRAIN_CONFIG).read_text()


def test_harmless_changes_are_accepted_without_the_flag(records, tmp_path, caplog, capsys):
    """An older run without configs/ keeps its first config in the history."""
    (tmp_path / ckpt.TRAIN_CONFIG).write_text(config(records).to_json())
    harmless = config(records, **{"checkpoint.every_steps": 7, "eval.batch_size": 8,
                                  "mesh": (("data", 4), ("fsdp", 2))})
    with caplog.at_level(logging.WARNING, logger=run_config.__name__):
        run_config.accept_resume_config(str(tmp_path), harmless, 12)
    assert capsys.readouterr().out == "resumed from step 12\n"
    assert [r.getMessage().split(" (")[0] for r in caplog.records if r.name == run_config.__name__] == [
        "resuming with a changed config: checkpoint.every_steps 2 -> 7", "resuming with a changed config: "
        "eval.batch_size 64 -> 8", "resuming with a changed config: mesh [['data', -1], ['fsdp', 1]] -> "
        "[['data', 4], ['fsdp', 2]]"]
    assert sorted(os.listdir(tmp_path / run_config.HISTORY)) == ["train_config.0.json", "train_config.12.json"]
    for meaningful in ({"heads.num_text_experts": 3}, {"seed": 1}, {"data.dir": "elsewhere"},
                       {"optimizer.schedule": "constant"}, {"num_epochs": 3}):
        with pytest.raises(EntityClipError, match=f"trained with: {next(iter(meaningful))} "):
            run_config.accept_resume_config(str(tmp_path), config(records, **meaningful), 12)


@pytest.mark.slow  # trains again after the damage
def test_the_cli_resumes_from_the_step_before_a_damaged_latest_one(records, run, capsys, caplog):
    flip_low_bit(run, 4)
    command = ["train", "--config", CONFIG, "--workdir", str(run), *overrides(records)]
    with caplog.at_level(logging.WARNING, logger=ckpt.__name__):
        assert cli.main(command) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    damaged = [r.getMessage() for r in caplog.records if "damaged checkpoint" in r.getMessage()]
    assert len(damaged) == 1 and "checkpoints/4: " in damaged[0] and "\n" not in damaged[0], damaged
    assert trained_steps(run) == [1, 2, 3, 4]  # steps 3 and 4 trained again
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]
    assert [name.split("-")[0] for name in os.listdir(run / ckpt.DAMAGED)] == ["4"]

    for step in (2, 4):
        flip_low_bit(run, step)
    assert cli.main(command) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("entityclip train: error: no intact checkpoint in"), err


def test_records_of_another_tokenizer_are_refused_before_any_step(records, run, tmp_path):
    data_dir, vocab_size, eos_id = records
    text = ckpt.read_towers_config(run).text
    with pytest.raises(EntityClipError, match=f"outside the model's vocabulary of {vocab_size - 50}"):
        run_tokenizer.check_records_fit_model(data_dir, ["train"], dataclasses.replace(
            text, vocab_size=vocab_size - 50))
    with pytest.raises(EntityClipError, match=f"ends its texts with token id {eos_id}, the model's end-of-text id "
                                              f"is {eos_id + 1}"):
        run_tokenizer.check_records_fit_model(data_dir, ["val"], dataclasses.replace(text, eos_token_id=eos_id + 1))
    with pytest.raises(EntityClipError, match="texts of 77 tokens, the model has 16 positions"):
        run_tokenizer.check_records_fit_model(data_dir, [], dataclasses.replace(text, max_position_embeddings=16))
    run_tokenizer.check_records_fit_model(data_dir, ["train", "val"], text)

    recorded = json.loads((run / run_tokenizer.RUN_TOKENIZER).read_text())
    assert recorded == {"tokenizer_fingerprint": recorded["tokenizer_fingerprint"], "context_length": 77,
                        "vocab_size": vocab_size, "eos_token_id": eos_id}
    # the same token ids, but the meta says another tokenizer wrote them
    other = tmp_path / "other_records"
    shutil.copytree(records[0], other)
    meta = json.loads((other / "entityclip_meta.json").read_text())
    meta["tokenizer_fingerprint"] = "another"
    (other / "entityclip_meta.json").write_text(json.dumps(meta))
    with pytest.raises(EntityClipError, match="was written with tokenizer_fingerprint 'another'"):
        loop.train(config(records, **{"data.dir": str(other), "num_train_steps": 6}), str(run),
                   allow_config_change=True)
    assert trained_steps(run) == [1, 2, 3, 4]

    # eval of the run against those records is refused too; its export carries what it trained on
    assert cli.main(["eval", "--checkpoint", str(run), "--data", str(other), "--split", "val",
                     "--out", str(tmp_path / "eval")]) == 2
    assert not (tmp_path / "eval").exists()
    assert cli.main(["export-hf", str(run), str(tmp_path / "export"), "--no-verify"]) == 0
    assert json.loads((tmp_path / "export" / run_tokenizer.RUN_TOKENIZER).read_text()) == recorded


@pytest.mark.slow  # trains another run
def test_eval_refuses_towers_with_another_eot(records, tmp_path, capsys):
    import jax

    from entityclip_jax.models.clip import init_params
    from entityclip_jax.models.clip_config import PRESETS
    from entityclip_jax.checkpoints.towers import save_towers
    _, vocab_size, eos_id = records
    tiny = PRESETS["tiny"]
    clip = dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, vocab_size=vocab_size + 1,
                                                              eos_token_id=vocab_size))
    towers = save_towers(init_params(clip, jax.random.key(0)), clip, tmp_path / "towers")
    assert cli.main(["eval", "--checkpoint", str(towers), "--data", records[0], "--split", "val",
                     "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert f"ends its texts with token id {eos_id}, the model's end-of-text id is {vocab_size}" in err
    assert not (tmp_path / "eval").exists()


def test_an_unwritable_workdir_fails_before_any_step(records, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert cli.main(["train", "--config", CONFIG, "--workdir", str(tmp_path / "file" / "run"),
                     *overrides(records)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("entityclip train: error: cannot write to"), err
