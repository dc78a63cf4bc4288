"""N24News (New York Times): nytimes_{train,dev,test}.json + images/{image_id}.jpg.

Each split file is a JSON list of records with fields section, headline,
abstract, caption, image_url, article_url, image_id, body. The query is the
caption, the label is the section (24 classes), the headline is kept.
Also accepted: the EntityCLIP release layout, news/nytimes_{split}.json with
imgs/{image_id}.jpg (and news/CapDsc_mistral_{split}.json beside it).
"""
from entityclip_jax.data.example import RawExample
from entityclip_jax.data.sources import checks
from entityclip_jax.errors import EntityClipError

LAYOUT = ("ROOT/nytimes_{split}.json + ROOT/images/{image_id}.jpg, "
          "or ROOT/news/nytimes_{split}.json + ROOT/imgs/{image_id}.jpg")
SPLITS = {"train": "train", "dev": "dev", "val": "dev", "validation": "dev", "test": "test"}


def read_n24news(root, split, report):
    root = checks.dataset_root(root, "N24News", LAYOUT)
    split = checks.canonical_split(split, SPLITS, "N24News")
    split_file = checks.first_existing(
        [root / f"nytimes_{split}.json", root / "news" / f"nytimes_{split}.json"], "N24News split file", LAYOUT)
    image_dir = checks.first_existing([root / "images", root / "imgs"], "N24News image folder", LAYOUT)
    records = checks.load_json(split_file, LAYOUT)
    if not isinstance(records, list):
        raise EntityClipError(f"{split_file} holds a {type(records).__name__}, expected a JSON list of records")
    return _examples(records, root, image_dir, split_file.name, report)


def _examples(records, root, image_dir, file_name, report):
    ids = checks.UniqueIds()
    for position, record in enumerate(records):
        if not isinstance(record, dict) or record.get("image_id") in (None, ""):
            report.skip(f"{file_name}[{position}]", "bad_record: not an object with an image_id")
            continue
        record_id = str(record["image_id"])
        if not ids.first(record_id, report):
            continue
        query = checks.clean_query(record.get("caption"), report, record_id)
        if query is None:
            continue
        image = checks.resolve_image(root, f"{record_id}.jpg", report, record_id, bases=(image_dir,))
        if image is None:
            continue
        yield RawExample(id=record_id, query=query, image_path=image,
                         headline=checks.optional_text(record.get("headline")),
                         label=checks.optional_text(record.get("section")), source="n24news")
