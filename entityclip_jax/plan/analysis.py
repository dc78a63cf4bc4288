"""What the compiler says about a compiled program, per device: memory, FLOPs, collectives.

memory_analysis() splits the bytes one device holds while the program runs:
arguments (here the train state and the batch), outputs (aliased with the donated
state, so not counted twice), temporaries (activations, gradients, the compiler's
scratch) and generated code; its peak is what must fit in the chip's HBM.
cost_analysis() counts the FLOPs of one call on one device, after partitioning and
rematerialisation. The collectives are read from the optimized HLO text: each
all-reduce / all-gather / reduce-scatter / all-to-all / collective-permute with the
bytes of its result on one device. A collective inside a loop body (gradient
accumulation's scan) is counted once, as it is written in the program.
"""
import collections
import math
import re

import jax

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
                "collective-permute", "collective-broadcast")
# "name = <result shape> <op>(" for an op or the -done half of an async pair (the -start half holds
# the operand too, so its shape would count the bytes twice).
_INSTRUCTION = re.compile(r"=\s+(?P<shape>.*?)\s+(?P<op>" + "|".join(sorted(_COLLECTIVES, key=len, reverse=True))
                          + r")(?P<half>-start|-done)?\(")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[(?P<dims>[0-9,]*)\]")
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16, "bf16": 16,
         "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64, "c64": 64, "c128": 128}
# XLA:TPU's two wordings: "Used 29.83G of 15.75G hbm." and "the total memory required for HLO
# temporaries (20.02G) exceeds available HBM (15.75G)."
_OUT_OF_MEMORY = (re.compile(r"Used (?P<used>[0-9.]+)(?P<used_unit>[KMGT]?) of (?P<limit>[0-9.]+)"
                             r"(?P<limit_unit>[KMGT]?) hbm"),
                  re.compile(r"required for [^(]*\((?P<used>[0-9.]+)(?P<used_unit>[KMGT]?)\) exceeds available "
                             r"HBM \((?P<limit>[0-9.]+)(?P<limit_unit>[KMGT]?)\)"))
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def memory(compiled):
    """Bytes per device: arguments, outputs, aliased, temporaries, code and the peak."""
    stats = compiled.memory_analysis()
    found = dict(arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
                 aliased=stats.alias_size_in_bytes, temporaries=stats.temp_size_in_bytes,
                 code=stats.generated_code_size_in_bytes)
    live = found["arguments"] + found["outputs"] - found["aliased"] + found["temporaries"] + found["code"]
    peak = getattr(stats, "peak_memory_in_bytes", 0) or 0
    found["peak"] = peak if peak > 0 else live  # a compiler that reports no peak: everything live at once
    return {name: int(value) for name, value in found.items()}


def bytes_per_device(tree):
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * jax.numpy.dtype(leaf.dtype).itemsize
               for leaf in jax.tree.leaves(tree))


def collectives(hlo_text):
    """[{"kind", "count", "bytes"}] per collective kind in optimized HLO text, largest first."""
    counts, sizes = collections.Counter(), collections.Counter()
    for line in hlo_text.splitlines():
        found = _INSTRUCTION.search(line)
        if found is None or found["half"] == "-start":
            continue
        counts[found["op"]] += 1
        sizes[found["op"]] += shape_bytes(found["shape"])
    return [{"kind": kind, "count": counts[kind], "bytes": sizes[kind]}
            for kind in sorted(counts, key=lambda k: -sizes[k])]


def shape_bytes(shape_text):
    """Bytes of an HLO result shape ("f32[8,128]{1,0}" or a tuple of them)."""
    total = 0
    for array in _ARRAY.finditer(shape_text):
        elements = math.prod(int(d) for d in array["dims"].split(",") if d) if array["dims"] else 1
        total += elements * _BITS.get(array["dtype"], 8 if array["dtype"].startswith("f8") else 0) // 8
    return total


def out_of_memory(message):
    """(bytes needed, bytes available) from an XLA:TPU out-of-memory error, or None for another error."""
    found = next((m for m in (p.search(message) for p in _OUT_OF_MEMORY) if m), None)
    if found is None:
        return None
    return (int(float(found["used"]) * _UNITS[found["used_unit"]]),
            int(float(found["limit"]) * _UNITS[found["limit_unit"]]))
