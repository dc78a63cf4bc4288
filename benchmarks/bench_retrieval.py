"""Time and memory of the chunked Recall@K metrics (retrieval_ranks + recall_metrics).

Random L2-normalised D=512 embeddings, one caption per image (Ni = Nt = N), both
directions. Each N runs in a fresh subprocess so its peak resident memory
(ru_maxrss) is its own; "embeddings" is the memory of the inputs alone and
"chunk scores" the [chunk, N] fp32 block each step holds.

    python benchmarks/bench_retrieval.py                      # N = 10k, 50k, 100k
    python benchmarks/bench_retrieval.py --sizes 10000 --chunk-size 2048 --repeats 3
    python benchmarks/bench_retrieval.py --out results.json   # also write JSON
"""
import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def measure(n, dim, chunk_size, repeats, seed=0):
    """One N, in this process: seconds per call (first includes compilation), peak RSS."""
    import jax
    import numpy as np

    from entityclip_jax.eval.retrieval import recall_metrics, retrieval_ranks

    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, dim), dtype=np.float32)
    texts = images + 6 * rng.standard_normal((n, dim), dtype=np.float32)   # noisy pairs: recalls well below 100
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    pairs = np.arange(n)
    rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        metrics = recall_metrics(retrieval_ranks(images, texts, pairs, chunk_size=chunk_size))
        seconds.append(time.perf_counter() - start)
    return {
        "n": n, "dim": dim, "chunk_size": chunk_size, "seconds": seconds,
        "first_call_s": seconds[0], "best_s": min(seconds),
        "pairs_scored_per_s": 2 * n * n / min(seconds),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_inputs_mib": rss_inputs / 1024,
        "embeddings_mib": 2 * n * dim * 4 / 2**20,
        "chunk_scores_mib": min(chunk_size, n) * n * 4 / 2**20,
        "i2t_R@1": metrics["i2t"]["R@1"], "t2i_R@1": metrics["t2i"]["R@1"],
        "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1, help="calls per N (the first includes compilation)")
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)   # internal: measure one N, print JSON
    args = parser.parse_args()

    if args.one:
        print(json.dumps(measure(args.one, args.dim, args.chunk_size, args.repeats)))
        return
    results = []
    print(f"# retrieval metrics, D={args.dim}, chunk {args.chunk_size}, {platform.processor() or platform.machine()}")
    print("| N | first call (s) | best (s) | pairs/s | peak RSS (MiB) | inputs (MiB) | chunk scores (MiB) | R@1 i2t/t2i |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        command = [sys.executable, __file__, "--one", str(n), "--dim", str(args.dim),
                   "--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"| {n} | {r['first_call_s']:.2f} | {r['best_s']:.2f} | {r['pairs_scored_per_s']:.3g} | "
              f"{r['peak_rss_mib']:.0f} | {r['embeddings_mib']:.0f} | {r['chunk_scores_mib']:.0f} | "
              f"{r['i2t_R@1']:.1f}/{r['t2i_R@1']:.1f} |", flush=True)
    print(f"device: {results[0]['device']} ({results[0]['backend']})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
