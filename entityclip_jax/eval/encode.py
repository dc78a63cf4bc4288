"""Embed a whole evaluation split, batch by batch, with jitted encoders.

The deterministic eval pipeline pads its last batch to full size and marks real
rows with `mask`, so every batch has one shape and each encoder compiles once;
padding rows are dropped here, after encoding. The encoders are data-parallel:
one jit, each batch split over every device of the mesh (default: all local
devices), the parameters replicated.
"""
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from entityclip_jax.errors import EntityClipError
from entityclip_jax.models.clip import CLIPModel
from entityclip_jax.parallel import sharding
from entityclip_jax.parallel.mesh import make_mesh


def encode_dataset(batches, encode_image_fn, encode_text_fn=None, *, image_key="pixel_values", text_key="query_ids"):
    """Returns (image_embeds [N, D], text_embeds [N, D] or None, ids [N] str, labels [N] str or None).

    batches: dicts with `image_key` (e.g. pixel_values [b, H, W, 3]), `text_key`
    (e.g. query_ids [b, 77]), and optionally `mask` [b] (True = real example),
    `id` and `label` (bytes or str). encode_image_fn(images) and
    encode_text_fn(ids) return [b, D]. Pass them jitted, with the parameters as
    jit arguments rather than closed-over constants, e.g.
        apply = jax.jit(lambda p, x: model.apply({"params": p}, x, method=...).embeds)
        encode_image_fn = functools.partial(apply, jax.device_put(params))
    Pass encode_text_fn=None to embed images only.
    """
    image_parts, text_parts, ids, labels, masks = [], [], [], [], []
    for batch in batches:
        if image_key not in batch or (encode_text_fn and text_key not in batch):
            raise EntityClipError(f"batch has keys {sorted(batch)}; the encoders need {image_key!r}"
                                  + (f" and {text_key!r}" if encode_text_fn else ""))
        size = len(batch[image_key])
        # Dispatch now, fetch later: the device encodes while the host reads the next batch.
        image_parts.append(encode_image_fn(np.asarray(batch[image_key])))
        if encode_text_fn:
            text_parts.append(encode_text_fn(np.asarray(batch[text_key])))
        masks.append(np.asarray(batch.get("mask", np.ones(size, bool)), bool).reshape(size))
        ids.append(_strings(batch.get("id"), size))
        labels.append(_strings(batch.get("label"), size))
    if not masks or not np.concatenate(masks).any():
        raise EntityClipError("the dataset yielded no examples to encode; check the data directory and split")
    keep = np.concatenate(masks)
    image_embeds = check_finite(_gathered(image_parts, keep), "image embeddings")
    text_embeds = check_finite(_gathered(text_parts, keep), "text embeddings") if encode_text_fn else None
    if any(part is None for part in ids):      # no ids: name examples by their position
        ids = [np.arange(keep.size).astype(str)]
    labels = None if any(part is None for part in labels) else np.concatenate(labels)[keep]
    return image_embeds, text_embeds, np.concatenate(ids)[keep], labels


def collecting(batches, key, sink):
    """Yields the batches unchanged, appending each one's real rows of `key` (as str) to sink:
    e.g. the captions, in the order encode_dataset keeps its rows."""
    for batch in batches:
        size = len(batch[key])
        real = np.asarray(batch.get("mask", np.ones(size, bool)), bool).reshape(size)
        sink.append(_strings(batch[key], size)[real])
        yield batch


def clip_encoders(model, params, mesh=None):
    """(encode_image_fn, encode_text_fn) -> L2-normalised [b, D] embeddings of the plain towers.

    Data-parallel over `mesh` (default: every local device on one axis): the
    parameters are replicated once and enter jit as arguments; each batch is
    padded to a multiple of the device count and split over the devices. No
    text attention mask: CLIP's text tower is causal, so the padding after EOT
    never reaches the EOT feature.
    """
    mesh = mesh or make_mesh((("data", -1),), jax.local_devices())
    params = jax.device_put(params, sharding.replicated(mesh))

    def encode_image(p, pixel_values):
        return model.apply({"params": p}, pixel_values, method=CLIPModel.encode_image).embeds

    def encode_text(p, input_ids):
        return model.apply({"params": p}, input_ids, method=CLIPModel.encode_text).embeds

    return data_parallel(encode_image, params, mesh), data_parallel(encode_text, params, mesh)


def data_parallel(fn, params, mesh):
    """inputs [b, ...] -> fn(params, inputs) [b, ...], jitted, the batch split over every mesh axis."""
    jitted = jax.jit(fn, out_shardings=NamedSharding(mesh, P(tuple(mesh.axis_names))))

    def call(inputs):
        inputs = np.asarray(inputs)
        size = len(inputs)
        pad = -size % mesh.size           # every device gets the same number of rows
        if pad:
            inputs = np.concatenate([inputs, np.repeat(inputs[-1:], pad, axis=0)])
        inputs = jax.device_put(inputs, NamedSharding(mesh, sharding.batch_spec(mesh, inputs.ndim)))
        out = jitted(params, inputs)
        return out[:size] if pad else out
    return call


def check_finite(embeds, what):
    """Refuse embeddings holding NaN or inf before they reach an index or a metric."""
    bad = ~np.isfinite(np.asarray(embeds)).all(axis=tuple(range(1, np.ndim(embeds))))
    if bad.any():
        raise EntityClipError(f"{int(bad.sum())} of {len(bad)} {what} hold NaN or inf (first: row "
                              f"{int(np.flatnonzero(bad)[0])}); the checkpoint is likely damaged or diverged: "
                              "use an earlier checkpoint")
    return embeds


def _gathered(parts, keep):
    embeds = np.concatenate([np.asarray(part, np.float32) for part in jax.device_get(parts)])
    if len(embeds) != len(keep):
        raise EntityClipError(f"an encoder returned {len(embeds)} rows for {len(keep)} examples; "
                              "it must return one embedding per input row")
    return embeds[keep]


def _strings(values, size):
    """bytes/str per row -> str array; None when the batch has no such field."""
    if values is None:
        return None
    values = np.asarray(values).reshape(size)
    return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values.tolist()], dtype=str)
