"""Time from start to the first step of a resumed run, with JAX's persistent compilation
cache (config.compilation_cache_dir) and without it.

A run of --preset towers (random weights, EntityCLIP by default) on the synthetic TFRecords
is started, stopped by SIGTERM after its first checkpoint (a preemption), and kept as a
template; its first run also fills the cache. Each round copies the template and reruns the
same `entityclip train` command on the copy, which resumes; the time is from starting the
process to its first progress line (log.every_steps=1: the first resumed step has run and its
metrics are on the host), then the process is killed. The two sides (cache / no cache)
alternate over --rounds rounds, the order reversed every other round. One CPU device per
process: with several, the cache is off on CPU (train/compilation_cache.py). Prints one JSON
line: seconds per side and the no-cache/cache ratio, median and min-max spread.

    python benchmarks/bench_compile_cache.py [--preset vit-b-32] [--mode entityclip] [--batch 8] [--rounds 3]
"""
import argparse
import contextlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rounds import alternate, emit, ratio, spread  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
           XLA_FLAGS="--xla_force_host_platform_device_count=1", TF_CPP_MIN_LOG_LEVEL="2")
ENV.pop("JAX_COMPILATION_CACHE_DIR", None)


def train_command(workdir, records, vocab_size, eos_id, args, cache):
    values = {"data.dir": records, "model.vocab_size": vocab_size, "model.eos_token_id": eos_id,
              "model.init": f"random:{args.preset}", "model.mode": args.mode, "batch_size": args.batch,
              "num_train_steps": 1000, "checkpoint.every_steps": 1, "checkpoint.async_save": False,
              "eval.every_steps": 0, "log.every_steps": 1, "compilation_cache_dir": cache}
    return [sys.executable, "-m", "entityclip_jax.cli", "train", "--config", str(ROOT / "configs" / "tiny_cpu.py"),
            "--workdir", str(workdir), *[f"--config.{key}={value}" for key, value in values.items()]]


def seconds_to_first_step(command, stop):
    """Starts the command; returns the seconds until its first progress line, after `stop`(process)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               start_new_session=True)
    try:
        for line in process.stdout:
            if line.startswith("step "):
                seconds = time.perf_counter() - started
                stop(process)
                process.communicate(timeout=600)
                return seconds
        raise SystemExit(f"the run ended before its first step (exit {process.wait()}): {' '.join(command)}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vit-b-32", help="tower architecture (random weights)")
    parser.add_argument("--mode", default="entityclip", help="model.mode: entityclip or clip_finetune")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests._tiny_training import write_tiny_records
    print(f"# machine: {len(os.sched_getaffinity(0))} CPU cores, load average {os.getloadavg()[0]:.1f}",
          file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        with contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON line only
            records, vocab_size, eos_id = write_tiny_records(tmp / "data", num_train=64, num_val=16)
        cache, template = tmp / "cache", tmp / "template"

        def command(workdir, with_cache):
            return train_command(workdir, records, vocab_size, eos_id, args, str(cache) if with_cache else "")

        def preempt(process):  # the first step is done: SIGTERM saves it, as a preemption would
            process.send_signal(signal.SIGTERM)
        compile_s = seconds_to_first_step(command(template, True), preempt)  # compiles, fills the cache

        seconds = {"cache": [], "no_cache": []}

        def side(name):
            def resume():
                workdir = tmp / "resumed"
                shutil.rmtree(workdir, ignore_errors=True)
                shutil.copytree(template, workdir)
                seconds[name].append(seconds_to_first_step(command(workdir, name == "cache"),
                                                           lambda p: os.killpg(p.pid, signal.SIGKILL)))
            return resume
        alternate({name: side(name) for name in seconds}, args.rounds)  # the order; the times are ours
        emit("resume_seconds_to_first_step", preset=args.preset, mode=args.mode, batch=args.batch, devices=1,
             rounds=args.rounds, first_run_s=compile_s, cache_s=spread(seconds["cache"]),
             no_cache_s=spread(seconds["no_cache"]), no_cache_over_cache=ratio(seconds["no_cache"], seconds["cache"]),
             cache_entries=sorted(name.split("-")[0] for name in os.listdir(cache)),
             load_average=os.getloadavg()[0])


if __name__ == "__main__":
    main()
