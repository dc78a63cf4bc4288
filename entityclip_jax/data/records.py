"""Explanation-augmented TFRecords: schema, writer, and the metadata beside the shards.

A written dataset directory is both ours and TFDS's:
    entityclip-train.tfrecord-00000-of-00004 ...   shards (tf.train.Example, TFDS layout)
    dataset_info.json, features.json               TFDS metadata (tfds.builder_from_directory)
    entityclip_meta.json                           ours: counts, skips, tokenizer, schema version
Schema (one example; FEATURES below; text is UTF-8):
    id               bytes   unique within the split
    image            bytes   encoded JPEG or PNG (TFDS decodes it; our pipeline decodes itself)
    query            text    the image caption (METHOD.md: the entity query)
    explanation      text    LLM explanation of the entities, "" when absent
    query_ids        int64[context_length]   CLIP tokens: BOS ... EOT pad
    explanation_ids  int64[context_length]
    headline, label, source  text, "" when absent

Why not a tfds.core.GeneratorBasedBuilder / store_as_tfds_dataset: their
generators run in one process (Beam is the only parallel path) and write one
split per build. Here image checking and re-encoding run in a process pool,
examples are serialised with TFDS's own FeaturesDict (so the bytes are exactly
what TFDS reads), shards are written with tf.io.TFRecordWriter, and
tfds.folder_dataset.write_metadata writes TFDS's dataset_info.json.

Crash safety: shards are written under .tmp-<split>/ and renamed into place only
when the split is complete; the meta file is written last, atomically. A
directory without entityclip_meta.json (or without the split in it) was never
finished.
"""
import collections
import concurrent.futures
import contextlib
import datetime
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import threading

import numpy as np
from PIL import Image
from tqdm import tqdm

from entityclip_jax import storage
from entityclip_jax.data.preprocess import exif_upright
from entityclip_jax.errors import EntityClipError

SCHEMA_VERSION = 1
CONTEXT_LENGTH = 77
DATASET_NAME = "entityclip"
META_FILE = "entityclip_meta.json"
TEXT_FIELDS = ("id", "query", "explanation", "headline", "label", "source")
TOKEN_FIELDS = ("query_ids", "explanation_ids")
_CHUNK = 64  # examples per worker task: big enough to amortise pickling, small enough to stream


def features(context_length=CONTEXT_LENGTH):
    """The record schema as a tfds.features.FeaturesDict."""
    import tensorflow_datasets as tfds  # lazy: heavy (TensorFlow), only for the schema
    spec = {name: tfds.features.Text() for name in TEXT_FIELDS}
    spec["image"] = tfds.features.Image(shape=(None, None, 3))
    for name in TOKEN_FIELDS:
        spec[name] = tfds.features.Tensor(shape=(context_length,), dtype=np.int64)
    return tfds.features.FeaturesDict(spec)


def shard_name(split, index, count):
    return f"{DATASET_NAME}-{split}.tfrecord-{index:05d}-of-{count:05d}"


# ---------------------------------------------------------------- image checks (worker side)

def check_image(data, max_side=None, jpeg_quality=90):
    """Encoded image bytes -> (bytes to store, None) or (None, reason).

    Decodes fully with PIL (verify() finds broken structure, load() truncated
    data). JPEG/PNG in modes TF decodes are kept byte for byte; other formats
    or modes (CMYK, 16-bit, WebP, GIF, ...) are re-encoded as RGB JPEG, and so
    are images whose longer side exceeds max_side (resized to max_side, bicubic)
    and images that EXIF turns (phone photos; stored upright, TF ignores EXIF).
    """
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # PIL raises many types for bad bytes; all mean "not an image we can use"
        return None, f"corrupt_image: {type(err).__name__}: {err}"
    if min(image.size) < 1:
        return None, f"corrupt_image: empty image {image.size}"
    keep = ((image.format == "JPEG" and image.mode in ("RGB", "L"))
            or (image.format == "PNG" and image.mode in ("RGB", "RGBA", "L", "LA", "P")))
    image, turned = exif_upright(image)
    too_big = max_side is not None and max(image.size) > max_side
    if keep and not too_big and not turned:
        return data, None
    if image.mode != "RGB":
        image = image.convert("RGB")
    if too_big:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=jpeg_quality)
    return out.getvalue(), None


