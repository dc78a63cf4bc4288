"""The train state (step, params, optimizer state) and where each piece lives."""
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec as P

from entityclip_jax.parallel import sharding


@struct.dataclass
class TrainState:
    step: jax.Array   # int32 scalar: optimizer updates done
    params: Any       # fp32 {"clip": ..., "heads": ...}
    opt_state: Any


def _follow_params(opt_state, params, param_specs):
    """Optimizer state leaves (Adam's mu, nu ...) take the spec of the parameter
    whose path ends theirs and whose shape they share; the rest is replicated."""
    by_name = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        by_name[sharding.path_name(path)] = leaf.shape
    specs = {sharding.path_name(p): s for p, s in jax.tree_util.tree_flatten_with_path(
        param_specs, is_leaf=lambda x: isinstance(x, P))[0]}

    def spec(path, leaf):
        name = sharding.path_name(path)
        for param_name, shape in by_name.items():
            if (name == param_name or name.endswith("/" + param_name)) and tuple(leaf.shape) == tuple(shape):
                return specs[param_name]
        return P()
    return jax.tree_util.tree_map_with_path(spec, opt_state)


def state_specs(abstract_state, mesh, rules, min_size):
    """PartitionSpecs of a (abstract) TrainState by the config's sharding rules."""
    params = sharding.param_specs(abstract_state.params, mesh, rules, min_size)
    return TrainState(step=P(), params=params,
                      opt_state=_follow_params(abstract_state.opt_state, abstract_state.params, params))


def abstract_state(abstract_params, tx):
    return jax.eval_shape(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)), abstract_params)


def create_train_state(params, tx, shardings):
    """A fresh TrainState laid out by `shardings` (the optimizer state is created there)."""
    params = jax.device_put(params, shardings.params)
    init = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)), out_shardings=shardings)
    return init(params)
