"""Flax linen CLIP towers, numerically the same model as transformers' CLIPModel.

Module and parameter names mirror Hugging Face (text_model.encoder.layers.0.
self_attn.q_proj, vision_model.pre_layrnorm, visual_projection, logit_scale ...)
so conversion is a rename plus a transpose (see entityclip_jax/weights/hf.py).

Beyond Hugging Face's pooled outputs, the towers return the token-level
projected features EntityCLIP's experts need (METHOD.md): post_layernorm +
visual_projection on EVERY image token, final_layer_norm + text_projection on
EVERY text token, and the end-of-text index per row.

Images are NHWC (tf.data's layout). Parameters are fp32; `dtype` is the compute
dtype of matmuls; LayerNorm and attention softmax run in fp32. Dropout is not
implemented: CLIP checkpoints use none.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from entityclip_jax.models.clip_config import CLIPConfig, pools_at_argmax


@struct.dataclass
class ImageFeatures:
    tokens: jax.Array   # [B, 1+P, D] projected, CLS first
    embeds: jax.Array   # [B, D] L2-normalised CLS feature


@struct.dataclass
class TextFeatures:
    tokens: jax.Array     # [B, L, D] projected
    embeds: jax.Array     # [B, D] L2-normalised EOT feature
    eot_index: jax.Array  # [B] int32


@struct.dataclass
class CLIPOutput:
    image: ImageFeatures
    text: TextFeatures
    logits_per_image: jax.Array  # [B_img, B_txt], scaled by exp(logit_scale) as in HF
    logits_per_text: jax.Array


ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


def l2_normalize(x, eps=1e-12):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def eot_positions(input_ids, eos_token_id):
    """End-of-text index per row, exactly as transformers pools CLIP text.

    Legacy configs with eos_token_id == 2 take the argmax of the ids (OpenAI's
    EOT 49407 is the largest id); others take the first eos_token_id position.
    """
    input_ids = input_ids.astype(jnp.int32)
    if pools_at_argmax(eos_token_id):
        return jnp.argmax(input_ids, axis=-1).astype(jnp.int32)
    return jnp.argmax(input_ids == eos_token_id, axis=-1).astype(jnp.int32)


def layer_norm(x, eps, name, dtype):
    """LayerNorm computed in fp32 whatever the compute dtype (call inside @nn.compact)."""
    ln = nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32, name=name)
    return ln(x.astype(jnp.float32)).astype(dtype)


def _dense(features, dtype, name, use_bias=True):
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


class CLIPAttention(nn.Module):
    hidden_size: int
    num_heads: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, mask=None):
        b, t, _ = x.shape
        head_dim = self.hidden_size // self.num_heads
        split = lambda y: y.reshape(b, t, self.num_heads, head_dim)
        q = split(_dense(self.hidden_size, self.dtype, "q_proj")(x))
        k = split(_dense(self.hidden_size, self.dtype, "k_proj")(x))
        v = split(_dense(self.hidden_size, self.dtype, "v_proj")(x))
        # Fused kernels on GPU where available; softmax is fp32 inside.
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=head_dim ** -0.5)
        return _dense(self.hidden_size, self.dtype, "out_proj")(out.reshape(b, t, self.hidden_size))


class CLIPMLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        x = _dense(self.intermediate_size, self.dtype, "fc1")(x)
        x = ACTIVATIONS[self.hidden_act](x)
        return _dense(self.hidden_size, self.dtype, "fc2")(x)


class CLIPEncoderLayer(nn.Module):
    config: object  # TextConfig or VisionConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, mask=None):
        c = self.config
        h = layer_norm(x, c.layer_norm_eps, "layer_norm1", self.dtype)
        x = x + CLIPAttention(c.hidden_size, c.num_attention_heads, self.dtype, name="self_attn")(h, mask)
        h = layer_norm(x, c.layer_norm_eps, "layer_norm2", self.dtype)
        return x + CLIPMLP(c.hidden_size, c.intermediate_size, c.hidden_act, self.dtype, name="mlp")(h)


class CLIPLayerCollection(nn.Module):
    """Holds the layers under the names "0", "1", ... as Hugging Face does."""
    config: object
    dtype: jnp.dtype
    remat: bool = False

    @nn.compact
    def __call__(self, x, mask=None):
        layer_class = nn.remat(CLIPEncoderLayer) if self.remat else CLIPEncoderLayer
        for i in range(self.config.num_hidden_layers):
            x = layer_class(self.config, self.dtype, name=str(i))(x, mask)
        return x


class CLIPEncoder(nn.Module):
    config: object
    dtype: jnp.dtype
    remat: bool = False

    @nn.compact
    def __call__(self, x, mask=None):
        return CLIPLayerCollection(self.config, self.dtype, self.remat, name="layers")(x, mask)


class CLIPTextEmbeddings(nn.Module):
    config: object
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, input_ids):
        c = self.config
        init = nn.initializers.normal(0.02)
        token = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=init, name="token_embedding")
        position = nn.Embed(c.max_position_embeddings, c.hidden_size, embedding_init=init,
                            name="position_embedding")
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        return (token(input_ids) + position(positions)).astype(self.dtype)


class CLIPTextTransformer(nn.Module):
    config: object
    dtype: jnp.dtype
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        """Final-LayerNorm'd hidden states [B, L, H] and the EOT index [B]."""
        c = self.config
        if input_ids.shape[-1] > c.max_position_embeddings:
            raise ValueError(f"text length {input_ids.shape[-1]} exceeds max_position_embeddings "
                             f"{c.max_position_embeddings}; tokenize with context_length <= that")
        x = CLIPTextEmbeddings(c, self.dtype, name="embeddings")(input_ids)
        length = input_ids.shape[-1]
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]  # causal
        if attention_mask is not None:  # and never attend to padding keys
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        x = CLIPEncoder(c, self.dtype, self.remat, name="encoder")(x, mask)
        x = layer_norm(x, c.layer_norm_eps, "final_layer_norm", jnp.float32)
        return x, eot_positions(input_ids, c.eos_token_id)