def _load_and_check(example, max_side, jpeg_quality):
    data = example.image_bytes
    if data is None:
        if not example.image_path:
            return None, "missing_image: the record names no image"
        try:
            data = storage.path(example.image_path).read_bytes()  # a raw data root may be on gs:// too
        except OSError as err:
            return None, f"missing_image: {example.image_path}: {err.strerror or err}"
    return check_image(data, max_side, jpeg_quality)


def _check_chunk(chunk, max_side, jpeg_quality):
    """Worker task: [RawExample] -> [(bytes or None, reason or None)] in order."""
    return [_load_and_check(example, max_side, jpeg_quality) for example in chunk]


def _text_problem(example):
    """A skip reason when the texts cannot be written (adapters normally catch these first)."""
    if not isinstance(example.id, str) or not example.id:
        return "bad_record: empty id"
    if not isinstance(example.query, str) or not example.query.strip():
        return "empty_query: the query is empty"
    for name in ("id", "query", "explanation", "headline", "label", "source"):
        value = getattr(example, name)
        try:
            value is None or value.encode("utf-8")
        except (UnicodeEncodeError, AttributeError):
            return f"bad_utf8: {name} is not valid UTF-8 text"
    return None


def _chunks(examples, size):
    chunk = []
    for example in examples:
        chunk.append(example)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _ordered_map(fn, items, workers, *args):
    """fn(item, *args) over items, results in order, at most 2*workers tasks in flight.

    Workers are spawned (never forked: the parent may hold TensorFlow threads)
    and import only this module's light dependencies (PIL, numpy).
    """
    if workers <= 1:
        for item in items:
            yield item, fn(item, *args)
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_exit_with_parent) as pool:
        pending = collections.deque()
        for item in items:
            pending.append((item, pool.submit(fn, item, *args)))
            if len(pending) >= 2 * workers:
                item, future = pending.popleft()
                yield item, future.result()
        while pending:
            item, future = pending.popleft()
            yield item, future.result()


def _exit_with_parent():
    """Worker initializer: a parent killed with SIGKILL cannot stop its pool, so each
    worker watches the parent's sentinel (closed when it dies) and exits with it."""
    sentinel = multiprocessing.parent_process().sentinel

    def watch():
        multiprocessing.connection.wait([sentinel])
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def checked_examples(examples, report, *, max_side=None, jpeg_quality=90, workers=None):
    """(RawExample, image bytes to store) of the examples write-records writes, in order.

    Bad text and repeated ids are skipped first, then every image is read and
    decoded (in `workers` processes; default all cores, <= 1 inline); each skip
    lands in `report` with its reason. check-source counts with this too.
    """
    workers = os.cpu_count() if workers is None else workers
    seen = set()

    def fresh(chunk):  # bad text and duplicates are dropped before the costly image work
        kept = []
        for example in chunk:
            problem = _text_problem(example)
            if problem:  # an id that is not UTF-8 is listed in its ascii() form
                report.skip_noted(example.id, problem, listed_as=ascii(example.id) if "id is not" in problem else None)
            elif example.id in seen:
                report.skip_noted(example.id, f"duplicate_id: {example.id} seen before (first kept)")
            else:
                seen.add(example.id)
                kept.append(example)
        return kept

    chunks = (kept for kept in map(fresh, _chunks(examples, _CHUNK)) if kept)
    for chunk, checked in _ordered_map(_check_chunk, chunks, workers, max_side, jpeg_quality):
        for example, (data, reason) in zip(chunk, checked):
            if reason:
                report.skip_noted(example.id, reason)
            else:
                yield example, data


