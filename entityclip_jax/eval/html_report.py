"""The retrieval report: one self-contained HTML page of what the model retrieved.

Per text query (text -> image): the caption, its ground-truth image, the rank
and score of that image, and the top 5 images with their scores; per image
(image -> text): the image, its captions, their best rank and score, and the top
5 captions. Above them, the Recall@K table and curve. Sorting and filtering by
rank run in the page (a few lines of script); nothing is fetched from a network:
every thumbnail is inlined once as a data: URI, so the file opens anywhere it is
copied to. Pages are rendered by Jinja2 templates (eval/templates/) with
autoescaping on: captions are user text and are shown as text.

A split with more queries than `max_rows` per direction shows a seeded random
sample of them (the Recall@K figures always cover every query).
"""
import os

import jinja2
import numpy as np

from entityclip_jax import storage
from entityclip_jax.eval.report import DIRECTIONS, recall_ks
from entityclip_jax.eval.retrieval_details import DIRECTIONS as QUERY_DIRECTIONS
from entityclip_jax.eval.thumbnails import data_uri

REPORT_FILE = "report.html"
DEFAULT_ROWS = 1000          # queries per direction on a page
THUMBNAIL_LIMIT = 20000      # a split with more images keeps only the thumbnails its report shows
TOP_K = 5
TITLES = {"t2i": "text -> image: each caption looks for its image",
          "i2t": "image -> text: each image looks for its captions"}
COLUMNS = {"t2i": ("query", "ground truth", "rank / score", f"top {TOP_K}"),
           "i2t": ("image", "its captions", "rank / score", f"top {TOP_K}")}


def templates():
    """The Jinja2 environment of the page templates (package data), escaping every value."""
    return jinja2.Environment(loader=jinja2.PackageLoader("entityclip_jax.eval", "templates"),
                              autoescape=True, undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True)


def shown_rows(count, max_rows, seed=0):
    """Which of `count` queries a page shows: all, or a sorted seeded sample of max_rows."""
    if count <= max_rows:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, max_rows, replace=False))


def rows_on_page(details, max_rows=DEFAULT_ROWS):
    """{"t2i": rows, "i2t": rows}: the query indices a report of `details` shows."""
    return {"t2i": shown_rows(len(details.text_ids), max_rows), "i2t": shown_rows(len(details.image_ids), max_rows)}


def images_on_page(details, rows):
    """Ids of every image the rows {direction: indices} show (their thumbnails)."""
    t2i = details.direction("t2i")
    shown = np.concatenate([details.text_image[rows["t2i"]], t2i["top"][rows["t2i"]].ravel(), rows["i2t"]])
    return {str(details.image_ids[i]) for i in np.unique(shown.astype(np.int64))}


def query_rows(details, direction, rows):
    """One dict per shown query, for the templates (ranks 1-based)."""
    d = details.direction(direction)
    out = []
    for q in (int(r) for r in rows):
        row = {"order": q, "rank": int(d["ranks"][q]) + 1, "score": float(d["correct_scores"][q])}
        if direction == "t2i":
            row.update(id=str(details.text_ids[q]), query=str(details.texts[q]),
                       truth=str(details.image_ids[details.text_image[q]]),
                       top=[{"image": str(details.image_ids[i]), "score": float(s),
                             "correct": int(i) == int(details.text_image[q])}
                            for i, s in zip(d["top"][q], d["top_scores"][q])])
        else:
            row.update(image=str(details.image_ids[q]),
                       captions=[str(t) for t in details.texts[details.text_image == q]],
                       top=[{"text": str(details.texts[t]), "id": str(details.text_ids[t]), "score": float(s),
                             "correct": int(details.text_image[t]) == q}
                            for t, s in zip(d["top"][q], d["top_scores"][q])])
        out.append(row)
    return out


def page_thumbnails(image_ids, *thumbnail_stores):
    """{image id: data: URI} of the images a page shows, each once; the first store that has it wins."""
    found = {}
    for image_id in sorted(image_ids):
        for store in thumbnail_stores:
            if image_id in store:
                found[image_id] = data_uri(store[image_id])
                break
    return found


def run_name(metrics):
    return os.path.basename(str(metrics.get("checkpoint", "model")).rstrip("/")) or "model"


def data_name(metrics):
    return f"{metrics.get('split', '?')} of {os.path.basename(str(metrics.get('data', '?')).rstrip('/'))}"


def render_report(metrics, details, *, curve_png=None, max_rows=DEFAULT_ROWS):
    """The report page as a string."""
    rows = rows_on_page(details, max_rows)
    sections = [{"key": d, "title": TITLES[d], "columns": COLUMNS[d], "rows": query_rows(details, d, rows[d]),
                 "total": len(details.direction(d)["ranks"])} for d in QUERY_DIRECTIONS]
    return templates().get_template(REPORT_FILE).render(
        title=f"Retrieval of {run_name(metrics)} on the {data_name(metrics)}", metrics=metrics,
        ks=recall_ks(metrics), directions=DIRECTIONS, sections=sections,
        curve=data_uri(curve_png, "image/png") if curve_png else None,
        thumbnails=page_thumbnails(images_on_page(details, rows), details.thumbnails))


def write_report(results_dir, metrics, details, *, max_rows=DEFAULT_ROWS):
    """results_dir/report.html, with results_dir/retrieval.png (write_retrieval_report's) as its curve."""
    curve = storage.path(results_dir) / "retrieval.png"
    html = render_report(metrics, details, curve_png=curve.read_bytes() if curve.is_file() else None,
                         max_rows=max_rows)
    out = storage.path(results_dir) / REPORT_FILE
    out.write_text(html)
    return out
