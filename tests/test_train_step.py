"""The sharded train step: same numbers on 1 device and on 8 (data=8, data=2 x fsdp=4),
compiled once, gradient in every parameter; the optimizer, sharding rules and
gradient accumulation against their definitions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entityclip_jax.config import model_from_config, validate_config
from entityclip_jax.errors import EntityClipError
from entityclip_jax.parallel import sharding
from entityclip_jax.parallel.mesh import make_mesh
from entityclip_jax.train import optimizer
from entityclip_jax.train.step import loss_and_grads
from tests._tiny_training import build_state, random_batch, tiny_config, tiny_model

BATCH = 16
# Adam's first update is g / (|g| + eps) * lr; with eps = lr = 1 it is ~g, so
# parameters after one step compare the gradients themselves, not just their signs.
GRADIENT_LIKE = {"optimizer.eps": 1.0, "optimizer.learning_rate": 1.0, "optimizer.schedule": "constant",
                 "optimizer.warmup_steps": 0, "optimizer.grad_clip_norm": 0.0, "sharding.fsdp_min_size": 0}
MESHES = {
    "data8": ((("data", -1), ("fsdp", 1)), ((".*", "replicate"),)),
    "data2_fsdp4": ((("data", 2), ("fsdp", 4)), ((".*", "fsdp"),)),
}


def one_step(mesh_axes, rules, devices=None, steps=1):
    model, params = tiny_model()
    config = tiny_config(**GRADIENT_LIKE, **{"mesh": mesh_axes, "sharding.rules": rules})
    mesh = make_mesh(config.mesh, devices)
    step, state, _, _ = build_state(model, params, config, mesh)
    batch = jax.device_put(random_batch(BATCH), sharding.batch_shardings(mesh, random_batch(BATCH)))
    for _ in range(steps):
        state, metrics = step(state, batch)
    return step, jax.device_get(state.params), jax.device_get(metrics), state


@pytest.fixture(scope="module")
def single_device_step():
    with jax.default_matmul_precision("highest"):
        return one_step((("data", 1), ("fsdp", 1)), ((".*", "replicate"),), devices=jax.devices()[:1])


def assert_same_step(result, single_device_step):
    _, params_1, metrics_1, _ = single_device_step
    _, params_8, metrics_8, _ = result
    for name in ("loss", "vtc", "itm", "vtc_experts"):
        np.testing.assert_allclose(metrics_8[name], metrics_1[name], rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), params_8, params_1)


@pytest.mark.slow  # compiles the whole step (test_resume trains through it)
def test_single_device_step_moves_every_parameter(single_device_step):
    _, params_1, _, _ = single_device_step
    _, initial = tiny_model()
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(), params_1, initial)
    # Adam moves a parameter iff its gradient is non-zero: the gradient reached every array
    still = [jax.tree_util.keystr(p) for p, m in jax.tree_util.tree_flatten_with_path(moved)[0] if m == 0]
    assert not still, f"no gradient reached {still}"
    assert set(params_1) == {"clip", "heads"} and max(jax.tree.leaves(moved)) > 1e-3


@pytest.mark.slow  # another compile of the step (data8 stays fast)
def test_fsdp_step_equals_single_device(single_device_step):
    with jax.default_matmul_precision("highest"):
        result = one_step(*MESHES["data2_fsdp4"])
    assert_same_step(result, single_device_step)
    kernel = result[3].params["clip"]["text_model"]["encoder"]["layers"]["0"]["mlp"]["fc1"]["kernel"]
    assert "fsdp" in str(kernel.sharding.spec)  # really sharded, not silently replicated


@pytest.mark.slow  # compiles the whole step twice
def test_data8_step_equals_single_device_and_compiles_once(single_device_step):
    assert len(jax.devices()) == 8
    with jax.default_matmul_precision("highest"):
        result = one_step(*MESHES["data8"])
        assert_same_step(result, single_device_step)
        step, _, _, state = result
        batch = jax.device_put(random_batch(BATCH, seed=1), sharding.batch_shardings(step_mesh(state), random_batch(2)))
        for _ in range(2):
            state, _ = step(state, batch)
    assert step._cache_size() == 1  # three steps, one compilation


def step_mesh(state):
    return state.params["clip"]["logit_scale"].sharding.mesh


@pytest.mark.slow  # another compile of the step
def test_bfloat16_compute_keeps_fp32_params_and_loss(single_device_step):
    model, params = tiny_model()
    config = tiny_config(**{"model.dtype": "bfloat16"})
    model = model_from_config(config, model.clip)
    mesh = make_mesh((("data", 1),), jax.devices()[:1])
    step, state, _, _ = build_state(model, params, config, mesh)
    batch = jax.device_put(random_batch(BATCH), sharding.batch_shardings(mesh, random_batch(BATCH)))
    state, metrics = step(state, batch)
    assert metrics["loss"].dtype == jnp.float32
    fp32_loss = single_device_step[2]["loss"]  # same params, batch and negatives, fp32 compute
    assert metrics["loss"] != fp32_loss and abs(metrics["loss"] - fp32_loss) < 0.05 * abs(fp32_loss)
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}


@pytest.mark.slow  # another compile of the step
def test_accumulation_averages_micro_batch_gradients():
    model, params = tiny_model("clip_finetune")
    mesh = make_mesh((("data", -1),))
    batch = random_batch(BATCH)
    grads_of = jax.jit(lambda b, k: loss_and_grads(model, params, b, jax.random.key(0), k, mesh),
                       static_argnums=1)
    with jax.default_matmul_precision("highest"):
        metrics, grads = grads_of(batch, 2)
        # micro-batch m holds rows m, m + 2, ... (spread over every device)
        parts = [grads_of({k: v[m::2] for k, v in batch.items()}, 1) for m in range(2)]
    np.testing.assert_allclose(metrics["loss"], np.mean([p[0]["loss"] for p in parts]), rtol=1e-6)
    jax.tree.map(lambda g, a, b: np.testing.assert_allclose(g, (a + b) / 2, rtol=1e-4, atol=1e-5),
                 grads, parts[0][1], parts[1][1])


# ---------------------------------------------------------------- optimizer and sharding rules

def toy_params():
    return {"clip": {"vision_model": {"w": jnp.ones((4, 3))}, "logit_scale": jnp.asarray(2.0)},
            "heads": {"itm_head": {"kernel": jnp.ones((3, 2))}}}


def test_release_schedule_is_cosine_to_zero_without_warmup():
    opt = tiny_config(**{"optimizer.warmup_steps": 0, "optimizer.learning_rate": 1e-5}).optimizer
    schedule = optimizer.learning_rate_schedule(opt, 100)
    steps = np.arange(101)
    expected = 1e-5 * 0.5 * (1 + np.cos(np.pi * steps / 100))
    np.testing.assert_allclose([schedule(s) for s in steps], expected, rtol=1e-5, atol=1e-12)
    warm = optimizer.learning_rate_schedule(tiny_config(**{"optimizer.warmup_steps": 10}).optimizer, 100)
    assert float(warm(0)) == 0.0 and float(warm(5)) == pytest.approx(0.5e-3)


def test_freeze_and_group_learning_rates():
    opt = tiny_config(**{"optimizer.freeze": ("vision_model",), "optimizer.lr_multipliers": (("heads/", 10.0),),
                         "optimizer.schedule": "constant", "optimizer.warmup_steps": 0,
                         "optimizer.grad_clip_norm": 0.0}).optimizer
    params = toy_params()
    tx = optimizer.make_optimizer(opt, 10, params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert not np.any(updates["clip"]["vision_model"]["w"])
    lr = opt.learning_rate
    # Adam's first step moves by lr * g / (|g| + eps) ~ lr
    np.testing.assert_allclose(updates["clip"]["logit_scale"], -lr, rtol=1e-4)
    np.testing.assert_allclose(updates["heads"]["itm_head"]["kernel"], -10 * lr, rtol=1e-4)


def test_clipping_ignores_frozen_gradients():
    # eps = lr = 1: the first update is ~g / (|g| + 1), so the clipping scale shows
    settings = {"optimizer.freeze": ("vision_model",), "optimizer.eps": 1.0, "optimizer.learning_rate": 1.0,
                "optimizer.schedule": "constant", "optimizer.warmup_steps": 0}
    params = toy_params()

    def updates(clip_norm, frozen_grad):
        opt = tiny_config(**settings, **{"optimizer.grad_clip_norm": clip_norm}).optimizer
        tx = optimizer.make_optimizer(opt, 10, params)
        grads = jax.tree.map(jnp.ones_like, params)
        grads["clip"]["vision_model"]["w"] = grads["clip"]["vision_model"]["w"] * frozen_grad
        return tx.update(grads, tx.init(params), params)[0]
    small, huge, unclipped = updates(1.0, 1.0), updates(1.0, 1e6), updates(0.0, 1.0)
    jax.tree.map(np.testing.assert_allclose, small, huge)  # the frozen gradient is not in the norm
    assert not np.allclose(small["heads"]["itm_head"]["kernel"], unclipped["heads"]["itm_head"]["kernel"])


def test_bad_optimizer_settings_are_refused():
    with pytest.raises(EntityClipError, match="adamw"):
        validate_config(tiny_config(**{"optimizer.weight_decay": 0.1}))
    with pytest.raises(EntityClipError, match="schedule"):
        validate_config(tiny_config(**{"optimizer.schedule": "linear"}))
    with pytest.raises(EntityClipError, match="warmup_steps"):  # known only with the run's length
        optimizer.learning_rate_schedule(tiny_config(**{"optimizer.warmup_steps": 10}).optimizer, 10)


def test_fsdp_rule_shards_the_largest_divisible_axis():
    assert sharding.fsdp_spec((6, 8), 4, 0) == jax.sharding.PartitionSpec(None, "fsdp")
    assert sharding.fsdp_spec((12, 8), 4, 0) == jax.sharding.PartitionSpec("fsdp", None)
    assert sharding.fsdp_spec((5, 7), 4, 0) == jax.sharding.PartitionSpec()
    assert sharding.fsdp_spec((64, 64), 4, 10 ** 6) == jax.sharding.PartitionSpec()  # small: replicated
    mesh = make_mesh((("data", 2), ("fsdp", 4)))
    specs = sharding.param_specs(toy_params(), mesh, (("heads", "fsdp"), (".*", "replicate")))
    assert specs["heads"]["itm_head"]["kernel"] == jax.sharding.PartitionSpec()  # 3 x 2: nothing divisible
    assert specs["clip"]["vision_model"]["w"] == jax.sharding.PartitionSpec()
    specs = sharding.param_specs(toy_params(), mesh, ((".*", "fsdp"),))
    assert specs["clip"]["vision_model"]["w"] == jax.sharding.PartitionSpec("fsdp", None)


def test_bad_meshes_and_rules_are_refused():
    with pytest.raises(EntityClipError, match="devices"):
        make_mesh((("data", 3), ("fsdp", -1)))
    with pytest.raises(EntityClipError, match="more than one"):
        make_mesh((("data", -1), ("fsdp", -1)))
    with pytest.raises(EntityClipError, match="strategy"):  # one check of the rules, before any mesh is built
        validate_config(tiny_config(**{"sharding.rules": ((".*", "shard_everything"),)}))
