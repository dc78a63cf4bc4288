"""EntityCLIP = the CLIP towers (clip.py) + the training-only heads (heads.py).

Parameters: {"clip": tower params under Hugging Face names, "heads": the
experts, gates and ITM head}. In "clip_finetune" mode there are no heads and
the loss is CLIP's VTC alone: the plain fine-tuning baseline.

The loss itself lives in losses.py; here the towers turn a data-pipeline batch
into the token features it needs (METHOD.md "Backbone"): V from the image, T
from the query and E from the explanation through the SAME text tower.
"""
import dataclasses
import os

import jax
import jax.numpy as jnp

from entityclip_jax.errors import EntityClipError
from entityclip_jax.losses import clip_contrastive_loss, entityclip_loss, logit_scale_value
from entityclip_jax.models.clip import CLIPModel
from entityclip_jax.models.clip_config import CLIPConfig, PRESETS
from entityclip_jax.models.heads import HeadsConfig, init_heads
from entityclip_jax.models.loading import load_towers, resolve_checkpoint

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


RANDOM_PREFIX = "random:"
PRETRAINED_BY_PRESET = {"vit-b-32": "openai/clip-vit-base-patch32", "vit-b-16": "openai/clip-vit-base-patch16",
                        "vit-l-14": "openai/clip-vit-large-patch14"}


def random_preset(init):
    """The preset name of "random:NAME", None for a checkpoint path or hub id. A bare
    preset name is refused: random towers must be asked for, never implied."""
    if init in PRESETS:
        pretrained = PRETRAINED_BY_PRESET.get(init)
        hint = f", or {pretrained} for OpenAI's pretrained weights" if pretrained else ""
        raise EntityClipError(f"model.init={init!r} names an architecture, not weights: write "
                              f"--config.model.init={RANDOM_PREFIX}{init} for RANDOM towers{hint}")
    if not init.startswith(RANDOM_PREFIX):
        return None
    name = init[len(RANDOM_PREFIX):]
    if name not in PRESETS:
        raise EntityClipError(f"unknown architecture in model.init={init!r}; choose one of "
                              f"{[RANDOM_PREFIX + n for n in sorted(PRESETS)]}")
    return name


def describe_init(init):
    """One line saying where the towers start from (a training run's first log line)."""
    name = random_preset(init)
    if name is not None:
        return (f"towers: RANDOM weights ({init}), not pretrained: every weight is learned from this data; "
                f"set model.init to a checkpoint or hub id (e.g. {PRETRAINED_BY_PRESET.get(name, 'org/name')}) "
                "to fine-tune pretrained towers")
    return f"towers: pretrained, from {init}"


def tower_source(config, init=None):
    """(CLIPConfig, host params or None): "random:PRESET" gives an architecture to
    initialise randomly; anything else is loaded (models/loading.load_towers).
    init: model.init already resolved to a local path (default: resolve it here)."""
    overrides = {k: config.model[k] for k in ("vocab_size", "eos_token_id") if config.model.get(k) is not None}
    name = random_preset(config.model.init)
    if name is not None:
        clip = PRESETS[name]
        return dataclasses.replace(clip, text=dataclasses.replace(clip.text, **overrides)), None
    if overrides:
        raise EntityClipError(f"model.vocab_size / model.eos_token_id apply to random towers only; "
                              f"{config.model.init!r} brings its own text config: drop those overrides")
    return load_towers(init or config.model.init)


def release_heads(config, model, init=None):
    """The experts, gates and ITM head that model.init brings: an EntityCLIP release
    checkpoint (a .pt of the authors' code) or an `entityclip export-hf` directory
    (local or on the hub); None when it holds towers only.
    init: model.init already resolved to a local path (default: resolve it here)."""
    if model.mode != "entityclip" or random_preset(config.model.init) is not None:
        return None
    init = init or resolve_checkpoint(config.model.init)
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
    # Resolved once: a hub id is looked up (and downloaded) a single time.
    init = None if random_preset(config.model.init) is not None else resolve_checkpoint(config.model.init)
    clip_config, tower_params = tower_source(config, init)
    model = model_from_config(config, clip_config)
    tower_rng, heads_rng = jax.random.split(rng)
    if tower_params is None:
        tower_params = init_params(clip_config, tower_rng)
    params = {"clip": tower_params}
    if model.mode == "entityclip":
        params["heads"] = release_heads(config, model, init)
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
