"""Time to the first batch of a run resumed late in an epoch: the consumed batches
skipped after the map that decodes them (before) vs as serialized records, before
that map (after: train/input_stream.host_batches, pipeline.make_dataset's skip_batches).

--records examples written as in bench_pipeline.py (real photos re-encoded as
640x480 JPEGs), the training stream at --batch examples per batch (one process,
train mode, the default preprocessing), resumed at batch --resume-at of its epoch.
Each side builds its stream and takes one batch; the two sides alternate over
--rounds rounds (the order reversed every other round). Prints one JSON line per
figure: seconds to the first batch per side and the before/after ratio, median and
min-max spread over the rounds.

    python benchmarks/bench_resume.py [--records 10000] [--batch 64] [--resume-at 150] [--rounds 3]
"""
import argparse
import os
import pathlib
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests._tiny_training: the config
from bench_pipeline import write_records  # noqa: E402
from rounds import alternate, emit, ratio, spread  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def first_batch_before(config, image_size, resume_at, steps_in_epoch):
    """The stream as host_batches built it before: every image decoded, then the consumed batches dropped."""
    from entityclip_jax.data import pipeline
    from entityclip_jax.train.input_stream import epoch_seed
    ds = pipeline.make_dataset(config.data.dir, "train", batch_size=config.batch_size, image_size=image_size,
                               train=True, seed=epoch_seed(config.seed, 0), process_index=0, process_count=1,
                               shuffle_buffer=config.data.shuffle_buffer, random_crop=config.data.random_crop,
                               normalize_on_host=config.data.normalize_on_host, dct_scaling=config.data.dct_scaling)
    return next(pipeline.numpy_batches(ds.skip(resume_at).take(steps_in_epoch - resume_at)))


def first_batch_after(config, image_size, resume_at, steps_in_epoch):
    from entityclip_jax.train import input_stream
    return next(input_stream.host_batches(config, image_size, resume_at, steps_in_epoch, 0, 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--resume-at", type=int, default=150, help="batch of the epoch the run resumes at")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import numpy as np
    from entityclip_jax.train import input_stream
    from tests._tiny_training import tiny_config
    cores = len(os.sched_getaffinity(0))
    print(f"# machine: {cores} CPU cores available, load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        config = tiny_config(**{"data.dir": str(write_records(tmp, args.records)), "batch_size": args.batch,
                                "data.shuffle_buffer": 4096})
        steps_in_epoch = input_stream.steps_per_epoch(config)
        if not 0 < args.resume_at < steps_in_epoch:
            raise SystemExit(f"--resume-at must be in 1..{steps_in_epoch - 1} (the epoch's batches)")
        firsts = {}

        def side(name, fn):
            return lambda: firsts.setdefault(name, []).append(fn(config, args.image_size, args.resume_at,
                                                                 steps_in_epoch))
        seconds = alternate({"before": side("before", first_batch_before),
                             "after": side("after", first_batch_after)}, args.rounds)
        same = all(np.array_equal(a[k], b[k]) for a, b in zip(firsts["before"], firsts["after"]) for k in a)
        emit("resume_seconds_to_first_batch", records=args.records, batch=args.batch, resume_at=args.resume_at,
             steps_per_epoch=steps_in_epoch, image_size=args.image_size, rounds=args.rounds, cores=cores,
             before_s=spread(seconds["before"]), after_s=spread(seconds["after"]),
             before_over_after=ratio(seconds["before"], seconds["after"]), same_first_batch=same,
             load_average=os.getloadavg()[0])


if __name__ == "__main__":
    main()