# ---------------------------------------------------------------- metadata

def read_meta(data_dir):
    """The entityclip_meta.json of a written dataset; refuses unfinished or foreign ones."""
    path = storage.path(data_dir) / META_FILE
    if not path.is_file():
        raise EntityClipError(f"{path} not found: {data_dir} is not a finished entityclip records directory; "
                              "write it with `entityclip write-records --out DIR` (an interrupted write "
                              "leaves no meta file: run it again)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise EntityClipError(f"{path} is not valid JSON ({err}); rewrite the dataset with write-records") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("splits"), dict):
        raise EntityClipError(f"{path} is not an entityclip_meta.json (no splits); rewrite the dataset with "
                              "write-records")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise EntityClipError(f"{path} has schema version {meta.get('schema_version')}, this code reads "
                              f"version {SCHEMA_VERSION}; rewrite the records with this version's write-records")
    return meta


def _write_tfds_metadata(out_dir, meta):
    """dataset_info.json + features.json for every non-empty split, so tfds can read the directory."""
    import tensorflow_datasets as tfds  # lazy: heavy (TensorFlow), only for the metadata
    split_infos = [tfds.core.SplitInfo(name=name, shard_lengths=[s["num_examples"] for s in info["shards"]],
                                       num_bytes=info["num_bytes"])
                   for name, info in sorted(meta["splits"].items()) if info["shards"]]
    if not split_infos:  # nothing readable: leave no TFDS metadata pointing at deleted shards
        for name in ("dataset_info.json", "features.json"):
            (storage.path(out_dir) / name).unlink(missing_ok=True)
        return
    tfds.folder_dataset.write_metadata(
        data_dir=str(out_dir), features=features(meta["context_length"]), split_infos=split_infos,
        check_data=False, description="EntityCLIP explanation-augmented image/query records "
        f"(schema version {SCHEMA_VERSION}; see {META_FILE}).")


# ---------------------------------------------------------------- writer

def write_split(examples, out_dir, split, tokenizer, report, *, context_length=CONTEXT_LENGTH,
                examples_per_shard=1024, max_side=None, jpeg_quality=90, workers=None,
                source="", progress=True):
    """Writes one split of RawExamples as TFRecord shards; returns the split's meta entry.

    examples: iterable of RawExample (explanation already attached, None -> "").
    report: the SkipReport the source adapters filled; this adds the writer's own
      skips (duplicate_id, missing_image, corrupt_image) and is stored in the meta.
    workers: processes checking/re-encoding images (default: all cores; <= 1 inline).
      They are spawned, so a calling script needs the `if __name__ == "__main__":` guard.
    Rewriting an existing split replaces it; other splits in out_dir are kept,
    but they must have been written with the same tokenizer and context length.
    """
    import tensorflow as tf  # lazy: heavy; image-checking workers import this module without it

    if not str(split).replace("_", "").isalnum():
        raise EntityClipError(f"split name {split!r} must be letters, digits or '_' (it goes into file names)")
    if examples_per_shard < 1:
        raise EntityClipError(f"examples_per_shard must be >= 1, got {examples_per_shard}")
    if max_side is not None and max_side < 1:
        raise EntityClipError(f"max_side must be >= 1 pixel, got {max_side}")
    if not 1 <= jpeg_quality <= 100:
        raise EntityClipError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    out_dir = storage.path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"schema_version": SCHEMA_VERSION, "context_length": context_length,
            "tokenizer_fingerprint": tokenizer.fingerprint, "tokenizer_style": tokenizer.style,
            "dataset_name": DATASET_NAME, "splits": {}}
    if (out_dir / META_FILE).is_file():
        old = read_meta(out_dir)
        for key in ("tokenizer_fingerprint", "context_length"):
            if old[key] != meta[key]:
                raise EntityClipError(f"{out_dir} holds splits written with {key} {old[key]!r}, not {meta[key]!r}; "
                                      "write to a new --out directory or rewrite every split")
        meta["splits"] = old["splits"]

    feature_dict = features(context_length)
    tmp_dir = out_dir / f".tmp-{split}"
    tmp_dir.rmtree(missing_ok=True)
    tmp_dir.mkdir(parents=True, exist_ok=True)  # a no-op on gs://, where directories are name prefixes
    shards, writer = [], None
    good = checked_examples(examples, report, max_side=max_side, jpeg_quality=jpeg_quality, workers=workers)

    bar = tqdm(desc=f"write {split}", unit="ex", disable=not progress)
    try:
        for batch in _chunks(good, _CHUNK):
            query_ids, _ = tokenizer.encode([e.query for e, _ in batch], context_length)
            expl_ids, _ = tokenizer.encode([e.explanation or "" for e, _ in batch], context_length)
            for row, (example, data) in enumerate(batch):
                serialized = feature_dict.serialize_example({
                    "id": example.id, "image": data, "query": example.query,
                    "explanation": example.explanation or "", "headline": example.headline or "",
                    "label": example.label or "", "source": example.source or source,
                    "query_ids": query_ids[row].astype("int64"),
                    "explanation_ids": expl_ids[row].astype("int64")})
                if writer is None or shards[-1]["num_examples"] == examples_per_shard:
                    if writer is not None:
                        writer.close()
                    shards.append({"file": f"{len(shards):05d}.tfrecord", "num_examples": 0})
                    writer = tf.io.TFRecordWriter(str(tmp_dir / shards[-1]["file"]))
                writer.write(serialized)
                shards[-1]["num_examples"] += 1
                bar.update(1)
        if writer is not None:
            writer.close()
        if not shards:
            skipped = report.to_dict()
            raise EntityClipError(f"no example of split {split!r} could be written ({skipped['skipped']} skipped: "
                                  f"{skipped['by_reason'] or 'the source yielded none'}); no shard was written to "
                                  f"{out_dir}. Check --root, --split and the images (`entityclip check-source` "
                                  "lists every skipped record)")
    except BaseException as err:
        good.close()  # stops the worker pool
        with contextlib.suppress(tf.errors.OpError):  # its last flush fails too on a full disk
            if writer is not None:
                writer.close()
        tmp_dir.rmtree(missing_ok=True)  # partial shards are useless: a rerun starts over
        if isinstance(err, tf.errors.OpError):  # what the disk said, through TensorFlow's writer
            raise _cannot_write(out_dir, split, err) from None
        raise
    finally:
        bar.close()

    # The split is complete: replace the old shards of this split, then the metadata (meta file last).
    for old_shard in out_dir.glob(f"{DATASET_NAME}-{split}.tfrecord-*"):
        old_shard.unlink()
    for index, shard in enumerate(shards):
        final = out_dir / shard_name(split, index, len(shards))
        storage.replace(tmp_dir / shard["file"], final)  # a rename locally, copy + delete on gs://
        shard["file"] = final.name
        shard["num_bytes"] = storage.size(final)
    tmp_dir.rmtree(missing_ok=True)
    entry = {"num_examples": sum(s["num_examples"] for s in shards),
             "num_bytes": sum(s["num_bytes"] for s in shards), "shards": shards,
             "source": source, "max_side": max_side, "jpeg_quality": jpeg_quality,
             "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "skipped": report.to_dict()}
    meta["splits"][split] = entry
    try:
        _write_tfds_metadata(out_dir, meta)
    except tf.errors.OpError as err:
        raise _cannot_write(out_dir, split, err) from None
    storage.write_json_atomic(out_dir / META_FILE, meta, indent=1)  # last: the completion marker
    return entry


def _cannot_write(out_dir, split, err):
    return EntityClipError(f"cannot write the {split!r} split to {out_dir} ({err.message}); free space there (or "
                           "raise the file size limit) or choose another --out, then rerun; the split's earlier "
                           "shards, if any, are untouched")
