"""Load CLIP towers from whatever a user has: one entry point for every command.

  - a towers directory written by save_towers (clip_config.json + Orbax params),
  - an EntityCLIP training workdir or checkpoint step (Orbax; see train/checkpoint.py),
  - a Hugging Face CLIPModel directory (config.json + weights),
  - an OpenAI-layout file (.pt/.pth/.safetensors; also the EntityCLIP release's).
"""
import json
import os

from entityclip_jax.errors import EntityClipError

TOWERS_CONFIG = "clip_config.json"


def save_towers(params, config, out_dir):
    """Write Flax tower params (Orbax) with their architecture beside them."""
    import orbax.checkpoint as ocp
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(os.path.join(out_dir, "params")):
        raise EntityClipError(f"{out_dir} already holds params; choose a new directory")
    os.makedirs(out_dir, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(out_dir, "params"), params)
    checkpointer.wait_until_finished()
    with open(os.path.join(out_dir, TOWERS_CONFIG), "w") as f:
        json.dump(config.to_dict(), f, indent=2)
    return out_dir


def load_towers(path):
    """(CLIPConfig, params as host arrays) from any supported checkpoint kind."""
    from entityclip_jax.models.clip_config import CLIPConfig
    if os.path.isfile(os.path.join(path, TOWERS_CONFIG)):
        import orbax.checkpoint as ocp
        with open(os.path.join(path, TOWERS_CONFIG)) as f:
            config = CLIPConfig.from_dict(json.load(f))
        return config, ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), "params"))
    if os.path.isfile(os.path.join(path, "config.json")):
        from entityclip_jax.convert.hf import load_hf_checkpoint
        return load_hf_checkpoint(path)
    if os.path.isfile(path):
        from entityclip_jax.convert.openai import openai_to_flax, read_openai_checkpoint
        return openai_to_flax(read_openai_checkpoint(path), source=path, allow_extra=True)
    if os.path.isdir(path):
        from entityclip_jax.train import checkpoint
        return checkpoint.restore_towers(path)
    raise EntityClipError(f"{path} does not exist; pass a towers directory, a training workdir, "
                          "a Hugging Face CLIPModel directory or an OpenAI-layout .pt file")
