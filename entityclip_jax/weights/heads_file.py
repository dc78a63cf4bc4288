"""EntityCLIP's training-only heads (experts, gates, ITM head) as one safetensors
file beside a Hugging Face export, so an exported model can resume training.

Inference never needs them (METHOD.md): transformers ignores the file, and
`entityclip train --config.model.init=EXPORT_DIR` picks it up again.
"""
import jax
import numpy as np
import safetensors.numpy
from flax import traverse_util

from entityclip_jax import storage
from entityclip_jax.errors import EntityClipError

HEADS_FILE = "entityclip_heads.safetensors"


def save_heads(heads_params, directory):
    flat = traverse_util.flatten_dict(jax.device_get(heads_params), sep=".")
    path = storage.join(directory, HEADS_FILE)
    storage.path(path).write_bytes(safetensors.numpy.save({k: np.array(v, np.float32, order="C")
                                                           for k, v in flat.items()}))
    return path


def load_heads(directory, expected):
    """The heads saved in directory, checked against `expected` (arrays or ShapeDtypeStructs)."""
    path = storage.join(directory, HEADS_FILE)
    try:
        flat = safetensors.numpy.load(storage.path(path).read_bytes())
    except Exception as err:
        raise EntityClipError(f"cannot read {path}: {err}") from None
    want = traverse_util.flatten_dict(expected, sep=".")
    wrong = sorted(k for k in set(want) | set(flat)
                   if k not in flat or k not in want or tuple(flat[k].shape) != tuple(want[k].shape))
    if wrong:
        raise EntityClipError(f"{path} does not fit this config's heads (expert counts or width differ), e.g. "
                              f"{', '.join(wrong[:3])}; set config.heads.num_*_experts to what it was trained with")
    return traverse_util.unflatten_dict(flat, sep=".")


def has_heads(directory):
    return storage.path(directory).joinpath(HEADS_FILE).is_file()
