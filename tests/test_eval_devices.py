"""Evaluation is data-parallel over every device and gives what one device gives;
the validation loss (both modes) against a NumPy transcription; NaN/inf refused."""
import jax
import numpy as np
import pytest

from entityclip_jax.data.pipeline import to_global_arrays
from entityclip_jax.errors import EntityClipError
from entityclip_jax.eval.encode import clip_encoders, encode_dataset
from entityclip_jax.models.clip import CLIPModel, init_params
from entityclip_jax.models.clip_config import PRESETS
from entityclip_jax.parallel.mesh import make_mesh
from entityclip_jax.train.validation import Validator, validation_vtc_loss
from tests._tiny_training import random_batch, tiny_config, tiny_model


def one_device_mesh():
    return make_mesh((("data", 1),), jax.devices()[:1])


def test_clip_encoders_split_the_batch_over_all_devices_and_match_one_device():
    assert jax.local_device_count() == 8
    config = PRESETS["tiny"]
    params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    size = config.vision.image_size
    pixels = rng.normal(size=(16, size, size, 3)).astype(np.float32)
    ids = rng.integers(1, config.text.vocab_size - 1, (13, config.text.max_position_embeddings))  # not 8k: padded
    ids[:, -1] = config.text.eos_token_id
    everywhere = clip_encoders(CLIPModel(config), params)
    alone = clip_encoders(CLIPModel(config), params, mesh=one_device_mesh())
    image8, text8 = everywhere[0](pixels), everywhere[1](ids)
    assert text8.shape == (13, config.projection_dim)
    assert len(image8.sharding.device_set) == 8 and not image8.sharding.is_fully_replicated   # really split
    np.testing.assert_allclose(np.asarray(image8), np.asarray(alone[0](pixels)), atol=2e-6)
    np.testing.assert_allclose(np.asarray(text8), np.asarray(alone[1](ids)), atol=2e-6)


class _RandomBatchValidator(Validator):
    """The Validator on random batches (the same on every mesh) instead of TFRecords."""
    def _batches(self):
        for seed in range(3):
            batch = random_batch(self.batch_size, image_size=self.image_size, seed=seed)
            if seed == 2:
                batch["mask"][-5:] = False      # a padded last batch
            yield to_global_arrays(batch, self.mesh, self.mesh.axis_names)


def test_validation_on_8_devices_equals_1_device():
    model, params = tiny_model()
    config = tiny_config(**{"eval.batch_size": 16, "batch_size": 8})
    everywhere = _RandomBatchValidator(model, config, make_mesh((("data", -1),)))
    alone = _RandomBatchValidator(model, config, one_device_mesh())
    got, want = everywhere(params), alone(params)
    assert got.keys() == want.keys()
    assert got["val/vtc_loss"] == pytest.approx(want["val/vtc_loss"], rel=1e-5)
    for name in got:
        if name != "val/vtc_loss":
            assert got[name] == want[name], name


def numpy_vtc(image, text, scale):
    """CLIP's loss as the release computes it: exp(scale) * cosines, cross-entropy both ways."""
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    logits = np.exp(scale) * image.astype(np.float64) @ text.T

    def cross_entropy(rows):
        rows = rows - rows.max(axis=1, keepdims=True)
        return np.mean(np.log(np.exp(rows).sum(axis=1)) - np.diag(rows))
    return (cross_entropy(logits) + cross_entropy(logits.T)) / 2


def test_validation_loss_default_and_faithful_against_numpy():
    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(2, 10, 6)).astype(np.float32)
    scale = np.float32(np.log(300.0))            # above ln(100): clamping matters
    # default: chunks of the training batch (3) -> rows 0-2, 3-5, 6-8; the one-row tail left out; clamped
    default = np.mean([numpy_vtc(image[i:i + 3], text[i:i + 3], np.log(100.0)) for i in (0, 3, 6)])
    # the release: batches of 2 x 3 = 6 -> rows 0-5 and 6-9; the scale as it is
    faithful = np.mean([numpy_vtc(image[:6], text[:6], scale), numpy_vtc(image[6:], text[6:], scale)])
    assert abs(default - faithful) > 0.1
    assert float(validation_vtc_loss(image, text, scale, batch_size=3)) == pytest.approx(default, rel=1e-5)
    assert float(validation_vtc_loss(image, text, scale, batch_size=3, faithful=True)) == pytest.approx(
        faithful, rel=1e-5)


def test_non_finite_embeddings_never_reach_a_metric():
    def broken(x):
        out = np.ones((len(x), 4), np.float32)
        out[1, 2] = np.nan
        return out
    batches = [{"pixel_values": np.zeros((3, 2, 2, 3)), "query_ids": np.zeros((3, 5), np.int32)}]
    with pytest.raises(EntityClipError, match="1 of 3 image embeddings hold NaN or inf"):
        encode_dataset(batches, broken, broken)
    with pytest.raises(EntityClipError, match="1 of 3 text embeddings hold NaN or inf"):
        encode_dataset(batches, lambda x: np.ones((len(x), 4)), broken)


def test_validation_refuses_a_diverged_model():
    model, params = tiny_model()
    params = jax.tree.map(lambda x: x, params)
    params["clip"]["visual_projection"]["kernel"] = params["clip"]["visual_projection"]["kernel"] * np.inf
    validator = _RandomBatchValidator(model, tiny_config(**{"eval.batch_size": 16}), one_device_mesh())
    with pytest.raises(EntityClipError, match="validation image embeddings hold NaN or inf"):
        validator(params)
