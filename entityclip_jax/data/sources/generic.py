"""Generic JSONL and CSV sources: one record per line (or row).

Fields: image (alias image_path; a path relative to ROOT, or absolute inside
ROOT), query (alias caption); optional id, label, headline (alias title),
explanation. The id defaults to the line number in the file (1-based, the CSV
header being line 1). The file defaults to ROOT/{split}.jsonl or ROOT/{split}.csv;
file=PATH (relative to ROOT or absolute) names another one.
"""
import csv
import json

from entityclip_jax import storage
from entityclip_jax.data.example import RawExample
from entityclip_jax.data.sources import checks
from entityclip_jax.errors import EntityClipError

IMAGE_FIELDS, QUERY_FIELDS, HEADLINE_FIELDS = ("image", "image_path"), ("query", "caption"), ("headline", "title")


def _source_file(root, split, file, suffix, kind):
    layout = f"ROOT/{{split}}{suffix} with fields image, query and optional id, label, headline, explanation"
    root = checks.dataset_root(root, kind, layout)
    path = storage.path(storage.join(root, file)) if file else root / f"{split}{suffix}"
    return root, checks.first_existing([path], f"{kind} file", layout)


def read_jsonl(root, split, report, file=None):
    root, path = _source_file(root, split, file, ".jsonl", "JSONL")
    return _jsonl_examples(root, path, report)


def _jsonl_examples(root, path, report):
    ids = checks.UniqueIds()
    with storage.open(path, errors="surrogateescape") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                report.skip(f"line {line_number}", f"bad_json: line {line_number} of {path.name}")
                continue
            if not isinstance(record, dict):
                report.skip(f"line {line_number}", f"bad_json: line {line_number} of {path.name} is not an object")
                continue
            example = _example(record, line_number, root, ids, report, "jsonl")
            if example is not None:
                yield example


def read_csv(root, split, report, file=None):
    root, path = _source_file(root, split, file, ".csv", "CSV")
    with storage.open(path, errors="surrogateescape", newline="") as f:
        header = next(csv.reader(f), [])
    if not set(header) & set(IMAGE_FIELDS) or not set(header) & set(QUERY_FIELDS):
        raise EntityClipError(f"{path} has columns {header}; it needs an image column "
                              f"({' or '.join(IMAGE_FIELDS)}) and a query column ({' or '.join(QUERY_FIELDS)})")
    return _csv_examples(root, path, report)


def _csv_examples(root, path, report):
    ids = checks.UniqueIds()
    with storage.open(path, errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        for record in reader:
            example = _example(record, reader.line_num, root, ids, report, "csv")
            if example is not None:
                yield example


def _field(record, names):
    for name in names:
        if record.get(name) not in (None, ""):
            return record[name]
    return None


def _example(record, line_number, root, ids, report, source):
    record_id = record.get("id")
    record_id = str(line_number) if record_id in (None, "") else str(record_id)
    if not ids.first(record_id, report):
        return None
    query = checks.clean_query(_field(record, QUERY_FIELDS), report, record_id, field="query")
    if query is None:
        return None
    image = checks.resolve_image(root, _field(record, IMAGE_FIELDS), report, record_id)
    if image is None:
        return None
    return RawExample(id=record_id, query=query, image_path=image,
                      headline=checks.optional_text(_field(record, HEADLINE_FIELDS)),
                      label=checks.optional_text(record.get("label")),
                      explanation=checks.optional_text(record.get("explanation")), source=source)
