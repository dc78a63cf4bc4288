"""Source adapters over tiny raw files in each release layout, built at test time;
every kind of bad input lands in the SkipReport with its reason; explanations
are attached under each policy."""
import json
import os
import pathlib

import pytest

from entityclip_jax.data.example import SkipReport
from entityclip_jax.data.sources import SOURCES, read_source
from entityclip_jax.data.sources import explanations as expl
from entityclip_jax.errors import EntityClipError
from tests._raw_layouts import (CAPTIONS, LABELS, write_csv, write_goodnews, write_goodnews_entityclip,
                                write_jpeg, write_jsonl, write_n24news, write_visualnews)


def read(kind, root, split, **options):
    report = SkipReport()
    return list(read_source(kind, root, split, report, **options)), report


def reasons(report):
    return [reason for _, reason in report.items]


def assert_clean(examples, report, source):
    assert len(report) == 0, report.to_dict()
    for example in examples:
        assert os.path.isfile(example.image_path) and os.path.isabs(example.image_path)
        assert example.query in CAPTIONS and example.source == source
    assert len({e.id for e in examples}) == len(examples)


# ---------------------------------------------------------------- layouts

@pytest.mark.parametrize("layout", ["original", "entityclip"])
def test_n24news_layouts_and_split_aliases(tmp_path, layout):
    root = write_n24news(tmp_path / "n24", layout=layout)
    for split, name in [("train", "train"), ("dev", "dev"), ("val", "dev"), ("test", "test")]:
        examples, report = read("n24news", root, split)
        assert_clean(examples, report, "n24news")
        assert [e.id for e in examples] == [f"{name}{i:03d}" for i in range(3)]
        assert [e.label for e in examples] == LABELS
        assert examples[1].headline == f"Headline {name} 1"
        assert examples[0].query == CAPTIONS[0]
        assert pathlib.Path(examples[0].image_path).name == f"{name}000.jpg"


def test_visualnews_entityclip_layout(tmp_path):
    root = write_visualnews(tmp_path / "vn")
    ids = []
    for split in ("train", "dev", "test"):
        examples, report = read("visualnews", root, split)
        assert_clean(examples, report, "visualnews")
        assert [e.label for e in examples] == LABELS
        ids += [e.id for e in examples]
        # "./bbc/images/..." is found under ROOT/images/ as the release reads it.
        assert all("/images/bbc/" in e.image_path or "/images/guardian/" in e.image_path for e in examples)
    assert ids == [str(1000 + i) for i in range(9)]


def test_visualnews_original_data_json(tmp_path):
    root = write_visualnews(tmp_path / "vn", layout="original")
    examples, report = read("visualnews", root, "val", split_ids="val_ids.txt")
    assert_clean(examples, report, "visualnews")
    assert [e.id for e in examples] == ["1003", "1004", "1005"]
    everything, _ = read("visualnews", root, "all")
    assert len(everything) == 9
    with pytest.raises(EntityClipError, match="split_ids"):
        read("visualnews", root, "train")


@pytest.mark.parametrize("image_dir", ["resized", "images"])
def test_goodnews_original_layout(tmp_path, image_dir):
    root = write_goodnews(tmp_path / "gn", image_dir=image_dir)
    examples, report = read("goodnews", root, "val")
    assert_clean(examples, report, "goodnews")
    assert [e.id for e in examples] == ["0001abcd_0", "0001abcd_1"]
    assert examples[0].headline == "Headline of val" and examples[0].label is None


def test_goodnews_entityclip_layout(tmp_path):
    root = write_goodnews_entityclip(tmp_path / "gn")
    (root / "broken_images.txt").write_text("0002ef01_1.jpg\n")
    examples, report = read("goodnews", root, "test")
    assert [e.id for e in examples] == ["0002ef01_0"]
    assert examples[0].query == CAPTIONS[0] + " Photo: AP"  # \r\n -> one space, as the release does
    assert examples[0].headline == "Title test 0"
    assert reasons(report) == ["broken_image: 0002ef01_1.jpg is listed in broken_images.txt"]


@pytest.mark.parametrize("kind,writer", [("jsonl", write_jsonl), ("csv", write_csv)])
def test_generic_sources(tmp_path, kind, writer):
    root = writer(tmp_path / kind)
    examples, report = read(kind, root, "train")
    assert_clean(examples, report, kind)
    assert [e.id for e in examples] == ["img0", "img1", "img2"]
    assert [e.explanation for e in examples] == ["Explanation 0.", "Explanation 1.", "Explanation 2."]
    assert [e.label for e in examples] == LABELS


def test_generic_aliases_absolute_paths_and_line_number_ids(tmp_path):
    root = tmp_path / "g"
    image = write_jpeg(root / "a.jpg")
    rows = [{"image_path": str(image.resolve()), "caption": "Obama in Berlin"},
            {"image": "a.jpg", "query": "Merkel in Paris", "title": "A headline"}]
    write_jsonl(root, "test", rows)
    examples, report = read("jsonl", root, "test")
    assert len(report) == 0
    assert [e.id for e in examples] == ["1", "2"]
    assert examples[1].headline == "A headline" and examples[0].explanation is None
    write_csv(root, "other", [{"image": "a.jpg", "caption": "x"}, {"image": "a.jpg", "caption": "y"}])
    examples, _ = read("csv", root, "ignored", file="other.csv")
    assert [e.id for e in examples] == ["2", "3"]  # CSV file lines; the header is line 1


