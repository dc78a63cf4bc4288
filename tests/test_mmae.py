"""MMAE expert block and expert groups against a NumPy transcription of METHOD.md."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entityclip_jax.models import mmae

B, S_IMG, L, D = 3, 5, 7, 8


# ---- NumPy transcription of METHOD.md (independent of the implementation) ----
def np_layer_norm(x, scale, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def np_expert(p, X, Y, y_mask=None):
    """X1 = X + Attn(q=LN1(X), k=v=LN1(Y)); out = X1 + MLP(LN2(X1)); one head; full query sequence."""
    lin = lambda q, x: x @ q["kernel"] + q["bias"]
    a = p["self_attn"]
    xn = np_layer_norm(X, **p["layer_norm1"])
    yn = np_layer_norm(Y, **p["layer_norm1"])
    q, k, v = lin(a["q_proj"], xn), lin(a["k_proj"], yn), lin(a["v_proj"], yn)
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(X.shape[-1])
    if y_mask is not None:
        scores = np.where(y_mask[:, None, :] > 0, scores, -np.inf)
    X1 = X + lin(a["out_proj"], np_softmax(scores) @ v)
    h = lin(p["mlp"]["fc1"], np_layer_norm(X1, **p["layer_norm2"]))
    h = h / (1 + np.exp(-1.702 * h))
    return X1 + lin(p["mlp"]["fc2"], h)


def random_expert(rs, dim):
    dense = lambda i, o: dict(kernel=rs.normal(0, 0.4, (i, o)), bias=rs.normal(0, 0.1, (o,)))
    ln = lambda: dict(scale=1 + rs.normal(0, 0.2, (dim,)), bias=rs.normal(0, 0.1, (dim,)))
    return dict(layer_norm1=ln(),
                self_attn=dict(q_proj=dense(dim, dim), k_proj=dense(dim, dim),
                               v_proj=dense(dim, dim), out_proj=dense(dim, dim)),
                layer_norm2=ln(), mlp=dict(fc1=dense(dim, 4 * dim), fc2=dense(4 * dim, dim)))


def random_mask(rs, length, batch=B):
    """1 for a prefix of real tokens (at least 2), 0 for padding."""
    lengths = rs.randint(2, length + 1, size=batch)
    return (np.arange(length)[None] < lengths[:, None]).astype(np.float32), lengths


def stack(trees):
    return jax.tree.map(lambda *leaves: np.stack(leaves), *trees)


def to_jax(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


@pytest.fixture
def rs():
    return np.random.RandomState(0)


# ---- tests ----
@pytest.mark.parametrize("masked", [False, True])
def test_expert_block_matches_numpy(rs, masked):
    p = random_expert(rs, D)
    X, Y = rs.normal(size=(B, 4, D)), rs.normal(size=(B, L, D))
    mask = random_mask(rs, L)[0] if masked else None
    with jax.default_matmul_precision("highest"):
        got = jax.jit(mmae.expert_block)(to_jax(p), jnp.asarray(X, jnp.float32), jnp.asarray(Y, jnp.float32),
                                None if mask is None else jnp.asarray(mask))
    assert got.dtype == jnp.float32 and got.shape == (B, 4, D)
    np.testing.assert_allclose(np.asarray(got), np_expert(p, X, Y, mask), rtol=1e-5, atol=1e-5)


def test_masked_keys_have_no_influence(rs):
    p = to_jax(random_expert(rs, D))
    X, Y = jnp.asarray(rs.normal(size=(B, 2, D))), rs.normal(size=(B, L, D))
    mask, lengths = random_mask(rs, L)
    Y_changed = Y.copy()
    for b, n in enumerate(lengths):
        Y_changed[b, n:] = rs.normal(size=(L - n, D)) * 10
    block = jax.jit(mmae.expert_block)
    run = lambda y, m: np.asarray(block(p, X, jnp.asarray(y), m))
    np.testing.assert_allclose(run(Y, mask), run(Y_changed, mask), rtol=1e-6, atol=1e-6)
    assert not np.allclose(run(Y, None), run(Y_changed, None), atol=1e-3)  # without mask they matter


def test_expert_groups_match_numpy(rs):
    n = 3
    experts = [random_expert(rs, D) for _ in range(n)]
    stacked = to_jax(stack(experts))
    V, T, E = rs.normal(size=(B, S_IMG, D)), rs.normal(size=(B, L, D)), rs.normal(size=(B, L, D))
    t_mask, t_len = random_mask(rs, L)
    e_mask, _ = random_mask(rs, L)
    eot = t_len - 1  # EOT is the last real token
    rows = np.arange(B)
    want_image = np.stack([np_expert(p, V, V)[:, 0] for p in experts], axis=1)
    want_text = np.stack([np_expert(p, T, T, t_mask)[rows, eot] for p in experts], axis=1)
    want_shared_v = np.stack([np_expert(p, V, E, e_mask)[:, 0] for p in experts], axis=1)
    want_shared_t = np.stack([np_expert(p, T, E, e_mask)[rows, eot] for p in experts], axis=1)
    want_text_unmasked = np.stack([np_expert(p, T, T)[rows, eot] for p in experts], axis=1)

    @jax.jit
    def run_groups(stacked, V, T, E, t_mask, e_mask, eot):
        return (mmae.image_experts(stacked, V),
                mmae.text_experts(stacked, T, t_mask, eot),
                mmae.explanation_experts(stacked, V, E, e_mask, 0),
                mmae.explanation_experts(stacked, T, E, e_mask, eot),
                mmae.text_experts(stacked, T, None, eot))

    j = lambda a: jnp.asarray(a, jnp.float32)
    with jax.default_matmul_precision("highest"):
        got_image, got_text, got_shared_v, got_shared_t, got_text_unmasked = run_groups(
            stacked, j(V), j(T), j(E), j(t_mask), j(e_mask), jnp.asarray(eot))
    for got, want in [(got_image, want_image), (got_text, want_text), (got_shared_v, want_shared_v),
                      (got_shared_t, want_shared_t), (got_text_unmasked, want_text_unmasked)]:
        assert got.shape == (B, n, D)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_groups_are_vmapped_not_unrolled(rs):
    """One expert block in the jaxpr whatever the group size."""
    stacked = to_jax(stack([random_expert(rs, D) for _ in range(4)]))
    jaxpr = str(jax.make_jaxpr(mmae.image_experts)(stacked, jnp.zeros((B, S_IMG, D))))
    assert jaxpr.count("logistic") == 1  # the QuickGELU sigmoid appears once


def test_bfloat16_compute_keeps_fp32_outputs(rs):
    stacked = to_jax(stack([random_expert(rs, D) for _ in range(2)]))
    V = jnp.asarray(rs.normal(size=(B, S_IMG, D)), jnp.float32)
    full, half = jax.jit(lambda s, v: (mmae.image_experts(s, v), mmae.image_experts(s, v, dtype=jnp.bfloat16)))(
        stacked, V)
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(half), np.asarray(full), rtol=0.1, atol=0.1)
    assert not np.array_equal(np.asarray(half), np.asarray(full))  # bf16 really was used
