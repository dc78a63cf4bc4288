"""EntityCLIP = the CLIP towers (clip.py) + the training-only heads (heads.py).

Parameters: {"clip": tower params under Hugging Face names, "heads": the
experts, gates and ITM head}. In "clip_finetune" mode there are no heads and
the loss is CLIP's VTC alone: the plain fine-tuning baseline.

The loss itself lives in losses.py; here the towers turn a data-pipeline batch
into the token features it needs (METHOD.md "Backbone"): V from the image, T
from the query and E from the explanation through the SAME text tower.
"""
import dataclasses

import jax
import jax.numpy as jnp

from entityclip_jax.errors import EntityClipError
from entityclip_jax.losses import clip_contrastive_loss, entityclip_loss, logit_scale_value
from entityclip_jax.models.clip import CLIPModel
from entityclip_jax.models.clip_config import CLIPConfig, PRESETS
from entityclip_jax.models.heads import HeadsConfig, init_heads

MODES = ("entityclip", "clip_finetune")


@dataclasses.dataclass(frozen=True)
class EntityCLIP:
    """What the step needs to know about the model (hashable: a static jit argument)."""
    clip: CLIPConfig
    heads: HeadsConfig
    mode: str = "entityclip"
    remat: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise EntityClipError(f"unknown model.mode {self.mode!r}; choose one of {MODES}")

    @property
    def dtype(self):
        return jnp.dtype(self.heads.dtype)

    @property
    def towers(self):
        return CLIPModel(self.clip, self.dtype, self.remat)


def model_from_config(config, clip_config):
    """EntityCLIP description from the training config and the towers' architecture."""
    from entityclip_jax.config import heads_config
    return EntityCLIP(clip=clip_config, heads=heads_config(config), mode=config.model.mode,
                      remat=config.model.remat)


def tower_source(config):
    """(CLIPConfig, host params or None): a preset gives an architecture to initialise
    randomly; anything else is loaded (models/loading.load_towers)."""
    init = config.model.init
    overrides = {k: config.model[k] for k in ("vocab_size", "eos_token_id") if config.model.get(k) is not None}
    if init in PRESETS:
        clip = PRESETS[init]
        return dataclasses.replace(clip, text=dataclasses.replace(clip.text, **overrides)), None
    if overrides:
        raise EntityClipError(f"model.vocab_size / model.eos_token_id apply to preset towers only; "
                              f"{init!r} brings its own text config: drop those overrides")
    from entityclip_jax.models.loading import load_towers
    return load_towers(init)


def release_heads(config, model):
    """The experts, gates and ITM head that model.init brings: an EntityCLIP release
    checkpoint (a .pt of the authors' code) or an `entityclip export-hf` directory;
    None when it holds towers only."""
    import os
    init = config.model.init
    if model.mode != "entityclip" or init in PRESETS:
        return None
    from entityclip_jax.convert.heads_file import has_heads, load_heads
    if os.path.isdir(init) and has_heads(init):  # an `entityclip export-hf` directory
        return load_heads(init, jax.eval_shape(
            lambda: init_heads(jax.random.key(0), model.heads, model.clip.projection_dim)))
    if not os.path.isfile(init):
        return None
    from entityclip_jax.convert.openai import read_openai_checkpoint
    from entityclip_jax.convert.release import release_heads_to_flax, split_release_state_dict
    _, heads = split_release_state_dict(read_openai_checkpoint(init))
    return release_heads_to_flax(heads, model.heads, model.clip.projection_dim) if heads else None


def init_entityclip(rng, config):
    """(EntityCLIP, params) for a training config: towers from config.model.init,
    heads from it too when it is an EntityCLIP release checkpoint (so a model
    trained with the authors' code continues here), else freshly initialised
    with the release's initialisation."""
    from entityclip_jax.models.clip import init_params
    clip_config, tower_params = tower_source(config)
    model = model_from_config(config, clip_config)
    tower_rng, heads_rng = jax.random.split(rng)
    if tower_params is None:
        tower_params = init_params(clip_config, tower_rng)
    params = {"clip": tower_params}
    if model.mode == "entityclip":
        params["heads"] = release_heads(config, model)
        if params["heads"] is None:
            params["heads"] = init_heads(heads_rng, model.heads, clip_config.projection_dim)
    return model, params


def abstract_params(model):
    """The params tree as jax.ShapeDtypeStruct leaves (no memory), for restoring."""
    from entityclip_jax.models.clip import init_params

    def init(rng):
        params = {"clip": init_params(model.clip, rng)}
        if model.mode == "entityclip":
            params["heads"] = init_heads(rng, model.heads, model.clip.projection_dim)
        return params
    return jax.eval_shape(init, jax.random.key(0))


def token_mask(eot_index, length):
    """1 up to and including EOT, 0 on the padding after it: [B], L -> [B, L] int32."""
    return (jnp.arange(length)[None, :] <= eot_index[:, None]).astype(jnp.int32)


def pixels(batch):
    """CLIP-normalised float pixels; uint8 batches are normalised here, on device."""
    from entityclip_jax.data.preprocess import normalize
    values = batch["pixel_values"]
    return normalize(values.astype(jnp.float32)) if values.dtype == jnp.uint8 else values


def encode_batch(model, params, batch, *, with_explanation=True):
    """Token features for entityclip_loss: V, T, t_mask, t_eot_index and (with_explanation) E, e_mask, e_eot_index."""
    towers, clip_params = model.towers, {"params": params["clip"]}
    image = towers.apply(clip_params, pixels(batch), method=CLIPModel.encode_image)
    query_ids = batch["query_ids"]
    batch_size, length = query_ids.shape
    # Query and explanation share the text tower: one pass over both.
    ids = jnp.concatenate([query_ids, batch["explanation_ids"]]) if with_explanation else query_ids
    text = towers.apply(clip_params, ids, method=CLIPModel.encode_text)
    features = dict(V=image.tokens, T=text.tokens[:batch_size], t_eot_index=text.eot_index[:batch_size])
    features["t_mask"] = token_mask(features["t_eot_index"], length)
    if with_explanation:
        features.update(E=text.tokens[batch_size:], e_eot_index=text.eot_index[batch_size:])
        features["e_mask"] = token_mask(features["e_eot_index"], length)
    return features


def compute_loss(model, params, batch, rng):
    """(loss, metrics) of one batch: the EntityCLIP objective, or VTC alone in clip_finetune mode."""
    logit_scale = params["clip"]["logit_scale"]
    if model.mode == "clip_finetune":
        features = encode_batch(model, params, batch, with_explanation=False)
        t_eot = jnp.take_along_axis(features["T"], features["t_eot_index"][:, None, None], axis=1)[:, 0]
        vtc = clip_contrastive_loss(features["V"][:, 0], t_eot, logit_scale)
        return vtc, dict(loss=vtc, vtc=vtc, logit_scale=logit_scale_value(logit_scale))
    features = encode_batch(model, params, batch)
    return entityclip_loss(params["heads"], features, logit_scale, rng, model.heads)
