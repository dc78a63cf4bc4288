"""CLIP preprocessing in TF against transformers' CLIPImageProcessor (PIL backend) on real
photos shipped inside installed wheels (scikit-image, matplotlib, scikit-learn).

Tolerance, in normalised units (1 grey level = 1/255/std ~ 0.015):
- JPEGs are decoded with the accurate integer IDCT, as PIL does, so decoded pixels
  are identical; what remains is TF's antialiased bicubic vs PIL's bicubic, both
  rounded to uint8: measured mean |diff| <= 0.0028 and max <= 0.105 (~7 grey levels
  at a few edge pixels) at 224 and 336 px. Asserted: mean < 0.005, max < 0.2.
- dct_scaling=True (JPEGs decoded at 1/2..1/8 size, no antialiasing below a 2x shrink)
  is a deliberate approximation for training: measured mean |diff| 0.002-0.094 per photo
  (0.023 on average; worst: china.jpg, a 1.9x shrink without antialiasing), max 1.4.
  Asserted: average < 0.04, each photo < 0.12.
"""
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
from PIL import Image  # noqa: E402

from entityclip_jax.data import preprocess  # noqa: E402


def photo_paths():
    import matplotlib.cbook
    import skimage
    import sklearn
    skimage_dir = os.path.join(os.path.dirname(skimage.__file__), "data")
    sklearn_dir = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
    paths = [os.path.join(skimage_dir, name) for name in
             ("astronaut.png", "rocket.jpg", "coins.png", "coffee.png", "chelsea.png")]
    paths.append(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    paths += [os.path.join(sklearn_dir, name) for name in ("china.jpg", "flower.jpg")]
    return [str(p) for p in paths]


@pytest.fixture(scope="module")
def hf_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    return CLIPImageProcessorPil()


def reference(processor, path, size):
    out = processor(Image.open(path).convert("RGB"), return_tensors="np",
                    size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return out["pixel_values"][0].transpose(1, 2, 0)


@pytest.mark.parametrize("size", [224, 336])
def test_matches_clip_image_processor_on_real_photos(hf_processor, size):
    paths = photo_paths()
    assert any(p.endswith(".jpg") for p in paths) and any(p.endswith(".png") for p in paths)
    for path in paths:
        ours = preprocess.clip_preprocess(tf.constant(open(path, "rb").read()), size).numpy()
        ref = reference(hf_processor, path, size)
        assert ours.shape == ref.shape == (size, size, 3) and ours.dtype == np.float32
        diff = np.abs(ours - ref)
        assert diff.mean() < 0.005 and diff.max() < 0.2, (os.path.basename(path), diff.mean(), diff.max())


def test_uint8_mode_normalised_on_device_equals_host_mode():
    import jax.numpy as jnp
    data = tf.constant(open(photo_paths()[1], "rb").read())
    host = preprocess.clip_preprocess(data, 224).numpy()
    raw = preprocess.clip_preprocess(data, 224, normalize_on_host=False).numpy()
    assert raw.dtype == np.uint8
    on_device = np.asarray(preprocess.normalize(jnp.asarray(raw).astype(jnp.float32)))
    np.testing.assert_allclose(on_device, host, atol=1e-5)


def test_dct_scaling_is_close_and_exact_where_it_cannot_help(hf_processor):
    means = []
    for path in photo_paths():
        fast = preprocess.clip_preprocess(tf.constant(open(path, "rb").read()), 224, dct_scaling=True).numpy()
        means.append(np.abs(fast - reference(hf_processor, path, 224)).mean())
    assert 0.005 < np.mean(means) < 0.04 and max(means) < 0.12, means
    # astronaut.png (512 px, a PNG): no DCT decode, shrink > 2x keeps antialiasing -> the exact path.
    astronaut = tf.constant(open(photo_paths()[0], "rb").read())
    np.testing.assert_array_equal(preprocess.clip_preprocess(astronaut, 224, dct_scaling=True).numpy(),
                                  preprocess.clip_preprocess(astronaut, 224).numpy())


def test_random_resized_crop_is_seeded_and_in_range():
    # astronaut.png is cropped by slicing, rocket.jpg by decode_and_crop_jpeg.
    for path in (photo_paths()[0], photo_paths()[1]):
        data = tf.constant(open(path, "rb").read())
        one = preprocess.clip_preprocess(data, 64, random_crop_seed=tf.constant([1, 2]), crop_scale=(0.1, 0.3))
        again = preprocess.clip_preprocess(data, 64, random_crop_seed=tf.constant([1, 2]), crop_scale=(0.1, 0.3))
        other = preprocess.clip_preprocess(data, 64, random_crop_seed=tf.constant([3, 4]), crop_scale=(0.1, 0.3))
        assert one.shape == (64, 64, 3)
        np.testing.assert_array_equal(one.numpy(), again.numpy())
        assert not np.array_equal(one.numpy(), other.numpy())
        lo, hi = preprocess.normalize(np.zeros(3, np.float32)), preprocess.normalize(np.full(3, 255, np.float32))
        assert (one.numpy() >= lo - 1e-5).all() and (one.numpy() <= hi + 1e-5).all()
