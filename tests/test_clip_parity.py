"""Our Flax CLIP is numerically Hugging Face's PyTorch CLIPModel."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conftest import tiny_hf_clip
from entityclip_jax.weights.hf import expected_params
from entityclip_jax.weights.layout import state_dict_to_flax
from entityclip_jax.models.clip import CLIPModel
from entityclip_jax.models.clip_config import CLIPConfig


def to_flax(model):
    config = CLIPConfig.from_hf(model.config)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    return config, state_dict_to_flax(state, expected_params(config))


def padded_batch(lengths, context, bos, eos, vocab, rng):
    """Token ids of different lengths, right-padded with 0, and their mask."""
    ids = np.zeros((len(lengths), context), np.int64)
    for row, n in enumerate(lengths):
        ids[row, 0] = bos
        ids[row, 1:n - 1] = rng.integers(1, vocab - 3, n - 2)
        ids[row, n - 1] = eos
    mask = (np.arange(context)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
    return ids, mask


def compare(model, config, params, ids, mask, pixels):
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    with jax.default_matmul_precision("highest"):
        out = jax.jit(CLIPModel(config).apply)({"params": params}, jnp.asarray(ids),
                                               jnp.asarray(pixels), jnp.asarray(mask))
    return {
        "image_embeds": np.abs(np.asarray(out.image.embeds) - ref.image_embeds.numpy()).max(),
        "text_embeds": np.abs(np.asarray(out.text.embeds) - ref.text_embeds.numpy()).max(),
        "logits": np.abs(np.asarray(out.logits_per_image) - ref.logits_per_image.numpy()).max(),
    }, out, ref


@pytest.mark.parametrize("text_overrides", [
    {},                                        # first-eos pooling, quick_gelu
    {"eos_token_id": 2, "hidden_act": "gelu"},  # legacy argmax pooling, exact gelu
])
def test_tiny_model_matches_transformers(text_overrides):
    model = tiny_hf_clip(**text_overrides)
    config, params = to_flax(model)
    rng = np.random.default_rng(0)
    eos = 98  # the tokenizer's EOT; legacy configs say 2 but still find it by argmax
    ids, mask = padded_batch([16, 5, 9, 3], 16, bos=97, eos=eos, vocab=99, rng=rng)
    pixels = rng.standard_normal((3, 30, 30, 3)).astype(np.float32)
    diffs, out, _ = compare(model, config, params, ids, mask, pixels[[0, 1, 2, 0]])
    assert max(diffs.values()) < 1e-5, diffs
    assert list(np.asarray(out.text.eot_index)) == [15, 4, 8, 2]
    # Token-level features: the EOT token is the pooled text feature, CLS the pooled image one.
    tokens = np.asarray(out.text.tokens)
    eot = tokens[np.arange(4), [15, 4, 8, 2]]
    np.testing.assert_allclose(eot / np.linalg.norm(eot, axis=-1, keepdims=True),
                               np.asarray(out.text.embeds), atol=1e-6)
    assert out.image.tokens.shape == (4, 1 + 25, 24)


def test_token_features_match_at_every_position():
    """All projected text tokens, padding positions included, follow HF's masking."""
    model = tiny_hf_clip()
    config, params = to_flax(model)
    ids, mask = padded_batch([6, 16], 16, bos=97, eos=98, vocab=99, rng=np.random.default_rng(1))
    ids[0, 6:] = 5  # non-zero padding content after EOT
    with torch.no_grad():
        hidden = model.text_model(input_ids=torch.from_numpy(ids),
                                  attention_mask=torch.from_numpy(mask)).last_hidden_state
        ref = model.text_projection(hidden).numpy()
    apply = lambda m: CLIPModel(config).apply({"params": params}, jnp.asarray(ids), m,
                                             method=CLIPModel.encode_text).tokens
    with jax.default_matmul_precision("highest"):
        ours, unmasked = np.asarray(apply(jnp.asarray(mask))), np.asarray(apply(None))
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    # The mask matters at padding positions (and only there, the text tower being causal).
    assert np.abs(ours[0, 6:] - unmasked[0, 6:]).max() > 1e-3
    np.testing.assert_allclose(ours[:, :6], unmasked[:, :6], atol=1e-5)


@pytest.mark.slow  # a full-size ViT-B/32 in PyTorch and Flax
def test_vit_b32_shape_matches_transformers():
    """The full ViT-B/32 architecture (openai/clip-vit-base-patch32's config), random weights."""
    hf_config = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=1),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, image_size=224, patch_size=32, hidden_act="quick_gelu"),
        projection_dim=512, logit_scale_init_value=2.6592)
    torch.manual_seed(0)
    model = transformers.CLIPModel(hf_config).eval()
    config, params = to_flax(model)
    rng = np.random.default_rng(0)
    ids, mask = padded_batch([77, 12], 77, bos=49406, eos=49407, vocab=49406, rng=rng)
    pixels = rng.standard_normal((2, 224, 224, 3)).astype(np.float32)
    diffs, _, _ = compare(model, config, params, ids, mask, pixels)
    assert max(diffs.values()) < 1e-4, diffs
