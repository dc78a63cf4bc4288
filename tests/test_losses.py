"""Losses and hard negatives against a NumPy transcription of METHOD.md, both modes.

The transcription recomputes every negative triple from scratch, with the
release's quirks (no masks, negative queries read at the positive's EOT, no
clamp) in faithful mode; the implementation gathers what it can.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from entityclip_jax.objective import hard_negatives, losses
from entityclip_jax.objective.hard_negatives import sample_hard_negatives
from entityclip_jax.models.heads import HeadsConfig

B, S_IMG, L, D = 4, 5, 7, 8
N_V, N_S, N_T = 2, 3, 4
LOGIT_SCALE = 4.9  # above ln(100), so the clamp matters


# ---- NumPy transcription ----
def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_itm_ce(logits, label, faithful):
    """Corrected: exact log-softmax. Release: -log(softmax(logits) + 1e-8)."""
    if faithful:
        return -np.log(np_softmax(logits)[:, label] + 1e-8).mean()
    return -np_log_softmax(logits)[:, label].mean()


def np_negative_probabilities(logits, faithful):
    """Row i: the probability of drawing column j as i's hard negative."""
    weights = np_softmax(logits.astype(np.float64))
    np.fill_diagonal(weights, 0)
    if faithful:
        weights = weights + 1e-5  # after zeroing: the diagonal gets 1e-5 too
    return weights / weights.sum(1, keepdims=True)


