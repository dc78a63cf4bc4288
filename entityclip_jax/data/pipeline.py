"""tf.data input pipeline over the records that records.py writes.

One host's view: this process reads its share of the shard FILES (or, when there
are fewer files than processes, every file and its share of the EXAMPLES),
decodes and preprocesses in parallel, and batches `batch_size` examples per host.
`to_global_arrays` then assembles the hosts' batches into global jax.Arrays.

Train mode: files reshuffled each epoch, interleaved, examples shuffled,
repeated forever (the loop counts steps; split_size() gives the epoch length),
drop_remainder so every batch is full.
Eval mode: no shuffle, no repeat, every example exactly once across processes;
each host is padded with masked zero examples up to the same number of batches
(multi-host jit needs every host to take part in every step).

Batches: pixel_values [b, s, s, 3] float32 (CLIP-normalised) or uint8 with
normalize_on_host=False (then normalise on device with preprocess.normalize),
query_ids / explanation_ids [b, L] int32, id / query / label / headline [b] bytes
(query: the caption's text, for pages a person reads; headline for zero-shot
classification), mask [b] bool.
"""
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from entityclip_jax import storage
from entityclip_jax.data import preprocess, records
from entityclip_jax.errors import EntityClipError

log = logging.getLogger(__name__)


def split_size(data_dir, split):
    """Number of examples in a written split."""
    return _split_meta(records.read_meta(data_dir), data_dir, split)["num_examples"]


def _split_meta(meta, data_dir, split):
    if split not in meta["splits"]:
        raise EntityClipError(f"{data_dir} has no split {split!r}; it holds {sorted(meta['splits'])}")
    return meta["splits"][split]


def _checked_shards(data_dir, split, split_meta, skip_corrupt_shards):
    """[(path, num_examples)] of the split; a missing or truncated shard is an error (or skipped)."""
    shards = []
    for shard in split_meta["shards"]:
        path = storage.path(data_dir) / shard["file"]
        size = storage.size(path) if path.is_file() else None
        problem = (f"shard {path} is missing" if size is None else
                   f"shard {path} is truncated or altered ({size} bytes, {shard['num_bytes']} written)"
                   if size != shard["num_bytes"] else None)
        if problem is None:
            shards.append((str(path), shard["num_examples"]))
        elif skip_corrupt_shards:
            log.warning("%s; skipping its %d examples (skip_corrupt_shards=True)", problem, shard["num_examples"])
        else:
            raise EntityClipError(f"{problem}; copy it again or rewrite the split with "
                                  f"{_rewrite_hint(data_dir, split)}")
    return shards


def _rewrite_hint(data_dir, split):
    return f"`entityclip write-records --split {split} --out {data_dir} ...` (the command that wrote it)"


def first_token_ids(data_dir, split, count):
    """query_ids and explanation_ids of the split's first `count` records, [n, L] int64: the shards
    checked as make_dataset checks them, a damaged one named in one line."""
    import tensorflow as tf  # lazy: heavy; light code paths import this module
    meta = records.read_meta(data_dir)
    length = meta["context_length"]
    if split not in meta["splits"]:
        return np.zeros((0, length), np.int64)
    shards = [file for file, _ in _checked_shards(data_dir, split, meta["splits"][split], False)]
    spec = {name: tf.io.FixedLenFeature([length], tf.int64) for name in records.TOKEN_FIELDS}
    parsed = tf.data.TFRecordDataset(shards).take(count).map(lambda s: tf.io.parse_single_example(s, spec))
    rows = [batch[name] for batch in numpy_batches(parsed.batch(count), (data_dir, split))
            for name in records.TOKEN_FIELDS]
    return np.concatenate(rows) if rows else np.zeros((0, length), np.int64)


def verify_shards(data_dir, split):
    """Reads every record of a split (CRC-checked); returns [(file, problem)] of the damaged shards."""
    import tensorflow as tf  # lazy: heavy; light code paths import this module
    problems = []
    for shard in _split_meta(records.read_meta(data_dir), data_dir, split)["shards"]:
        path = storage.path(data_dir) / shard["file"]
        try:
            count = sum(1 for _ in tf.data.TFRecordDataset(str(path)))
            if count != shard["num_examples"]:
                problems.append((str(path), f"{count} records, {shard['num_examples']} written"))
        except (tf.errors.DataLossError, tf.errors.NotFoundError) as err:
            problems.append((str(path), err.message.split("}}")[-1].strip()))
    return problems


