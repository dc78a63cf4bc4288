"""Search index: build, load, query, contact sheet, folder batches (no CLI)."""
import numpy as np
import pytest
from PIL import Image

from entityclip_jax.errors import EntityClipError
from entityclip_jax.eval.search import (
    build_index, contact_sheet, find_images, image_folder_batches, load_index, model_fingerprint, query_index)


def write_images(directory, count, size=(64, 48)):
    """Distinct solid-ish images: colour gradients, one per file."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(count):
        x = np.linspace(0, 255, size[0], dtype=np.float32)[None, :, None]
        pixels = np.broadcast_to(x, (size[1], size[0], 3)).copy()
        pixels[..., n % 3] = 40 * n % 256
        path = directory / f"img{n:02d}.{'png' if n % 2 else 'jpg'}"
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def random_unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_index_round_trip_and_top_k_match_brute_force(tmp_path, dtype):
    rng = np.random.default_rng(0)
    embeds = random_unit(rng, 50, 16) * rng.uniform(0.5, 2, (50, 1))   # norms vary: stored normalised
    paths = [f"/photos/{n}.jpg" for n in range(50)]
    index_path = build_index(tmp_path / "sub" / "index.npz", embeds, paths, fingerprint="abc",
                             source={"kind": "folder", "directory": "/photos"}, dtype=dtype)
    index = load_index(index_path)
    assert index.embeds.dtype == np.dtype(dtype) and index.fingerprint == "abc"
    assert list(index.paths) == paths and list(index.ids) == paths and index.source["kind"] == "folder"

    queries = random_unit(rng, 3, 16)
    top_paths, top_scores = query_index(index, queries, k=7)
    assert top_paths.shape == top_scores.shape == (3, 7)
    cosine = queries @ (embeds / np.linalg.norm(embeds, axis=1, keepdims=True)).T
    for q in range(3):
        want = np.argsort(-cosine[q], kind="stable")[:7]
        assert list(top_paths[q]) == [paths[i] for i in want]
        np.testing.assert_allclose(top_scores[q], cosine[q, want], atol=2e-3 if dtype == "float16" else 1e-5)


def test_query_edge_cases(tmp_path):
    rng = np.random.default_rng(1)
    embeds = random_unit(rng, 4, 8)
    index = load_index(build_index(tmp_path / "i.npz", embeds, list("abcd"), fingerprint="m1"))
    top_paths, _ = query_index(index, embeds[2] * 3.0, k=10)     # one query, k > N
    assert top_paths.shape == (1, 4) and top_paths[0, 0] == "c"
    with pytest.raises(EntityClipError, match="rebuild the index"):
        query_index(index, embeds[0], fingerprint="m2")
    with pytest.raises(EntityClipError, match="do not match the index width"):
        query_index(index, np.ones(5))
    with pytest.raises(EntityClipError, match="not a search index"):
        (tmp_path / "bad.npz").write_bytes(b"not a zip")
        load_index(tmp_path / "bad.npz")
    with pytest.raises(EntityClipError, match="one embedding per image"):
        build_index(tmp_path / "x.npz", embeds, list("abc"))


def test_tied_scores_come_back_in_index_order(tmp_path):
    embeds = np.array([[1, 0], [0, 1], [1, 0], [1, 0]], np.float32)
    index = load_index(build_index(tmp_path / "i.npz", embeds, list("wxyz"), dtype="float32"))
    top_paths, top_scores = query_index(index, [1, 0], k=3)
    assert list(top_paths[0]) == ["w", "y", "z"] and np.allclose(top_scores, 1)


def test_model_fingerprint_sees_every_parameter():
    params = {"a": {"kernel": np.ones((2, 3), np.float32)}, "b": np.zeros(4, np.float32)}
    same = {"b": np.zeros(4, np.float32), "a": {"kernel": np.ones((2, 3), np.float32)}}
    changed = {"a": {"kernel": np.ones((2, 3), np.float32)}, "b": np.array([0, 0, 0, 1e-7], np.float32)}
    assert model_fingerprint(params) == model_fingerprint(same)
    assert model_fingerprint(params) != model_fingerprint(changed)


def test_contact_sheet_is_a_real_png(tmp_path):
    paths = write_images(tmp_path / "photos", 6)
    out = contact_sheet(paths + [str(tmp_path / "missing.jpg")], np.linspace(0.9, 0.3, 7),
                        "Queen Elizabeth II waves at the crowd outside Buckingham Palace", tmp_path / "sheet.png",
                        thumb_size=96, columns=4)
    with Image.open(out) as sheet:
        assert sheet.format == "PNG"
        assert sheet.width >= 4 * 96 and sheet.height >= 2 * 96      # 7 tiles on 4 columns: 2 rows
        grid = np.asarray(sheet.convert("RGB"))
    assert len(np.unique(grid.reshape(-1, 3), axis=0)) > 50           # thumbnails and text were drawn
    arrays = [np.full((30, 40, 3), 90 * n, np.uint8) for n in range(3)]
    with Image.open(contact_sheet(arrays, [0.5, 0.4, 0.3], "q", tmp_path / "a.png", captions=["x", "y", "z"])) as s:
        assert s.width >= 3 * 192


def test_folder_batches_preprocess_pad_and_skip_broken_files(tmp_path):
    paths = write_images(tmp_path / "photos", 5, size=(80, 60))
    (tmp_path / "photos" / "nested").mkdir()
    (tmp_path / "photos" / "nested" / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "photos" / "notes.txt").write_text("not an image either")
    found = find_images(tmp_path / "photos")
    assert len(found) == 6 and not any(p.endswith(".txt") for p in found)

    batches = list(image_folder_batches(found, image_size=32, batch_size=4))
    for batch in batches:
        assert batch["pixel_values"].shape == (4, 32, 32, 3) and batch["pixel_values"].dtype == np.float32
    mask = np.concatenate([b["mask"] for b in batches])
    ids = [i.decode() for i in np.concatenate([b["id"] for b in batches])[mask]]
    assert ids == sorted(paths)                          # the broken file is skipped, order is kept
    padded = np.concatenate([b["pixel_values"] for b in batches])[~mask]
    assert not padded.any()

    with pytest.raises(EntityClipError, match="not a directory"):
        find_images(tmp_path / "photos" / "nested2")


def test_find_images_refuses_a_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("no pictures here")
    with pytest.raises(EntityClipError, match="no images"):
        find_images(tmp_path)


def test_nan_or_inf_never_reaches_the_index_or_a_ranking(tmp_path):
    embeds = random_unit(np.random.default_rng(2), 4, 8)
    index = load_index(build_index(tmp_path / "i.npz", embeds, list("abcd")))
    with pytest.raises(EntityClipError, match="query embeddings hold NaN or inf"):
        query_index(index, np.full(8, np.nan))
    broken = embeds.copy()
    broken[1, 3] = np.inf
    with pytest.raises(EntityClipError, match="NaN or inf"):
        build_index(tmp_path / "j.npz", broken, list("abcd"))
    np.savez(tmp_path / "k.npz", embeds=broken, paths=np.array(list("abcd")), ids=np.array(list("abcd")),
             fingerprint=np.array(""), source=np.array("{}"))          # a damaged index file
    with pytest.raises(EntityClipError, match="the index holds NaN or inf"):
        query_index(load_index(tmp_path / "k.npz"), embeds[0])