class CLIPVisionEmbeddings(nn.Module):
    config: object
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, pixel_values):
        c = self.config
        b, h, w, _ = pixel_values.shape
        if (h, w) != (c.image_size, c.image_size):
            raise ValueError(f"image size {h}x{w} does not match the model's {c.image_size}x{c.image_size}; "
                             f"preprocess images to {c.image_size} px")
        patches = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size), strides=c.patch_size,
                          padding="VALID", use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                          name="patch_embedding")(pixel_values.astype(self.dtype))
        patches = patches.reshape(b, -1, c.hidden_size)
        cls = self.param("class_embedding", nn.initializers.normal(1.0), (c.hidden_size,))
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size))
        num_positions = (c.image_size // c.patch_size) ** 2 + 1
        position = nn.Embed(num_positions, c.hidden_size, embedding_init=nn.initializers.normal(0.02),
                            name="position_embedding")
        x = jnp.concatenate([cls, patches], axis=1)
        return (x + position(jnp.arange(num_positions))[None]).astype(self.dtype)


class CLIPVisionTransformer(nn.Module):
    config: object
    dtype: jnp.dtype
    remat: bool = False

    @nn.compact
    def __call__(self, pixel_values):
        """Post-LayerNorm'd hidden states of every token [B, 1+P, H] (HF norms only CLS)."""
        c = self.config
        x = CLIPVisionEmbeddings(c, self.dtype, name="embeddings")(pixel_values)
        x = layer_norm(x, c.layer_norm_eps, "pre_layrnorm", self.dtype)  # sic, HF's name
        x = CLIPEncoder(c, self.dtype, self.remat, name="encoder")(x)
        return layer_norm(x, c.layer_norm_eps, "post_layernorm", jnp.float32)


class CLIPModel(nn.Module):
    """Both towers, the projections and logit_scale, under Hugging Face's names."""
    config: CLIPConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False  # rematerialise encoder layers to save activation memory

    def setup(self):
        c = self.config
        self.text_model = CLIPTextTransformer(c.text, self.dtype, self.remat)
        self.vision_model = CLIPVisionTransformer(c.vision, self.dtype, self.remat)
        self.visual_projection = _dense(c.projection_dim, self.dtype, None, use_bias=False)
        self.text_projection = _dense(c.projection_dim, self.dtype, None, use_bias=False)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.logit_scale_init_value), ())

    def encode_image(self, pixel_values):
        tokens = self.visual_projection(self.vision_model(pixel_values)).astype(jnp.float32)
        return ImageFeatures(tokens=tokens, embeds=l2_normalize(tokens[:, 0]))

    def encode_text(self, input_ids, attention_mask=None):
        hidden, eot_index = self.text_model(input_ids, attention_mask)
        tokens = self.text_projection(hidden).astype(jnp.float32)
        eot = jnp.take_along_axis(tokens, eot_index[:, None, None], axis=1)[:, 0]
        return TextFeatures(tokens=tokens, embeds=l2_normalize(eot), eot_index=eot_index)

    def __call__(self, input_ids, pixel_values, attention_mask=None):
        image = self.encode_image(pixel_values)
        text = self.encode_text(input_ids, attention_mask)
        # As Hugging Face: unclamped exp(logit_scale). Training clamps in the loss.
        logits_per_text = text.embeds @ image.embeds.T * jnp.exp(self.logit_scale)
        return CLIPOutput(image=image, text=text, logits_per_image=logits_per_text.T,
                          logits_per_text=logits_per_text)


def init_params(config: CLIPConfig, rng, dtype=jnp.float32):
    """Random fp32 parameters for the towers (for tests and from-scratch runs)."""
    model = CLIPModel(config, dtype)
    ids = jnp.zeros((1, config.text.max_position_embeddings), jnp.int32)
    pixels = jnp.zeros((1, config.vision.image_size, config.vision.image_size, 3), jnp.float32)
    return jax.jit(model.init)(rng, ids, pixels)["params"]
