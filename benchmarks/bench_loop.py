"""Training-loop steps/s: the host waiting for every step (before) vs the loop of
train/loop.py (after: batches prefetched to the devices, metrics fetched only at
log steps).

The tiny config on the synthetic TFRecords (tests/_tiny_training.py), 8
simulated CPU devices by default, the same compiled step and the same tf.data
stream for both sides. The two sides alternate over --rounds rounds (which one
goes first alternates too); prints one JSON line per round and side, then one
with the median after/before ratio and its min-max spread.

    python benchmarks/bench_loop.py [--rounds 7] [--steps 24] [--log-every 50] [--prefetch 2]
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from entityclip_jax.checkpoints.model_init import init_entityclip  # noqa: E402
from entityclip_jax.data.pipeline import to_global_arrays  # noqa: E402
from entityclip_jax.parallel import sharding  # noqa: E402
from entityclip_jax.parallel.mesh import make_mesh  # noqa: E402
from entityclip_jax.train import input_stream, loop, optimizer  # noqa: E402
from entityclip_jax.train.state import abstract_state, create_train_state, state_specs  # noqa: E402
from entityclip_jax.train.step import make_train_step  # noqa: E402
from tests._tiny_training import tiny_config, write_tiny_records  # noqa: E402


def before(state, train_step, host, mesh, steps, _):
    """The old loop: each batch put on the devices when needed, each step's metrics fetched and checked."""
    for _ in range(steps):
        state, metrics = train_step(state, to_global_arrays(next(host), mesh, mesh.axis_names))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        assert all(np.isfinite(v) for v in metrics.values())
    return state


def after(state, train_step, batches, _, steps, log_every):
    """train/loop.py's: prefetched device batches, metrics fetched at log steps and at the end."""
    pending = []
    for i in range(1, steps + 1):
        state, metrics = train_step(state, next(batches))
        pending.append((i, metrics))
        if i % log_every == 0 or i == steps:
            rows, bad = loop.fetch_metrics(pending)
            assert bad is None and rows
            pending = []
    return state


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=24, help="steps per side per round (3 epochs of the data)")
    parser.add_argument("--log-every", type=int, default=50, help="log.every_steps of the after side")
    parser.add_argument("--prefetch", type=int, default=2, help="data.prefetch_to_device of the after side")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        records, vocab_size, eos_id = write_tiny_records(tmp, num_train=256, num_val=16)
        config = tiny_config(**{"data.dir": records, "model.vocab_size": vocab_size, "model.eos_token_id": eos_id,
                                "batch_size": args.batch})
        mesh = make_mesh(config.mesh)
        model, params = init_entityclip(jax.random.key(0), config)
        total = 10 ** 6
        tx = optimizer.make_optimizer(config.optimizer, total, params)
        shardings = sharding.to_shardings(state_specs(abstract_state(params, tx), mesh, config.sharding.rules,
                                                      config.sharding.fsdp_min_size), mesh)
        state = create_train_state(params, tx, shardings)
        steps_in_epoch = input_stream.steps_per_epoch(config)

        def host():
            return input_stream.host_batches(config, model.clip.vision.image_size, 0, steps_in_epoch, 0, 1)
        sides = {"before": (before, host()), "after": (after, input_stream.device_batches(host(), mesh, args.prefetch))}
        first = to_global_arrays(next(host()), mesh, mesh.axis_names)
        train_step = make_train_step(model, tx, optimizer.learning_rate_schedule(config.optimizer, total), mesh,
                                     shardings, sharding.batch_shardings(mesh, first), seed=0)
        for fn, stream in sides.values():  # compile, and run both tf.data streams through an epoch
            state = fn(state, train_step, stream, mesh, steps_in_epoch, args.log_every)
        jax.block_until_ready(state)

        rates = {name: [] for name in sides}
        for r in range(args.rounds):
            for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
                fn, stream = sides[name]
                start = time.perf_counter()
                state = jax.block_until_ready(fn(state, train_step, stream, mesh, args.steps, args.log_every))
                rates[name].append(args.steps / (time.perf_counter() - start))
                print(json.dumps({"round": r, "side": name, "steps_per_s": round(rates[name][-1], 3)}), flush=True)
        ratios = np.array(rates["after"]) / np.array(rates["before"])
        print(json.dumps({
            "figure": "after/before steps/s", "median": round(float(np.median(ratios)), 3),
            "min": round(float(ratios.min()), 3), "max": round(float(ratios.max()), 3),
            "before_steps_per_s": round(float(np.median(rates["before"])), 3),
            "after_steps_per_s": round(float(np.median(rates["after"])), 3),
            "rounds": args.rounds, "steps": args.steps, "batch": args.batch, "prefetch": args.prefetch,
            "log_every": args.log_every, "devices": jax.device_count(), "backend": jax.default_backend(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}), flush=True)


if __name__ == "__main__":
    main()
