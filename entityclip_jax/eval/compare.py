"""Two evaluations of one split, query by query: what model A gets right that B misses, and back.

Per direction, over every query: fixed (A ranks the correct item first, B does
not), broken (B does, A does not), better / worse / same (A's rank against B's).
The page lists the queries whose rank moved most (at most max_rows per direction),
sorted by the change, each with both models' top 5 side by side. Refused in one
line unless both evaluations ran on the same split with the same record set
(ids, captions and pairing: retrieval_details' fingerprint).
"""
import os

import numpy as np

from entityclip_jax import storage
from entityclip_jax.errors import EntityClipError
from entityclip_jax.eval.html_report import (COLUMNS, DEFAULT_ROWS, TITLES, data_name, images_on_page,
                                             page_thumbnails, query_rows, templates)
from entityclip_jax.eval.report import DIRECTIONS, recall_ks
from entityclip_jax.eval.retrieval_details import DIRECTIONS as QUERY_DIRECTIONS, load_results

COMPARE_TEMPLATE = "compare.html"


def rank_changes(ranks_a, ranks_b):
    """Counts of how A's 0-based ranks stand against B's, and the kind of each query."""
    a, b = np.asarray(ranks_a), np.asarray(ranks_b)
    kinds = np.where(a < b, "better", np.where(a > b, "worse", "same")).astype(object)
    kinds[(a == 0) & (b > 0)] = "fixed"
    kinds[(a > 0) & (b == 0)] = "broken"
    return {"fixed": int(((a == 0) & (b > 0)).sum()), "broken": int(((a > 0) & (b == 0)).sum()),
            "better": int((a < b).sum()), "worse": int((a > b).sum()), "same": int((a == b).sum()),
            "total": int(a.size)}, kinds


def most_moved(ranks_a, ranks_b, max_rows):
    """Indices of the max_rows queries whose rank moved most (ties: split order), sorted by the change."""
    change = np.asarray(ranks_b, np.int64) - np.asarray(ranks_a, np.int64)      # > 0: A ranks it better
    chosen = np.lexsort((np.arange(change.size), -np.abs(change)))[:max_rows]
    return chosen[np.lexsort((chosen, -change[chosen]))]


def compare_results(results_a, results_b, out=None, *, max_rows=DEFAULT_ROWS):
    """Writes the comparison page; returns (its path, {direction: counts})."""
    metrics_a, details_a = load_results(results_a)
    metrics_b, details_b = load_results(results_b)
    name_a, name_b = _name(results_a), _name(results_b)
    if metrics_a.get("split") != metrics_b.get("split") or details_a.records != details_b.records:
        raise EntityClipError(
            f"{results_a} and {results_b} evaluated different data ({data_name(metrics_a)}, records "
            f"{details_a.records} vs {data_name(metrics_b)}, records {details_b.records}); compare two evaluations "
            "of the same split")
    if name_a == name_b:
        name_a, name_b = f"A ({name_a})", f"B ({name_b})"
    sections, summary, rows_shown = [], {}, {}
    for direction in QUERY_DIRECTIONS:
        ranks_a, ranks_b = details_a.direction(direction)["ranks"], details_b.direction(direction)["ranks"]
        counts, kinds = rank_changes(ranks_a, ranks_b)
        rows = most_moved(ranks_a, ranks_b, max_rows)
        rows_shown[direction] = rows
        both = []
        for row_a, row_b in zip(query_rows(details_a, direction, rows), query_rows(details_b, direction, rows)):
            both.append(dict(row_a, rank_b=row_b["rank"], score_b=row_b["score"], top_b=row_b["top"],
                             change=row_b["rank"] - row_a["rank"], kind=kinds[row_a["order"]]))
        summary[direction] = dict(counts, label=DIRECTIONS[direction], name_a=name_a, name_b=name_b)
        sections.append({"key": direction, "title": TITLES[direction], "columns": COLUMNS[direction][:2],
                         "rows": both, "counts": counts, "total": counts["total"]})
    shown = images_on_page(details_a, rows_shown) | images_on_page(details_b, rows_shown)
    html = templates().get_template(COMPARE_TEMPLATE).render(
        title=f"{name_a} vs {name_b} on the {data_name(metrics_a)}", name_a=name_a, name_b=name_b,
        metrics_a=metrics_a, metrics_b=metrics_b, ks=recall_ks(metrics_a), directions=DIRECTIONS,
        sections=sections, thumbnails=page_thumbnails(shown, details_a.thumbnails, details_b.thumbnails))
    out = storage.path(out or storage.join(results_a, f"compare_{_name(results_b)}.html"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html)
    return out, summary


def _name(results_dir):
    return os.path.basename(str(results_dir).rstrip("/")) or str(results_dir)