# ---------------------------------------------------------------- bad input

def test_bad_records_are_skipped_and_reported(tmp_path):
    root = tmp_path / "g"
    write_jpeg(root / "ok.jpg")
    outside = write_jpeg(tmp_path / "outside.jpg")
    (root / "link.jpg").symlink_to(outside)
    rows = [
        json.dumps({"id": "good", "image": "ok.jpg", "query": "Boris Johnson"}),
        json.dumps({"id": "gone", "image": "missing.jpg", "query": "x"}),
        json.dumps({"id": "dots", "image": "../outside.jpg", "query": "x"}),
        json.dumps({"id": "link", "image": "link.jpg", "query": "x"}),
        json.dumps({"id": "abs", "image": str(outside), "query": "x"}),
        json.dumps({"id": "empty", "image": "ok.jpg", "query": ""}),
        json.dumps({"id": "blank", "image": "ok.jpg", "query": " \t "}),
        json.dumps({"id": "good", "image": "ok.jpg", "query": "a duplicate"}),
        '{"id": "torn", "image": "ok.jpg", "qu',
        "[1, 2]",
        json.dumps({"id": "noimage", "query": "x"}),
    ]
    path = write_jsonl(root, "train", rows) / "train.jsonl"
    with open(path, "ab") as f:  # raw invalid UTF-8 bytes in a caption
        f.write(b'{"id": "latin1", "image": "ok.jpg", "query": "Fran\xe7ois"}\n')
    examples, report = read("jsonl", root, "train")
    assert [(e.id, e.query) for e in examples] == [("good", "Boris Johnson")]
    got = dict(report.items)
    assert got["gone"].startswith("missing_image: ") and got["gone"].endswith("missing.jpg")
    for record_id in ("dots", "link", "abs"):
        assert got[record_id].startswith("path_escapes_root: "), record_id
    assert got["empty"].startswith("empty_query") and got["blank"].startswith("empty_query")
    assert got["good"].startswith("duplicate_id: good")
    assert got["line 9"] == "bad_json: line 9 of train.jsonl"
    assert got["line 10"].startswith("bad_json: line 10")
    assert got["noimage"].startswith("bad_record")
    assert got["latin1"].startswith("bad_utf8")
    assert report.counts == {"missing_image": 1, "path_escapes_root": 3, "empty_query": 2, "duplicate_id": 1,
                             "bad_json": 2, "bad_record": 1, "bad_utf8": 1}
    json.dumps(report.to_dict())  # the report is writable as JSON


def test_bad_records_in_release_json_files(tmp_path):
    root = write_n24news(tmp_path / "n24", splits=("train",), n=3)
    split_file = root / "nytimes_train.json"
    records = json.loads(split_file.read_text())
    records[1]["image_id"] = "train000"                  # duplicate of the first
    records.append(dict(records[2], image_id="nofile"))  # image not on disk
    records.append(dict(records[2], image_id="../../escape"))
    records.append(dict(records[2], image_id="latin", caption="PLACEHOLDER"))
    records.append("not a record")
    raw = json.dumps(records).encode().replace(b"PLACEHOLDER", b"Z\xfcrich")  # a Latin-1 byte
    split_file.write_bytes(raw)
    write_jpeg(root / "images" / "latin.jpg")
    write_jpeg(tmp_path / "escape.jpg")
    examples, report = read("n24news", root, "train")
    assert [e.id for e in examples] == ["train000", "train002"]
    assert report.counts == {"duplicate_id": 1, "missing_image": 1, "path_escapes_root": 1, "bad_utf8": 1,
                             "bad_record": 1}


def test_visualnews_and_goodnews_skip_missing_images(tmp_path):
    vn = write_visualnews(tmp_path / "vn")
    next(vn.glob("images/guardian/images/train/*.jpg")).unlink()
    examples, report = read("visualnews", vn, "train")
    assert len(examples) == 2 and report.counts == {"missing_image": 1}
    gn = write_goodnews(tmp_path / "gn")
    (gn / "resized" / "0000abcd_1.jpg").unlink()
    examples, report = read("goodnews", gn, "train")
    assert [e.id for e in examples] == ["0000abcd_0"] and report.counts == {"missing_image": 1}


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_wrong_root_or_missing_split_file_is_refused(tmp_path, kind):
    with pytest.raises(EntityClipError, match="not a directory"):
        read(kind, tmp_path / "nowhere", "train")
    (tmp_path / "images").mkdir()
    with pytest.raises(EntityClipError, match="expected .*train"):
        read(kind, tmp_path, "train")


