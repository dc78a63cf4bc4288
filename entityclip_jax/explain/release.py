"""Imports the EntityCLIP release's explanations (CapDsc_*.json) into the explanation cache.

With a dataset source, each example is matched to a CapDsc key by its image path
(full path, then its last 1..4 path components, as the data stage does) and its
record carries the example's id and query, so `read_explanations` finds it by
id and by query. Without a source, ids are the CapDsc keys themselves and the
query is unknown. Imported records have backend "release-import", model
RELEASE_MODEL and prompt_version RELEASE_PROMPT; importing twice writes nothing new.
"""
import collections

from entityclip_jax.data.sources.explanations import path_tails, read_capdsc
from entityclip_jax.data import explanation_cache

RELEASE_MODEL = "entityclip-release-mistral"
RELEASE_PROMPT = "release-capdsc"


def _full_keys(index):
    """The file's own keys: read_capdsc's index also holds their path tails."""
    tails = {tail for key in index for tail in path_tails(key) if tail != key}
    return [key for key in index if key not in tails]


def _pairs_from_source(index, examples, counts):
    for example in examples:
        keys = [example.id]
        if example.image_path:
            keys = [example.image_path, *path_tails(example.image_path), example.id]
        text = next((index[k] for k in keys if k in index), None)
        if text is None:
            counts["example_without_explanation"] += 1
            continue
        yield example.id, example.query, text


def import_capdsc(capdsc_path, cache_path, examples=None):
    """Writes one "ok" record per matched id; returns counts (imported, already_cached, ...)."""
    index = read_capdsc(capdsc_path)
    counts = collections.Counter()
    if examples is None:
        pairs = ((key, None, index[key]) for key in _full_keys(index))
    else:
        pairs = _pairs_from_source(index, examples, counts)
    have = {(r["id"], r.get("query"), r.get("explanation")) for r in explanation_cache.iter_records(cache_path)
            if r.get("status") == explanation_cache.OK and r.get("model") == RELEASE_MODEL}
    with explanation_cache.CacheWriter(cache_path, sync_every=1024) as writer:
        for record_id, query, text in pairs:
            if (record_id, query, text) in have:
                counts["already_cached"] += 1
                continue
            writer.write(explanation_cache.make_record(record_id, query, text, backend="release-import",
                                           model=RELEASE_MODEL, prompt_version=RELEASE_PROMPT))
            have.add((record_id, query, text))
            counts["imported"] += 1
        if writer.torn_bytes:
            counts["torn_bytes_cut"] = writer.torn_bytes
    return counts
