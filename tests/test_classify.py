"""Zero-shot classification against a NumPy reference written from the paper's words."""
import json

import numpy as np
import pytest
from PIL import Image

from entityclip_jax.errors import EntityClipError
from entityclip_jax.eval.classify import (
    accuracy, class_prompts, class_scores, confusion_matrix, label_indices, per_class_accuracy,
    write_classification_report, zero_shot_classify)

SECTIONS = ["sports", "arts", "science", "travel", "food"]


def unnormalised_problem(seed, n=40, d=12, c=len(SECTIONS)):
    rng = np.random.default_rng(seed)
    scale = lambda shape: rng.uniform(0.5, 3.0, shape)   # norms vary: cosine must normalise
    return (rng.normal(size=(n, d)) * scale((n, 1)), rng.normal(size=(n, d)) * scale((n, 1)),
            rng.normal(size=(c, d)) * scale((c, 1)))


def test_predictions_equal_reference_loop():
    images, headlines, classes = unnormalised_problem(seed=0)

    def cosine(a, b):
        return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))

    want = []
    for image, headline in zip(images, headlines):
        scores = [(cosine(image, cls) + cosine(headline, cls)) / 2 for cls in classes]
        want.append(int(np.argmax(scores)))
    np.testing.assert_array_equal(zero_shot_classify(images, headlines, classes), want)
    np.testing.assert_allclose(class_scores(images, headlines, classes)[3, 2],
                               (cosine(images[3], classes[2]) + cosine(headlines[3], classes[2])) / 2, rtol=1e-5)


def test_both_modalities_count():
    classes = np.eye(3)
    image, headline = np.array([[0.8, 0.6, 0.0]]), np.array([[0.0, 1.0, 0.0]])
    assert zero_shot_classify(image, image, classes)[0] == 0          # the image alone says 0
    assert zero_shot_classify(image, headline, classes)[0] == 1       # (0.6 + 1) / 2 > (0.8 + 0) / 2
    image, headline = np.array([[1.0, 0.0, 0.0]]), np.array([[0.6, 0.8, 0.0]])
    assert zero_shot_classify(headline, headline, classes)[0] == 1    # the headline alone says 1
    assert zero_shot_classify(image, headline, classes)[0] == 0       # (1 + 0.6) / 2 > (0 + 0.8) / 2


def test_accuracy_and_confusion_matrix():
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 5, 200)
    predictions = np.where(rng.random(200) < 0.6, targets, rng.integers(0, 5, 200))
    matrix = confusion_matrix(targets, predictions, 5)
    for t in range(5):
        for p in range(5):
            assert matrix[t, p] == sum(1 for a, b in zip(targets, predictions) if a == t and b == p)
    assert accuracy(predictions, targets) == pytest.approx(100.0 * np.trace(matrix) / 200)
    for t in range(5):
        assert per_class_accuracy(matrix)[t] == pytest.approx(100.0 * np.mean(predictions[targets == t] == t))


def test_prompts_and_labels():
    assert class_prompts(["arts"], "news about {section}.") == ["news about arts."]
    assert class_prompts(SECTIONS)[0] == "a news photo about sports"
    with pytest.raises(EntityClipError, match="placeholder"):
        class_prompts(SECTIONS, "a news photo")
    np.testing.assert_array_equal(label_indices([b"food", "arts"], SECTIONS), [4, 1])
    with pytest.raises(EntityClipError, match="not among the classes"):
        label_indices([b"weather"], SECTIONS)


def test_report_files(tmp_path):
    images, headlines, classes = unnormalised_problem(seed=2, n=120)
    targets = np.random.default_rng(2).integers(0, len(SECTIONS), 120)
    predictions = zero_shot_classify(images, headlines, classes)
    paths = write_classification_report(targets, predictions, SECTIONS, tmp_path, template="about {section}")
    summary = json.loads(paths["json"].read_text())
    assert summary["accuracy"] == pytest.approx(accuracy(predictions, targets))
    assert np.array_equal(summary["confusion_matrix"], confusion_matrix(targets, predictions, len(SECTIONS)))
    assert summary["num_examples"] == 120
    with Image.open(paths["png"]) as image:
        assert image.format == "PNG" and min(image.size) >= 300
        assert len(set(image.convert("L").getdata())) > 10


def test_bad_shapes_are_refused():
    images, headlines, classes = unnormalised_problem(seed=3)
    with pytest.raises(EntityClipError, match="one headline per image"):
        class_scores(images, headlines[:-1], classes)
    with pytest.raises(EntityClipError, match="all-zero"):
        class_scores(images, np.zeros_like(headlines), classes)


def test_nan_embeddings_are_refused_not_scored():
    images, headlines, classes = unnormalised_problem(seed=4)
    headlines[2, 0] = np.nan
    with pytest.raises(EntityClipError, match="headline_embeds hold NaN or inf"):
        class_scores(images, headlines, classes)
