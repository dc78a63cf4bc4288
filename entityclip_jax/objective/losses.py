"""EntityCLIP's objective (METHOD.md, "Objective"), as pure functions:

    L = VTC(v_cls, t_eot) + eta * GI-ITM + lambda * VTC(V*, T*)

Every loss works on GLOBAL arrays: under jax.jit with batch-sharded inputs XLA
inserts the collectives, so the contrastive terms see all B x B pairs and the
hard negatives are drawn from the whole batch. All losses are fp32.
"""
import functools
import math

import jax
import jax.numpy as jnp

from entityclip_jax.models.gi_itm import expert_features, image_star, itm_logits, text_star
from entityclip_jax.models.mmae import explanation_experts, read_tokens, text_experts
from entityclip_jax.objective.hard_negatives import sample_hard_negatives

LOGIT_SCALE_MAX = math.log(100.0)  # OpenAI CLIP's clamp of the log scale
RELEASE_ITM_EPS = 1e-8  # the release's ITM loss: -log(p + 1e-8)


def l2_normalize(x, eps=1e-12):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def logit_scale_value(logit_scale, *, clamp=True):
    """exp(logit_scale), with the log scale clamped at ln(100) unless clamp=False."""
    logit_scale = jnp.asarray(logit_scale, jnp.float32)
    return jnp.exp(jnp.minimum(logit_scale, LOGIT_SCALE_MAX) if clamp else logit_scale)


def contrastive_logits(image_embeds, text_embeds, logit_scale, *, clamp=True):
    """logits_per_image [B, B] = scale * normalised(image) @ normalised(text).T, fp32."""
    scale = logit_scale_value(logit_scale, clamp=clamp)
    return scale * l2_normalize(image_embeds) @ l2_normalize(text_embeds).T


def symmetric_cross_entropy(logits_per_image):
    """Mean of image->text and text->image cross-entropy, the pairs on the diagonal."""
    def rows_toward_diagonal(logits):
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.diagonal(logits))
    logits = logits_per_image.astype(jnp.float32)
    return 0.5 * (rows_toward_diagonal(logits) + rows_toward_diagonal(logits.T))


def clip_contrastive_loss(image_embeds, text_embeds, logit_scale, *, clamp=True):
    """Symmetric CLIP InfoNCE over the global batch: [B, D], [B, D], scalar -> scalar."""
    return symmetric_cross_entropy(contrastive_logits(image_embeds, text_embeds, logit_scale, clamp=clamp))


def itm_cross_entropy(logits, label, *, faithful=False):
    """Mean cross-entropy of [B, 2] logits toward class `label`. Faithful: the release's
    -log(softmax + 1e-8), which gives a confidently wrong pair (almost) no gradient."""
    logits = logits.astype(jnp.float32)
    if faithful:
        return -jnp.mean(jnp.log(jax.nn.softmax(logits, axis=-1)[:, label] + RELEASE_ITM_EPS))
    return -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[:, label])


def gi_itm_loss(positive_logits, negative_a_logits, negative_b_logits, *, faithful=False):
    """(loss, accuracy): mean of three cross-entropies, positives toward class 0
    (match), each negative set toward class 1. Logits are [B, 2]."""
    cross_entropy = functools.partial(itm_cross_entropy, faithful=faithful)
    loss = (cross_entropy(positive_logits, 0) + cross_entropy(negative_a_logits, 1)
            + cross_entropy(negative_b_logits, 1)) / 3.0
    correct = jnp.concatenate([jnp.argmax(positive_logits, -1) == 0,
                               jnp.argmax(negative_a_logits, -1) == 1,
                               jnp.argmax(negative_b_logits, -1) == 1])
    return loss, jnp.mean(correct.astype(jnp.float32))


def _take(x, index):
    return None if x is None else x[index]


def entityclip_loss(heads, features, logit_scale, rng, cfg, *, dtype=jnp.float32):
    """Total EntityCLIP loss and its metrics, the hard negatives drawn with `rng` from the
    batch's own similarity logits (hard_negatives.py); see entityclip_loss_given_negatives."""
    def draw(main_logits):
        return sample_hard_negatives(rng, main_logits, faithful=bool(cfg.faithful_release))
    return _entityclip_loss(heads, features, logit_scale, draw, cfg, dtype)


