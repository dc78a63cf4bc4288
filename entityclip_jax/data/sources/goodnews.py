"""GoodNews (New York Times), in either of two layouts.

- Original release (furkanbiten/GoodNews): ROOT/captioning_dataset.json keyed by
  article id, each with "images" {index: caption} and "headline" {"main": ...};
  ROOT/img_splits.json {"<article>_<index>.jpg": "train" | "val" | "test"};
  images under ROOT/resized/ (or ROOT/images/).
- EntityCLIP release: ROOT/new_goodnews_capim_{split}.json, a JSON list of
  {image_id: "<article>_<index>.jpg", captioning, title} with images under
  ROOT/images/; ROOT/broken_images.txt (optional) lists files to leave out.

layout="auto" picks the EntityCLIP file when it exists for the split. Ids are the
image file stem "<article>_<index>" in both layouts; the query is the caption,
the headline is the article headline (title). GoodNews has no class label.
"""
import posixpath

from entityclip_jax.data.example import RawExample
from entityclip_jax.data.sources import checks
from entityclip_jax.errors import EntityClipError

LAYOUT = ("ROOT/captioning_dataset.json + ROOT/img_splits.json + ROOT/resized/ (original), "
          "or ROOT/new_goodnews_capim_{split}.json + ROOT/images/ (EntityCLIP release)")
SPLITS = {"train": "train", "val": "val", "dev": "val", "validation": "val", "test": "test"}
LAYOUTS = ("auto", "original", "entityclip")


def read_goodnews(root, split, report, layout="auto"):
    root = checks.dataset_root(root, "GoodNews", LAYOUT)
    split = checks.canonical_split(split, SPLITS, "GoodNews")
    if layout not in LAYOUTS:
        raise EntityClipError(f"GoodNews layout {layout!r} is unknown; use one of {LAYOUTS}")
    release_file = root / f"new_goodnews_capim_{split}.json"
    if layout == "entityclip" or (layout == "auto" and release_file.is_file()):
        return _entityclip_examples(root, checks.first_existing([release_file], "GoodNews split file", LAYOUT),
                                    report)
    if layout == "auto" and not (root / "captioning_dataset.json").is_file():
        raise EntityClipError(f"GoodNews split {split!r} not found: expected {release_file} (EntityCLIP release) "
                              f"or {root / 'captioning_dataset.json'} + img_splits.json (original release)")
    dataset_file = checks.first_existing([root / "captioning_dataset.json"], "GoodNews captions", LAYOUT)
    splits_file = checks.first_existing([root / "img_splits.json"], "GoodNews split file", LAYOUT)
    image_dir = checks.first_existing([root / "resized", root / "images"], "GoodNews image folder", LAYOUT)
    articles = checks.load_json(dataset_file, LAYOUT)
    image_splits = checks.load_json(splits_file, LAYOUT)
    if not isinstance(articles, dict) or not isinstance(image_splits, dict):
        raise EntityClipError(f"{dataset_file} and {splits_file} must each hold a JSON object ({LAYOUT})")
    return _original_examples(articles, image_splits, split, root, image_dir, report)


def _original_examples(articles, image_splits, split, root, image_dir, report):
    ids = checks.UniqueIds()
    for article_id, article in articles.items():
        if not isinstance(article, dict) or not isinstance(article.get("images"), dict):
            report.skip(article_id, "bad_record: article without an 'images' object")
            continue
        headline = checks.optional_text(article.get("headline"))
        for index, caption in sorted(article["images"].items(), key=lambda kv: _index_order(kv[0])):
            file_name = f"{article_id}_{index}.jpg"
            if image_splits.get(file_name) != split:
                continue
            record_id = f"{article_id}_{index}"
            if not ids.first(record_id, report):
                continue
            query = checks.clean_query(caption, report, record_id)
            if query is None:
                continue
            image = checks.resolve_image(root, file_name, report, record_id, bases=(image_dir,))
            if image is not None:
                yield RawExample(id=record_id, query=query, image_path=image, headline=headline,
                                 source="goodnews")


def _index_order(index):
    return (0, int(index), "") if str(index).isdigit() else (1, 0, str(index))


def _entityclip_examples(root, release_file, report):
    records = checks.load_json(release_file, LAYOUT)
    if not isinstance(records, list):
        raise EntityClipError(f"{release_file} holds a {type(records).__name__}, expected a JSON list")
    broken_file = root / "broken_images.txt"
    broken = set(checks.read_text(broken_file).split()) if broken_file.is_file() else set()
    image_dir = checks.first_existing([root / "images"], "GoodNews image folder", LAYOUT)
    return _release_records(records, root, image_dir, broken, release_file.name, report)


def _release_records(records, root, image_dir, broken, source_name, report):
    ids = checks.UniqueIds()
    for position, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("image_id"), str) or not record["image_id"]:
            report.skip(f"{source_name}[{position}]", "bad_record: not an object with an image_id")
            continue
        suffix = posixpath.splitext(record["image_id"])[1]  # a file name in the release, not a path of ours
        image_file = record["image_id"] if suffix else record["image_id"] + ".jpg"
        record_id = posixpath.splitext(posixpath.basename(image_file))[0]
        if not ids.first(record_id, report):
            continue
        if image_file in broken:
            report.skip(record_id, f"broken_image: {image_file} is listed in broken_images.txt")
            continue
        query = checks.clean_query(record.get("captioning"), report, record_id, field="captioning")
        if query is None:
            continue
        image = checks.resolve_image(root, image_file, report, record_id, bases=(image_dir,))
        if image is not None:
            yield RawExample(id=record_id, query=query, image_path=image,
                             headline=checks.optional_text(record.get("title")), source="goodnews")
