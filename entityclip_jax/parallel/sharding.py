"""Sharding rules, as config data (big_vision style): where each array lives on the mesh (mesh.py).

The batch is split over every mesh axis. A parameter is replicated or, with the "fsdp" strategy, split
along its largest axis that the 'fsdp' axis size divides; the first rule whose
regex matches the parameter's "/"-joined path (re.search) decides. Optimizer
state follows the parameter it belongs to.
"""
import math
import re

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


STRATEGIES = ("replicate", "fsdp")  # config.validate_config refuses any other
FSDP_AXIS = "fsdp"


def batch_spec(mesh, ndim=1):
    """PartitionSpec of a batch array: leading axis over every mesh axis."""
    return P(tuple(mesh.axis_names), *([None] * (ndim - 1)))


def batch_shardings(mesh, batch):
    """NamedShardings for a dict of (abstract) batch arrays."""
    return {name: NamedSharding(mesh, batch_spec(mesh, len(value.shape))) for name, value in batch.items()}


def path_name(path):
    """"clip/vision_model/..." from a jax tree path."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _strategy(name, rules):
    """The first matching rule's strategy (the rules were checked by config.validate_config)."""
    return next((strategy for pattern, strategy in rules if re.search(pattern, name)), "replicate")


def fsdp_spec(shape, fsdp_size, min_size):
    """Shard the largest axis divisible by fsdp_size; replicate small or indivisible arrays."""
    if fsdp_size == 1 or math.prod(shape) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp_size == 0:
            return P(*[FSDP_AXIS if a == axis else None for a in range(len(shape))])
    return P()


def param_specs(params, mesh, rules, min_size=0):
    """PartitionSpec per parameter (params may be abstract) by the first matching rule."""
    fsdp_size = mesh.shape.get(FSDP_AXIS, 1)

    def spec(path, leaf):
        if _strategy(path_name(path), rules) == "fsdp":
            return fsdp_spec(np.shape(leaf), fsdp_size, min_size)
        return P()
    return jax.tree_util.tree_map_with_path(spec, params)


def to_shardings(specs, mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh):
    return NamedSharding(mesh, P())
