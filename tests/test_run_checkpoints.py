"""Orbax checkpoints: written on one mesh, restored on another or on one CPU; the
last K plus the best kept; a checkpoint of another architecture refused by name;
the towers (and heads) readable by checkpoints.load_towers(_and_heads)."""
import jax
import numpy as np
import pytest

from entityclip_jax.checkpoints.model_init import init_entityclip
from entityclip_jax.checkpoints.towers import load_towers, load_towers_and_heads
from entityclip_jax.config import model_from_config
from entityclip_jax.errors import EntityClipError
from entityclip_jax.models.entityclip import abstract_params
from entityclip_jax.checkpoints import run as ckpt
from entityclip_jax.parallel import sharding
from entityclip_jax.parallel.mesh import make_mesh
from entityclip_jax.train import optimizer
from entityclip_jax.train.state import abstract_state, state_specs
from tests._tiny_training import build_state, tiny_config, tiny_model

FSDP = {"mesh": (("data", 2), ("fsdp", 4)), "sharding.rules": ((".*", "fsdp"),), "sharding.fsdp_min_size": 0}


def restore_target(config, model, mesh):
    """Abstract TrainState carrying the target mesh's shardings."""
    shapes = abstract_params(model)
    abstract = abstract_state(shapes, optimizer.make_optimizer(config.optimizer, 10, shapes))
    shardings = sharding.to_shardings(
        state_specs(abstract, mesh, config.sharding.rules, config.sharding.fsdp_min_size), mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A workdir with checkpoints of an fsdp-sharded state at steps 1..4 (val loss 3, 1, 2, none)."""
    workdir = tmp_path_factory.mktemp("run")
    model, params = tiny_model()
    config = tiny_config(**FSDP)
    mesh = make_mesh(config.mesh)
    _, state, _, _ = build_state(model, params, config, mesh)
    ckpt.write_run_files(workdir, model.clip, config)
    checkpointer = ckpt.Checkpointer(workdir, config.checkpoint)
    # stand-in for a training step: every step's state differs
    advance = jax.jit(lambda s: s.replace(step=s.step + 1, params=jax.tree.map(lambda x: x + 1.0, s.params)))
    for n, val_loss in zip(range(1, 5), (3.0, 1.0, 2.0, None)):
        state = advance(state)
        metrics = {"val/vtc_loss": val_loss} if val_loss is not None else {}
        checkpointer.save(n, state, {"step": n}, metrics)
    checkpointer.wait()
    checkpointer.close()
    return workdir, config, jax.device_get(state)


def test_keeps_the_last_k_and_the_best(saved_run):
    workdir, config, _ = saved_run
    assert config.checkpoint.keep == 2
    checkpointer = ckpt.Checkpointer(workdir, config.checkpoint)
    assert list(checkpointer.manager.all_steps()) == [2, 3, 4]  # 3, 4 latest; 2 has the lowest val loss
    assert checkpointer.best_step() == 2 and checkpointer.latest_step() == 4


@pytest.mark.slow  # restores a whole sharded model twice
@pytest.mark.parametrize("target", ["data8", "one_cpu"])
def test_restores_onto_another_mesh(saved_run, target):
    workdir, config, final_state = saved_run
    model, _ = tiny_model()
    if target == "one_cpu":
        config = tiny_config(**{"mesh": (("data", 1),)})
        mesh = make_mesh(config.mesh, jax.devices("cpu")[:1])
    else:
        config = tiny_config()
        mesh = make_mesh(config.mesh)
    state, position = ckpt.Checkpointer(workdir, config.checkpoint).restore(restore_target(config, model, mesh))
    assert position == {"step": 4} and int(state.step) == 4
    kernel = state.params["clip"]["visual_projection"]["kernel"]
    assert kernel.sharding.mesh.size == mesh.size and kernel.sharding.spec == jax.sharding.PartitionSpec()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), final_state)


def test_checkpoint_of_another_architecture_is_refused(saved_run):
    workdir, _, _ = saved_run
    model, _ = tiny_model()
    config = tiny_config(**{"heads.num_text_experts": 3})
    other = model_from_config(config, model.clip)
    mesh = make_mesh(config.mesh)
    with pytest.raises(EntityClipError, match=r"heads/text_experts/layer_norm1/bias \(shape \(2, 32\) there, "
                                              r"shape \(3, 32\) here\)"):
        ckpt.Checkpointer(workdir, config.checkpoint).restore(restore_target(config, other, mesh))


def test_load_towers_from_workdir_and_step(saved_run):
    workdir, _, final_state = saved_run
    model, _ = tiny_model()
    config, towers = load_towers(str(workdir))  # what eval and export call; the best step: 2
    assert config == model.clip
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(towers))
    assert jax.tree.structure(towers) == jax.tree.structure(final_state.params["clip"])
    _, latest = load_towers(str(workdir / "checkpoints" / "4"))
    jax.tree.map(np.testing.assert_array_equal, latest, final_state.params["clip"])
    differs = jax.tree.map(lambda a, b: not np.array_equal(a, b), towers, latest)
    assert any(jax.tree.leaves(differs))  # the workdir gave step 2, not 4


def test_load_towers_and_heads_of_a_step(saved_run):
    workdir, _, final_state = saved_run
    _, towers, heads = load_towers_and_heads(str(workdir / "checkpoints" / "4"))
    jax.tree.map(np.testing.assert_array_equal, {"clip": towers, "heads": heads}, final_state.params)


def test_a_training_run_as_model_init_brings_its_best_steps_heads(saved_run):
    workdir, _, final_state = saved_run
    config = tiny_config(**{"model.init": str(workdir), "model.vocab_size": None, "model.eos_token_id": None})
    model, params = init_entityclip(jax.random.key(5), config)
    assert model.clip == tiny_model()[0].clip
    # the saved steps add 1.0 per step to every parameter: the best step (2) is the last (4) minus 2
    jax.tree.map(lambda got, last: np.testing.assert_allclose(got, last - 2.0, atol=1e-5), params,
                 final_state.params)
    other = tiny_config(**{"model.init": str(workdir), "model.vocab_size": None, "model.eos_token_id": None,
                           "heads.num_text_experts": 3})
    with pytest.raises(EntityClipError, match=r"heads/text_experts/.*shape \(2, 32\) there, shape \(3, 32\) here"):
        init_entityclip(jax.random.key(5), other)


def test_load_towers_refuses_other_directories(tmp_path):
    with pytest.raises(EntityClipError, match="holds none of their files; pass a training workdir"):
        load_towers(str(tmp_path))
    with pytest.raises(EntityClipError, match="does not exist; pass a training workdir"):
        load_towers(str(tmp_path / "missing"))
