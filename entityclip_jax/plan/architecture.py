"""The towers' architecture of config.model.init, known without reading weights or downloading.

  random:PRESET                  the preset, as training builds it (checkpoints/model_init.py)
  openai/clip-vit-*[@revision]   the preset with OpenAI's architecture (config.PRETRAINED_BY_PRESET)
  a local directory              its config files alone (a towers directory, a training run or one
                                 of its steps, a Hugging Face CLIPModel directory)
Anything else (another hub id, gs://, an OpenAI-layout file) would have to be downloaded
or opened: the plan asks for the same architecture as a preset instead.
"""
from entityclip_jax import storage
from entityclip_jax.checkpoints.model_init import tower_architecture
from entityclip_jax.config import PRETRAINED_BY_PRESET, RANDOM_PREFIX, random_preset
from entityclip_jax.errors import EntityClipError
from entityclip_jax.models.clip_config import PRESETS

_PRESET_BY_HUB_ID = {hub_id: preset for preset, hub_id in PRETRAINED_BY_PRESET.items()}


def architecture(config):
    """The CLIPConfig training would build from config.model.init (see the module doc)."""
    init = str(config.model.init)
    if random_preset(init) is not None:
        return tower_architecture(config)  # reads nothing for random towers
    preset = _PRESET_BY_HUB_ID.get(init.split("@", 1)[0])
    if preset is not None:
        return PRESETS[preset]
    found = None
    if not storage.is_remote(init) and storage.path(init).is_dir():
        found = tower_architecture(config)  # config files only
    if found is not None:
        return found
    presets = ", ".join(f"{RANDOM_PREFIX}{name}" for name in sorted(PRESETS))
    raise EntityClipError(f"plan cannot tell the architecture of model.init={init!r} without reading it; plan "
                          f"with the same architecture as a preset, e.g. --config.model.init={RANDOM_PREFIX}vit-b-16 "
                          f"({presets}), or a local directory holding its config files")
