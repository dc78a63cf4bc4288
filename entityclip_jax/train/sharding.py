"""Device mesh and sharding rules, as config data (big_vision style).

The mesh comes from config.mesh, e.g. (("data", -1), ("fsdp", 1)): axis names
and sizes, one size -1 meaning "all remaining devices". The batch is split over
every mesh axis. A parameter is replicated or, with the "fsdp" strategy, split
along its largest axis that the 'fsdp' axis size divides; the first rule whose
regex matches the parameter's "/"-joined path (re.search) decides. Optimizer
state follows the parameter it belongs to.
"""
import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from entityclip_jax.errors import EntityClipError

STRATEGIES = ("replicate", "fsdp")
FSDP_AXIS = "fsdp"


def make_mesh(axes, devices=None):
    """Mesh over `devices` (default: all) from ((name, size), ...) with at most one size -1."""
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(name for name, _ in axes)
    sizes = [int(size) for _, size in axes]
    if sizes.count(-1) > 1:
        raise EntityClipError(f"mesh {tuple(axes)} has more than one axis of size -1; give all but one a size")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if known <= 0 or len(devices) % known:
            raise EntityClipError(f"mesh {tuple(axes)}: {len(devices)} devices do not split into axes of "
                                  f"sizes {sizes}; choose sizes whose product divides {len(devices)}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise EntityClipError(f"mesh {tuple(axes)} needs {math.prod(sizes)} devices, there are {len(devices)}; "
                              "set one axis size to -1 to use all of them")
    return Mesh(np.asarray(devices).reshape(sizes), names)


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
    for pattern, strategy in rules:
        if strategy not in STRATEGIES:
            raise EntityClipError(f"sharding rule ({pattern!r}, {strategy!r}): strategy must be one of {STRATEGIES}")
        if re.search(pattern, name):
            return strategy
    return "replicate"


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
