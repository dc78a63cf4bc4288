"""Multimodal Attentive Experts (METHOD.md, "MMAE"), as pure functions.

An expert is a pre-LN transformer block of width D with ONE attention head and
a QuickGELU MLP, whose queries come from X and keys/values from Y:
    X1  = X + Attn(q = LN1(X), k = v = LN1(Y))      (the same LN1 on both sides)
    out = X1 + MLP(LN2(X1))
Its parameters mirror a Hugging Face CLIPEncoderLayer:
    {layer_norm1: {scale, bias}, self_attn: {q_proj, k_proj, v_proj, out_proj},
     layer_norm2: {scale, bias}, mlp: {fc1, fc2}}      (Dense: kernel [in, out], bias)
A group of experts stacks these leaves on a leading axis [n, ...] and runs them
with jax.vmap.

EntityCLIP reads each expert at one token only (CLS for images, EOT for text).
Attention and MLP act on every query row independently, so running the block
on that single query row gives exactly the same value at a fraction of the
cost; the groups below do that.

Parameters are fp32; matmuls run in `dtype`; the residual stream, LayerNorm and
the attention softmax stay in fp32.
"""
import jax
import jax.numpy as jnp

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, used by the release's experts


def layer_norm(params, x, eps=LAYER_NORM_EPS):
    """LayerNorm over the last axis, in fp32."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * params["scale"] + params["bias"]


def dense(params, x, dtype=jnp.float32):
    """x @ kernel + bias with inputs cast to the compute dtype."""
    return x.astype(dtype) @ params["kernel"].astype(dtype) + params["bias"].astype(dtype)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def expert_block(params, x, y, y_mask=None, *, dtype=jnp.float32):
    """One expert f(X, Y).

    x: [B, Tq, D] queries; y: [B, S, D] keys and values; y_mask: [B, S] with
    1 = real token, or None to attend to every key (the release's behaviour).
    Returns [B, Tq, D] float32.
    """
    x = x.astype(jnp.float32)
    attn = params["self_attn"]
    x_norm = layer_norm(params["layer_norm1"], x)
    y_norm = layer_norm(params["layer_norm1"], y)
    # One head: the head axis has size 1 and the 1/sqrt(D) scale is the default.
    q = dense(attn["q_proj"], x_norm, dtype)[:, :, None, :]
    k = dense(attn["k_proj"], y_norm, dtype)[:, :, None, :]
    v = dense(attn["v_proj"], y_norm, dtype)[:, :, None, :]
    mask = None if y_mask is None else y_mask.astype(bool)[:, None, None, :]
    attended = jax.nn.dot_product_attention(q, k, v, mask=mask)[:, :, 0, :]
    x = x + dense(attn["out_proj"], attended, dtype).astype(jnp.float32)

    hidden = quick_gelu(dense(params["mlp"]["fc1"], layer_norm(params["layer_norm2"], x), dtype))
    return x + dense(params["mlp"]["fc2"], hidden, dtype).astype(jnp.float32)


def expert_group(stacked, queries, keys, key_mask=None, *, dtype=jnp.float32):
    """All experts of a stack on the same inputs: [B, Q, D] queries -> [B, n, Q, D]."""
    run_one = lambda params: expert_block(params, queries, keys, key_mask, dtype=dtype)
    return jnp.moveaxis(jax.vmap(run_one)(stacked), 0, 1)


def read_tokens(tokens, index):
    """tokens[b, index[b]] for every row: [B, S, D], [B] (or a scalar) -> [B, D]."""
    index = jnp.broadcast_to(jnp.asarray(index, jnp.int32), tokens.shape[:1])
    return jnp.take_along_axis(tokens, index[:, None, None], axis=1)[:, 0]


def image_experts(stacked, V, *, dtype=jnp.float32):
    """e_v[k] = f_vk(V, V) read at CLS: [B, 1+P, D] -> [B, n_v, D]."""
    return expert_group(stacked, V[:, :1], V, None, dtype=dtype)[:, :, 0]


def text_experts(stacked, T, t_mask, eot_index, *, dtype=jnp.float32):
    """e_t[k] = f_tk(T, T) read at EOT: [B, L, D] -> [B, n_t, D]. t_mask None = no masking."""
    queries = read_tokens(T, eot_index)[:, None]
    return expert_group(stacked, queries, T, t_mask, dtype=dtype)[:, :, 0]


def explanation_experts(stacked, X, E, e_mask, read_index, *, dtype=jnp.float32):
    """s[k] = f_sk(X, E) read at read_index: X attends to the explanation tokens.

    Image side: X = V, read_index = 0. Text side: X = T, read_index = EOT.
    [B, S, D], [B, L, D] -> [B, n_s, D]. e_mask None = no masking.
    """
    queries = read_tokens(X, read_index)[:, None]
    return expert_group(stacked, queries, E, e_mask, dtype=dtype)[:, :, 0]
