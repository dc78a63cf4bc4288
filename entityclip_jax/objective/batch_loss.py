"""The loss of one data-pipeline batch: the towers' token features, then the objective.

The towers turn a batch into the token features the loss needs (METHOD.md
"Backbone"): V from the image, T from the query and E from the explanation
through the SAME text tower. compute_loss applies EntityCLIP's objective
(losses.py) to them, or CLIP's VTC alone in clip_finetune mode.
"""
import jax.numpy as jnp

from entityclip_jax.models.clip import CLIPModel
from entityclip_jax.models.clip_pixels import normalize
from entityclip_jax.objective.losses import clip_contrastive_loss, entityclip_loss, logit_scale_value


def token_mask(eot_index, length):
    """1 up to and including EOT, 0 on the padding after it: [B], L -> [B, L] int32."""
    return (jnp.arange(length)[None, :] <= eot_index[:, None]).astype(jnp.int32)


def pixels(batch):
    """CLIP-normalised float pixels; uint8 batches are normalised here, on device."""
    values = batch["pixel_values"]
    return normalize(values.astype(jnp.float32)) if values.dtype == jnp.uint8 else values


def encode_batch(model, params, batch, *, with_explanation=True):
    """Token features for entityclip_loss: V, T, t_mask, t_eot_index and (with_explanation) E, e_mask, e_eot_index."""
    towers, clip_params = model.towers, {"params": params["clip"]}
    image = towers.apply(clip_params, pixels(batch), method=CLIPModel.encode_image)
    query_ids = batch["query_ids"]
    batch_size, length = query_ids.shape
    # Query and explanation share the text tower: one pass over both.
    ids = jnp.concatenate([query_ids, batch["explanation_ids"]]) if with_explanation else query_ids
    text = towers.apply(clip_params, ids, method=CLIPModel.encode_text)
    features = dict(V=image.tokens, T=text.tokens[:batch_size], t_eot_index=text.eot_index[:batch_size])
    features["t_mask"] = token_mask(features["t_eot_index"], length)
    if with_explanation:
        features.update(E=text.tokens[batch_size:], e_eot_index=text.eot_index[batch_size:])
        features["e_mask"] = token_mask(features["e_eot_index"], length)
    return features


def compute_loss(model, params, batch, rng):
    """(loss, metrics) of one batch: the EntityCLIP objective, or VTC alone in clip_finetune mode."""
    logit_scale = params["clip"]["logit_scale"]
    if model.mode == "clip_finetune":
        features = encode_batch(model, params, batch, with_explanation=False)
        t_eot = jnp.take_along_axis(features["T"], features["t_eot_index"][:, None, None], axis=1)[:, 0]
        vtc = clip_contrastive_loss(features["V"][:, 0], t_eot, logit_scale)
        return vtc, dict(loss=vtc, vtc=vtc, logit_scale=logit_scale_value(logit_scale))
    features = encode_batch(model, params, batch)
    return entityclip_loss(params["heads"], features, logit_scale, rng, model.heads, dtype=model.dtype)