def test_unknown_kind_split_and_option(tmp_path):
    with pytest.raises(EntityClipError, match="known kinds: n24news, visualnews, goodnews, jsonl, csv"):
        read("coco", tmp_path, "train")
    with pytest.raises(EntityClipError, match="no split 'holdout'"):
        read("n24news", tmp_path, "holdout")
    with pytest.raises(EntityClipError, match="options are: file"):
        read("jsonl", tmp_path, "train", limit=3)


# ---------------------------------------------------------------- explanations

def test_read_capdsc_full_keys_tails_and_ambiguity(tmp_path):
    path = tmp_path / "CapDsc_mistral_test.json"
    path.write_text(json.dumps({
        "/star/u/VisualNews/images//bbc/images/0001/000.jpg": "About the BBC photo.",
        "/star/u/VisualNews/images//guardian/images/0001/000.jpg": "About the Guardian photo.",
        "abc_1.jpg": ["First explanation.", "second"],
        "empty.jpg": "",
    }))
    index = expl.read_capdsc(path)
    assert index["abc_1.jpg"] == "First explanation."
    assert index["bbc/images/0001/000.jpg"] == "About the BBC photo."
    assert index["/star/u/VisualNews/images//guardian/images/0001/000.jpg"] == "About the Guardian photo."
    assert "000.jpg" not in index and "0001/000.jpg" not in index  # ambiguous tails left out
    assert "empty.jpg" not in index
    with pytest.raises(EntityClipError, match="not found"):
        expl.read_capdsc(tmp_path / "none.json")


@pytest.mark.parametrize("kind,writer,split", [
    ("n24news", lambda r: write_n24news(r, layout="entityclip"), "val"),
    ("visualnews", write_visualnews, "train"),
    ("goodnews", write_goodnews_entityclip, "val"),
])
def test_release_capdsc_attaches_to_every_example(tmp_path, kind, writer, split):
    root = writer(tmp_path / kind)
    examples, _ = read(kind, root, split)
    capdsc = expl.release_capdsc_path(kind, root, split)
    report = SkipReport()
    attached = list(expl.attach_explanations(examples, by_image=expl.read_capdsc(capdsc),
                                             policy="error", report=report))
    assert len(attached) == len(examples) == len({e.explanation for e in attached})
    for example in attached:
        key = pathlib.Path(example.image_path).name if kind == "goodnews" else example.id
        assert example.explanation == f"Explanation of {key}."


def _write_cache(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("policy", ["empty", "skip", "error"])
def test_attach_policies(tmp_path, policy):
    root = write_jsonl(tmp_path / "g")
    examples, _ = read("jsonl", root, "train")
    examples = [e.__class__(**{**e.__dict__, "explanation": None}) for e in examples]
    cache = _write_cache(tmp_path / "cache.jsonl", [
        {"id": "img0", "query": "q", "explanation": "By id.", "status": "ok"},
        {"id": "zzz", "query": examples[1].query, "explanation": "By query.", "status": "ok"},
        {"id": "img2", "query": examples[2].query, "explanation": "", "status": "failed", "reason": "timeout"},
    ])
    by_id, by_query = expl.read_explanation_cache(cache)
    report = SkipReport()
    attached = expl.attach_explanations(examples, by_id=by_id, by_query=by_query, policy=policy, report=report)
    if policy == "error":
        with pytest.raises(EntityClipError, match="no explanation for record img2.*entityclip explain"):
            list(attached)
        return
    attached = list(attached)
    assert [e.explanation for e in attached[:2]] == ["By id.", "By query."]
    if policy == "skip":
        assert len(attached) == 2 and report.counts == {"missing_explanation": 1}
        assert report.items[0][0] == "img2" and not report.notes
    else:
        assert attached[2].explanation == "" and len(report) == 0
        assert report.note_counts == {"empty_explanation": 1} and report.notes[0][0] == "img2"
        assert report.to_dict()["noted"] == 1


def test_attach_keeps_given_explanations_and_checks_policy(tmp_path):
    root = write_jsonl(tmp_path / "g")
    examples, _ = read("jsonl", root, "train")
    kept = list(expl.attach_explanations(examples, by_id={"img0": "other"}, policy="error"))
    assert [e.explanation for e in kept] == [e.explanation for e in examples]
    with pytest.raises(EntityClipError, match="policy 'drop'"):
        expl.attach_explanations(examples, policy="drop", report=SkipReport())


def test_check_source_command(tmp_path, capsys):
    import argparse
    from entityclip_jax.commands import records as commands
    root = write_n24news(tmp_path / "n24", layout="entityclip")
    (root / "imgs" / "dev001.jpg").unlink()
    parser = argparse.ArgumentParser()
    commands.configure_check_source(parser)
    report_path = tmp_path / "report.json"
    commands.run_check_source(parser.parse_args(["--kind", "n24news", "--root", str(root), "--split", "val",
                                                 "--capdsc", "auto", "--policy", "skip",
                                                 "--report", str(report_path)]))
    out = capsys.readouterr().out
    assert "n24news val: 2 examples, 1 skipped {'missing_image': 1}" in out
    assert json.loads(report_path.read_text())["records"][0]["id"] == "dev001"
