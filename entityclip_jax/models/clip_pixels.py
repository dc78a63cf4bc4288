"""CLIP's image input contract: float pixels normalised by OpenAI's mean and std.

The towers were pretrained on (x / 255 - mean) / std per RGB channel; every path
that feeds them pixels (tf.data on the host, uint8 batches on the device, the
demo's drawings going back) uses these numbers from here.
"""
import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Folded for 0..255 input: (x/255 - mean)/std == (x - 255*mean) * 1/(255*std).
_SHIFT = np.float32(255.0) * np.asarray(CLIP_MEAN, np.float32)
_SCALE = np.float32(1.0) / (np.float32(255.0) * np.asarray(CLIP_STD, np.float32))


def normalize(pixels):
    """Pixels as float32 in 0..255 (any array library: NumPy, jnp, TensorFlow) -> CLIP-normalised float32.

    On device with uint8 batches: normalize(batch["pixel_values"].astype(jnp.float32)).
    """
    return (pixels - _SHIFT) * _SCALE


def to_uint8(pixels):
    """CLIP-normalised pixels (NumPy, [..., 3]) -> uint8 RGB for drawing: the inverse of normalize."""
    return np.clip(np.asarray(pixels, np.float32) / _SCALE + _SHIFT, 0, 255).round().astype(np.uint8)
