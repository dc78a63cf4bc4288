"""Chunked Recall@K against a brute-force reference: full matrix, sorted rows."""
import numpy as np
import pytest

from entityclip_jax.errors import EntityClipError
from entityclip_jax.eval.retrieval import group_images_by_id, recall_metrics, retrieval_ranks


def brute_force_ranks(image_embeds, text_embeds, text_to_image, ties):
    """Sort every row of the full similarity matrix; the rank is the position of
    the first correct item. Ties put correct items first (optimistic) or last."""
    sims = image_embeds.astype(np.float64) @ text_embeds.astype(np.float64).T   # [Ni, Nt]
    correct = text_to_image[None, :] == np.arange(len(image_embeds))[:, None]

    def rank_rows(scores, is_correct):
        tie_key = ~is_correct if ties == "optimistic" else is_correct
        ranks = []
        for row_scores, row_key, row_correct in zip(scores, tie_key, is_correct):
            order = np.lexsort((row_key, -row_scores))   # by score desc, then tie key
            ranks.append(np.flatnonzero(row_correct[order])[0])
        return np.array(ranks)

    return {"i2t_ranks": rank_rows(sims, correct), "t2i_ranks": rank_rows(sims.T, correct.T)}


def tied_problem(seed, num_images=37, dim=6):
    """Integer embeddings in {-1, 0, 1}: dot products are exact and tie often.
    1-3 captions per image, shuffled, plus captions copied under other images."""
    rng = np.random.default_rng(seed)
    image_embeds = rng.integers(-1, 2, (num_images, dim)).astype(np.float32)
    text_to_image = np.repeat(np.arange(num_images), rng.integers(1, 4, num_images))
    text_embeds = np.clip(image_embeds[text_to_image] + rng.integers(-1, 2, (len(text_to_image), dim)), -1, 1)
    duplicates = rng.choice(len(text_to_image), 8, replace=False)
    text_embeds = np.concatenate([text_embeds, text_embeds[duplicates]]).astype(np.float32)
    text_to_image = np.concatenate([text_to_image, rng.integers(0, num_images, 8)])
    perm = rng.permutation(len(text_to_image))
    return image_embeds, text_embeds[perm], text_to_image[perm]


@pytest.mark.parametrize("ties", ["optimistic", "pessimistic"])
@pytest.mark.parametrize("chunk_size, backend", [(1, "numpy"), (7, "numpy"), (10, "numpy"), (1000, "numpy"),
                                                 pytest.param(10, "jax", marks=pytest.mark.slow)])  # a compile
def test_chunked_ranks_equal_brute_force_with_ties(ties, chunk_size, backend, monkeypatch):
    import jax.numpy as jnp

    from entityclip_jax.eval import retrieval
    if backend == "jax":   # the path GPU/TPU take: scores and counts in jax.numpy
        monkeypatch.setattr(retrieval, "_array_backend", lambda: (jnp, retrieval._jax_scores))
    image_embeds, text_embeds, text_to_image = tied_problem(seed=chunk_size)
    image_embeds[5] = image_embeds[30]      # a duplicated image: text->image ties across blocks
    got = retrieval_ranks(image_embeds, text_embeds, text_to_image, chunk_size=chunk_size, ties=ties)
    want = brute_force_ranks(image_embeds, text_embeds, text_to_image, ties)
    np.testing.assert_array_equal(got["i2t_ranks"], want["i2t_ranks"])
    np.testing.assert_array_equal(got["t2i_ranks"], want["t2i_ranks"])


def test_tie_conventions_differ_on_ties_only():
    image_embeds, text_embeds, text_to_image = tied_problem(seed=3)
    optimistic = retrieval_ranks(image_embeds, text_embeds, text_to_image, chunk_size=5)
    pessimistic = retrieval_ranks(image_embeds, text_embeds, text_to_image, chunk_size=5, ties="pessimistic")
    assert (pessimistic["t2i_ranks"] >= optimistic["t2i_ranks"]).all()
    assert (pessimistic["t2i_ranks"] > optimistic["t2i_ranks"]).any()   # the problem does tie

    rng = np.random.default_rng(0)   # continuous embeddings: no ties, the conventions agree
    images = rng.normal(size=(50, 16)).astype(np.float32)
    texts = rng.normal(size=(50, 16)).astype(np.float32)
    pairs = np.arange(50)
    a = retrieval_ranks(images, texts, pairs, chunk_size=16)
    b = retrieval_ranks(images, texts, pairs, chunk_size=16, ties="pessimistic")
    np.testing.assert_array_equal(a["i2t_ranks"], b["i2t_ranks"])
    np.testing.assert_array_equal(a["t2i_ranks"], b["t2i_ranks"])


