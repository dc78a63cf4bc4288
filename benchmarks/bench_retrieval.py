"""Recall@K metrics (retrieval_ranks + recall_metrics) against the floor: one pass of the matmul.

Random L2-normalised D=512 embeddings, one caption per image (Ni = Nt = N), both
directions. The floor is the bare similarity matmul, the same blocks of
--chunk-size image rows against every text, with the same matmul the metrics
use (NumPy's BLAS on CPU, XLA elsewhere) and nothing else: no counting. The two
sides alternate over --rounds rounds; the figure is the median of the per-round
ratios metrics / floor with its min-max spread. Each N runs in a fresh
subprocess so its peak resident memory (ru_maxrss) is its own.

    python benchmarks/bench_retrieval.py                      # N = 100k, 2 rounds
    python benchmarks/bench_retrieval.py --sizes 10000 50000 --rounds 5

Prints one JSON line per N.
"""
import argparse
import json
import os
import resource
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rounds import alternate, emit, ratio, spread  # noqa: E402


def measure(n, dim, chunk_size, rounds, seed=0):
    """One N, in this process."""
    import jax

    from entityclip_jax.eval import retrieval

    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, dim), dtype=np.float32)
    texts = images + 6 * rng.standard_normal((n, dim), dtype=np.float32)   # noisy pairs: recalls well below 100
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    pairs = np.arange(n)
    xp, matmul = retrieval._array_backend()
    device_images, device_texts = xp.asarray(images), xp.asarray(texts)
    results = {}

    def floor():
        for start in range(0, n, chunk_size):
            block = matmul(device_images[start:start + chunk_size], device_texts)
        getattr(block, "block_until_ready", lambda: None)()

    def metrics():
        results["metrics"] = retrieval.recall_metrics(retrieval.retrieval_ranks(images, texts, pairs,
                                                                                chunk_size=chunk_size))

    seconds = alternate({"floor": floor, "metrics": metrics}, rounds)
    return {
        "n": n, "dim": dim, "chunk_size": chunk_size, "rounds": rounds,
        "metrics_s": spread(seconds["metrics"]), "floor_matmul_s": spread(seconds["floor"]),
        "metrics_over_floor": ratio(seconds["metrics"], seconds["floor"]),
        "floor_gflops": 2 * n * n * dim / min(seconds["floor"]) / 1e9,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "embeddings_mib": 2 * n * dim * 4 / 2**20,
        "chunk_scores_mib": min(chunk_size, n) * n * 4 / 2**20,
        "i2t_R@1": results["metrics"]["i2t"]["R@1"], "t2i_R@1": results["metrics"]["t2i"]["R@1"],
        "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of floor and metrics")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)   # internal: measure one N, print JSON
    args = parser.parse_args()

    if args.one:
        print(json.dumps(measure(args.one, args.dim, args.chunk_size, args.rounds)))
        return
    for n in args.sizes:
        command = [sys.executable, __file__, "--one", str(n), "--dim", str(args.dim),
                   "--chunk-size", str(args.chunk_size), "--rounds", str(args.rounds)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        emit("retrieval_metrics_vs_matmul_floor", **json.loads(done.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
