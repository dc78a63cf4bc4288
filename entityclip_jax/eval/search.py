"""Text-to-image search: embed a collection of images once, then answer queries.

The index is one .npz file:
  embeds       [N, D] L2-normalised image embeddings, float16 (default) or float32
  paths        [N] where each image lives (a file path, or the example id for records)
  ids          [N] example ids
  fingerprint  hash of the model parameters that made the embeddings
  source       JSON: how the images were found ({"kind": "folder"|"records", ...})
and, built from records, the captions, so an image can show its nearest ones:
  texts        [Nt] the captions; text_ids [Nt] the example id of each (its image's id)
  text_embeds  [Nt, D] their L2-normalised embeddings, in the dtype of `embeds`
Queries must be embedded by the same model: query_index refuses a fingerprint
that differs from the index's.
"""
import dataclasses
import hashlib
import io
import json
import os
import textwrap
import zipfile

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from entityclip_jax import storage
from entityclip_jax.data.preprocess import clip_preprocess, read_image_file
from entityclip_jax.errors import EntityClipError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp")   # what tf.io.decode_image reads
INDEX_DTYPES = ("float16", "float32")


@dataclasses.dataclass(frozen=True)
class SearchIndex:
    embeds: np.ndarray        # [N, D]
    paths: np.ndarray         # [N] str
    ids: np.ndarray           # [N] str
    fingerprint: str
    source: dict
    texts: np.ndarray = None          # [Nt] str, or None: the index holds no captions
    text_ids: np.ndarray = None       # [Nt] str
    text_embeds: np.ndarray = None    # [Nt, D]


def model_fingerprint(params):
    """sha256 (16 hex digits) of every parameter's name, shape, dtype and bytes."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        leaf = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{leaf.shape}:{leaf.dtype};".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()[:16]


def build_index(out_path, embeds, paths, *, ids=None, fingerprint="", source=None, dtype="float16", captions=None):
    """Write the index file; embeddings are L2-normalised before storing. Returns its path.

    captions: (texts [Nt], text_ids [Nt], text_embeds [Nt, D]) to store beside the images.
    """
    embeds = np.asarray(embeds, np.float32)
    paths = np.asarray([str(p) for p in paths], dtype=str)
    ids = paths if ids is None else np.asarray([str(i) for i in ids], dtype=str)
    if embeds.ndim != 2 or len(embeds) == 0 or len(embeds) != len(paths) or len(ids) != len(paths):
        raise EntityClipError(f"need one embedding per image and at least one image; got embeds {embeds.shape}, "
                              f"{len(paths)} paths, {len(ids)} ids")
    if dtype not in INDEX_DTYPES:
        raise EntityClipError(f"index dtype must be one of {INDEX_DTYPES}, got {dtype!r}")
    extra = {}
    if captions is not None:
        texts, text_ids, text_embeds = captions
        text_embeds = np.asarray(text_embeds, np.float32)
        if text_embeds.shape != (len(texts), embeds.shape[1]) or len(text_ids) != len(texts):
            raise EntityClipError(f"need one embedding of width {embeds.shape[1]} and one id per caption; got "
                                  f"{len(texts)} captions, {len(text_ids)} ids, embeds {text_embeds.shape}")
        extra = dict(texts=np.asarray([str(t) for t in texts], dtype=str),
                     text_ids=np.asarray([str(i) for i in text_ids], dtype=str),
                     text_embeds=_unit_rows(text_embeds, "caption").astype(dtype))
    embeds = _unit_rows(embeds, "image")
    out_path = storage.path(out_path)
    if out_path.suffix != ".npz":
        raise EntityClipError(f"the index file name must end in .npz, got {out_path}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, embeds=embeds.astype(dtype), paths=paths, ids=ids,
             fingerprint=np.array(fingerprint), source=np.array(json.dumps(source or {})), **extra)
    out_path.write_bytes(buffer.getvalue())  # one whole write: atomic on gs://, and np.savez cannot open gs://
    return out_path


def load_index(path):
    """SearchIndex from a file build_index wrote."""
    path = storage.path(path)
    if not path.is_file():
        raise EntityClipError(f"index {path} does not exist; build it with `entityclip search-index`")
    try:
        with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as data:
            captions = {name: data[name] for name in ("texts", "text_ids", "text_embeds") if name in data}
            return SearchIndex(embeds=data["embeds"], paths=data["paths"], ids=data["ids"],
                               fingerprint=str(data["fingerprint"]), source=json.loads(str(data["source"])),
                               **captions)
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as err:  # cut short, not an .npz
        raise EntityClipError(f"{path} is not a search index ({err}); rebuild it with `entityclip search-index`") from None


def query_index(index, text_embeds, k=5, *, fingerprint=None):
    """Top-k images per query: (paths [Q, k] str, scores [Q, k] cosine), best first.

    text_embeds [Q, D] or [D]. Pass the query model's fingerprint to have a
    mismatch with the index refused.
    """
    rows, scores = query_rows(index, text_embeds, k, fingerprint=fingerprint)
    return index.paths[rows], scores


def query_rows(index, text_embeds, k=5, *, fingerprint=None):
    """query_index's hits as index rows: (rows [Q, k] int, scores [Q, k] cosine), best first."""
    if fingerprint is not None and index.fingerprint and fingerprint != index.fingerprint:
        raise EntityClipError(f"the index was built by model {index.fingerprint}, the queries come from model "
                              f"{fingerprint}; rebuild the index with this checkpoint (`entityclip search-index`)")
    queries = np.atleast_2d(np.asarray(text_embeds, np.float32))
    if queries.ndim != 2 or queries.shape[1] != index.embeds.shape[1]:
        raise EntityClipError(f"query embeddings {queries.shape} do not match the index width {index.embeds.shape[1]}")
    if not np.isfinite(queries).all():
        raise EntityClipError("the query embeddings hold NaN or inf; the checkpoint is likely damaged or diverged: "
                              "use an earlier checkpoint")
    if not np.isfinite(index.embeds).all():
        raise EntityClipError("the index holds NaN or inf embeddings; rebuild it with `entityclip search-index`")
    queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    return best_rows(queries @ index.embeds.astype(np.float32).T, k)     # [Q, N] scores


