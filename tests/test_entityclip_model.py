"""The EntityCLIP composition: parameter layout, the features the loss reads
(query and explanation through the SAME text tower), and the plain-CLIP mode
against the towers' own contrastive logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entityclip_jax.checkpoints.model_init import tower_source
from entityclip_jax.config import validate_config
from entityclip_jax.errors import EntityClipError
from entityclip_jax.models.clip import CLIPModel
from entityclip_jax.models.clip_pixels import normalize, to_uint8
from entityclip_jax.models.entityclip import abstract_params
from entityclip_jax.objective.batch_loss import compute_loss, encode_batch, pixels
from tests._tiny_training import CONTEXT, EOS, VOCAB, random_batch, tiny_config, tiny_model


def test_parameter_layout():
    model, params = tiny_model()
    assert set(params) == {"clip", "heads"}
    assert params["clip"]["text_model"]["embeddings"]["token_embedding"]["embedding"].shape == (VOCAB, 64)
    assert params["heads"]["text_experts"]["mlp"]["fc1"]["kernel"].shape == (2, 32, 128)  # 2 experts, D=32
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), abstract_params(model))
    clip_model, clip_params = tiny_model("clip_finetune")
    assert set(clip_params) == {"clip"} and "heads" not in abstract_params(clip_model)


def test_features_come_from_the_shared_text_tower():
    model, params = tiny_model()
    batch = random_batch(4)
    features = jax.jit(lambda p, b: encode_batch(model, p, b))(params, batch)
    variables = {"params": params["clip"]}
    image = model.towers.apply(variables, batch["pixel_values"], method=CLIPModel.encode_image)
    query = model.towers.apply(variables, batch["query_ids"], method=CLIPModel.encode_text)
    explanation = model.towers.apply(variables, batch["explanation_ids"], method=CLIPModel.encode_text)
    np.testing.assert_allclose(features["V"], image.tokens, atol=1e-5)
    np.testing.assert_allclose(features["T"], query.tokens, atol=1e-5)
    np.testing.assert_allclose(features["E"], explanation.tokens, atol=1e-5)
    eot = np.argmax(batch["query_ids"] == EOS, axis=1)
    np.testing.assert_array_equal(features["t_eot_index"], eot)
    np.testing.assert_array_equal(features["t_mask"], np.arange(CONTEXT)[None] <= eot[:, None])
    np.testing.assert_array_equal(features["e_mask"],
                                  np.arange(CONTEXT)[None] <= np.argmax(batch["explanation_ids"] == EOS, 1)[:, None])


def test_clip_finetune_loss_is_clips_own_contrastive_loss():
    model, params = tiny_model("clip_finetune")
    batch = random_batch(6)
    loss, metrics = compute_loss(model, params, batch, None)
    out = model.towers.apply({"params": params["clip"]}, batch["query_ids"], batch["pixel_values"])
    logits = np.asarray(out.logits_per_image, np.float64)  # HF's logits; the init scale is below the clamp
    log_softmax = lambda x: x - np.log(np.exp(x).sum(1, keepdims=True))  # noqa: E731
    expected = -0.5 * (np.diag(log_softmax(logits)).mean() + np.diag(log_softmax(logits.T)).mean())
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert set(metrics) == {"loss", "vtc", "logit_scale"}


def test_uint8_pixels_are_normalised_on_device():
    raw = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    np.testing.assert_allclose(pixels({"pixel_values": jnp.asarray(raw)}), (raw / 255.0 - mean) / std,
                               rtol=1e-5, atol=1e-5)  # OpenAI's constants, written out: the reference
    floats = jnp.ones((2, 8, 8, 3))
    assert pixels({"pixel_values": floats}) is floats  # the pipeline normalised them already


def test_normalised_pixels_draw_back_as_the_original_bytes():
    raw = np.random.default_rng(1).integers(0, 256, (4, 5, 3)).astype(np.uint8)
    np.testing.assert_array_equal(to_uint8(normalize(raw.astype(np.float32))), raw)
    assert to_uint8(np.full(3, 1e6)).tolist() == [255] * 3  # clipped, not wrapped


def test_bad_model_settings_are_refused(tiny_hf_dir):
    model, _ = tiny_model()
    with pytest.raises(EntityClipError, match="model.mode"):
        validate_config(tiny_config(**{"model.mode": "blip"}))
    with pytest.raises(EntityClipError, match="random towers only"):
        tower_source(tiny_config(**{"model.init": tiny_hf_dir}))
    config = tiny_config(**{"model.init": tiny_hf_dir, "model.vocab_size": None, "model.eos_token_id": None})
    clip_config, params, heads = tower_source(config)  # a Hugging Face directory brings its own architecture
    assert clip_config.projection_dim == 24 and params["logit_scale"] == pytest.approx(3.1) and heads is None
