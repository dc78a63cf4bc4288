"""Gated aggregation of the experts and Gated Integrative ITM (METHOD.md), pure.

For a triple (image tokens V, query tokens T, explanation tokens E):
    e_v = image experts on V at CLS         s_v = explanation experts, V attends to E, at CLS
    e_t = text experts on T at EOT          s_t = explanation experts, T attends to E, at EOT
    V*  = sum_j softmax(W_v v_cls + b_v)_j [e_v; s_v]_j          (image_gate)
    T*  = sum_j softmax(W_t t_eot + b_t)_j [e_t; s_t]_j          (text_gate)
    z   = softmax(W_f [v_cls; t_eot] + b_f)                      (itm_gate)
    p   = softmax(itm_head(sum_j z_j [e_v; s_v; e_t; s_t]_j))    class 0 = match
Expert stacks are [B, n, D]; gates and sums run in fp32, matmuls in `dtype`.
"""
import jax
import jax.numpy as jnp

from entityclip_jax.models.mmae import (
    dense, expert_group, image_experts, read_tokens, text_experts)


def expert_features(heads, V, T, t_mask, t_read, E, e_mask, *, dtype=jnp.float32):
    """All expert outputs of a triple: dict(e_v, s_v, e_t, s_t), each [B, n, D].

    t_read: [B] token index at which the query is read (its EOT). Masks are
    [B, L] with 1 = real token, or None to attend to padding (release quirk).
    """
    # The image CLS and the query EOT both attend to the same explanation keys
    # with the same expert weights: one call with two query rows serves both sides.
    queries = jnp.stack([V[:, 0], read_tokens(T, t_read)], axis=1)
    shared = expert_group(heads["explanation_experts"], queries, E, e_mask, dtype=dtype)
    return dict(
        e_v=image_experts(heads["image_experts"], V, dtype=dtype),
        s_v=shared[:, :, 0],
        e_t=text_experts(heads["text_experts"], T, t_mask, t_read, dtype=dtype),
        s_t=shared[:, :, 1],
    )


def gate_weights(params, x, *, dtype=jnp.float32):
    """softmax(W x + b) in fp32: [B, D_in] -> [B, n]."""
    return jax.nn.softmax(dense(params, x, dtype).astype(jnp.float32), axis=-1)


def gated_sum(weights, experts):
    """sum_j weights[:, j] * experts[:, j]: [B, n], [B, n, D] -> [B, D] float32."""
    return jnp.einsum("bn,bnd->bd", weights, experts.astype(jnp.float32))


def image_star(heads, v_cls, e_v, s_v, *, dtype=jnp.float32):
    """Explanation-enriched image feature V*: [B, D]."""
    experts = jnp.concatenate([e_v, s_v], axis=1)
    return gated_sum(gate_weights(heads["image_gate"], v_cls, dtype=dtype), experts)


def text_star(heads, t_eot, e_t, s_t, *, dtype=jnp.float32):
    """Explanation-enriched query feature T*: [B, D]."""
    experts = jnp.concatenate([e_t, s_t], axis=1)
    return gated_sum(gate_weights(heads["text_gate"], t_eot, dtype=dtype), experts)


def itm_logits(heads, v_cls, t_eot, experts, *, dtype=jnp.float32):
    """GI-ITM logits [B, 2] float32 (class 0 = match) from expert_features' dict."""
    stacked = jnp.concatenate([experts["e_v"], experts["s_v"], experts["e_t"], experts["s_t"]], axis=1)
    z = gate_weights(heads["itm_gate"], jnp.concatenate([v_cls, t_eot], axis=-1), dtype=dtype)
    return dense(heads["itm_head"], gated_sum(z, stacked), dtype).astype(jnp.float32)

