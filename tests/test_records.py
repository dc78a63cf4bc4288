"""The TFRecord writer: image checks, the meta file, crash safety, parallel workers, and an
end-to-end run raw JSONL -> `entityclip write-records` -> pipeline / tfds.builder_from_directory."""
import io
import json
import os
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

from entityclip_jax import cli
from entityclip_jax.data import records
from entityclip_jax.data.example import RawExample, SkipReport
from entityclip_jax.data.tokenizer import load_tokenizer
from entityclip_jax.errors import EntityClipError
from tests._raw_layouts import write_tiny_clip_tokenizer


def real_photos():
    """Real photos shipped in installed wheels: (name, encoded bytes)."""
    import skimage
    import sklearn
    sk = os.path.join(os.path.dirname(skimage.__file__), "data")
    sl = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
    paths = [os.path.join(sk, "rocket.jpg"), os.path.join(sk, "coffee.png"), os.path.join(sk, "chelsea.png"),
             os.path.join(sl, "china.jpg"), os.path.join(sl, "flower.jpg")]
    return [(os.path.basename(p), pathlib.Path(p).read_bytes()) for p in paths]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_tiny_clip_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def encode(image, fmt, **save):
    out = io.BytesIO()
    image.save(out, format=fmt, **save)
    return out.getvalue()


def test_check_image_keeps_good_bytes_and_rejects_broken_ones():
    name, jpeg = real_photos()[0]
    assert records.check_image(jpeg) == (jpeg, None)  # kept byte for byte
    for broken in (jpeg[: len(jpeg) // 2], b"not an image at all", b""):
        data, reason = records.check_image(broken)
        assert data is None and reason.startswith("corrupt_image:")


def test_check_image_reencodes_large_and_exotic_images():
    _, jpeg = real_photos()[3]  # china.jpg, 640 x 427
    data, reason = records.check_image(jpeg, max_side=200, jpeg_quality=80)
    small = Image.open(io.BytesIO(data))
    assert reason is None and small.format == "JPEG" and max(small.size) == 200
    assert small.size == (200, 133)  # aspect kept
    cmyk = encode(Image.open(io.BytesIO(jpeg)).convert("CMYK"), "JPEG")
    data, _ = records.check_image(cmyk)
    assert Image.open(io.BytesIO(data)).mode == "RGB"
    webp_or_bmp = encode(Image.open(io.BytesIO(jpeg)), "BMP")
    data, _ = records.check_image(webp_or_bmp)
    assert Image.open(io.BytesIO(data)).format == "JPEG"


def raw_examples(n, prefix="ex"):
    photos = real_photos()
    return [RawExample(id=f"{prefix}{i}", query=f"Angela Merkel meets the coach of Real Madrid {i}",
                       image_bytes=photos[i % len(photos)][1], explanation=f"A photo {i}." if i % 2 else None,
                       label=("world", "sports")[i % 2], source="test")
            for i in range(n)]


def read_records(data_dir, split):
    import tensorflow as tf
    meta = records.read_meta(data_dir)
    files = [str(pathlib.Path(data_dir) / s["file"]) for s in meta["splits"][split]["shards"]]
    parsed = []
    for serialized in tf.data.TFRecordDataset(files).as_numpy_iterator():
        parsed.append(records.features(meta["context_length"]).deserialize_example_np(serialized))
    return parsed


def test_writer_skips_bad_records_with_reasons_and_tokenises(tmp_path, tokenizer):
    good = raw_examples(5)
    bad = [RawExample(id="ex1", query="a duplicate id", image_bytes=good[0].image_bytes),
           RawExample(id="cut", query="a truncated jpeg", image_bytes=good[0].image_bytes[:3000]),
           RawExample(id="gone", query="no file", image_path=str(tmp_path / "nowhere.jpg")),
           RawExample(id="bad\udcff", query="an id with a byte that is not UTF-8", image_bytes=good[0].image_bytes),
           RawExample(id="blank", query="  ", image_bytes=good[0].image_bytes)]
    report = SkipReport()
    entry = records.write_split(good[:2] + bad + good[2:], tmp_path / "out", "train", tokenizer, report,
                                examples_per_shard=2, workers=0, progress=False)
    assert entry["num_examples"] == 5 and [s["num_examples"] for s in entry["shards"]] == [2, 2, 1]
    assert entry["skipped"]["by_reason"] == {"duplicate_id": 1, "corrupt_image": 1, "missing_image": 1,
                                             "bad_utf8": 1, "empty_query": 1}
    assert {r["id"] for r in entry["skipped"]["records"]} == {"ex1", "cut", "gone", "'bad\\udcff'", "blank"}
    meta = json.loads((tmp_path / "out" / records.META_FILE).read_text())
    assert meta["schema_version"] == records.SCHEMA_VERSION and meta["context_length"] == 77
    assert meta["tokenizer_fingerprint"] == tokenizer.fingerprint
    assert meta["tokenizer_style"] == tokenizer.style == "openai"
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        [s["file"] for s in entry["shards"]] + [records.META_FILE, "dataset_info.json", "features.json"])
    rows = read_records(tmp_path / "out", "train")
    assert [r["id"].decode() for r in rows] == [e.id for e in good]
    query_ids, _ = tokenizer.encode([e.query for e in good])
    expl_ids, _ = tokenizer.encode([e.explanation or "" for e in good])
    np.testing.assert_array_equal(np.stack([r["query_ids"] for r in rows]), query_ids)
    np.testing.assert_array_equal(np.stack([r["explanation_ids"] for r in rows]), expl_ids)
    assert [r["image"].shape[-1] for r in rows] == [3] * 5  # TFDS decodes the stored bytes
    assert [r["explanation"].decode() for r in rows] == [e.explanation or "" for e in good]


def test_parallel_workers_write_the_same_shards(tmp_path, tokenizer):
    examples = raw_examples(150)  # more than one worker chunk
    for workers, name in ((0, "inline"), (2, "pool")):
        records.write_split(examples, tmp_path / name, "train", tokenizer, SkipReport(), max_side=96,
                            examples_per_shard=64, workers=workers, progress=False)
    inline, pool = sorted((tmp_path / "inline").glob("*.tfrecord-*")), sorted((tmp_path / "pool").glob("*.tfrecord-*"))
    assert len(inline) == 3 and [p.name for p in inline] == [p.name for p in pool]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(inline, pool))