def test_collapsed_model_is_perfect_only_optimistically():
    same = np.ones((20, 8), np.float32)
    pairs = np.arange(20)
    assert recall_metrics(retrieval_ranks(same, same, pairs))["t2i"]["R@1"] == 100.0
    assert recall_metrics(retrieval_ranks(same, same, pairs, ties="pessimistic"))["t2i"]["R@1"] == 0.0


def test_recall_metrics_match_direct_counts():
    image_embeds, text_embeds, text_to_image = tied_problem(seed=11, num_images=120)
    ranks = brute_force_ranks(image_embeds, text_embeds, text_to_image, "optimistic")
    metrics = recall_metrics(ranks, ks=(1, 5, 10, 50, 100))
    for direction in ("i2t", "t2i"):
        r = ranks[f"{direction}_ranks"]
        for k in (1, 5, 10, 50, 100):
            hits = sum(1 for rank in r if rank + 1 <= k)   # 1-based rank within the top k
            assert metrics[direction][f"R@{k}"] == pytest.approx(100.0 * hits / len(r))
        one_based = sorted(rank + 1 for rank in r)
        middle = len(one_based) // 2
        median = one_based[middle] if len(r) % 2 else (one_based[middle - 1] + one_based[middle]) / 2
        assert metrics[direction]["median_rank"] == np.floor(median - 1) + 1
        assert metrics[direction]["mean_rank"] == pytest.approx(sum(one_based) / len(r))
    rsum = sum(metrics[d][f"R@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert metrics["rsum"] == pytest.approx(rsum)
    assert (metrics["num_images"], metrics["num_texts"]) == (len(image_embeds), len(text_embeds))


def test_group_images_by_id_maps_captions_to_distinct_images():
    ids = np.array([b"b", b"a", b"b", b"c", b"a", b"b"])
    keep, text_to_image = group_images_by_id(ids)
    np.testing.assert_array_equal(ids[keep], [b"b", b"a", b"c"])           # first appearance order
    np.testing.assert_array_equal(ids[keep][text_to_image], ids)          # every caption finds its image


def test_several_captions_per_image_take_the_best_caption():
    images = np.eye(3, dtype=np.float32)
    # image 0 has a poor caption and a perfect one; the perfect one decides its rank
    texts = np.array([[0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32) + 0.1 * np.eye(4, 3, dtype=np.float32)
    text_to_image = np.array([0, 0, 1, 2])
    ranks = retrieval_ranks(images, texts, text_to_image)
    want = brute_force_ranks(images, texts, text_to_image, "optimistic")
    np.testing.assert_array_equal(ranks["i2t_ranks"], want["i2t_ranks"])
    assert ranks["i2t_ranks"][0] == 0


@pytest.mark.parametrize("bad, message", [
    (dict(text_to_image=np.array([0, 1, 5])), "outside"),
    (dict(text_to_image=np.array([0, 0, 0])), "have no text"),
    (dict(text_to_image=np.array([0, 1])), "one integer image index per text"),
    (dict(ties="random"), "ties must be one of"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_bad_input_is_refused_with_a_fix(bad, message):
    args = dict(image_embeds=np.eye(3, dtype=np.float32), text_embeds=np.eye(3, dtype=np.float32),
                text_to_image=np.arange(3))
    args.update(bad)
    with pytest.raises(EntityClipError, match=message):
        retrieval_ranks(args.pop("image_embeds"), args.pop("text_embeds"), args.pop("text_to_image"), **args)


def test_report_files_hold_the_metrics(tmp_path):
    import json
    import re

    from PIL import Image

    from entityclip_jax.eval.report import write_retrieval_report

    image_embeds, text_embeds, text_to_image = tied_problem(seed=5, num_images=60)
    metrics = recall_metrics(retrieval_ranks(image_embeds, text_embeds, text_to_image, chunk_size=16))
    paths = write_retrieval_report(metrics, tmp_path / "out", name="n24news", title="N24News test")

    assert json.loads(paths["json"].read_text()) == metrics

    rows = {}
    for line in paths["markdown"].read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("image -> text", "text -> image"):
            rows["i2t" if cells[0] == "image -> text" else "t2i"] = [float(c) for c in cells[1:]]
    assert set(rows) == {"i2t", "t2i"}
    for direction, cells in rows.items():
        want = [metrics[direction][f"R@{k}"] for k in (1, 5, 10, 50, 100)]
        want += [metrics[direction]["median_rank"], metrics[direction]["mean_rank"]]
        np.testing.assert_allclose(cells, want, atol=0.005)
    rsum = re.search(r"rsum .*: ([0-9.]+)", paths["markdown"].read_text()).group(1)
    assert float(rsum) == pytest.approx(metrics["rsum"], abs=0.005)

    with Image.open(paths["png"]) as image:
        image.verify()
    with Image.open(paths["png"]) as image:
        assert image.format == "PNG" and min(image.size) >= 200
        assert len(set(image.convert("L").getdata())) > 10   # drawn on, not blank


def fake_batches(num_examples, batch_size, rng):
    """Eval-mode batches: the last one padded to full size with mask=False rows."""
    for start in range(0, num_examples, batch_size):
        real = min(batch_size, num_examples - start)
        mask = np.arange(batch_size) < real
        yield {
            "pixel_values": rng.normal(size=(batch_size, 4, 4, 3)).astype(np.float32),
            "query_ids": rng.integers(0, 100, (batch_size, 7)).astype(np.int32),
            "id": np.array([f"ex{start + i}".encode() if mask[i] else b"" for i in range(batch_size)], object),
            "label": np.array([b"sport" if (start + i) % 2 else b"arts" for i in range(batch_size)], object),
            "mask": mask,
        }


def test_encode_dataset_drops_padding_and_keeps_order():
    import jax
    import jax.numpy as jnp

    from entityclip_jax.eval.encode import encode_dataset

    traces = []

    def encode_image(pixels):
        traces.append(pixels.shape)   # runs once per compilation
        return pixels.reshape(pixels.shape[0], -1)[:, :5] * 2.0

    encode_text = jax.jit(lambda ids: jnp.stack([ids.sum(1), ids[:, 0]], axis=1).astype(jnp.float32))
    batches = list(fake_batches(23, 8, np.random.default_rng(0)))
    image_embeds, text_embeds, ids, labels = encode_dataset(iter(batches), jax.jit(encode_image), encode_text)

    keep = np.concatenate([b["mask"] for b in batches])
    pixels = np.concatenate([b["pixel_values"] for b in batches])[keep]
    query_ids = np.concatenate([b["query_ids"] for b in batches])[keep]
    np.testing.assert_allclose(image_embeds, pixels.reshape(23, -1)[:, :5] * 2.0)
    np.testing.assert_allclose(text_embeds, np.stack([query_ids.sum(1), query_ids[:, 0]], 1))
    assert list(ids) == [f"ex{i}" for i in range(23)]
    assert list(labels) == ["sport" if i % 2 else "arts" for i in range(23)]
    assert len(traces) == 1   # padded batches share one shape: one compilation


def test_encode_dataset_images_only_and_empty_input():
    from entityclip_jax.eval.encode import encode_dataset

    batches = [{"pixel_values": np.ones((3, 2, 2, 3), np.float32)}]
    image_embeds, text_embeds, ids, labels = encode_dataset(batches, lambda x: x.reshape(3, -1))
    assert image_embeds.shape == (3, 12) and text_embeds is None and labels is None
    assert list(ids) == ["0", "1", "2"]
    with pytest.raises(EntityClipError, match="no examples"):
        encode_dataset([], lambda x: x)
    with pytest.raises(EntityClipError, match="query_ids"):
        encode_dataset(batches, lambda x: x, lambda t: t)


def test_clip_encoders_equal_transformers_pytorch_clip(tiny_hf_dir):
    """The reference is independent of our model code: transformers' PyTorch CLIPModel."""
    import torch
    import transformers

    from entityclip_jax.checkpoints.towers import load_towers
    from entityclip_jax.eval.encode import clip_encoders
    from entityclip_jax.models.clip import CLIPModel

    config, params = load_towers(tiny_hf_dir)
    reference = transformers.CLIPModel.from_pretrained(tiny_hf_dir).eval()
    rng = np.random.default_rng(0)
    size, length = config.vision.image_size, config.text.max_position_embeddings
    pixels = rng.normal(size=(5, size, size, 3)).astype(np.float32)
    ids = rng.integers(1, config.text.bos_token_id, (5, length)).astype(np.int64)
    ids[:, 0], ids[np.arange(5), [3, 5, 7, 9, 15]] = config.text.bos_token_id, config.text.eos_token_id
    with torch.no_grad():
        want_image = reference.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
        want_text = reference.get_text_features(input_ids=torch.from_numpy(ids))
    want_image, want_text = (np.asarray(getattr(w, "pooler_output", w)) for w in (want_image, want_text))

    encode_image, encode_text = clip_encoders(CLIPModel(config), params)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)   # noqa: E731
    np.testing.assert_allclose(np.asarray(encode_image(pixels)), unit(want_image), atol=2e-5)
    np.testing.assert_allclose(np.asarray(encode_text(ids.astype(np.int32))), unit(want_text), atol=2e-5)


def brute_force_top(image_embeds, text_embeds, text_to_image, k):
    """Sorted rows of the full matrix; equal scores in gallery order: images by row, texts by
    (their image's row, input order), the order retrieval_ranks documents."""
    sims = image_embeds @ text_embeds.T
    text_order = np.lexsort((np.arange(len(text_to_image)), text_to_image))   # gallery position -> text
    i2t = [text_order[np.lexsort((np.arange(len(text_order)), -row[text_order]))[:k]] for row in sims]
    t2i = [np.lexsort((np.arange(len(column)), -column))[:k] for column in sims.T]
    return np.array(i2t), np.array(t2i), sims


@pytest.mark.parametrize("chunk_size, backend", [(1, "numpy"), (7, "numpy"), (1000, "numpy"),
                                                 pytest.param(7, "jax", marks=pytest.mark.slow)])  # a compile
def test_top_k_in_the_chunked_pass_equals_sorted_rows_with_ties(chunk_size, backend, monkeypatch):
    import jax.numpy as jnp

    from entityclip_jax.eval import retrieval
    if backend == "jax":
        monkeypatch.setattr(retrieval, "_array_backend", lambda: (jnp, retrieval._jax_scores))
    image_embeds, text_embeds, text_to_image = tied_problem(seed=11)
    image_embeds[5] = image_embeds[30]
    got = retrieval_ranks(image_embeds, text_embeds, text_to_image, chunk_size=chunk_size, top_k=5,
                          ties="pessimistic")
    i2t, t2i, sims = brute_force_top(image_embeds, text_embeds, text_to_image, 5)
    np.testing.assert_array_equal(got["i2t_top"], i2t)
    np.testing.assert_array_equal(got["t2i_top"], t2i)
    np.testing.assert_array_equal(got["i2t_top_scores"], np.take_along_axis(sims, i2t, axis=1))
    np.testing.assert_array_equal(got["t2i_top_scores"], np.take_along_axis(sims.T, t2i, axis=1))
    np.testing.assert_array_equal(got["t2i_correct_scores"], sims[text_to_image, np.arange(len(text_to_image))])
    best = [sims[i, text_to_image == i].max() for i in range(len(image_embeds))]
    np.testing.assert_array_equal(got["i2t_correct_scores"], best)
    # the ranks are those of the pass without top k
    plain = retrieval_ranks(image_embeds, text_embeds, text_to_image, chunk_size=chunk_size, ties="pessimistic")
    np.testing.assert_array_equal(got["t2i_ranks"], plain["t2i_ranks"])
    np.testing.assert_array_equal(got["i2t_ranks"], plain["i2t_ranks"])
    assert "i2t_top" not in plain


def test_top_k_agrees_with_the_rank_and_shrinks_to_the_gallery():
    rng = np.random.default_rng(4)
    images, texts = rng.normal(size=(3, 8)).astype(np.float32), rng.normal(size=(9, 8)).astype(np.float32)
    text_to_image = np.arange(9) % 3
    got = retrieval_ranks(images, texts, text_to_image, chunk_size=2, top_k=5)
    assert got["t2i_top"].shape == (9, 3) and got["i2t_top"].shape == (3, 5)   # 3 images to rank
    for t, rank in enumerate(got["t2i_ranks"]):   # continuous scores: a top-5 hit sits at its rank
        assert got["t2i_top"][t, rank] == text_to_image[t]
    with pytest.raises(EntityClipError, match="top_k"):
        retrieval_ranks(images, texts, text_to_image, top_k=-1)