def entityclip_loss_given_negatives(heads, features, logit_scale, negatives, cfg, *, dtype=jnp.float32):
    """Total EntityCLIP loss and its metrics for given hard negatives.

    heads: the EntityHeads parameter tree (entityclip_jax/models/heads.py).
    features: dict of the towers' outputs
        V [B, 1+P, D], T [B, L, D], t_mask [B, L], t_eot_index [B],
        E [B, L, D], e_mask [B, L], e_eot_index [B] (not needed: E only serves as keys).
    logit_scale: CLIP's log scale (scalar parameter).
    negatives: (neg_text_for_image [B], neg_image_for_text [B]) indices into the batch.
    cfg: a HeadsConfig (itm_weight = eta, expert_vtc_weight = lambda, faithful_release).
    dtype: the compute dtype of the experts' matmuls.
    Returns (loss, metrics) with metrics: loss, vtc, itm, vtc_experts,
    itm_accuracy, logit_scale (the scale actually used).
    """
    fixed = tuple(jnp.asarray(n, jnp.int32) for n in negatives)
    return _entityclip_loss(heads, features, logit_scale, lambda _: fixed, cfg, dtype)


def _entityclip_loss(heads, features, logit_scale, choose_negatives, cfg, dtype):
    """The objective; choose_negatives(main_logits) -> (neg_text [B], neg_image [B])."""
    dtype = jnp.dtype(dtype)
    faithful = bool(cfg.faithful_release)
    clamp = not faithful  # release quirk: logit_scale never clamped
    V, T, E, t_eot_index = features["V"], features["T"], features["E"], features["t_eot_index"]
    # Release quirk: no padding masks in the experts.
    t_mask = None if faithful else features["t_mask"]
    e_mask = None if faithful else features["e_mask"]
    v_cls, t_eot = V[:, 0], read_tokens(T, t_eot_index)

    main_logits = contrastive_logits(v_cls, t_eot, logit_scale, clamp=clamp)
    vtc = symmetric_cross_entropy(main_logits)

    positive = expert_features(heads, V, T, t_mask, t_eot_index, E, e_mask, dtype=dtype)
    v_star = image_star(heads, v_cls, positive["e_v"], positive["s_v"], dtype=dtype)
    t_star = text_star(heads, t_eot, positive["e_t"], positive["s_t"], dtype=dtype)
    vtc_experts = clip_contrastive_loss(v_star, t_star, logit_scale, clamp=clamp)

    neg_text, neg_image = choose_negatives(main_logits)

    # Most expert outputs of a negative triple are rows of the positive ones
    # (e_v depends on the image only; e_t, s_t on the query and its explanation,
    # which travel together), so they are gathered; only s_v, which meets an
    # image with another pair's explanation, is computed anew.
    shared = heads["explanation_experts"]
    # Negative A = (image_i, query_j, explanation_j), j = neg_text[i].
    j = neg_text
    s_v_a = explanation_experts(shared, V[:, :1], E[j], _take(e_mask, j), 0, dtype=dtype)
    if faithful:
        # Release quirk: query j is read at the EOT position of the POSITIVE query i.
        T_j, E_j = T[j], E[j]
        e_t_a = text_experts(heads["text_experts"], T_j, None, t_eot_index, dtype=dtype)
        s_t_a = explanation_experts(shared, T_j, E_j, None, t_eot_index, dtype=dtype)
        t_eot_a = read_tokens(T_j, t_eot_index)
    else:
        e_t_a, s_t_a, t_eot_a = positive["e_t"][j], positive["s_t"][j], t_eot[j]
    negative_a = dict(e_v=positive["e_v"], s_v=s_v_a, e_t=e_t_a, s_t=s_t_a)

    # Negative B = (image_j', query_i, explanation_i), j' = neg_image[i].
    jp = neg_image
    s_v_b = explanation_experts(shared, v_cls[jp][:, None], E, e_mask, 0, dtype=dtype)
    negative_b = dict(e_v=positive["e_v"][jp], s_v=s_v_b, e_t=positive["e_t"], s_t=positive["s_t"])

    itm, itm_accuracy = gi_itm_loss(
        itm_logits(heads, v_cls, t_eot, positive, dtype=dtype),
        itm_logits(heads, v_cls, t_eot_a, negative_a, dtype=dtype),
        itm_logits(heads, v_cls[jp], t_eot, negative_b, dtype=dtype), faithful=faithful)

    loss = vtc + cfg.itm_weight * itm + cfg.expert_vtc_weight * vtc_experts
    metrics = dict(loss=loss, vtc=vtc, itm=itm, vtc_experts=vtc_experts, itm_accuracy=itm_accuracy,
                   logit_scale=logit_scale_value(logit_scale, clamp=clamp))
    return loss, metrics