def _process_share(shards, process_index, process_count):
    """(files, shard_examples, num_examples) for one process.

    Whole files when there are at least as many files as processes, otherwise
    every file with every process_count-th example (shard_examples=True).
    """
    if len(shards) >= process_count:
        mine = shards[process_index::process_count]
        return [f for f, _ in mine], False, sum(n for _, n in mine)
    total = sum(n for _, n in shards)
    return [f for f, _ in shards], True, len(range(process_index, total, process_count))


def _parse(context_length):
    import tensorflow as tf  # lazy: heavy; light code paths import this module
    spec = {"id": tf.io.FixedLenFeature([], tf.string),
            "query": tf.io.FixedLenFeature([], tf.string),
            "image": tf.io.FixedLenFeature([], tf.string),
            "label": tf.io.FixedLenFeature([], tf.string),
            "headline": tf.io.FixedLenFeature([], tf.string),
            "query_ids": tf.io.FixedLenFeature([context_length], tf.int64),
            "explanation_ids": tf.io.FixedLenFeature([context_length], tf.int64)}
    return lambda serialized: tf.io.parse_single_example(serialized, spec)


def make_dataset(data_dir, split, *, batch_size, image_size=224, train, seed=0, process_index=None,
                 process_count=None, random_crop=False, crop_scale=(0.08, 1.0), shuffle_buffer=4096,
                 normalize_on_host=True, dct_scaling=False, skip_corrupt_shards=False, ids=None,
                 skip_batches=0):
    """tf.data.Dataset of per-host dict batches (see the module doc).

    batch_size: examples per HOST (global batch = batch_size * process_count).
    random_crop: train-time random resized crop of `crop_scale` area instead of
      the resize + center crop of CLIPImageProcessor.
    shuffle_buffer: serialized records held for shuffling (~100 KB each).
    dct_scaling: the fast preprocessing for training: DCT-scaled JPEG decode and no
      antialiasing below a 2x shrink (~3x cheaper, ~0.03 off CLIPImageProcessor;
      see preprocess.clip_preprocess). Keep it off for evaluation.
    skip_corrupt_shards: skip missing/truncated shards with a warning instead of failing.
    ids: eval only: just the examples with these ids, found by reading each record's id
      before decoding its image (no padding; the last batch may be smaller).
    skip_batches: train mode: start after this many batches, as if they had been taken, without
      decoding their images (a resumed run): their serialized records, and with random_crop their
      crop seeds, are dropped before the map that decodes.
    """
    import tensorflow as tf  # lazy: heavy; light code paths import this module
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise EntityClipError(f"process_index {process_index} is outside 0..{process_count - 1}")
    if batch_size < 1:
        raise EntityClipError(f"batch_size must be >= 1 per host, got {batch_size}")
    meta = records.read_meta(data_dir)
    shards = _checked_shards(data_dir, split, _split_meta(meta, data_dir, split), skip_corrupt_shards)
    if not shards:
        raise EntityClipError(f"split {split!r} of {data_dir} has no readable shards (nothing was written, "
                              "or every shard was skipped)")
    files, shard_examples, num_examples = _process_share(shards, process_index, process_count)
    parse = _parse(meta["context_length"])

    def example(serialized, crop_seed=None):
        ex = parse(serialized)
        pixels = preprocess.clip_preprocess(
            ex["image"], image_size, normalize_on_host=normalize_on_host, dct_scaling=dct_scaling,
            random_crop_seed=crop_seed, crop_scale=crop_scale)
        return {"pixel_values": pixels, "query_ids": tf.cast(ex["query_ids"], tf.int32),
                "explanation_ids": tf.cast(ex["explanation_ids"], tf.int32),
                "id": ex["id"], "query": ex["query"], "label": ex["label"], "headline": ex["headline"],
                "mask": tf.constant(True)}

    autotune = tf.data.AUTOTUNE
    if train:
        if shard_examples:
            ds = tf.data.TFRecordDataset(files).shard(process_count, process_index).repeat()
        else:
            ds = (tf.data.Dataset.from_tensor_slices(files)
                  .shuffle(len(files), seed=seed, reshuffle_each_iteration=True).repeat()
                  .interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 16),
                              num_parallel_calls=autotune))
        ds = ds.shuffle(shuffle_buffer, seed=seed + process_index, reshuffle_each_iteration=True)
        if random_crop:  # each record paired with its crop seed before the skip, so they stay in step
            seeds = tf.data.Dataset.random(seed=seed + 7919 * process_index).batch(2)
            ds = tf.data.Dataset.zip(ds, seeds)
        ds = ds.skip(skip_batches * batch_size).map(example, num_parallel_calls=autotune)
        ds = ds.batch(batch_size, drop_remainder=True)
    elif ids is not None:
        ds = tf.data.TFRecordDataset(files)
        if shard_examples:
            ds = ds.shard(process_count, process_index)
        wanted = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
            tf.constant(sorted({str(i) for i in ids}), tf.string), tf.ones(len(set(ids)), tf.int32)), 0)
        id_only = {"id": tf.io.FixedLenFeature([], tf.string)}
        ds = (ds.filter(lambda s: wanted.lookup(tf.io.parse_single_example(s, id_only)["id"]) > 0)
              .map(example, num_parallel_calls=autotune).batch(batch_size))
    else:
        ds = tf.data.TFRecordDataset(files)
        if shard_examples:
            ds = ds.shard(process_count, process_index)
        ds = ds.map(example, num_parallel_calls=autotune)
        # Same batch count on every host: the host with the most examples sets it.
        most = max(_process_share(shards, i, process_count)[2] for i in range(process_count))
        num_batches = math.ceil(most / batch_size)
        padding = tf.data.Dataset.from_tensors(_padding(ds.element_spec))
        ds = ds.concatenate(padding.repeat(num_batches * batch_size - num_examples))
        ds = ds.batch(batch_size, drop_remainder=True)
    return ds.prefetch(autotune)


