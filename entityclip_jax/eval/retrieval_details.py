"""What one evaluation knows per query, for the pages a person reads (report, compare).

`entityclip eval --report` writes retrieval_details.npz beside retrieval.json:
  image_ids [Ni] str       one per distinct image (the gallery of text -> image), in split order
  text_ids [Nt] str        the example id of each text query; texts [Nt] str its caption
  text_image [Nt] int      the image row each text describes (its ground truth)
  {d}_ranks, {d}_top, {d}_top_scores, {d}_correct_scores   for d in i2t, t2i: retrieval_ranks'
                           output with top_k (0-based ranks; i2t_top holds text rows, t2i_top image rows)
  thumb_ids, thumb_offsets, thumb_bytes   JPEG thumbnails by image id (all images, or those the
                           report shows on a large split): one byte string, cut at the offsets
  records                  fingerprint of the record set (ids, captions, pairing): two results
                           are comparable only when theirs are equal
"""
import dataclasses
import hashlib
import io
import json
import zipfile

import numpy as np

from entityclip_jax import storage
from entityclip_jax.errors import EntityClipError

DETAILS_FILE = "retrieval_details.npz"
METRICS_FILE = "retrieval.json"
DIRECTIONS = ("t2i", "i2t")
_PER_DIRECTION = ("ranks", "top", "top_scores", "correct_scores")


@dataclasses.dataclass(frozen=True)
class RetrievalDetails:
    image_ids: np.ndarray
    text_ids: np.ndarray
    texts: np.ndarray
    text_image: np.ndarray
    ranks: dict             # {"t2i_ranks": ..., "t2i_top": ..., ...}: retrieval_ranks' output
    thumbnails: dict        # {image id: JPEG bytes}
    records: str

    def direction(self, name):
        """{ranks, top, top_scores, correct_scores} of "t2i" or "i2t"."""
        return {field: self.ranks[f"{name}_{field}"] for field in _PER_DIRECTION}


def records_fingerprint(image_ids, text_ids, texts, text_image):
    """sha256 (16 hex digits) of what makes two evaluations comparable: the same queries and galleries."""
    digest = hashlib.sha256()
    for array in (image_ids, text_ids, texts):
        digest.update(json.dumps([str(x) for x in array]).encode())
    digest.update(np.asarray(text_image, np.int64).tobytes())
    return digest.hexdigest()[:16]


def make_details(ranks, image_ids, text_ids, texts, text_image, thumbnails=None):
    missing = [f"{d}_{f}" for d in DIRECTIONS for f in _PER_DIRECTION if f"{d}_{f}" not in ranks]
    if missing:
        raise EntityClipError(f"ranks without {', '.join(missing)}: call retrieval_ranks with top_k > 0")
    image_ids, text_ids, texts = (np.asarray([str(x) for x in a], dtype=str) for a in (image_ids, text_ids, texts))
    return RetrievalDetails(image_ids=image_ids, text_ids=text_ids, texts=texts,
                            text_image=np.asarray(text_image, np.int64), ranks=dict(ranks),
                            thumbnails=dict(thumbnails or {}),
                            records=records_fingerprint(image_ids, text_ids, texts, text_image))


def write_details(details, out_dir):
    """Writes out_dir/retrieval_details.npz in one piece (np.savez cannot open gs://); returns its path."""
    out = storage.path(out_dir) / DETAILS_FILE
    thumb_ids = sorted(details.thumbnails)
    blobs = [details.thumbnails[i] for i in thumb_ids]
    buffer = io.BytesIO()
    np.savez(buffer, image_ids=details.image_ids, text_ids=details.text_ids, texts=details.texts,
             text_image=details.text_image, records=np.array(details.records),
             thumb_ids=np.asarray(thumb_ids, dtype=str),
             thumb_offsets=np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64),
             thumb_bytes=np.frombuffer(b"".join(blobs), np.uint8),
             **{f"{d}_{f}": np.asarray(details.ranks[f"{d}_{f}"]) for d in DIRECTIONS for f in _PER_DIRECTION})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buffer.getvalue())
    return out


def load_results(results_dir):
    """(metrics from retrieval.json, RetrievalDetails) of an `entityclip eval --report` output directory."""
    where = storage.path(results_dir)
    for name in (METRICS_FILE, DETAILS_FILE):
        if not (where / name).is_file():
            hint = "with --report " if name == DETAILS_FILE else ""
            raise EntityClipError(f"{results_dir} has no {name}; run `entityclip eval ... {hint}--out {results_dir}`")
    try:
        metrics = json.loads((where / METRICS_FILE).read_text())
        with np.load(io.BytesIO((where / DETAILS_FILE).read_bytes()), allow_pickle=False) as data:
            offsets, blob = data["thumb_offsets"], data["thumb_bytes"].tobytes()
            thumbnails = {str(i): blob[a:b] for i, a, b in zip(data["thumb_ids"], offsets[:-1], offsets[1:])}
            details = RetrievalDetails(
                image_ids=data["image_ids"], text_ids=data["text_ids"], texts=data["texts"],
                text_image=data["text_image"], records=str(data["records"]), thumbnails=thumbnails,
                ranks={f"{d}_{f}": data[f"{d}_{f}"] for d in DIRECTIONS for f in _PER_DIRECTION})
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as err:  # cut short, not an .npz
        raise EntityClipError(f"{where / DETAILS_FILE} is damaged or not written by `entityclip eval --report` "
                              f"({err}); run the evaluation again")
    return metrics, details
