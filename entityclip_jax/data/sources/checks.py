"""Checks every source adapter applies to a raw record before it yields it.

Bad records are skipped and land in the SkipReport with a reason that starts
with a short code: missing_image, path_escapes_root, empty_query, bad_utf8,
duplicate_id, bad_json, bad_record. A missing split file or a wrong root is
not a bad record: it raises EntityClipError naming the file and the layout.

Files are decoded with errors="surrogateescape", so invalid UTF-8 bytes survive
as lone surrogates and are caught per record instead of failing a whole file.
"""
import json

from entityclip_jax import storage
from entityclip_jax.errors import EntityClipError


def dataset_root(root, dataset, layout):
    """The dataset root (local or gs://) as a real (symlink-resolved) epath; refuses a missing one."""
    path = storage.path(root)
    if not path.is_dir():
        raise EntityClipError(f"{dataset} root {path} is not a directory; expected the layout: {layout}")
    return storage.path(storage.resolve(path))


def canonical_split(split, aliases, dataset):
    """Maps split aliases (e.g. val -> dev) to the release's name; refuses unknown ones."""
    name = aliases.get(str(split).lower())
    if name is None:
        raise EntityClipError(f"{dataset} has no split {split!r}; use one of {sorted(aliases)}")
    return name


def first_existing(paths, what, layout):
    """The first of `paths` that exists, else EntityClipError naming the expected files."""
    for path in paths:
        if path.exists():
            return path
    expected = " or ".join(str(p) for p in paths)
    raise EntityClipError(f"{what} not found: expected {expected} ({layout})")


def read_text(path):
    return storage.path(path).read_bytes().decode("utf-8", errors="surrogateescape")


def load_json(path, layout):
    """A whole-file JSON document (a split file); malformed -> EntityClipError."""
    try:
        return json.loads(read_text(path))
    except ValueError as err:
        raise EntityClipError(f"{path} is not valid JSON ({err}); expected {layout}. "
                              "Re-download or repair the file.")


def is_utf8(text):
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def clean_query(value, report, record_id, field="caption"):
    """The caption as one line of text, or None (skipped: empty_query / bad_utf8)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="surrogateescape")
    if value is None or (isinstance(value, str) and not value.strip()):
        report.skip(record_id, f"empty_query: {field} is empty or missing")
        return None
    if not isinstance(value, str):  # a number, a list ...: say so, it is not missing
        report.skip(record_id, f"not_text: {field} is {type(value).__name__} {str(value)[:40]!r}, not a string; "
                               "quote it in the source file")
        return None
    if not is_utf8(value):
        report.skip(record_id, f"bad_utf8: {field} is not valid UTF-8")
        return None
    return " ".join(value.split())  # \r\n and runs of spaces in scraped captions -> one space


def optional_text(value):
    """Headline, label, explanation: cleaned, None when absent; bad bytes become '?'."""
    if isinstance(value, dict):  # GoodNews headline {"main": ..., "print_headline": ...}
        value = value.get("main") or value.get("print_headline")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    text = " ".join(str(value).split())
    return text if is_utf8(text) else text.encode("utf-8", errors="replace").decode("utf-8")


def resolve_image(root, path_text, report, record_id, bases=(".",)):
    """Real path of an image file inside `root`, or None (skipped).

    Relative paths are tried against each of `bases` (relative to root or absolute)
    in order. Symlinks are resolved before the containment check, so a link that
    points outside the root is refused like a "../" path.
    """
    if not isinstance(path_text, str) or not path_text.strip():
        report.skip(record_id, "bad_record: no image path")
        return None
    if storage.is_absolute(path_text):
        candidates = [path_text]
    else:
        candidates = [storage.join(root, base, path_text) for base in dict.fromkeys(map(str, bases))]
    escaped = None
    for candidate in candidates:
        real = storage.resolve(candidate)
        if not _inside(real, str(root)):
            escaped = escaped or candidate
        elif storage.path(real).is_file():
            return real
    if escaped is not None:
        report.skip(record_id, f"path_escapes_root: {path_text} resolves outside {root}")
    else:
        report.skip(record_id, f"missing_image: {candidates[0]}")
    return None


def _inside(path, root):
    """path is root or lies below it (both resolved; gs://b/x is not inside gs://b/xy)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


class UniqueIds:
    """Keeps the first record of each id; later ones are skipped as duplicate_id."""

    def __init__(self):
        self.seen = set()

    def first(self, record_id, report):
        if not is_utf8(record_id):
            report.skip(ascii(record_id), "bad_utf8: id is not valid UTF-8")
            return False
        if record_id in self.seen:
            report.skip(record_id, f"duplicate_id: {record_id} seen before (first kept)")
            return False
        self.seen.add(record_id)
        return True
