"""Weights named by Hugging Face hub id: "org/name" or "org/name@revision" -> a local snapshot.

Beside storage.py (a path names local or gs:// storage), this names the third place
weights live. The download, cache (HF_HOME / HF_HUB_CACHE) and offline mode
(HF_HUB_OFFLINE) are huggingface_hub's own; only the files a CLIPModel (and an
`entityclip export-hf` directory) needs are fetched. checkpoints/towers.py opens what the
snapshot holds; data/tokenizer.py reads a hub model's tokenizer files from it.
"""
import os
import re

from entityclip_jax import storage
from entityclip_jax.errors import EntityClipError

HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(@(?P<revision>[\w./-]+))?")
# config, tokenizer, CLIPModel safetensors weights, an export's entityclip_heads.safetensors and run files
HUB_FILES = ("*.json", "*.txt", "model*.safetensors", "entityclip_*.safetensors")
HUB_FALLBACK_WEIGHTS = ("pytorch_model.bin*",)     # for repos without safetensors (read weights_only)
LOCAL_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".gz")  # a missing file, never a hub id


def resolve_checkpoint(spec):
    """A local or gs:// path unchanged; a hub id "org/name[@revision]" -> its snapshot directory."""
    match = HUB_ID.fullmatch(str(spec))
    if (storage.is_remote(spec) or storage.path(spec).exists() or match is None
            or str(spec).endswith(LOCAL_FILE_SUFFIXES)):
        return spec
    import huggingface_hub  # lazy: ~0.6 s to import, needed only for hub ids
    from huggingface_hub import constants, errors

    repo, revision = match["repo"], match["revision"]
    try:
        folder = huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=list(HUB_FILES))
        names = os.listdir(folder)  # not a user path: huggingface_hub's own snapshot folder
        if not any(name.startswith("model") and name.endswith(".safetensors") for name in names):
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