def np_layer_norm(x, scale, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_linear(p, x):
    return x @ p["kernel"] + p["bias"]


def np_expert(p, X, Y, y_mask=None):
    a = p["self_attn"]
    xn, yn = np_layer_norm(X, **p["layer_norm1"]), np_layer_norm(Y, **p["layer_norm1"])
    q, k, v = np_linear(a["q_proj"], xn), np_linear(a["k_proj"], yn), np_linear(a["v_proj"], yn)
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(X.shape[-1])
    if y_mask is not None:
        scores = np.where(y_mask[:, None, :] > 0, scores, -np.inf)
    X1 = X + np_linear(a["out_proj"], np_softmax(scores) @ v)
    h = np_linear(p["mlp"]["fc1"], np_layer_norm(X1, **p["layer_norm2"]))
    return X1 + np_linear(p["mlp"]["fc2"], h / (1 + np.exp(-1.702 * h)))


def np_vtc(a, b, scale):
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    logits = scale * a @ b.T
    diag = np.arange(len(a))
    return -(np_log_softmax(logits)[diag, diag].mean() + np_log_softmax(logits.T)[diag, diag].mean()) / 2


def np_triple_experts(h, V, T, E, read, t_mask, e_mask):
    """[e_v; s_v; e_t; s_t] of triples (V_b, T_b, E_b), the query read at `read`: lists of [B, D]."""
    rows = np.arange(len(V))
    e_v = [np_expert(p, V, V)[:, 0] for p in h["image_experts"]]
    s_v = [np_expert(p, V, E, e_mask)[:, 0] for p in h["explanation_experts"]]
    e_t = [np_expert(p, T, T, t_mask)[rows, read] for p in h["text_experts"]]
    s_t = [np_expert(p, T, E, e_mask)[rows, read] for p in h["explanation_experts"]]
    return e_v, s_v, e_t, s_t


def np_gated(gate, x, experts):
    w = np_softmax(np_linear(gate, x))
    return sum(w[:, k:k + 1] * e for k, e in enumerate(experts))


def np_itm_logits(h, v_cls, t_eot, experts):
    e_v, s_v, e_t, s_t = experts
    fused = np_gated(h["itm_gate"], np.concatenate([v_cls, t_eot], 1), e_v + s_v + e_t + s_t)
    return np_linear(h["itm_head"], fused)


def np_entityclip_loss(h, f, logit_scale, neg_text, neg_image, faithful, eta=0.1, lam=0.1):
    V, T, E, eot = f["V"], f["T"], f["E"], f["t_eot_index"]
    t_mask, e_mask = (None, None) if faithful else (f["t_mask"], f["e_mask"])
    scale = np.exp(logit_scale if faithful else min(logit_scale, math.log(100)))
    rows = np.arange(len(V))
    v_cls, t_eot = V[:, 0], T[rows, eot]
    vtc = np_vtc(v_cls, t_eot, scale)

    pos = np_triple_experts(h, V, T, E, eot, t_mask, e_mask)
    v_star = np_gated(h["image_gate"], v_cls, pos[0] + pos[1])
    t_star = np_gated(h["text_gate"], t_eot, pos[2] + pos[3])
    vtc_experts = np_vtc(v_star, t_star, scale)

    j, jp = neg_text, neg_image
    # A = (image_i, query_j, explanation_j); the release reads query j at query i's EOT.
    read_a = eot if faithful else eot[j]
    sub = lambda m, idx: None if m is None else m[idx]
    neg_a = np_triple_experts(h, V, T[j], E[j], read_a, sub(t_mask, j), sub(e_mask, j))
    # B = (image_j', query_i, explanation_i)
    neg_b = np_triple_experts(h, V[jp], T, E, eot, t_mask, e_mask)
    ce = lambda logits, label: np_itm_ce(logits, label, faithful)
    itm = (ce(np_itm_logits(h, v_cls, t_eot, pos), 0)
           + ce(np_itm_logits(h, v_cls, T[j][rows, read_a], neg_a), 1)
           + ce(np_itm_logits(h, V[jp][:, 0], t_eot, neg_b), 1)) / 3
    return vtc + eta * itm + lam * vtc_experts, dict(vtc=vtc, itm=itm, vtc_experts=vtc_experts)


# ---- fixtures ----
def random_expert(rs):
    dense = lambda i, o: dict(kernel=rs.normal(0, 0.4, (i, o)), bias=rs.normal(0, 0.1, (o,)))
    ln = lambda: dict(scale=1 + rs.normal(0, 0.2, (D,)), bias=rs.normal(0, 0.1, (D,)))
    return dict(layer_norm1=ln(), layer_norm2=ln(), mlp=dict(fc1=dense(D, 4 * D), fc2=dense(4 * D, D)),
                self_attn=dict(q_proj=dense(D, D), k_proj=dense(D, D), v_proj=dense(D, D), out_proj=dense(D, D)))


def random_problem(seed=0, batch=B):
    """(numpy heads with expert lists, jax heads with stacks, numpy features)."""
    rs = np.random.RandomState(seed)
    dense = lambda i, o: dict(kernel=rs.normal(0, 0.5, (i, o)), bias=rs.normal(0, 0.3, (o,)))
    np_heads = dict(image_experts=[random_expert(rs) for _ in range(N_V)],
                    explanation_experts=[random_expert(rs) for _ in range(N_S)],
                    text_experts=[random_expert(rs) for _ in range(N_T)],
                    image_gate=dense(D, N_V + N_S), text_gate=dense(D, N_T + N_S),
                    itm_gate=dense(2 * D, N_V + N_S + N_T + N_S), itm_head=dense(D, 2))
    stack = lambda trees: jax.tree.map(lambda *leaves: np.stack(leaves), *trees)
    jax_heads = {k: stack(v) if isinstance(v, list) else v for k, v in np_heads.items()}
    jax_heads = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), jax_heads)
    t_len, e_len = rs.randint(2, L + 1, size=batch), rs.randint(2, L + 1, size=batch)
    t_len[0], t_len[1] = 3, L  # distinct EOTs, so the faithful read index differs
    features = dict(V=rs.normal(size=(batch, S_IMG, D)), T=rs.normal(size=(batch, L, D)),
                    E=rs.normal(size=(batch, L, D)),
                    t_mask=(np.arange(L)[None] < t_len[:, None]).astype(np.float32),
                    e_mask=(np.arange(L)[None] < e_len[:, None]).astype(np.float32),
                    t_eot_index=(t_len - 1).astype(np.int32), e_eot_index=(e_len - 1).astype(np.int32))
    return np_heads, jax_heads, features


def to_jax_features(f):
    return {k: jnp.asarray(v, jnp.int32 if "index" in k else jnp.float32) for k, v in f.items()}


CFG = HeadsConfig(num_image_experts=N_V, num_explanation_experts=N_S, num_text_experts=N_T)
CFG_FAITHFUL = HeadsConfig(num_image_experts=N_V, num_explanation_experts=N_S, num_text_experts=N_T,
                           faithful_release=True)
# j != i and j' != i, and not a mere shift, so gathers in the wrong direction fail.
NEG_TEXT, NEG_IMAGE = np.array([2, 3, 0, 1]), np.array([1, 0, 3, 0])
LOSS = jax.jit(losses.entityclip_loss_given_negatives, static_argnums=4)  # one compilation cache for the tests


# ---- tests ----
@pytest.mark.parametrize("clamp", [True, False])
def test_clip_contrastive_loss_matches_numpy(clamp):
    rs = np.random.RandomState(3)
    a, b = rs.normal(size=(6, D)), rs.normal(size=(6, D))
    with jax.default_matmul_precision("highest"):
        got = losses.clip_contrastive_loss(jnp.asarray(a), jnp.asarray(b), LOGIT_SCALE, clamp=clamp)
    want = np_vtc(a, b, np.exp(min(LOGIT_SCALE, math.log(100)) if clamp else LOGIT_SCALE))
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-5)


