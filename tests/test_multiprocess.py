"""Training as two JAX processes on this machine, as on a two-host pod: each
process is `entityclip train`, joined through jax.distributed on a loopback
coordinator (gloo collectives between processes).

The reference is a 1-process, 8-device run in this pytest process fed the same
global batches: the concatenation of both processes' shares of the shards, in
process order. Equal losses step by step therefore say that each process read
only its own share and that the loss saw the whole global batch; the rerun after
SIGTERM resuming at the saved step, with equal losses after it and equal final
parameters, says both processes wrote and restored it.

Devices per process: 4 in the run compared with the reference, so the two processes
hold its 8 as a pod's hosts hold several chips each. One in the kill -9 and Ctrl-C
tests, which are about the coordination service: it compiles faster and keeps them
off XLA:CPU's in-process rendezvous of several devices, which deadlocked in the cache
finding below. In one CI run both processes of the kill -9 test (then with 4 devices)
aborted before their first checkpoint, about 300 s after they started; why is not
known, as pytest cut their output (wait_for now prints each one's last lines). The earlier
finding that several CPU devices per process corrupt cross-process collectives
(runs parting at a random step by 1e-4..1e-2, or gloo's "collective mismatch")
came from JAX's persistent compilation cache, which these tests then set: with 4
CPU devices per process, 5 of 5 runs that loaded the step from the cache parted
from the reference (from step 6..12 on, by 5e-3..0.13), while 7 of 7 runs that
compiled it (the run that filled the cache among them) matched it to 5e-7 (jax
0.10.2; no gloo mismatch in either). So no cache here, and train switches it off
on CPU whenever a process has several devices (train/compilation_cache.py).
"""
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from entityclip_jax.checkpoints.towers import load_towers
from entityclip_jax.config import load_config
from entityclip_jax.train import input_stream, loop
from tests._child_process import child_env
from tests._tiny_training import write_tiny_records

ROOT = pathlib.Path(__file__).parents[1]
CONFIG = str(ROOT / "configs" / "tiny_cpu.py")
PROCESSES = 2
STEPS = 24  # room for the SIGTERM to land mid-run on a busy machine

pytestmark = [pytest.mark.slow, pytest.mark.serial]  # several JAX processes, waiting on each other


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    # 2 train shards of 64: one per process
    return write_tiny_records(tmp_path_factory.mktemp("synthetic"), num_train=128, num_val=16)


def settings(records, **extra):
    data_dir, vocab_size, eos_id = records
    # Plain CLIP fine-tuning: the global-batch contrastive loss at half the compile time of EntityCLIP.
    # Adam with eps=1 moves parameters in proportion to their gradients: with the default eps a
    # near-zero gradient becomes a learning-rate-sized step whose sign is float round-off (the
    # cross-process reduction sums in another order), which no tolerance could compare.
    values = {"data.dir": data_dir, "model.vocab_size": vocab_size, "model.eos_token_id": eos_id,
              "model.mode": "clip_finetune", "optimizer.eps": 1.0, "optimizer.learning_rate": 0.01,
              "num_train_steps": STEPS, "checkpoint.every_steps": 4, "checkpoint.async_save": False,
              "eval.every_steps": 0, "log.every_steps": 3, **extra}
    return [f"--config.{key}={value}" for key, value in values.items()]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir, overrides, port, heartbeat=100, local_devices=4):
    """The same `entityclip train` command on every process, as on a pod (local_devices: see above)."""
    env = child_env(devices=local_devices)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    processes = []
    for index in range(PROCESSES):
        command = [sys.executable, "-m", "entityclip_jax.cli", "train", "--config", CONFIG, "--workdir", str(workdir),
                   *overrides, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                   f"--config.distributed.num_processes={PROCESSES}", f"--config.distributed.process_id={index}",
                   f"--config.distributed.heartbeat_timeout_seconds={heartbeat}"]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
    return processes


def finish(processes, timeout=600):
    outputs = []
    for process in processes:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
        outputs.append((process.returncode, stdout, stderr))
    return outputs


def wait_for(path, processes, timeout=600):
    began = time.time()
    while not path.exists():
        if time.time() > began + timeout or any(p.poll() is not None for p in processes):
            waited = time.time() - began
            time.sleep(2)  # the others' last words, when one process's end is taking them down
            for p in processes:
                p.kill()
            pytest.fail(f"{path.name} of {path.parent} not written after {waited:.0f} s\n" + tails(finish(processes)))
        time.sleep(0.05)


def tails(outputs, chars=4000):
    """Each process's status and the end of its stderr without C++ stack frames, as a string
    (pytest cuts a long repr; an abort's stack would push out the line saying why)."""
    def said(stderr):
        return "\n".join(line for line in stderr.splitlines() if not line.lstrip().startswith("@ "))[-chars:]
    return "\n".join(f"--- process {index}: status {code}, stderr ends:\n{said(stderr)}"
                     for index, (code, _, stderr) in enumerate(outputs))


def metrics(workdir):
    return loop.read_metrics(workdir)


