"""Is a restored checkpoint the one that was saved? Checksums of the values, and sanity of the values.

A step is saved with a checksum of every array's values (value_checksums, computed on the
devices from the state being saved, stored as JSON beside it), and a restored step must give
the same checksums, hold no NaN/Inf and nothing above MAX_ABS. This goes through public APIs
only (Orbax's own format checksums only the zarr3 shard index) and is independent of the
storage layout: any damage that changes a value, whatever file or codec it hits, shows.

The checksum of an array is sum_i bits(x_i) * w_i mod 2^32, with bits(x_i) the element's bit
pattern and w_i an odd weight derived from its position: an integer sum is exact in any order,
so every mesh (or one CPU) that holds the array computes the same number, and a flipped bit
(w_i odd) or two swapped elements always change it.
"""
import logging
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from entityclip_jax.errors import EntityClipError
from entityclip_jax.parallel.sharding import path_name

MAX_ABS = 1e10  # no parameter or Adam moment of a sane run comes near this; a flipped exponent bit lands far above
_GOLDEN = 2654435761  # Knuth's multiplicative hash constant: spreads consecutive positions over the weights


class DamagedCheckpoint(EntityClipError):
    """A saved step that cannot be read back intact (the message is one line)."""


def _bits(x):
    """The element bit patterns of x as uint32 (1, 2 and 4-byte dtypes)."""
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[jnp.dtype(x.dtype).itemsize]
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _weights(shape):
    """An odd uint32 weight per position of an array of `shape` (no reshape: a sharded array stays put)."""
    linear = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        linear = linear + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    return linear * jnp.uint32(_GOLDEN) * jnp.uint32(2) + jnp.uint32(1)


@jax.jit
def _checksums(leaves):
    return [jnp.sum(_bits(x) * _weights(x.shape), dtype=jnp.uint32) for x in leaves]


def _array_leaves(tree):
    return [(path_name(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
            if hasattr(leaf, "dtype") and hasattr(leaf, "shape")]


def value_checksums(tree):
    """{parameter path: uint32 checksum} of every array in `tree` (device or host arrays)."""
    named = _array_leaves(tree)
    values = jax.device_get(_checksums([leaf for _, leaf in named])) if named else []
    return {name: int(value) for (name, _), value in zip(named, values)}


def check_checksums(tree, saved, where, prefix=""):
    """Raises DamagedCheckpoint when an array of `tree` differs from the checksum saved for it.
    `prefix` places a subtree's paths in the saved state ("params/")."""
    for name, value in value_checksums(tree).items():
        expected = saved.get(prefix + name)
        if expected is not None and int(expected) != value:
            raise DamagedCheckpoint(f"{where}: {prefix + name} does not hold the values that were saved "
                                    "(checksum mismatch)")


@jax.jit
def _peaks(leaves):
    """max |x| per leaf, inf when it holds a NaN or Inf (XLA's max may skip NaN)."""
    return [jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), jnp.inf)) for x in leaves]


def check_values(tree, where):
    """Refuses (DamagedCheckpoint) a tree with a NaN/Inf or |x| > MAX_ABS in any float leaf."""
    named = [(name, leaf) for name, leaf in _array_leaves(tree)
             if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.size]
    on_device = [(name, leaf) for name, leaf in named if isinstance(leaf, jax.Array)]
    on_host = [(name, leaf) for name, leaf in named if not isinstance(leaf, jax.Array)]
    peaks = [float(p) for p in jax.device_get(_peaks([leaf for _, leaf in on_device]))] if on_device else []
    peaks += [float(np.max(np.where(np.isfinite(leaf), np.abs(leaf), np.inf))) for _, leaf in on_host]
    for (name, _), peak in zip(on_device + on_host, peaks):
        if not np.isfinite(peak):
            raise DamagedCheckpoint(f"{where}: {name} holds NaN or Inf")
        if peak > MAX_ABS:
            raise DamagedCheckpoint(f"{where}: {name} holds |x| = {peak:.3g} (> {MAX_ABS:.0e})")


_TENSORSTORE_NOTES = re.compile(r"\s*\[(?:source locations|tensorstore_spec)='.*?'\](?=\s*\[|\s*$)")


def describe_failure(err):
    """One line for why reading (or writing) a step failed: the innermost cause's type and first
    line, its middle cut when long (TensorStore puts the OS's reason, "No space left on device",
    at the end)."""
    causes = []
    while err is not None and len(causes) < 20:
        causes.append(err)
        err = err.__cause__ or err.__context__
    root = causes[-1]
    text = str(root).strip().splitlines()
    line = _TENSORSTORE_NOTES.sub("", text[0]) if text else ""  # where in its C++ and the whole spec: noise here
    if len(line) > 300:
        line = f"{line[:120]} ... {line[-170:]}"
    return f"{type(root).__name__}: {line}".rstrip(": ")


def _orphaned_callback(unraisable):
    """True for the RuntimeError a TensorStore read or write raises when it completes after the event
    loop it was started on is closed: Orbax runs a restore (or save) on a loop of its own and closes it
    as soon as one read (or write) fails, while the step's others are still in flight."""
    if unraisable.exc_type is not RuntimeError or str(unraisable.exc_value) != "Event loop is closed":
        return False
    frame = unraisable.exc_traceback
    while frame is not None:
        if frame.tb_frame.f_code.co_name == "call_soon_threadsafe":
            return True
        frame = frame.tb_next
    return False


class _OrphanedTaskFilter(logging.Filter):
    """Drops asyncio's '... exception was never retrieved' (of a Task, a Future or a gather) for an
    error raised in Orbax: when one write of a step fails (a full disk), Orbax raises that one and
    the others, failing the same way after it, are never awaited; asyncio logs each with its
    traceback when it is collected."""

    def filter(self, record):
        if " exception was never retrieved" not in record.getMessage().split("\n", 1)[0]:
            return True
        trace = record.exc_info[2] if record.exc_info else None
        while trace is not None:
            if f"{os.sep}orbax{os.sep}" in trace.tb_frame.f_code.co_filename:
                return False
            trace = trace.tb_next
        return True


_previous_unraisablehook = None


def ignore_orphaned_callbacks():
    """Called before this package reads or writes steps: the reads and writes a failed one leaves in
    flight end without a word. Each would otherwise print a traceback around the one-line report of
    the failure: 'Event loop is closed' (through sys.unraisablehook, the public hook for errors nobody
    can catch) or '... exception was never retrieved' (through the asyncio logger); every other error
    still reaches the hook that was there before, and the logger. Installed once per process."""
    global _previous_unraisablehook
    if _previous_unraisablehook is not None:
        return
    _previous_unraisablehook = sys.unraisablehook

    def hook(unraisable):
        if not _orphaned_callback(unraisable):
            _previous_unraisablehook(unraisable)
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_OrphanedTaskFilter())
