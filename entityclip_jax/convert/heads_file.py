"""EntityCLIP's training-only heads (experts, gates, ITM head) as one safetensors
file beside a Hugging Face export, so an exported model can resume training.

Inference never needs them (METHOD.md): transformers ignores the file, and
`entityclip train --config.model.init=EXPORT_DIR` picks it up again.
"""
import os

import jax
import numpy as np
from flax import traverse_util

from entityclip_jax.errors import EntityClipError

HEADS_FILE = "entityclip_heads.safetensors"


def save_heads(heads_params, directory):
    from safetensors.numpy import save_file
    flat = traverse_util.flatten_dict(jax.device_get(heads_params), sep=".")
    path = os.path.join(directory, HEADS_FILE)
    save_file({k: np.array(v, np.float32, order="C") for k, v in flat.items()}, path)
    return path


def load_heads(directory, expected):
    """The heads saved in directory, checked against `expected` (arrays or ShapeDtypeStructs)."""
    from safetensors.numpy import load_file
    path = os.path.join(directory, HEADS_FILE)
    try:
        flat = load_file(path)
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
    return os.path.isfile(os.path.join(directory, HEADS_FILE))
