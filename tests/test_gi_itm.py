"""Expert outputs, gated aggregation (V*, T*) and GI-ITM logits against NumPy transcriptions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entityclip_jax.models import gi_itm
from entityclip_jax.models.heads import HeadsConfig, init_heads
from tests.test_losses import np_expert, random_expert

B, D = 3, 8
N_V, N_S, N_T = 2, 3, 4  # distinct counts, so a mixed-up axis cannot pass


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_gated(gate, x, experts):
    """sum_j softmax(W x + b)_j * experts_j"""
    w = np_softmax(x @ gate["kernel"] + gate["bias"])
    return (w[:, :, None] * experts).sum(1)


def random_dense(rs, i, o):
    return dict(kernel=rs.normal(0, 0.5, (i, o)), bias=rs.normal(0, 0.3, (o,)))


def test_gates_and_itm_match_numpy():
    rs = np.random.RandomState(1)
    heads = dict(image_gate=random_dense(rs, D, N_V + N_S), text_gate=random_dense(rs, D, N_T + N_S),
                 itm_gate=random_dense(rs, 2 * D, N_V + N_S + N_T + N_S), itm_head=random_dense(rs, D, 2))
    v_cls, t_eot = rs.normal(size=(B, D)), rs.normal(size=(B, D))
    experts = dict(e_v=rs.normal(size=(B, N_V, D)), s_v=rs.normal(size=(B, N_S, D)),
                   e_t=rs.normal(size=(B, N_T, D)), s_t=rs.normal(size=(B, N_S, D)))

    want_v_star = np_gated(heads["image_gate"], v_cls, np.concatenate([experts["e_v"], experts["s_v"]], 1))
    want_t_star = np_gated(heads["text_gate"], t_eot, np.concatenate([experts["e_t"], experts["s_t"]], 1))
    everything = np.concatenate([experts[k] for k in ("e_v", "s_v", "e_t", "s_t")], 1)
    fused = np_gated(heads["itm_gate"], np.concatenate([v_cls, t_eot], 1), everything)
    want_logits = fused @ heads["itm_head"]["kernel"] + heads["itm_head"]["bias"]

    j = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)
    with jax.default_matmul_precision("highest"):
        v_star = gi_itm.image_star(j(heads), j(v_cls), j(experts["e_v"]), j(experts["s_v"]))
        t_star = gi_itm.text_star(j(heads), j(t_eot), j(experts["e_t"]), j(experts["s_t"]))
        logits = gi_itm.itm_logits(j(heads), j(v_cls), j(t_eot), j(experts))
    np.testing.assert_allclose(np.asarray(v_star), want_v_star, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(t_star), want_t_star, rtol=1e-5, atol=1e-5)
    assert logits.shape == (B, 2) and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=1e-5, atol=1e-5)


def test_heads_parameter_tree_and_init():
    cfg = HeadsConfig(num_image_experts=N_V, num_explanation_experts=N_S, num_text_experts=N_T)
    params = init_heads(jax.random.key(0), cfg, D)
    assert set(params) == {"image_experts", "explanation_experts", "text_experts",
                           "image_gate", "text_gate", "itm_gate", "itm_head"}
    assert params["image_experts"]["self_attn"]["q_proj"]["kernel"].shape == (N_V, D, D)
    assert params["explanation_experts"]["mlp"]["fc1"]["kernel"].shape == (N_S, D, 4 * D)
    assert params["text_experts"]["mlp"]["fc2"]["kernel"].shape == (N_T, 4 * D, D)
    assert params["image_gate"]["kernel"].shape == (D, N_V + N_S)
    assert params["text_gate"]["kernel"].shape == (D, N_T + N_S)
    assert params["itm_gate"]["kernel"].shape == (2 * D, N_V + N_S + N_T + N_S)
    assert params["itm_head"]["kernel"].shape == (D, 2)
    # PyTorch defaults (what the release's heads start from).
    ln = params["text_experts"]["layer_norm1"]
    assert np.all(np.asarray(ln["scale"]) == 1) and np.all(np.asarray(ln["bias"]) == 0)
    q = np.asarray(params["image_experts"]["self_attn"]["q_proj"]["kernel"])
    assert np.abs(q).max() <= (6 / (4 * D)) ** 0.5 and np.abs(q).max() > 0.5 * (6 / (4 * D)) ** 0.5
    assert not np.allclose(q[0], q[1])  # experts of a stack start different
    fc2 = np.asarray(params["text_experts"]["mlp"]["fc2"]["kernel"])
    assert np.abs(fc2).max() <= (4 * D) ** -0.5
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "release_unmasked"])
def test_expert_features_match_numpy(masked):
    """e_v at the image CLS, s_v (image attends to the explanation), e_t and s_t at the
    query's EOT: each expert of each stack, against a NumPy pre-LN transformer block."""
    rs = np.random.RandomState(2)
    np_heads = dict(image_experts=[random_expert(rs) for _ in range(N_V)],
                    explanation_experts=[random_expert(rs) for _ in range(N_S)],
                    text_experts=[random_expert(rs) for _ in range(N_T)])
    stack = lambda trees: jax.tree.map(lambda *leaves: jnp.asarray(np.stack(leaves), jnp.float32), *trees)
    heads = {name: stack(experts) for name, experts in np_heads.items()}
    V, T, E = rs.normal(size=(B, 5, D)), rs.normal(size=(B, 7, D)), rs.normal(size=(B, 7, D))
    eot, e_len = np.array([3, 6, 1]), np.array([2, 7, 4])
    t_mask = (np.arange(7)[None] <= eot[:, None]).astype(np.float32)
    e_mask = (np.arange(7)[None] < e_len[:, None]).astype(np.float32)
    rows = np.arange(B)
    use = (lambda m: m) if masked else (lambda m: None)
    want = dict(e_v=[np_expert(p, V, V)[:, 0] for p in np_heads["image_experts"]],
                s_v=[np_expert(p, V, E, use(e_mask))[:, 0] for p in np_heads["explanation_experts"]],
                e_t=[np_expert(p, T, T, use(t_mask))[rows, eot] for p in np_heads["text_experts"]],
                s_t=[np_expert(p, T, E, use(e_mask))[rows, eot] for p in np_heads["explanation_experts"]])
    j = lambda a: None if a is None else jnp.asarray(a, jnp.float32)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(gi_itm.expert_features)(heads, j(V), j(T), j(use(t_mask)), jnp.asarray(eot), j(E), j(use(e_mask)))
    for name, per_expert in want.items():
        assert got[name].shape == (B, len(per_expert), D), name
        np.testing.assert_allclose(np.asarray(got[name]), np.stack(per_expert, 1), rtol=1e-4, atol=1e-4,
                                   err_msg=name)