@pytest.fixture(scope="module")
def reference(records, tmp_path_factory):
    """1 process, 8 devices, each global batch = process 0's share then process 1's."""
    workdir = tmp_path_factory.mktemp("one_process")
    real = input_stream.host_batches

    def both_shares(config, image_size, start_step, steps_in_epoch, process_index, process_count):
        assert (process_index, process_count) == (0, 1)
        shares = [real(config, image_size, start_step, steps_in_epoch, i, PROCESSES) for i in range(PROCESSES)]
        while True:
            parts = [next(share) for share in shares]
            yield {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(input_stream, "host_batches", both_shares)
        loop.train(load_config(CONFIG, settings(records)), str(workdir))
    return workdir


def test_two_processes_match_one_process_stop_together_on_sigterm_and_resume(records, reference, tmp_path):
    began = time.time()
    workdir = tmp_path / "run"
    overrides = settings(records)
    processes = start(workdir, overrides, free_port())
    wait_for(workdir / "checkpoints" / "4" / "_CHECKPOINT_METADATA", processes)
    for process in processes:  # a preemption notice reaches every host
        process.send_signal(signal.SIGTERM)
    stopped = []
    for code, stdout, stderr in finish(processes):
        assert code == 75, stderr[-3000:]  # stopped early, saved: rerun to resume
        stopped += [int(s) for s in re.findall(r"SIGTERM \(preemption\): stopped at step (\d+)", stdout)]
    assert len(stopped) == PROCESSES and len(set(stopped)) == 1, stopped
    step = stopped[0]
    assert 4 < step < STEPS, step  # stopped mid-run, after the first periodic checkpoint
    saved = sorted(int(s) for s in os.listdir(workdir / "checkpoints"))
    assert saved[-1] == step and all(s % 4 == 0 for s in saved[:-1]), saved  # periodic ones, then the stop
    assert [r["step"] for r in metrics(workdir)] == list(range(1, step + 1))  # process 0 writes, once

    # The global-batch loss, step by step, up to the preemption: each process read its own share
    # and the loss saw the whole batch.
    rows, expected = metrics(workdir), metrics(reference)
    for row, want in zip(rows, expected[:step]):
        assert row["loss"] == pytest.approx(want["loss"], abs=1e-5), row["step"]

    resumed = finish(start(workdir, overrides, free_port()), timeout=300)
    for code, _, stderr in resumed:
        assert code == 0, stderr[-3000:]
    progress = [int(s) for s in re.findall(rf"^step (\d+)/{STEPS} ", resumed[0][1], re.MULTILINE)]
    assert progress == [s for s in range(step + 1, STEPS + 1) if s % 3 == 0]  # went on from the checkpoint
    rows = metrics(workdir)
    assert [r["step"] for r in rows] == [r["step"] for r in expected] == list(range(1, STEPS + 1))
    for row, want in zip(rows, expected):  # the resumed steps too
        assert row["loss"] == pytest.approx(want["loss"], abs=1e-5), (row["step"], f"resumed at {step}")
    # Saved by both processes, restored by both, trained on: the parameters of the 1-process run.
    _, towers = load_towers(str(workdir / "checkpoints" / str(STEPS)))
    _, want_towers = load_towers(str(reference / "checkpoints" / str(STEPS)))
    for (path, leaf), want_leaf in zip(jax.tree_util.tree_flatten_with_path(towers)[0], jax.tree.leaves(want_towers)):
        np.testing.assert_allclose(leaf, want_leaf, rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    print(f"two processes, SIGTERM and resume: {time.time() - began:.1f} s")


def test_a_killed_process_ends_the_others_with_an_error(records, tmp_path):
    began = time.time()
    workdir = tmp_path / "run"
    # One device each: what is tested is the coordination service, not the collectives.
    processes = start(workdir, settings(records), free_port(), heartbeat=10, local_devices=1)
    wait_for(workdir / "checkpoints" / "4" / "_CHECKPOINT_METADATA", processes)
    processes[1].kill()
    killed = time.time()
    code, _, stderr = finish(processes[:1], timeout=60)[0]
    assert code != 0 and "JAX distributed service detected fatal errors" in stderr, stderr[-3000:]
    processes[1].wait()
    print(f"kill -9: the other process ended {time.time() - killed:.1f} s later; test {time.time() - began:.1f} s")


def test_ctrl_c_on_one_process_stops_both_at_one_step_with_status_75(records, tmp_path):
    """Ctrl-C reaches the process it was typed at: that one hands it to XLA's preemption notifier as a
    SIGTERM to itself, so the other process stops at the same step and both save it."""
    workdir = tmp_path / "run"
    processes = start(workdir, settings(records), free_port(), local_devices=1)
    wait_for(workdir / "checkpoints" / "4" / "_CHECKPOINT_METADATA", processes)
    processes[0].send_signal(signal.SIGINT)
    outputs = finish(processes)
    for code, _, stderr in outputs:
        assert code == 75 and "Traceback" not in stderr, stderr[-3000:]
    reasons = [re.search(r"process \d: (.*): stopped at step (\d+)", stdout).groups() for _, stdout, _ in outputs]
    assert reasons[0][0] == "SIGINT (Ctrl-C)" and reasons[1][0] == "SIGTERM (preemption)", reasons
    assert reasons[0][1] == reasons[1][1] and (workdir / "checkpoints" / reasons[0][1]).is_dir(), reasons