def nearest_captions(index, row, k=5):
    """The k captions nearest to image `row` of the index: (caption rows [k], cosine scores [k]), best first."""
    if index.text_embeds is None:
        raise EntityClipError("this index holds no captions; build it from records (`entityclip search-index "
                              "--records ...`) to see an image's nearest captions")
    if not 0 <= int(row) < len(index.embeds):
        raise EntityClipError(f"no image row {row} in this index of {len(index.embeds)} images")
    scores = index.embeds[int(row)].astype(np.float32) @ index.text_embeds.astype(np.float32).T
    top, top_scores = best_rows(scores[None, :], k)
    return top[0], top_scores[0]


def best_rows(scores, k):
    """(indices, scores) [Q, k] of each row's k highest scores, best first; ties in index order."""
    k = min(int(k), scores.shape[1])
    if k < 1:
        raise EntityClipError(f"k must be at least 1, got {k}")
    # argpartition finds the k best without sorting all N; then order those k
    # by score, ties by index order so results are reproducible.
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.lexsort((top, -top_scores), axis=1)
    top = np.take_along_axis(top, order, axis=1)
    return top, np.take_along_axis(scores, top, axis=1)


def contact_sheet(images, scores, query, out_png, *, captions=None, thumb_size=192, columns=5):
    """A PNG grid of the hits: the query as title, rank and score under each thumbnail.

    images: file paths, PIL images or uint8 [h, w, 3] arrays; an image that
    cannot be opened is drawn as a grey tile saying so. out_png may be on gs://; returns it.
    """
    if len(images) == 0 or len(images) != len(scores):
        raise EntityClipError(f"need one score per image and at least one image; got {len(images)} images "
                              f"and {len(scores)} scores")
    captions = captions or [storage.path(i).name if isinstance(i, (str, os.PathLike)) else "" for i in images]
    font, title_font = _font(13), _font(17)
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    pad, caption_h = 8, 36
    title_lines = textwrap.wrap(f"query: {query}", width=max(30, columns * thumb_size // 9)) or [""]
    title_h = 12 + 22 * len(title_lines)
    width = pad + columns * (thumb_size + pad)
    sheet = Image.new("RGB", (width, title_h + rows * (thumb_size + caption_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for line_no, line in enumerate(title_lines):
        draw.text((pad, 6 + 22 * line_no), line, fill="black", font=title_font)
    for n, (image, score, caption) in enumerate(zip(images, scores, captions)):
        left = pad + (n % columns) * (thumb_size + pad)
        top = title_h + (n // columns) * (thumb_size + caption_h + pad)
        sheet.paste(thumbnail(image, thumb_size), (left, top))
        draw.text((left, top + thumb_size + 2), f"#{n + 1}  score {float(score):.3f}", fill="black", font=font)
        draw.text((left, top + thumb_size + 18), _fit(caption, thumb_size // 7), fill="dimgray", font=font)
    storage.path(out_png).parent.mkdir(parents=True, exist_ok=True)
    with storage.open(out_png, "wb") as f:  # a file object: PIL would open a gs:// name locally
        sheet.save(f, format="PNG")
    return str(out_png)


def _unit_rows(embeds, what):
    norms = np.linalg.norm(embeds, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms) & (norms > 0)):
        raise EntityClipError(f"some {what} embeddings are zero, NaN or inf; check the model and the inputs")
    return embeds / norms


def find_images(directory):
    """Image files under directory (recursively, local or gs://), sorted, as absolute real paths."""
    if not storage.path(directory).is_dir():
        raise EntityClipError(f"{directory} is not a directory of images")
    paths = sorted(storage.resolve(p) for p in storage.files(directory) if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise EntityClipError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {directory}")
    return paths


def image_folder_batches(paths, image_size, batch_size):
    """Eval-style batches {pixel_values, id (path), mask} with CLIP preprocessing.

    Files that do not decode are skipped (the caller counts them: paths minus
    encoded ids). The last batch is padded to batch_size with mask=False rows.
    """
    import tensorflow as tf  # lazy: heavy, only to index a folder of images

    def load(path):
        return path, clip_preprocess(read_image_file(path), image_size)

    dataset = (tf.data.Dataset.from_tensor_slices(list(paths))
               .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
               .ignore_errors()
               .batch(batch_size)
               .prefetch(2))
    for path, pixels in dataset.as_numpy_iterator():
        real = len(path)
        pad = batch_size - real
        yield {
            "pixel_values": np.pad(pixels, ((0, pad), (0, 0), (0, 0), (0, 0))),
            "id": np.concatenate([path, np.full(pad, b"", object)]),
            "mask": np.arange(batch_size) < real,
        }


def thumbnail(image, size):
    """A size x size RGB tile of the image, letterboxed; one that cannot be opened says so."""
    try:
        if isinstance(image, (str, os.PathLike)):
            with storage.open(image, "rb") as f, Image.open(f) as opened:
                picture = opened.convert("RGB")
        elif isinstance(image, Image.Image):
            picture = image.convert("RGB")
        else:
            picture = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    except (OSError, ValueError, TypeError):
        tile = Image.new("RGB", (size, size), (200, 200, 200))
        ImageDraw.Draw(tile).text((8, size // 2 - 8), "cannot open image", fill="black", font=_font(12))
        return tile
    picture = ImageOps.contain(picture, (size, size), Image.Resampling.BICUBIC)   # shrinks or enlarges
    tile = Image.new("RGB", (size, size), (240, 240, 240))
    tile.paste(picture, ((size - picture.width) // 2, (size - picture.height) // 2))
    return tile


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:   # Pillow < 10.1: one fixed-size bitmap font
        return ImageFont.load_default()


def _fit(text, max_chars):
    return text if len(text) <= max_chars else text[:max_chars - 1] + "…"
