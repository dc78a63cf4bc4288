"""The persistent compilation cache of training runs: which directory a run uses, switched
off where XLA:CPU is unsafe with it, and a resumed run (one CPU device) loading its step
from it instead of compiling it again."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import pytest

from entityclip_jax.errors import EntityClipError
from entityclip_jax.train import compilation_cache
from tests._child_process import child_env
from tests._tiny_training import tiny_config, write_tiny_records

ROOT = pathlib.Path(__file__).parents[1]


def test_auto_is_under_the_workdir_on_tpu_and_gpu_and_none_on_cpu():
    for platform in ("tpu", "gpu"):
        assert compilation_cache.choose("auto", "gs://bucket/run", platform, 4) == ("gs://bucket/run/compilation_cache", None)
        assert compilation_cache.choose("auto", "/w", platform, 8, jax_setting="/env") == ("/env", None)
    assert compilation_cache.choose("auto", "/w", "cpu", 1) == (None, None)
    assert compilation_cache.choose("auto", "/w", "cpu", 1, jax_setting="/env") == ("/env", None)
    assert compilation_cache.choose("", "/w", "tpu", 4, jax_setting="/env") == (None, None)
    assert compilation_cache.choose("gs://bucket/cache/", "/w", "tpu", 4) == ("gs://bucket/cache", None)
    assert compilation_cache.choose("/c", "/w", "cpu", 1) == ("/c", None)


def test_several_cpu_devices_in_a_process_switch_it_off_with_a_note():
    for setting, env in (("/c", None), ("auto", "/env")):
        directory, note = compilation_cache.choose(setting, "/w", "cpu", 8, jax_setting=env)
        assert directory is None and "switched off" in note and "8 CPU devices" in note and "\n" not in note
    assert compilation_cache.choose("", "/w", "cpu", 8) == (None, None)  # nothing asked, nothing said


def test_an_uncreatable_directory_is_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(jax, "local_device_count", lambda: 1)  # where the cache would be used
    with pytest.raises(EntityClipError, match="compilation_cache_dir .* cannot be created"):
        compilation_cache.use(tiny_config(compilation_cache_dir=str(blocker / "cache")), str(tmp_path))


# The trainer in a process of its own with ONE CPU device, counting the cache hits JAX logs.
COUNT_HITS = r'''
import json, logging, sys
from entityclip_jax import cli
hits = []
class Hits(logging.Handler):
    def emit(self, record):
        if "Persistent compilation cache hit" in record.getMessage():
            hits.append(record.args[0])
jax_log = logging.getLogger("jax")
jax_log.addHandler(Hits(level=logging.DEBUG))
jax_log.setLevel(logging.DEBUG)
jax_log.propagate = False  # JAX's debug lines stay out of the output
code = cli.main(sys.argv[1:])
print(json.dumps({"code": code, "hits": hits}))
'''


@pytest.mark.slow  # two training runs
def test_a_resumed_run_loads_its_step_from_the_cache(tmp_path):
    records, vocab_size, eos_id = write_tiny_records(tmp_path / "data", num_train=64, num_val=16)
    cache, workdir = tmp_path / "cache", tmp_path / "run"
    values = {"data.dir": records, "model.vocab_size": vocab_size, "model.eos_token_id": eos_id,
              "batch_size": 16, "num_train_steps": 40, "checkpoint.every_steps": 2, "checkpoint.async_save": False,
              "eval.every_steps": 0, "compilation_cache_dir": str(cache)}
    command = [sys.executable, "-c", COUNT_HITS, "train", "--config", str(ROOT / "configs" / "tiny_cpu.py"),
               "--workdir", str(workdir), *[f"--config.{key}={value}" for key, value in values.items()]]
    env = child_env()  # one CPU device: where the cache is used
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    with open(tmp_path / "first.out", "w") as out, open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
        deadline = time.time() + 600
        while not (workdir / "checkpoints" / "2" / "_CHECKPOINT_METADATA").exists():
            assert first.poll() is None and time.time() < deadline, (tmp_path / "first.err").read_text()[-3000:]
            time.sleep(0.05)
        first.send_signal(signal.SIGTERM)  # preempted: saves and stops
        first.wait(timeout=300)
    stdout, stderr = (tmp_path / "first.out").read_text(), (tmp_path / "first.err").read_text()
    assert "Traceback" not in stderr and "SIGTERM" in stdout, stderr[-3000:]
    assert json.loads(stdout.splitlines()[-1])["hits"] == []  # compiled, and written to the cache
    assert any(name.startswith("jit_train_step-") for name in os.listdir(cache)), os.listdir(cache)

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads(resumed.stdout.splitlines()[-1])
    assert "resumed from step" in resumed.stdout and result["code"] == 0
    assert "jit_train_step" in result["hits"], result["hits"]