def _padding(element_spec):
    """A zero example with mask False, shaped like the real ones."""
    import tensorflow as tf  # lazy: heavy; light code paths import this module
    pad = {key: tf.zeros(spec.shape, spec.dtype) for key, spec in element_spec.items()}
    pad["mask"] = tf.constant(False)
    return pad


def numpy_batches(ds, source=None):
    """Iterates a dataset as dicts of numpy arrays; a corrupt record becomes an EntityClipError
    that names the damaged shard of `source`, the (data_dir, split) the dataset reads."""
    import tensorflow as tf  # lazy: heavy; light code paths import this module
    iterator = ds.as_numpy_iterator()
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except tf.errors.DataLossError as err:
            reason = err.message.split("}}")[-1].split("[Op:")[0].strip()
            if source is None:
                raise EntityClipError(f"a shard of this dataset is corrupt ({reason}); copy it again or "
                                      "rewrite the split with `entityclip write-records`") from None
            damaged = [file for file, _ in verify_shards(*source)] or [f"a shard of {source[0]}"]
            raise EntityClipError(f"shard {damaged[0]} is corrupt ({reason}); copy it again or rewrite the "
                                  f"split with {_rewrite_hint(*source)}") from None
        except tf.errors.InvalidArgumentError as err:
            raise EntityClipError(f"a record could not be decoded ({err.message}); the shard is damaged "
                                  "or was not written by write-records")
        yield batch


def batch_shapes(batch_size, image_size, context_length, normalize_on_host=True):
    """The arrays of one batch as to_global_arrays puts them on the devices (strings stay on the
    host), as jax.ShapeDtypeStructs: what a step is compiled for without reading any data."""
    pixels = jnp.float32 if normalize_on_host else jnp.uint8
    return {"pixel_values": jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), pixels),
            "query_ids": jax.ShapeDtypeStruct((batch_size, context_length), jnp.int32),
            "explanation_ids": jax.ShapeDtypeStruct((batch_size, context_length), jnp.int32),
            "mask": jax.ShapeDtypeStruct((batch_size,), jnp.bool_)}


def to_global_arrays(batch, mesh, data_axis_names):
    """Per-host numpy batch -> {name: global jax.Array} sharded on the batch dimension.

    data_axis_names: mesh axis name (or names) the batch dimension is split over.
    String fields (id, label) stay on the host and are left out.
    """
    axes = (data_axis_names,) if isinstance(data_axis_names, str) else tuple(data_axis_names)
    arrays = {}
    for name, value in batch.items():
        if value.dtype.kind in "OSU":
            continue
        spec = PartitionSpec(axes, *([None] * (value.ndim - 1)))
        arrays[name] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), value)
    return arrays