def test_contrastive_loss_uses_the_global_batch_when_sharded():
    devices = np.array(jax.devices())
    assert len(devices) == 8
    batch = 16
    rs = np.random.RandomState(4)
    a, b = rs.normal(size=(batch, D)).astype(np.float32), rs.normal(size=(batch, D)).astype(np.float32)
    sharding = NamedSharding(Mesh(devices, ("data",)), P("data"))
    a_sharded, b_sharded = jax.device_put(a, sharding), jax.device_put(b, sharding)
    with jax.default_matmul_precision("highest"):
        sharded = jax.jit(losses.clip_contrastive_loss)(a_sharded, b_sharded, 2.0)
        unsharded = losses.clip_contrastive_loss(jnp.asarray(a), jnp.asarray(b), 2.0)
    np.testing.assert_allclose(float(sharded), float(unsharded), rtol=1e-6)
    np.testing.assert_allclose(float(sharded), np_vtc(a, b, np.exp(2.0)), rtol=1e-5)
    per_device = np.mean([np_vtc(a[k:k + 2], b[k:k + 2], np.exp(2.0)) for k in range(0, batch, 2)])
    assert abs(float(sharded) - per_device) > 1e-2  # per-device blocks would give another value


@functools.partial(jax.jit, static_argnums=2)
def _sample_many(keys, logits, faithful):
    return jax.vmap(lambda key: sample_hard_negatives(key, logits, faithful=faithful))(keys)


def _draw_frequencies(logits, faithful, draws=40_000):
    keys = jax.random.split(jax.random.key(0), draws)
    neg_text, neg_image = (np.asarray(n) for n in _sample_many(keys, jnp.asarray(logits), faithful))
    assert neg_text.shape == neg_image.shape == (draws, len(logits))
    assert not np.array_equal(neg_text, neg_image)  # the two directions use different keys
    counts = lambda drawn: np.stack([np.bincount(drawn[:, i], minlength=len(logits)) / draws
                                     for i in range(len(logits))])
    return counts(neg_text), counts(neg_image)


@pytest.mark.parametrize("faithful", [False, True], ids=["corrected", "faithful"])
def test_hard_negatives_follow_the_numpy_weights(faithful):
    rs = np.random.RandomState(5)
    logits = rs.normal(0, 1.5, size=(4, 4)).astype(np.float32)
    logits[np.diag_indices(4)] += 5.0  # the positives dominate, yet are never (corrected) drawn
    for matrix, empirical in zip([logits, logits.T], _draw_frequencies(logits, faithful)):
        expected = np_negative_probabilities(matrix, faithful)
        np.testing.assert_allclose(empirical, expected, atol=0.015)
        if not faithful:
            assert np.all(np.diag(empirical) == 0)
    probabilities = jax.nn.softmax(hard_negatives.negative_log_weights(jnp.asarray(logits), faithful=faithful))
    np.testing.assert_allclose(np.asarray(probabilities), np_negative_probabilities(logits, faithful),
                               rtol=1e-5, atol=1e-7)


def test_hard_negatives_when_the_positive_holds_almost_all_the_mass():
    """Off-diagonal softmax ~1e-13: the release's 1e-5 floor makes the draw about
    uniform over the row, the positive itself included (a 1 in B chance)."""
    logits = np.full((4, 4), -10.0, np.float32)
    logits[np.diag_indices(4)] = 20.0
    logits[0, 1] = 0.0  # a hard negative the corrected mode picks (all but) every time
    for faithful in (False, True):
        want = np_negative_probabilities(logits, faithful)
        got = jax.nn.softmax(hard_negatives.negative_log_weights(jnp.asarray(logits), faithful=faithful))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-7)
    assert np.allclose(np.diag(np_negative_probabilities(logits, True)), 0.25, atol=1e-3)
    faithful_draws = _draw_frequencies(logits, True)[0]
    assert np.all(np.abs(np.diag(faithful_draws) - 0.25) < 0.015)  # drawn as its own negative
    corrected_draws = _draw_frequencies(logits, False)[0]
    assert np.all(np.diag(corrected_draws) == 0) and corrected_draws[0, 1] > 0.99


@pytest.mark.parametrize("faithful", [False, True], ids=["corrected", "faithful"])
def test_gi_itm_loss_matches_numpy(faithful):
    rs = np.random.RandomState(6)
    pos, neg_a, neg_b = (rs.normal(size=(5, 2)) for _ in range(3))
    loss, accuracy = losses.gi_itm_loss(jnp.asarray(pos), jnp.asarray(neg_a), jnp.asarray(neg_b), faithful=faithful)
    want = (np_itm_ce(pos, 0, faithful) + np_itm_ce(neg_a, 1, faithful) + np_itm_ce(neg_b, 1, faithful)) / 3
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    correct = np.concatenate([pos.argmax(1) == 0, neg_a.argmax(1) == 1, neg_b.argmax(1) == 1])
    np.testing.assert_allclose(float(accuracy), correct.mean(), rtol=1e-6)


