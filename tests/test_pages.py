"""The pages a person reads, without a browser: the per-query details file, compare's counts and
refusals, the report's escaping, and the search server's answers to bad input and concurrent requests.
(tests/test_pages_browser.py opens the same pages in headless Chromium.)"""
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from entityclip_jax.cli import main as cli
from entityclip_jax.eval.compare import compare_results, most_moved, rank_changes
from entityclip_jax.eval.html_report import render_report
from entityclip_jax.eval.retrieval import recall_metrics, retrieval_ranks
from entityclip_jax.eval.retrieval_details import load_results, make_details, write_details
from entityclip_jax.eval.search import build_index, load_index
from entityclip_jax.eval.serve import MAX_QUERY_CHARS, SearchPages, make_server
from entityclip_jax.eval.thumbnails import jpeg_thumbnail


def random_unit(rng, n, d=8):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_results(out_dir, seed, captions, split="test", pictures=True):
    """An eval --report output of random embeddings over len(captions) pairs: retrieval.json + details."""
    rng = np.random.default_rng(seed)
    images = random_unit(rng, len(captions))
    texts = images + 0.8 * random_unit(rng, len(captions))
    pairs = np.arange(len(captions))
    ranks = retrieval_ranks(images, texts, pairs, chunk_size=3, top_k=5)
    metrics = dict(recall_metrics(ranks), checkpoint=f"/runs/model{seed}", data="/data/records", split=split)
    ids = [f"ex{n}" for n in range(len(captions))]
    thumbnails = {i: jpeg_thumbnail(np.full((8, 8, 3), 8 * n, np.uint8)) for n, i in enumerate(ids) if pictures}
    details = make_details(ranks, ids, ids, captions, pairs, thumbnails)
    out_dir.mkdir(parents=True)
    (out_dir / "retrieval.json").write_text(json.dumps(metrics))
    write_details(details, out_dir)
    return ranks


def test_details_round_trip_and_the_record_set_fingerprint(tmp_path):
    captions = [f"caption {n}" for n in range(12)]
    ranks = write_results(tmp_path / "a", 0, captions)
    metrics, details = load_results(tmp_path / "a")
    assert metrics["split"] == "test" and len(details.thumbnails) == 12
    for key, value in ranks.items():
        np.testing.assert_array_equal(details.ranks[key], value)
    assert list(details.texts) == captions and list(details.image_ids) == [f"ex{n}" for n in range(12)]
    write_results(tmp_path / "b", 1, captions)            # another model, same records
    write_results(tmp_path / "c", 0, captions[:-1] + ["another caption"])
    assert load_results(tmp_path / "b")[1].records == details.records
    assert load_results(tmp_path / "c")[1].records != details.records


def test_rank_changes_count_fixed_broken_and_moves():
    a = np.array([0, 0, 3, 5, 1, 2, 0])
    b = np.array([0, 4, 0, 1, 2, 2, 7])
    counts, kinds = rank_changes(a, b)
    assert counts == {"fixed": 2, "broken": 1, "better": 3, "worse": 2, "same": 2, "total": 7}
    assert list(kinds) == ["same", "fixed", "broken", "worse", "better", "same", "fixed"]
    # the 4 largest moves (|b - a|: 7, 4, 4, 3), listed by the change b - a, gains first
    assert list(most_moved(a, b, 4)) == [6, 1, 2, 3]


