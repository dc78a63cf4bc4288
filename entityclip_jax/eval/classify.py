"""Zero-shot multimodal news classification (EntityCLIP paper, Figure 5).

No training: each class name becomes a prompt ("a news photo about sports"),
encoded by the text tower. An article is scored against every class prompt twice,
with its image and with its headline; the two cosine similarities are averaged
and the best class wins.
"""
import json

import numpy as np

from entityclip_jax import storage
from entityclip_jax.errors import EntityClipError

DEFAULT_TEMPLATE = "a news photo about {section}"


def class_prompts(class_names, template=DEFAULT_TEMPLATE):
    """One prompt per class: template with {section} replaced by the class name."""
    if "{section}" not in template:
        raise EntityClipError(f"the prompt template {template!r} has no {{section}} placeholder for the class name")
    return [template.format(section=name) for name in class_names]


def class_scores(image_embeds, headline_embeds, class_embeds):
    """[N, C] mean of cosine(image, class prompt) and cosine(headline, class prompt)."""
    image_embeds, headline_embeds, class_embeds = (_unit_rows(x, name) for x, name in (
        (image_embeds, "image_embeds"), (headline_embeds, "headline_embeds"), (class_embeds, "class_embeds")))
    if image_embeds.shape != headline_embeds.shape or image_embeds.shape[1] != class_embeds.shape[1]:
        raise EntityClipError(f"need one headline per image and a common width; got images {image_embeds.shape}, "
                              f"headlines {headline_embeds.shape}, classes {class_embeds.shape}")
    return 0.5 * (image_embeds @ class_embeds.T + headline_embeds @ class_embeds.T)


def zero_shot_classify(image_embeds, headline_embeds, class_embeds):
    """[N] index of the best class prompt per article (first one on ties)."""
    return np.argmax(class_scores(image_embeds, headline_embeds, class_embeds), axis=1)


def label_indices(labels, class_names):
    """Class index of each label (bytes or str); unknown labels are refused."""
    index = {name: i for i, name in enumerate(class_names)}
    names = [label.decode("utf-8") if isinstance(label, bytes) else str(label) for label in labels]
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise EntityClipError(f"labels {unknown[:5]} are not among the classes {list(class_names)}; "
                              "add them to the class list or drop those examples")
    return np.array([index[name] for name in names], np.int64)


def accuracy(predictions, targets):
    """Percent of predictions equal to the targets."""
    predictions, targets = np.asarray(predictions), np.asarray(targets)
    if predictions.shape != targets.shape or predictions.size == 0:
        raise EntityClipError(f"need as many predictions as targets (and at least one); "
                              f"got {predictions.shape} and {targets.shape}")
    return float(100.0 * np.mean(predictions == targets))


def confusion_matrix(targets, predictions, num_classes):
    """[C, C] counts: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(targets), np.asarray(predictions)), 1)
    return matrix


def per_class_accuracy(matrix):
    """[C] percent correct per true class (nan for a class with no examples)."""
    totals = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 100.0 * np.diag(matrix) / totals


def plot_confusion_matrix(matrix, class_names, path, *, title=None):
    """PNG heat map of the row-normalised matrix, counts written in the cells."""
    import matplotlib  # lazy: ~0.5 s to import, only for plots; pyplot needs Agg chosen first
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: see above

    matrix = np.asarray(matrix)
    num_classes = len(class_names)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.nan_to_num(matrix / matrix.sum(axis=1, keepdims=True))
    side = max(4.0, 0.45 * num_classes + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1, side), dpi=120)
    shown = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(num_classes), class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(num_classes), class_names, fontsize=8)
    ax.set_xlabel("predicted section")
    ax.set_ylabel("true section")
    if num_classes <= 30:   # counts stay legible up to about 30 classes
        for row in range(num_classes):
            for col in range(num_classes):
                ax.text(col, row, str(matrix[row, col]), ha="center", va="center", fontsize=6,
                        color="white" if rates[row, col] > 0.5 else "black")
    total = matrix.sum()
    correct = np.trace(matrix)
    ax.set_title(title or f"zero-shot accuracy {100.0 * correct / max(total, 1):.1f}% ({correct}/{total})")
    fig.tight_layout()
    with storage.path(path).open("wb") as f:  # a file object: matplotlib would open a gs:// name locally
        fig.savefig(f, format="png")
    plt.close(fig)
    return path


def write_classification_report(targets, predictions, class_names, out_dir, *, name="classification", template=None):
    """Writes {name}.json (accuracy, per-class accuracy, confusion matrix) and {name}.png."""
    out_dir = storage.path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    matrix = confusion_matrix(targets, predictions, len(class_names))
    summary = {
        "accuracy": accuracy(predictions, targets),
        "num_examples": int(matrix.sum()),
        "class_names": list(class_names),
        "per_class_accuracy": {c: (None if np.isnan(a) else float(a))
                               for c, a in zip(class_names, per_class_accuracy(matrix))},
        "confusion_matrix": matrix.tolist(),
        "prompt_template": template,
    }
    paths = {"json": out_dir / f"{name}.json", "png": out_dir / f"{name}.png"}
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n")
    plot_confusion_matrix(matrix, class_names, paths["png"])
    return paths


def _unit_rows(x, name):
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise EntityClipError(f"{name} must be a non-empty [N, D] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise EntityClipError(f"{name} hold NaN or inf; the checkpoint is likely damaged or diverged: "
                              "use an earlier checkpoint")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.all(norms > 0):
        raise EntityClipError(f"{name} has all-zero rows; cosine similarity is undefined for them")
    return x / norms
