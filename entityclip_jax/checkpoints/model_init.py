"""What a training run starts from: config.model.init turned into a model and its parameters.

"random:PRESET" gives an architecture to initialise randomly (the text tower fitted to
the records' tokenizer by model.vocab_size / model.eos_token_id / model.bos_token_id);
anything else is a checkpoint towers.py opens, with its heads in EntityCLIP mode when it
brings them.
"""
import dataclasses

import jax

from entityclip_jax.checkpoints.towers import load_towers, load_towers_and_heads, read_architecture
from entityclip_jax.config import PRETRAINED_BY_PRESET, heads_config, model_from_config, random_preset
from entityclip_jax.errors import EntityClipError
from entityclip_jax.models.clip import init_params
from entityclip_jax.models.clip_config import PRESETS
from entityclip_jax.models.heads import init_heads

RANDOM_TOWER_OVERRIDES = ("vocab_size", "eos_token_id", "bos_token_id")


def describe_init(init):
    """One line saying where the towers start from (a training run's first log line)."""
    name = random_preset(init)
    if name is not None:
        return (f"towers: RANDOM weights ({init}), not pretrained: every weight is learned from this data; "
                f"set model.init to a checkpoint or hub id (e.g. {PRETRAINED_BY_PRESET.get(name, 'org/name')}) "
                "to fine-tune pretrained towers")
    return f"towers: pretrained, from {init}"


def _random_architecture(config, name):
    overrides = {k: config.model[k] for k in RANDOM_TOWER_OVERRIDES if config.model.get(k) is not None}
    if overrides.get("eos_token_id", 0) >= 1 and "bos_token_id" not in overrides:
        # CLIP's tokenizers (OpenAI's BPE, those `entityclip tokenizer` writes) put <|startoftext|> just
        # before <|endoftext|>; a new run checks it against its records (run_tokenizer.check_training_data).
        overrides["bos_token_id"] = overrides["eos_token_id"] - 1
    clip = PRESETS[name]
    return dataclasses.replace(clip, text=dataclasses.replace(clip.text, **overrides))


def _check_overrides(config):
    if any(config.model.get(k) is not None for k in RANDOM_TOWER_OVERRIDES):
        raise EntityClipError(f"model.vocab_size / model.eos_token_id / model.bos_token_id apply to random towers "
                              f"only; {config.model.init!r} brings its own text config: drop those overrides")


def tower_architecture(config):
    """The CLIPConfig config.model.init will give, without reading weights where its files allow
    (None for an OpenAI-layout file): what the records are checked against before any work."""
    name = random_preset(config.model.init)
    if name is not None:
        return _random_architecture(config, name)
    _check_overrides(config)
    return read_architecture(config.model.init)


def tower_source(config):
    """What config.model.init brings: (CLIPConfig, tower params or None, head params or None).

    "random:PRESET" gives only an architecture, to initialise randomly; anything else is
    read once (load_towers_and_heads), its heads too in EntityCLIP mode: a training run's,
    an export-hf directory's or an EntityCLIP release checkpoint's (the authors' code), so
    a trained model continues here."""
    name = random_preset(config.model.init)
    if name is not None:
        return _random_architecture(config, name), None, None
    _check_overrides(config)
    if config.model.mode != "entityclip":
        return (*load_towers(config.model.init), None)
    return load_towers_and_heads(config.model.init, heads_config(config))


def init_entityclip(rng, config):
    """(EntityCLIPConfig, params) for a training config: towers from config.model.init, heads from
    it too when it brings them (tower_source), else freshly initialised as the release does."""
    clip_config, tower_params, head_params = tower_source(config)
    model = model_from_config(config, clip_config)
    tower_rng, heads_rng = jax.random.split(rng)
    if tower_params is None:
        tower_params = init_params(clip_config, tower_rng)
    params = {"clip": tower_params}
    if model.mode == "entityclip":
        params["heads"] = head_params
        if head_params is None:
            params["heads"] = init_heads(heads_rng, model.heads, clip_config.projection_dim)
    return model, params