def test_interrupted_write_leaves_no_complete_looking_shard(tmp_path, tokenizer):
    def dies_midway():
        yield from raw_examples(5)
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        records.write_split(dies_midway(), tmp_path, "train", tokenizer, SkipReport(),
                            examples_per_shard=2, workers=0, progress=False)
    assert not list(tmp_path.glob("entityclip-*")) and not (tmp_path / records.META_FILE).exists()
    assert not list(tmp_path.glob(".tmp-*"))  # the partial shards are cleaned up
    with pytest.raises(EntityClipError, match="interrupted write"):
        records.read_meta(tmp_path)
    # A killed (SIGKILL) writer leaves .tmp-train/ behind: never a shard name; a rerun clears it.
    (tmp_path / ".tmp-train").mkdir()
    (tmp_path / ".tmp-train" / "00000.tfrecord").write_bytes(b"partial")
    records.write_split(raw_examples(5), tmp_path, "train", tokenizer, SkipReport(), examples_per_shard=2,
                        workers=0, progress=False)
    assert len(list(tmp_path.glob("entityclip-train.tfrecord-*-of-00003"))) == 3
    assert not list(tmp_path.glob(".tmp-*"))


def test_splits_accumulate_and_must_share_the_tokenizer(tmp_path, tokenizer, tokenizer_dir):
    records.write_split(raw_examples(3), tmp_path, "train", tokenizer, SkipReport(), workers=0, progress=False)
    records.write_split(raw_examples(2, "t"), tmp_path, "test", tokenizer, SkipReport(), workers=0, progress=False)
    meta = records.read_meta(tmp_path)
    assert {k: v["num_examples"] for k, v in meta["splits"].items()} == {"train": 3, "test": 2}
    other_dir = tmp_path.parent / "other_tok"
    other_dir.mkdir(exist_ok=True)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (other_dir / name).write_text((pathlib.Path(tokenizer_dir) / name).read_text())
    other = json.loads((other_dir / "tokenizer.json").read_text())
    other["added_tokens"].append({"id": 9999, "content": "<extra>", "single_word": False, "lstrip": False,
                                  "rstrip": False, "normalized": False, "special": True})
    (other_dir / "tokenizer.json").write_text(json.dumps(other))
    with pytest.raises(EntityClipError, match="tokenizer_fingerprint"):
        records.write_split(raw_examples(2), tmp_path, "dev", load_tokenizer(other_dir), SkipReport(),
                            workers=0, progress=False)
    with pytest.raises(EntityClipError, match="tokenizer_fingerprint"):  # same vocabulary, the other style
        records.write_split(raw_examples(2), tmp_path, "dev", load_tokenizer(tokenizer_dir, "transformers"),
                            SkipReport(), workers=0, progress=False)


