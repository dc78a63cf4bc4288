"""The device mesh from config.mesh: ((axis name, size), ...), one size may be -1 ("all the rest").

The batch is split over every mesh axis; parameters over 'fsdp' by the sharding
rules (sharding.py). check_mesh_axes is the one check of a mesh spec: the config
check runs it before any device is counted, make_mesh again with the devices.

Which device takes which place follows the hardware: on TPU, mesh_utils lays the
axes along the chips' torus (neighbours on an axis are neighbours on the
interconnect), and with several slices the data axis runs across the slices, so
that only the gradient all-reduce crosses the slower data-centre network; GPUs
are ordered by id; CPU devices keep their order. Train, validation, eval and
plan all build their mesh here.
"""
import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from entityclip_jax.errors import EntityClipError

EXAMPLE = "(('data', -1), ('fsdp', 2))"
DATA_AXIS = "data"  # with several TPU slices, the axis that runs across them


def check_mesh_axes(axes):
    """Refuses a malformed mesh spec in one line: not (name, size) pairs, sizes < 1 other than -1,
    repeated names, or more than one -1."""
    if isinstance(axes, str) or not axes:
        raise EntityClipError(f"mesh must be ((axis name, size), ...), e.g. {EXAMPLE}; got {axes!r}")
    for axis in axes:
        if (not isinstance(axis, (tuple, list)) or len(axis) != 2 or not isinstance(axis[0], str)
                or not isinstance(axis[1], int) or not (axis[1] >= 1 or axis[1] == -1)):
            raise EntityClipError(f"mesh axis {axis!r} is not (name, size) with size >= 1 or -1; "
                                  f"write e.g. --config.mesh=\"{EXAMPLE}\"")
    names = [name for name, _ in axes]
    if len(set(names)) != len(names):
        raise EntityClipError(f"mesh {tuple(axes)} repeats an axis name")
    if sum(size == -1 for _, size in axes) > 1:
        raise EntityClipError(f"mesh {tuple(axes)} has more than one axis of size -1; give all but one a size")


def mesh_shape(axes, device_count):
    """The axis sizes of `axes` over device_count devices, the -1 filled in."""
    check_mesh_axes(axes)
    sizes = [int(size) for _, size in axes]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if device_count % known:
            raise EntityClipError(f"mesh {tuple(axes)}: {device_count} devices do not split into axes of "
                                  f"sizes {sizes}; choose sizes whose product divides {device_count}")
        sizes[sizes.index(-1)] = device_count // known
    if math.prod(sizes) != device_count:
        raise EntityClipError(f"mesh {tuple(axes)} needs {math.prod(sizes)} devices, there are {device_count}; "
                              "set one axis size to -1 to use all of them")
    return sizes


def make_mesh(axes, devices=None):
    """Mesh over `devices` (default: all) from ((name, size), ...) with at most one size -1."""
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(name for name, _ in axes)
    return Mesh(device_grid(mesh_shape(axes, len(devices)), names, devices), names)


def device_grid(sizes, names, devices):
    """The devices as an array of shape `sizes`, placed for the hardware (see the module doc)."""
    if devices[0].platform == "cpu":
        return np.asarray(devices).reshape(sizes)
    slices = sorted({getattr(d, "slice_index", 0) for d in devices}) if devices[0].platform == "tpu" else [0]
    try:
        if len(slices) == 1:
            # What jax.make_mesh does, without its Explicit axis types (the sharding rules assume Auto).
            return mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
        across = names.index(DATA_AXIS) if DATA_AXIS in names else 0
        if sizes[across] % len(slices):
            raise EntityClipError(f"mesh axis {names[across]!r} of size {sizes[across]} does not split over "
                                  f"{len(slices)} slices; make it a multiple of {len(slices)}")
        per_slice = [size // len(slices) if axis == across else size for axis, size in enumerate(sizes)]
        between = [len(slices) if axis == across else 1 for axis in range(len(sizes))]
        return mesh_utils.create_hybrid_device_mesh(per_slice, between, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError) as err:
        raise EntityClipError(f"mesh {dict(zip(names, sizes))} does not fit the {len(devices)} "
                              f"{devices[0].device_kind} devices' topology ({err}); choose other axis sizes") from None
