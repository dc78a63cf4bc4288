"""Embed a whole evaluation split, batch by batch, with jitted encoders.

The deterministic eval pipeline pads its last batch to full size and marks real
rows with `mask`, so every batch has one shape and each encoder compiles once;
padding rows are dropped here, after encoding.
"""
import functools

import jax
import numpy as np

from entityclip_jax.errors import EntityClipError


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
    image_embeds = _gathered(image_parts, keep)
    text_embeds = _gathered(text_parts, keep) if encode_text_fn else None
    if any(part is None for part in ids):      # no ids: name examples by their position
        ids = [np.arange(keep.size).astype(str)]
    labels = None if any(part is None for part in labels) else np.concatenate(labels)[keep]
    return image_embeds, text_embeds, np.concatenate(ids)[keep], labels


def clip_encoders(model, params):
    """(encode_image_fn, encode_text_fn) -> L2-normalised [b, D] embeddings of the plain towers.

    Parameters go to the device once and enter jit as arguments. No text
    attention mask: CLIP's text tower is causal, so the padding after EOT never
    reaches the EOT feature.
    """
    from entityclip_jax.models.clip import CLIPModel

    @jax.jit
    def encode_image(p, pixel_values):
        return model.apply({"params": p}, pixel_values, method=CLIPModel.encode_image).embeds

    @jax.jit
    def encode_text(p, input_ids):
        return model.apply({"params": p}, input_ids, method=CLIPModel.encode_text).embeds

    params = jax.device_put(params)
    return functools.partial(encode_image, params), functools.partial(encode_text, params)


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