def test_end_to_end_jsonl_to_records_to_pipeline(tmp_path, tokenizer_dir, tokenizer, capsys):
    import tensorflow_datasets as tfds
    from entityclip_jax.data.pipeline import make_dataset, numpy_batches
    root = tmp_path / "raw"
    (root / "img").mkdir(parents=True)
    lines, good_ids = [], []
    for i, (name, data) in enumerate(real_photos()):
        (root / "img" / name).write_bytes(data)
        lines.append({"id": f"p{i}", "image": f"img/{name}", "query": f"Queen Elizabeth II photo {i}",
                      "label": "world"})
        good_ids.append(f"p{i}")
    (root / "img" / "broken.jpg").write_bytes(real_photos()[0][1][:2000])
    lines.append({"id": "broken", "image": "img/broken.jpg", "query": "a truncated photo"})
    lines.append({"id": "absent", "image": "img/absent.jpg", "query": "a missing photo"})
    lines.append({"id": "p0", "image": f"img/{real_photos()[1][0]}", "query": "the same id again"})
    (root / "train.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    cache = tmp_path / "explanations.jsonl"
    cache.write_text(json.dumps({"id": "p1", "query": "Queen Elizabeth II photo 1", "status": "ok",
                                 "explanation": "Elizabeth II was queen of the United Kingdom."}) + "\n")
    out = tmp_path / "records"
    rc = cli.main(["write-records", "--source", "jsonl", "--root", str(root), "--split", "train",
                   "--tokenizer", str(tokenizer_dir), "--out", str(out), "--explanations", str(cache),
                   "--workers", "0", "--examples-per-shard", "2"])
    assert rc == 0
    summary = capsys.readouterr().out
    meta = records.read_meta(out)
    train = meta["splits"]["train"]
    assert train["num_examples"] == len(good_ids)
    assert train["skipped"]["by_reason"] == {"corrupt_image": 1, "missing_image": 1, "duplicate_id": 1}
    assert {r["id"] for r in train["skipped"]["records"]} == {"broken", "absent", "p0"}
    # Explanations are attached before the writer checks images; a record skipped after all
    # ("broken", the second "p0") loses its note: the notes and the summary count written records.
    noted = sorted(n["id"] for n in train["skipped"]["notes"])
    assert noted == sorted(set(good_ids) - {"p1"})
    reasons = re.search(r"skipped 3 \((.*?)\); ", summary).group(1).split(", ")
    assert sorted(reasons) == ["corrupt_image 1", "duplicate_id 1", "missing_image 1"], summary
    assert f"empty explanations {len(good_ids) - 1}" in summary, summary

    ds = make_dataset(out, "train", batch_size=2, image_size=32, train=False, process_index=0, process_count=1)
    batches = list(numpy_batches(ds))
    ids = [i.decode() for b in batches for i, m in zip(b["id"], b["mask"]) if m]
    assert sorted(ids) == sorted(good_ids)
    rows = {i.decode(): row for b in batches for i, row in zip(b["id"], b["query_ids"])}
    expected, _ = tokenizer.encode([line["query"] for line in lines[:len(good_ids)]])
    for i, good_id in enumerate(good_ids):
        np.testing.assert_array_equal(rows[good_id], expected[i])
    expl = {i.decode(): row for b in batches for i, row in zip(b["id"], b["explanation_ids"])}
    assert tokenizer.decode(expl["p1"]) == tokenizer.decode(
        tokenizer.encode(["Elizabeth II was queen of the United Kingdom."])[0][0])

    builder = tfds.builder_from_directory(str(out))  # TFDS reads the same directory
    assert builder.info.splits["train"].num_examples == len(good_ids)
    tfds_ids = sorted(ex["id"].decode() for ex in tfds.as_numpy(builder.as_dataset(split="train")))
    assert tfds_ids == sorted(good_ids)
