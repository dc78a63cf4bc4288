"""Raw dataset releases -> RawExample streams, one adapter per dataset.

Every adapter is read_<name>(root, split, report, **options) -> Iterator[RawExample];
layout problems (wrong root, missing split file) raise EntityClipError at call
time, bad records are skipped into the SkipReport while iterating.
"""
import inspect

from entityclip_jax.data.sources.generic import read_csv, read_jsonl
from entityclip_jax.data.sources.goodnews import read_goodnews
from entityclip_jax.data.sources.n24news import read_n24news
from entityclip_jax.data.sources.visualnews import read_visualnews
from entityclip_jax.errors import EntityClipError

SOURCES = {"n24news": read_n24news, "visualnews": read_visualnews, "goodnews": read_goodnews,
           "jsonl": read_jsonl, "csv": read_csv}


def read_source(kind, root, split, report, **options):
    """RawExamples of one split of a dataset of the given kind (a SOURCES key)."""
    if kind not in SOURCES:
        raise EntityClipError(f"unknown dataset kind {kind!r}; known kinds: {', '.join(SOURCES)}")
    reader = SOURCES[kind]
    accepted = [name for name in inspect.signature(reader).parameters if name not in ("root", "split", "report")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise EntityClipError(f"{kind} source takes no option {', '.join(unknown)}; "
                              f"its options are: {', '.join(accepted) or 'none'}")
    return reader(root, split, report, **options)
