"""VisualNews: records {id, caption, topic, source, image_path, article_path}.

Two layouts are accepted:
- EntityCLIP release: ROOT/{train,val,test}.json, one JSON list per split, with
  image_path like "./bbc/images/0013/123.jpg" under ROOT/images/ (the release
  reads ROOT/images/<image_path[1:]>), and CapDsc_mistral_{split}.json beside it.
- Original release: one data.json (ROOT/data.json or ROOT/origin/data.json) with
  image_path relative to the folder that holds data.json. It carries no split:
  read it with split="all", or give split_ids=FILE (a JSON list of ids, or one id
  per line) to keep one split.
Image paths are looked up under the data file's folder, ROOT, ROOT/images and
ROOT/origin, in that order. The query is the caption, the label is the topic.
"""
from entityclip_jax import storage
from entityclip_jax.data.example import RawExample
from entityclip_jax.data.sources import checks
from entityclip_jax.errors import EntityClipError

LAYOUT = ("ROOT/{train,val,test}.json with images under ROOT/images/ (EntityCLIP release), "
          "or ROOT/data.json / ROOT/origin/data.json (original release; split='all' or split_ids=FILE)")
SPLITS = {"train": "train", "val": "val", "dev": "val", "validation": "val", "test": "test", "all": "all"}


def read_visualnews(root, split, report, split_ids=None):
    root = checks.dataset_root(root, "VisualNews", LAYOUT)
    split = checks.canonical_split(split, SPLITS, "VisualNews")
    per_split = root / f"{split}.json"
    if per_split.is_file() and split_ids is None:
        data_file, keep = per_split, None
    else:
        data_file = checks.first_existing(
            [per_split, root / "data.json", root / "origin" / "data.json"], "VisualNews data file", LAYOUT)
        keep = _load_split_ids(root, split_ids) if split_ids else None
        if data_file.name == "data.json" and keep is None and split != "all":
            raise EntityClipError(f"{data_file} holds every split; read it with split='all' or pass "
                                  f"split_ids=FILE listing the ids of split {split!r}")
    records = checks.load_json(data_file, LAYOUT)
    if not isinstance(records, list):
        raise EntityClipError(f"{data_file} holds a {type(records).__name__}, expected a JSON list of records")
    bases = (data_file.parent, root, root / "images", root / "origin")
    return _examples(records, root, bases, keep, data_file.name, report)


def _load_split_ids(root, split_ids):
    path = storage.path(storage.join(root, split_ids))
    if not path.is_file():
        raise EntityClipError(f"VisualNews split id file {path} not found; give a JSON list of ids "
                              "or a text file with one id per line")
    if path.suffix == ".json":
        ids = checks.load_json(path, "a JSON list of VisualNews ids")
        if not isinstance(ids, list):
            raise EntityClipError(f"{path} must hold a JSON list of ids")
    else:
        ids = checks.read_text(path).split()
    return {str(i) for i in ids}


def _examples(records, root, bases, keep, file_name, report):
    ids = checks.UniqueIds()
    for position, record in enumerate(records):
        if not isinstance(record, dict) or record.get("id") in (None, ""):
            report.skip(f"{file_name}[{position}]", "bad_record: not an object with an id")
            continue
        record_id = str(record["id"])
        if keep is not None and record_id not in keep:
            continue
        if not ids.first(record_id, report):
            continue
        query = checks.clean_query(record.get("caption"), report, record_id)
        if query is None:
            continue
        image = checks.resolve_image(root, record.get("image_path"), report, record_id, bases=bases)
        if image is None:
            continue
        yield RawExample(id=record_id, query=query, image_path=image,
                         label=checks.optional_text(record.get("topic")), source="visualnews")
