"""Retrieval metrics as files a person reads: JSON, a Markdown table, a PNG plot.

`metrics` is recall_metrics' output: {"i2t": {"R@1": .., "median_rank": ..,
"mean_rank": ..}, "t2i": {...}, "rsum": .., "num_images": .., "num_texts": ..}.
"""
import json

from entityclip_jax import storage

DIRECTIONS = {"i2t": "image -> text", "t2i": "text -> image"}


def write_retrieval_report(metrics, out_dir, *, name="retrieval", title=None):
    """Writes {name}.json, {name}.md and {name}.png under out_dir; returns their paths."""
    out_dir = storage.path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "markdown": out_dir / f"{name}.md", "png": out_dir / f"{name}.png"}
    paths["json"].write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    paths["markdown"].write_text(markdown_table(metrics, title=title))
    plot_recall_at_k(metrics, paths["png"], title=title)
    return paths


def recall_ks(metrics):
    """The K values present in the metrics, ascending."""
    return sorted(int(key[2:]) for key in metrics["i2t"] if key.startswith("R@"))


def markdown_table(metrics, *, title=None):
    """One row per direction: R@K columns, median and mean rank; rsum below."""
    ks = recall_ks(metrics)
    header = ["direction", *(f"R@{k}" for k in ks), "median rank", "mean rank"]
    lines = [f"## {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for direction, label in DIRECTIONS.items():
        row = metrics[direction]
        cells = [label, *(f"{row[f'R@{k}']:.2f}" for k in ks), f"{row['median_rank']:.0f}", f"{row['mean_rank']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"rsum (R@1+R@5+R@10, both directions): {metrics['rsum']:.2f}"]
    if "num_images" in metrics:
        lines.append(f"images: {metrics['num_images']}, texts: {metrics['num_texts']}")
    return "\n".join(lines) + "\n"


def plot_recall_at_k(metrics, path, *, title=None):
    """Recall (%) against K (log axis), one line per direction."""
    import matplotlib  # lazy: ~0.5 s to import, only for plots; pyplot needs Agg chosen first
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: see above

    ks = recall_ks(metrics)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for (direction, label), offset in zip(DIRECTIONS.items(), (-12, 6)):   # labels below / above
        values = [metrics[direction][f"R@{k}"] for k in ks]
        line, = ax.plot(ks, values, marker="o", label=label)
        for k, value in zip(ks, values):
            ax.annotate(f"{value:.1f}", (k, value), textcoords="offset points", xytext=(0, offset),
                        ha="center", fontsize=7, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_ylim(0, 105)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_title(title or f"Recall@K ({metrics.get('num_images', '?')} images, {metrics.get('num_texts', '?')} texts)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with storage.path(path).open("wb") as f:  # a file object: matplotlib would open a gs:// name locally
        fig.savefig(f, format="png")
    plt.close(fig)
    return storage.path(path)
