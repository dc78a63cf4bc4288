"""The one rule that maps Flax CLIP parameters to Hugging Face state-dict keys.

Flax names mirror Hugging Face, so a key is the '.'-joined Flax path with the
leaf renamed (kernel/scale/embedding -> weight) and linear kernels transposed
([in, out] -> [out, in]; conv [kh, kw, in, out] -> [out, in, kh, kw]).
"""
import jax
import numpy as np
from flax import traverse_util

from entityclip_jax.errors import EntityClipError

_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
# Buffers some checkpoints carry that are not parameters.
IGNORED_HF_KEYS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def hf_key(path):
    return ".".join(path[:-1] + (_LEAF_TO_HF.get(path[-1], path[-1]),))


# Flax kernel axes -> PyTorch weight axes, by kernel rank (Dense, Conv).
_TO_HF_AXES = {2: (1, 0), 4: (3, 2, 0, 1)}


def to_hf_layout(path, value):
    value = np.asarray(value)
    axes = _TO_HF_AXES.get(value.ndim) if path[-1] == "kernel" else None
    return value if axes is None else value.transpose(axes)


def from_hf_layout(path, value):
    value = np.asarray(value)
    axes = _TO_HF_AXES.get(value.ndim) if path[-1] == "kernel" else None
    return value if axes is None else value.transpose(np.argsort(axes))


def flax_to_state_dict(params):
    """Flax params -> {Hugging Face key: fp32 numpy array in PyTorch layout}."""
    flat = traverse_util.flatten_dict(jax.device_get(params))
    return {hf_key(path): np.array(to_hf_layout(path, v), dtype=np.float32, order="C")
            for path, v in flat.items()}


def state_dict_to_flax(state_dict, expected_params, source="checkpoint"):
    """{HF key: array} -> Flax params shaped like expected_params (arrays or ShapeDtypeStructs).

    Every parameter must be present with the expected shape and no unknown key
    may remain, so a wrong checkpoint never loads silently.
    """
    expected = traverse_util.flatten_dict(expected_params)
    remaining = {k: v for k, v in state_dict.items() if k not in IGNORED_HF_KEYS}
    out = {}
    missing = []
    for path, spec in expected.items():
        key = hf_key(path)
        if key not in remaining:
            missing.append(key)
            continue
        value = from_hf_layout(path, remaining.pop(key))
        if tuple(value.shape) != tuple(spec.shape):
            raise EntityClipError(
                f"parameter {key} in {source} has shape {tuple(np.asarray(to_hf_layout(path, value)).shape)}, "
                f"expected {tuple(to_hf_layout(path, np.zeros(spec.shape, np.float32)).shape)} for this config; "
                "the weights do not belong to the architecture that config.json describes")
        out[path] = value.astype(np.float32)
    if missing:
        raise EntityClipError(
            f"{source} lacks {len(missing)} CLIP parameter(s), e.g. {', '.join(missing[:3])}; "
            "is it a complete CLIPModel checkpoint (not CLIPVisionModel/CLIPTextModel)?")
    if remaining:
        unknown = sorted(remaining)
        raise EntityClipError(
            f"{source} has {len(unknown)} unexpected key(s), e.g. {', '.join(unknown[:3])}; "
            "it is not a plain CLIPModel checkpoint for this architecture")
    return traverse_util.unflatten_dict(out)