def test_itm_cross_entropy_on_a_confidently_wrong_pair():
    """A positive scored [-20, 20] (sure it is NOT a match): the release's -log(p + 1e-8)
    saturates near -log(1e-8) and passes almost no gradient; the exact loss is 40 and
    pulls with the full gradient p - onehot."""
    logits = np.array([[-20.0, 20.0], [1.0, -1.0]])
    for faithful, want_loss in [(True, np_itm_ce(logits, 0, True)), (False, np_itm_ce(logits, 0, False))]:
        value, grad = jax.value_and_grad(lambda x: losses.itm_cross_entropy(x, 0, faithful=faithful))(
            jnp.asarray(logits, jnp.float32))
        np.testing.assert_allclose(float(value), want_loss, rtol=1e-5)
        p = np_softmax(logits)
        onehot = np.array([1.0, 0.0])
        if faithful:  # d/dz -log(p0 + eps) = -p0 (onehot - p) / (p0 + eps), averaged over rows
            want_grad = -(p[:, :1] * (onehot - p)) / (p[:, :1] + 1e-8) / len(logits)
        else:
            want_grad = (p - onehot) / len(logits)
        np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-9)
    assert abs(np_itm_ce(logits[:1], 0, True) - (-np.log(1e-8))) < 1e-6
    assert abs(np_itm_ce(logits[:1], 0, False) - 40.0) < 1e-6


@pytest.mark.parametrize("cfg", [CFG, CFG_FAITHFUL], ids=["corrected", "faithful"])
def test_entityclip_loss_matches_numpy(cfg):
    np_heads, heads, features = random_problem()
    with jax.default_matmul_precision("highest"):
        loss, metrics = LOSS(
            heads, to_jax_features(features), LOGIT_SCALE, (jnp.asarray(NEG_TEXT), jnp.asarray(NEG_IMAGE)), cfg)
    want, want_terms = np_entityclip_loss(np_heads, features, LOGIT_SCALE, NEG_TEXT, NEG_IMAGE,
                                          faithful=cfg.faithful_release)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-5)
    for name, value in want_terms.items():
        np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5, atol=1e-5)
    other, _ = np_entityclip_loss(np_heads, features, LOGIT_SCALE, NEG_TEXT, NEG_IMAGE,
                                  faithful=not cfg.faithful_release)
    assert abs(other - want) > 1e-3  # the two modes really differ on this problem
    expected_scale = LOGIT_SCALE if cfg.faithful_release else math.log(100)
    np.testing.assert_allclose(float(metrics["logit_scale"]), math.exp(expected_scale), rtol=1e-6)
    assert 0.0 <= float(metrics["itm_accuracy"]) <= 1.0


@pytest.mark.slow  # compiles the loss's gradient
def test_gradient_reaches_every_parameter_with_sampled_negatives():
    _, heads, features = random_problem(seed=2)
    features = to_jax_features(features)
    rng = jax.random.key(7)
    loss_fn = lambda h, scale: losses.entityclip_loss(h, features, scale, rng, CFG)[0]
    with jax.default_matmul_precision("highest"):
        sampled_loss, (grad_heads, grad_scale) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(
            heads, LOGIT_SCALE - 1.0)
        # the key path equals the explicit path with the same draw (LOSS is cached from above)
        t_eot = features["T"][jnp.arange(B), features["t_eot_index"]]
        main_logits = losses.contrastive_logits(features["V"][:, 0], t_eot, LOGIT_SCALE - 1.0)
        explicit_loss, _ = LOSS(heads, features, LOGIT_SCALE - 1.0, sample_hard_negatives(rng, main_logits), CFG)
    np.testing.assert_allclose(float(sampled_loss), float(explicit_loss), rtol=1e-6)

    assert abs(float(grad_scale)) > 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(grad_heads):
        name = jax.tree_util.keystr(path)
        assert np.all(np.isfinite(np.asarray(leaf))), name
        if "k_proj" in name and "bias" in name:
            continue  # a key bias shifts every score of a query equally: softmax ignores it
        # every expert of a stack gets its own gradient
        per_expert = np.abs(np.asarray(leaf)).reshape(leaf.shape[0], -1).max(1) if "experts" in name \
            else np.abs(np.asarray(leaf)).max(keepdims=True)
        assert np.all(per_expert > 0), name
