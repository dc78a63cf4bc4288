"""The training loop end to end on 8 fake CPU devices, from TFRecords of the
synthetic entity dataset: it learns (loss down, validation recall up from the
zero-shot numbers), resumes after SIGKILL exactly where an uninterrupted run
goes, saves on SIGTERM, and stops on NaN keeping the last good checkpoint."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from entityclip_jax import cli
from entityclip_jax.checkpoints.towers import load_towers
from entityclip_jax.config import load_config
from entityclip_jax.errors import EntityClipError
from entityclip_jax.checkpoints import run as ckpt
from entityclip_jax.parallel import sharding
from entityclip_jax.parallel.mesh import make_mesh
from entityclip_jax.train import chips, input_stream, loop, setup
from tests._child_process import child_env
from tests._tiny_training import write_tiny_records

ROOT = pathlib.Path(__file__).parents[1]
STEPS = 32  # 4 epochs of 8 batches of 32


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return write_tiny_records(tmp_path_factory.mktemp("synthetic"), num_train=256, num_val=64)


def overrides(records, **extra):
    data_dir, vocab_size, eos_id = records
    values = {"data.dir": data_dir, "model.vocab_size": vocab_size, "model.eos_token_id": eos_id,
              "num_epochs": 4, "checkpoint.every_steps": 8, "checkpoint.async_save": True,
              "eval.every_steps": 16, **extra}
    return [f"--config.{key}={value}" for key, value in values.items()]


def read_metrics(workdir):
    records = loop.read_metrics(workdir)
    train = {r["step"]: r for r in records if "loss" in r}
    val = {r["step"]: r for r in records if "val/vtc_loss" in r}
    return train, val


@pytest.fixture(scope="module")
def reference_run(records, tmp_path_factory):
    """An uninterrupted run, in this process, with a profiler window over steps 3 and 4."""
    workdir = tmp_path_factory.mktemp("reference")
    config = load_config(str(ROOT / "configs" / "tiny_cpu.py"),
                         overrides(records, **{"profile.first_step": 3, "profile.num_steps": 2}))
    summary = loop.train(config, str(workdir))
    return workdir, summary


@pytest.mark.slow  # a real training run
def test_tiny_entityclip_learns_from_tfrecords_on_8_devices(reference_run):
    assert len(jax.devices()) == 8
    workdir, summary = reference_run
    train, val = read_metrics(workdir)
    assert sorted(train) == list(range(1, STEPS + 1)) and sorted(val) == [0, 16, 32]
    first = np.mean([train[s]["loss"] for s in (1, 2, 3, 4)])
    last = np.mean([train[s]["loss"] for s in (29, 30, 31, 32)])
    assert last < first - 0.5, (first, last)
    zero_shot, final = summary["zero_shot"], summary["val"]
    assert val[0]["val/vtc_loss"] == pytest.approx(zero_shot["val/vtc_loss"])
    assert final["val/vtc_loss"] < zero_shot["val/vtc_loss"] - 0.5
    assert final["val/rsum"] > zero_shot["val/rsum"] + 50
    assert final["val/i2t_R@10"] > zero_shot["val/i2t_R@10"] and final["val/t2i_R@10"] > zero_shot["val/t2i_R@10"]
    # TensorBoard events and the run files beside the checkpoints
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
    with open(os.path.join(workdir, ckpt.TRAIN_CONFIG)) as f:
        saved_config = json.load(f)
    assert ckpt.read_towers_config(workdir).text.vocab_size == saved_config["model"]["vocab_size"] == 300
    assert summary["best_step"] in (16, 32)


@pytest.mark.slow  # a real training run
def test_progress_reports_the_compiled_steps_flops_and_the_profile_window_writes_a_trace(reference_run):
    workdir, _ = reference_run
    with open(os.path.join(workdir, loop.METRICS_FILE)) as f:
        perf = {r["step"]: r for r in map(json.loads, f) if "perf/examples_per_s" in r}
    assert sorted(perf) == list(range(5, STEPS + 1, 5)) + [STEPS]  # every progress line (log.every_steps 5)
    # TFLOP/s per chip = the compiled step's FLOPs per chip x steps per second: one constant ratio
    flops = [r["perf/tflops_per_chip"] * 1e12 * 32 / r["perf/examples_per_s"] for r in perf.values()]
    assert max(flops) == pytest.approx(min(flops), rel=1e-9) and 1e7 < flops[0] < 1e10
    assert not any("perf/mfu" in r for r in perf.values())  # a CPU has no peak to hold it against (train/chips.py)
    traces = list((pathlib.Path(workdir) / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_mfu_is_the_achieved_flops_over_the_chips_peak(tmp_path):
    log = loop._MetricsLog(str(tmp_path), total_steps=10, global_batch=8, resumed_step=0)
    log.flops_per_step, log.chip = 3e12, chips.chip("TPU v5 lite")
    log.mark = (time.time() - 2.0, 0)
    perf = log.throughput(4)  # 4 steps of 3 TFLOP in about 2 s
    assert perf["perf/tflops_per_chip"] == pytest.approx(6.0, rel=0.05)
    assert perf["perf/mfu"] == pytest.approx(6e12 / 197e12, rel=0.05)
    log.close()


@pytest.mark.slow  # kill and resume
def test_resume_after_sigkill_matches_the_uninterrupted_run(records, reference_run, tmp_path):
    reference_dir, _ = reference_run
    workdir = tmp_path / "killed"
    env = child_env(devices=8)  # as the in-process reference run
    # Validation never touches the train state or the data order: leave it out here to save time.
    command = [sys.executable, "-m", "entityclip_jax.cli", "train", "--config", str(ROOT / "configs" / "tiny_cpu.py"),
               "--workdir", str(workdir), *overrides(records, **{"eval.every_steps": 0})]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_checkpoint = workdir / "checkpoints" / "8"
    deadline = time.time() + 900
    while not first_checkpoint.is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.kill()
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-3000:]
    assert not (workdir / "checkpoints" / str(STEPS)).exists()  # killed mid-run

    resumed = subprocess.run(command, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    train, _ = read_metrics(workdir)
    reference_train, _ = read_metrics(reference_dir)
    assert sorted(train) == sorted(reference_train) == list(range(1, STEPS + 1))
    for step in train:
        for name, value in reference_train[step].items():
            if not name.startswith("perf/"):  # throughput: measured, not reproduced
                assert train[step][name] == pytest.approx(value, abs=1e-6), (step, name)
    _, towers = load_towers(str(workdir / "checkpoints" / str(STEPS)))
    _, reference_towers = load_towers(str(reference_dir / "checkpoints" / str(STEPS)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), towers, reference_towers)


@pytest.mark.slow  # kill and resume
def test_sigterm_saves_and_nan_stops_keeping_the_last_good_checkpoint(records, tmp_path, monkeypatch):
    config = load_config(str(ROOT / "configs" / "tiny_cpu.py"), overrides(
        records, **{"model.mode": "clip_finetune", "num_train_steps": 8, "checkpoint.every_steps": 2,
                    "log.every_steps": 4, "eval.every_steps": 0, "checkpoint.async_save": False}))
    events, fetched_at = {}, []
    real_compile, real_fetch = setup.TrainProgram.compile, loop.fetch_metrics

    def compile_step(*args, **kwargs):
        real = real_compile(*args, **kwargs)

        def step(state, batch):
            state, metrics = real(state, batch)
            done = int(state.step)
            if done == events.get("sigterm_at"):
                os.kill(os.getpid(), signal.SIGTERM)  # what a TPU preemption sends
            if done == events.get("nan_at"):
                metrics = dict(metrics, loss=jax.numpy.float32("nan"))
            return state, metrics
        step.cost_analysis = real.cost_analysis
        return step

    def fetch_metrics(pending):  # the only place the host waits for the devices
        fetched_at.append(pending[-1][0])
        return real_fetch(pending)
    monkeypatch.setattr(setup.TrainProgram, "compile", compile_step)
    monkeypatch.setattr(loop, "fetch_metrics", fetch_metrics)

    events["sigterm_at"] = 3
    summary = loop.train(config, str(tmp_path))
    assert summary["preempted"] and summary["step"] == 3
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]
    assert fetched_at == [2, 3]  # a save, the preemption save: no wait at step 1

    # NaN at step 5, between the log steps 4 and 8: found before step 6 is saved
    events.update(sigterm_at=None, nan_at=5)
    fetched_at.clear()
    with pytest.raises(EntityClipError, match="diverged at step 5.*last good checkpoint is step 4"):
        loop.train(config, str(tmp_path))
    assert fetched_at == [4, 6]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "4"]  # keep=2; the bad steps never saved
    train, _ = read_metrics(tmp_path)
    assert sorted(train) == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in train.values())


def test_batches_are_put_on_the_devices_ahead_in_order():
    mesh = make_mesh((("data", -1),))
    taken = []

    def host_batches():
        for i in range(5):
            taken.append(i)
            yield {"x": np.full((8, 2), i, np.float32)}
    batches = input_stream.device_batches(host_batches(), mesh, prefetch=2)
    first = next(batches)
    assert taken == [0, 1, 2]  # two more already on their way to the devices
    assert first["x"].sharding.spec == sharding.batch_spec(mesh, 2)
    rest = list(batches)
    assert [int(b["x"][0, 0]) for b in [first, *rest]] == [0, 1, 2, 3, 4]
    assert [int(b["x"][0, 0]) for b in input_stream.device_batches(host_batches(), mesh, prefetch=0)] == [0, 1, 2, 3, 4]


def test_train_command_reports_bad_overrides(tmp_path, capsys):
    code = cli.main(["train", "--config", str(ROOT / "configs" / "tiny_cpu.py"), "--workdir", str(tmp_path),
                     "--config.optimizer.lr=1"])
    assert code == 2 and "optimizer.lr" in capsys.readouterr().err


B32, B16 = "openai/clip-vit-base-patch32", "openai/clip-vit-base-patch16"  # pretrained, by hub id


@pytest.mark.parametrize("spec, init, lr", [("n24news.py", B32, 1e-5), ("n24news.py:b16", B16, 1e-5),
                                            ("visualnews.py", B32, 1e-5), ("goodnews.py:b16", B16, 5e-6)])
def test_release_configs(spec, init, lr):
    config = load_config(str(ROOT / "configs" / spec))
    assert (config.model.init, config.optimizer.learning_rate) == (init, lr)
    assert (config.batch_size, config.num_epochs, config.seed, config.optimizer.name) == (192, 20, 42, "adam")
    assert (config.optimizer.schedule, config.optimizer.warmup_steps, config.optimizer.weight_decay) == ("cosine", 0, 0)
    assert (config.heads.itm_weight, config.heads.expert_vtc_weight) == (0.1, 0.1)
    assert (config.checkpoint.best_metric, config.checkpoint.best_mode) == ("val/vtc_loss", "min")


def test_missing_config_file_is_refused(tmp_path):
    with pytest.raises(EntityClipError, match="does not exist"):
        load_config(str(tmp_path / "nope.py"))


def test_a_new_run_starts_only_where_nothing_but_a_run_was_written(tmp_path):
    """A run's files must not land among someone else's (records, an export, towers) and replace
    theirs; a run that stopped before its first checkpoint, or one with a config, is ours."""
    assert loop._check_workdir_is_a_run(str(tmp_path / "new")) is None  # missing: created later
    started = tmp_path / "started"  # stopped before its first checkpoint: the lease, run files, events
    (started / "configs").mkdir(parents=True)
    for name in ("train_lease.json", "towers_config.json", "run_tokenizer.json", "events.out.tfevents.1.vm",
                 ".nfs0001", "metrics.jsonl"):
        (started / name).write_text("{}")
    assert loop._check_workdir_is_a_run(str(started)) is None
    export = tmp_path / "export"
    export.mkdir()
    for name in ("config.json", "model.safetensors", "run_tokenizer.json"):
        (export / name).write_text("{}")
    with pytest.raises(EntityClipError, match=r"holds files no training run writes \(config.json, "
                                              r"model.safetensors\) and no train_config.json"):
        loop._check_workdir_is_a_run(str(export))
    (export / "train_config.json").write_text("{}")  # a run of ours, with the user's notes beside it
    assert loop._check_workdir_is_a_run(str(export)) is None