def test_compare_refuses_other_splits_and_record_sets_in_one_line(tmp_path, capsys):
    captions = [f"caption {n}" for n in range(12)]
    write_results(tmp_path / "a", 0, captions)
    write_results(tmp_path / "other_split", 1, captions, split="val")
    write_results(tmp_path / "other_records", 1, captions[::-1])
    for other in ("other_split", "other_records"):
        assert cli(["compare", str(tmp_path / "a"), str(tmp_path / other)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("entityclip compare: error: ") and "same split" in err and err.count("\n") == 1
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "retrieval.json").write_text("{}")
    assert cli(["compare", str(tmp_path / "a"), str(tmp_path / "plain")]) == 2
    assert "--report" in capsys.readouterr().err


def test_compare_counts_every_query_and_falls_back_to_the_other_thumbnails(tmp_path):
    captions = [f"caption {n}" for n in range(30)]
    ranks_a = write_results(tmp_path / "a", 0, captions, pictures=False)
    ranks_b = write_results(tmp_path / "b", 1, captions)
    out, summary = compare_results(tmp_path / "a", tmp_path / "b", max_rows=4)
    assert out == tmp_path / "a" / "compare_b.html"
    a, b = ranks_a["t2i_ranks"], ranks_b["t2i_ranks"]
    assert summary["t2i"]["fixed"] == int(((a == 0) & (b > 0)).sum()) and summary["t2i"]["total"] == 30
    html = out.read_text()
    assert html.count('<tr data-order=') == 8                  # 4 rows per direction
    assert "data:image/jpeg;base64," in html                     # B's thumbnails, though A kept none


def test_report_shows_captions_as_text():
    captions = ["<script>window.pwned = 1</script> at the <b>summit</b>", "a & b", "plain"]
    rng = np.random.default_rng(0)
    images = random_unit(rng, 3)
    ranks = retrieval_ranks(images, images, np.arange(3), top_k=5)
    metrics = dict(recall_metrics(ranks), checkpoint="/runs/<m>", data="/d", split="test")
    html = render_report(metrics, make_details(ranks, list("xyz"), list("xyz"), captions, np.arange(3)))
    assert "<script>window" not in html and "<b>summit" not in html
    assert "&lt;script&gt;window.pwned = 1&lt;/script&gt; at the &lt;b&gt;summit&lt;/b&gt;" in html
    assert "a &amp; b" in html and "/runs/&lt;m&gt;" in html


@pytest.fixture
def pages(tmp_path):
    """SearchPages over a 6-image index with captions. The stand-in text encoder sends a query to
    the caption embedding of image int(first word) (or 0), so the expected top hit is known."""
    rng = np.random.default_rng(0)
    embeds = random_unit(rng, 6)
    ids = [f"img{n}" for n in range(6)]
    path = build_index(tmp_path / "index.npz", embeds, [f"/photos/{i}.jpg" for i in ids], ids=ids,
                       source={"kind": "records"}, dtype="float32",
                       captions=([f"caption of <{i}>" for i in ids], ids, embeds + 0.01))
    index = load_index(path)
    gate = threading.Event()
    gate.set()

    def encode_query(texts):
        gate.wait(30)
        word = texts[0].split()[0]
        return embeds[[int(word) if word.isdigit() and int(word) < 6 else 0]]

    thumbs = {i: jpeg_thumbnail(np.zeros((4, 4, 3), np.uint8)) for i in ids[:5]}   # img5 has no picture
    return SearchPages(index, encode_query, thumbs.__getitem__), gate


def test_search_pages_answer_queries_and_bad_input_with_a_message(pages):
    pages, _ = pages
    status, kind, body = pages.handle("/", {"q": "3 <script>alert(1)</script>", "k": "2"})
    html = body.decode()
    assert status == 200 and kind.startswith("text/html") and html.count('class="result"') == 2
    assert html.split('<a href="/image?id=')[1].startswith("img3&")           # the first hit: image 3
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert" not in html
    for params, status, words in [({"q": "   "}, 400, "type a query"),
                                  ({"q": "x" * (MAX_QUERY_CHARS + 1)}, 400, "at most"),
                                  ({"q": "a", "k": "0"}, 400, "from 1 to"),
                                  ({"q": "a", "k": "many"}, 400, "whole number")]:
        got_status, _, body = pages.handle("/", params)
        assert got_status == status and words in body.decode(), params
    status, _, body = pages.handle("/image", {"id": "img2", "q": "2"})
    html = body.decode()
    nearest = html.split('<ol class="captions"')[1].split("<li")[1]
    assert status == 200 and "caption of &lt;img2&gt;" in nearest and "this image's caption" in nearest
    assert pages.handle("/image", {"id": "<nope>"})[0] == 404
    assert "no image with id" in pages.handle("/image", {"id": "<nope>"})[2].decode()
    assert pages.handle("/thumbnail", {"id": "img1"})[:2] == (200, "image/jpeg")
    assert pages.handle("/thumbnail", {"id": "img5"})[0] == 404
    assert pages.handle("/admin", {})[0] == 404


def test_server_answers_while_a_query_is_being_encoded(pages):
    """A search held inside the model does not hold up other requests (a thread per request)."""
    pages, gate = pages
    server = make_server(pages, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        gate.clear()
        results = {}
        slow = threading.Thread(target=lambda: results.update(
            search=urllib.request.urlopen(f"{base}/?q=4+tower&k=3", timeout=30).read().decode()))
        slow.start()
        with urllib.request.urlopen(f"{base}/thumbnail?id=img1", timeout=10) as answer:   # while the search waits
            assert answer.status == 200 and answer.read()[:2] == b"\xff\xd8"
        assert "search" not in results
        gate.set()
        slow.join(30)
        assert results["search"].count('class="result"') == 3 and "/image?id=img4" in results["search"]
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/?q=", timeout=10)
        assert err.value.code == 400 and "type a query" in err.value.read().decode()
    finally:
        gate.set()
        server.shutdown()
        server.server_close()


def test_serve_listens_elsewhere_only_when_asked(tmp_path, capsys):
    assert cli(["serve", "--index", str(tmp_path / "i.npz"), "--checkpoint", str(tmp_path), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--allow-remote" in err and err.count("\n") == 1
