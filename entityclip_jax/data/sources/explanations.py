"""Explanation sources and their attachment to raw examples.

Two sources exist:
- the project's explanation cache (JSONL written by `entityclip explain`), read by
  entityclip_jax.data.explanation_cache.read_explanations -> (by_id, by_query);
- the EntityCLIP release's CapDsc files: one JSON object {key: explanation} per
  split, keyed by image file name (N24News "<image_id>.jpg", GoodNews
  "<article>_<index>.jpg") or by the image path on the authors' machine
  (VisualNews ".../images//bbc/images/0013/123.jpg").

attach_explanations looks an example up by id, then by image path, then by query
text. Image keys are matched on their last 1 to 4 path components, so a CapDsc
key written as an absolute path on another machine still finds our image.
"""
import dataclasses
import os

from entityclip_jax import storage
from entityclip_jax.data.sources import checks
from entityclip_jax.errors import EntityClipError
from entityclip_jax.data.explanation_cache import read_explanations

POLICIES = ("empty", "skip", "error")
TAIL_DEPTH = 4  # "bbc/images/0013/123.jpg": VisualNews file names repeat across outlets


def path_tails(path):
    """'a/b//c/d.jpg' -> ['a/b/c/d.jpg', 'b/c/d.jpg', 'c/d.jpg', 'd.jpg'] (at most TAIL_DEPTH)."""
    parts = [p for p in str(path).replace("\\", "/").split("/") if p not in ("", ".")]
    return ["/".join(parts[-n:]) for n in range(min(TAIL_DEPTH, len(parts)), 0, -1)]


def read_capdsc(path):
    """{key: explanation} from a CapDsc_*.json file, indexed by the full key and by
    its last 1..4 path components (basename included). A tail shared by two keys
    with different explanations is ambiguous and left out; the full keys stay."""
    path = storage.path(path)
    if not path.is_file():
        raise EntityClipError(f"CapDsc file {path} not found; the EntityCLIP release ships "
                              "CapDsc_mistral_{split}.json (a JSON object {image name or path: explanation})")
    raw = checks.load_json(path, "a JSON object {image name or path: explanation}")
    if not isinstance(raw, dict):
        raise EntityClipError(f"{path} holds a {type(raw).__name__}; expected a JSON object "
                              "{image name or path: explanation}")
    texts = {}
    for key, value in raw.items():
        if isinstance(value, list):  # a list of explanations: the release tokenizes the first
            value = value[0] if value else None
        text = checks.optional_text(value)
        if text is not None:
            texts[key] = text
    index, ambiguous = {}, set()
    for key, text in texts.items():
        for tail in path_tails(key):
            if index.setdefault(tail, text) != text:
                ambiguous.add(tail)
    for tail in ambiguous:
        del index[tail]
    index.update(texts)  # full keys always stay
    return index


def read_explanation_cache(path):
    """(by_id, by_query) of the status-"ok" explanations in the project's JSONL cache."""
    return read_explanations(str(path))


def release_capdsc_path(kind, root, split):
    """Where the EntityCLIP release keeps the CapDsc file of a split (None: none there)."""
    root = storage.path(root)
    split = {"val": "dev", "validation": "dev"}.get(split, split) if kind == "n24news" else \
        {"dev": "val", "validation": "val"}.get(split, split)
    candidates = {
        "n24news": [root / "news" / f"CapDsc_mistral_{split}.json", root / f"CapDsc_mistral_{split}.json"],
        "visualnews": [root / f"CapDsc_mistral_{split}.json"],
        "goodnews": [root / "train_cap_individual" / f"New_Corr_CapDsc_mistral_{split}.json",
                     root / f"New_Corr_CapDsc_mistral_{split}.json"],
    }.get(kind, [])
    return next((p for p in candidates if p.is_file()), None)


def attach_explanations(examples, by_id=None, by_query=None, by_image=None, policy="empty", report=None):
    """Fills RawExample.explanation by id, then image path, then query text.

    An explanation already present (e.g. a JSONL column) is kept. When none is
    found, policy decides: "empty" keeps the example with explanation "" and
    notes it (report.note, reason empty_explanation); "skip" skips it
    (missing_explanation); "error" raises EntityClipError.
    """
    if policy not in POLICIES:
        raise EntityClipError(f"explanation policy {policy!r} is unknown; use one of {POLICIES}")
    if policy != "error" and report is None:
        raise EntityClipError("attach_explanations needs a SkipReport for policy 'empty' or 'skip'")
    return _attach(examples, by_id or {}, by_query or {}, by_image or {}, policy, report)


def _lookup(example, by_id, by_query, by_image):
    if example.id in by_id:
        return by_id[example.id]
    if example.image_path and by_image:
        if example.image_path in by_image:
            return by_image[example.image_path]
        for tail in path_tails(example.image_path):
            if tail in by_image:
                return by_image[tail]
    return by_query.get(example.query)


def _attach(examples, by_id, by_query, by_image, policy, report):
    for example in examples:
        if example.explanation:
            yield example
            continue
        text = _lookup(example, by_id, by_query, by_image)
        if text:
            yield dataclasses.replace(example, explanation=text)
            continue
        where = f"id {example.id}, image {os.path.basename(example.image_path or '') or '-'}"
        if policy == "error":
            raise EntityClipError(
                f"no explanation for record {example.id} ({where}, query {example.query[:60]!r}); generate it "
                "with `entityclip explain`, give the release's CapDsc file, or set the explanation policy "
                "to 'empty' or 'skip'")
        if policy == "skip":
            report.skip(example.id, f"missing_explanation: none found by {where} or query")
            continue
        report.note(example.id, f"empty_explanation: none found by {where} or query")
        yield dataclasses.replace(example, explanation="")
