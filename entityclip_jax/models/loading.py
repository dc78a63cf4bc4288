"""Load CLIP towers from whatever a user has: one entry point for every command.

  - a towers directory written by save_towers (clip_config.json + Orbax params),
  - an EntityCLIP training workdir or checkpoint step (Orbax; see train/checkpoint.py),
  - a Hugging Face CLIPModel directory (config.json + weights),
  - an OpenAI-layout file (.pt/.pth/.safetensors; also the EntityCLIP release's),
  - a Hugging Face hub id ("openai/clip-vit-base-patch32", "org/name@revision") of a
    CLIPModel, through huggingface_hub's own download and cache (resolve_checkpoint).
"""
import json
import os
import re

from entityclip_jax import storage
from entityclip_jax.errors import EntityClipError

TOWERS_CONFIG = "clip_config.json"
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(@(?P<revision>[\w./-]+))?")
# config, tokenizer, CLIPModel safetensors weights and an export's entityclip_heads.safetensors
HUB_FILES = ("*.json", "*.txt", "model*.safetensors", "entityclip_*.safetensors")
HUB_FALLBACK_WEIGHTS = ("pytorch_model.bin*",)     # for repos without safetensors (read weights_only)
LOCAL_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".gz")  # a missing file, never a hub id


def resolve_checkpoint(spec):
    """A local path unchanged; a hub id "org/name[@revision]" -> its snapshot directory.

    The download, cache (HF_HOME / HF_HUB_CACHE) and offline mode (HF_HUB_OFFLINE)
    are huggingface_hub's own; only the files a CLIPModel needs are fetched.
    """
    match = HUB_ID.fullmatch(str(spec))
    if storage.is_remote(spec) or os.path.exists(spec) or match is None or str(spec).endswith(LOCAL_FILE_SUFFIXES):
        return spec
    import huggingface_hub  # lazy: ~1 s to import, needed only for hub ids
    from huggingface_hub import constants, errors

    repo, revision = match["repo"], match["revision"]
    try:
        folder = huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=list(HUB_FILES))
        if not any(name.startswith("model") and name.endswith(".safetensors") for name in os.listdir(folder)):
            folder = huggingface_hub.snapshot_download(repo, revision=revision,
                                                       allow_patterns=list(HUB_FILES + HUB_FALLBACK_WEIGHTS))
    except errors.RevisionNotFoundError:
        raise EntityClipError(f"{repo} has no revision {revision!r} on the Hugging Face hub; "
                              "give a branch, tag or commit that exists (org/name@revision)") from None
    except errors.LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise EntityClipError(
                f"{spec} is not a local path, and the Hugging Face hub id {repo} is not in the cache "
                f"{constants.HF_HUB_CACHE} while HF_HUB_OFFLINE=1: go online (unset "
                "HF_HUB_OFFLINE) to download it once, set HF_HOME to a cache that holds it, "
                "or pass a local checkpoint path") from None
        raise EntityClipError(f"{spec} is not a local path, and the Hugging Face hub could not be reached "
                              f"to download {repo}: check the network, or pass a local checkpoint path") from None
    except (errors.HfHubHTTPError, errors.HFValidationError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EntityClipError(f"{spec} is neither a local path nor a model the Hugging Face hub serves "
                              f"({reason}); check the id (and `hf auth login` for a gated or private repo), "
                              "or pass a local checkpoint path") from None
    return folder


def save_towers(params, config, out_dir):
    """Write Flax tower params (Orbax) with their architecture beside them."""
    import orbax.checkpoint as ocp
    out_dir = storage.absolute(out_dir)
    if storage.path(out_dir).joinpath("params").exists():
        raise EntityClipError(f"{out_dir} already holds params; choose a new directory")
    storage.path(out_dir).mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(storage.join(out_dir, "params"), params)
    checkpointer.wait_until_finished()
    storage.write_json_atomic(storage.join(out_dir, TOWERS_CONFIG), config.to_dict())
    return out_dir


def load_towers(path):
    """(CLIPConfig, params as host arrays) from any supported checkpoint kind or hub id."""
    from entityclip_jax.models.clip_config import CLIPConfig
    path = resolve_checkpoint(path)
    where = storage.path(path)
    if (where / TOWERS_CONFIG).is_file():
        import orbax.checkpoint as ocp
        config = CLIPConfig.from_dict(json.loads((where / TOWERS_CONFIG).read_text()))
        return config, ocp.StandardCheckpointer().restore(storage.join(storage.absolute(path), "params"))
    if (where / "config.json").is_file():
        from entityclip_jax.convert.hf import load_hf_checkpoint
        with storage.local_copy(path) as local:  # safetensors and torch read local files only
            return load_hf_checkpoint(local)
    if where.is_file():
        from entityclip_jax.convert.openai import openai_to_flax, read_openai_checkpoint
        with storage.local_copy(path) as local:
            return openai_to_flax(read_openai_checkpoint(local), source=path, allow_extra=True)
    if where.is_dir():
        from entityclip_jax.train import checkpoint
        return checkpoint.restore_towers(path)
    raise EntityClipError(f"{path} does not exist; pass a towers directory, a training workdir, "
                          "a Hugging Face CLIPModel directory or hub id (org/name), or an OpenAI-layout .pt file")
