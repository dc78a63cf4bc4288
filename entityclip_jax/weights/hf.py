"""Hugging Face CLIPModel directories <-> (CLIPConfig, Flax params).

Reads config.json plus model.safetensors, sharded safetensors with an index,
or pytorch_model.bin (loaded with weights_only=True, never arbitrary pickle).
Writes a directory that transformers.CLIPModel.from_pretrained loads with no
missing and no unexpected keys; writes go to a temporary directory that is
renamed into place, so a failed export leaves nothing half-written.
"""
import json
import logging
import os
import re
import secrets
import socket

import jax
import numpy as np
import safetensors.numpy

from entityclip_jax import storage
from entityclip_jax.weights.layout import flax_to_state_dict, state_dict_to_flax
from entityclip_jax.errors import EntityClipError
from entityclip_jax.models.clip import init_params
from entityclip_jax.models.clip_config import CLIPConfig

# Files a CLIP checkpoint may carry besides weights; copied on export.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
              "special_tokens_map.json", "preprocessor_config.json", "processor_config.json")
# Written into every export: `export-hf --overwrite` replaces only directories that hold it.
EXPORT_MARKER = "entityclip_export.json"
# Written first into the hidden directory an export is built in: a rerun removes one whose
# writer is gone (killed mid-export), and only such a one.
PARTIAL_MARKER = "entityclip_export_partial.json"
log = logging.getLogger(__name__)


def read_hf_config(directory):
    where = storage.path(directory)
    if not where.is_dir():
        raise EntityClipError(f"{directory} is not a directory; pass a Hugging Face checkpoint directory")
    path = where / "config.json"
    if not path.exists():
        raise EntityClipError(f"{directory} has no config.json; it is not a Hugging Face checkpoint "
                              "(save one with CLIPModel.save_pretrained)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EntityClipError(f"{path} is not valid JSON: {err}") from None
    try:
        return CLIPConfig.from_hf(data), data
    except EntityClipError as err:
        raise EntityClipError(f"{path}: {err}") from None


def read_state_dict(directory):
    """All tensors of a checkpoint directory (local or gs://) as {key: fp32 numpy array}."""
    candidates = [("model.safetensors.index.json", _read_safetensors_index),
                  ("model.safetensors", _read_safetensors),
                  ("pytorch_model.bin.index.json", _read_torch_index),
                  ("pytorch_model.bin", _read_torch_bin)]
    for name, reader in candidates:
        path = storage.join(directory, name)
        if storage.path(path).exists():
            return reader(path), name
    raise EntityClipError(f"{directory} has no weights: expected model.safetensors, "
                          "model.safetensors.index.json or pytorch_model.bin")


def _read_safetensors(path):
    try:
        with storage.local_copy(path) as local:  # safetensors reads local files only
            tensors = safetensors.numpy.load_file(local)
    except Exception as err:  # safetensors raises its own error types for bad files
        raise EntityClipError(f"cannot read {path}: {err}; the file is truncated or not safetensors "
                              "(download it again)") from None
    return {k: _to_fp32(v) for k, v in tensors.items()}


def _read_torch_bin(path):
    import torch  # lazy: heavy, only for pytorch_model.bin checkpoints
    try:
        with storage.open(path, "rb") as f:
            tensors = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:
        raise EntityClipError(f"cannot read {path} with weights_only=True: {err}") from None
    return {k: v.float().numpy() for k, v in tensors.items()}


def _read_index(path, reader):
    try:
        shards = sorted(set(json.loads(storage.path(path).read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise EntityClipError(f"{path} is not a weight index ({type(err).__name__}: {err}); download the "
                              "checkpoint again") from None
    out = {}
    for shard in shards:
        shard_path = storage.join(storage.path(path).parent, shard)
        if not storage.path(shard_path).exists():
            raise EntityClipError(f"{path} names shard {shard}, which is missing")
        out.update(reader(shard_path))
    return out


def _read_safetensors_index(path):
    return _read_index(path, _read_safetensors)


def _read_torch_index(path):
    return _read_index(path, _read_torch_bin)


def _to_fp32(array):
    return np.asarray(array, dtype=np.float32)


def expected_params(config):
    """Parameter shapes of our CLIPModel for a config, without allocating them."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def load_hf_checkpoint(directory):
    """A Hugging Face CLIPModel directory, local or gs:// -> (CLIPConfig, Flax params as numpy fp32)."""
    config, _ = read_hf_config(directory)
    state_dict, weights_file = read_state_dict(directory)
    params = state_dict_to_flax(state_dict, expected_params(config),
                                source=storage.join(directory, weights_file))
    return config, params


def save_hf_checkpoint(params, config, out_dir, source_dir=None, overwrite=False, protect=(), extra=None):
    """Write a CLIPModel directory (config.json + model.safetensors, fp32).

    Tokenizer and preprocessor files are copied from source_dir when it has
    them; extra(directory) may add files of its own (the experts). The
    directory appears atomically: written beside, then renamed. overwrite
    replaces only an earlier export of ours (see check_export_destination), never a
    path in `protect` (what is being exported), a directory holding one, or one inside one.
    Modes follow the umask, as save_pretrained's do (mkdtemp's 0700 would hide the export).
    out_dir is on the local disk: a gs:// export is built locally, then uploaded (upload_export).
    """
    if storage.is_remote(out_dir):  # save_pretrained and the rename need a local disk
        raise EntityClipError(f"save_hf_checkpoint writes a local directory, not {out_dir}: save it locally, "
                              "then upload_export it (as `entityclip export-hf` does)")
    out_dir = storage.absolute(out_dir)
    check_export_destination(out_dir, overwrite, (*protect, source_dir))
    out = storage.path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_exports(out_dir)
    tmp = out.parent / f".{out.name}.export-{secrets.token_hex(6)}"
    tmp.mkdir()
    try:
        (tmp / PARTIAL_MARKER).write_text(json.dumps({"destination": out_dir, "host": socket.gethostname(),
                                                      "pid": os.getpid()}))
        config.to_hf().save_pretrained(str(tmp))
        safetensors.numpy.save_file(flax_to_state_dict(params), str(tmp / "model.safetensors"),
                                    metadata={"format": "pt"})
        for name in SIDE_FILES if source_dir else ():
            if storage.path(source_dir).joinpath(name).is_file():
                storage.copy(storage.join(source_dir, name), tmp / name)
        if extra is not None:
            extra(str(tmp))
        (tmp / PARTIAL_MARKER).unlink()
        (tmp / EXPORT_MARKER).write_text(json.dumps({"written_by": "entityclip export-hf",
                                                     "files": sorted([*storage.listdir(tmp), EXPORT_MARKER])},
                                                    indent=1))
        file_mode = os.stat(tmp).st_mode & 0o666  # mkdir applied the umask; safetensors writes 0600
        for item in tmp.iterdir():
            os.chmod(item, file_mode)
        if out.exists():  # an earlier export of ours (check_export_destination refused anything else)
            out.rmtree()
        tmp.rename(out)
    except BaseException:
        tmp.rmtree(missing_ok=True)
        raise
    return out_dir


def remove_abandoned_exports(out_dir):
    """Removes the hidden directories beside out_dir that an export to it left when it was killed
    (kill -9, a lost machine): those holding our PARTIAL_MARKER for this destination whose process is
    gone from this host, and empty ones under our naming (a kill right after the mkdir). Nothing else."""
    out = storage.path(out_dir)
    pattern = re.compile(rf"\.(?:{re.escape(out.name)}\.)?export-[0-9a-f]{{12}}")  # (the name before 0.2 had no destination)
    for item in out.parent.iterdir():
        if not (pattern.fullmatch(item.name) and item.is_dir()) or os.path.islink(item):
            continue
        names = storage.listdir(item)
        if names and not _abandoned(item, out_dir):
            continue
        item.rmtree()
        log.warning("removed %s, the unfinished export an interrupted `entityclip export-hf` left", item)


def _abandoned(tmp, out_dir):
    try:
        partial = json.loads((tmp / PARTIAL_MARKER).read_text())
    except (OSError, ValueError):
        return False  # not ours, or not ours to judge
    if not isinstance(partial, dict) or partial.get("destination") != out_dir:
        return False
    if partial.get("host") != socket.gethostname():
        return False  # its writer may live on another machine
    return "pid" in partial and not storage.process_is_running(partial["pid"])  # alive: an export there right now


def check_export_destination(out_dir, overwrite=False, protect=()):
    """Refuses an existing out_dir unless overwrite and it is an earlier export: a directory
    with our marker holding only the files the marker lists, and no path of `protect`
    (the source) is it, holds it or lies inside it. Cheap: export-hf calls it before reading."""
    if storage.is_remote(out_dir):
        return _check_remote_export_destination(out_dir, overwrite, protect)
    where = storage.path(out_dir)
    if not (os.path.islink(out_dir) or where.exists()):
        return
    if not overwrite:
        raise EntityClipError(f"{out_dir} exists; choose a new destination or pass --overwrite")
    protect = [p for p in protect if p and not storage.is_remote(p)]  # gs:// cannot hold a local out_dir
    real = storage.resolve(out_dir)
    for path in protect:
        other = storage.resolve(path)
        if os.path.commonpath([real, other]) in (real, other):
            raise EntityClipError(f"--overwrite refused: {out_dir} is, holds or lies inside {path}, which is "
                                  "being exported; choose a destination outside it")
    marker = where / EXPORT_MARKER
    if os.path.islink(out_dir) or not marker.is_file():
        raise EntityClipError(f"--overwrite refused: {out_dir} is not an earlier `entityclip export-hf` "
                              f"directory (no {EXPORT_MARKER}); choose a new destination or remove it yourself")
    try:
        ours = set(json.loads(marker.read_text())["files"])
    except (ValueError, KeyError, TypeError) as err:
        raise EntityClipError(f"--overwrite refused: {marker} is unreadable ({err}); remove {out_dir} yourself")
    foreign = [name for name in storage.listdir(out_dir)
               if name not in ours or not (where / name).is_file() or os.path.islink(where / name)]
    if foreign:
        raise EntityClipError(f"--overwrite refused: {out_dir} holds files export-hf did not write, e.g. "
                              f"{', '.join(foreign[:3])}; move them away or choose a new destination")


def _check_remote_export_destination(out_dir, overwrite, protect):
    """check_export_destination on object storage: the same rules, with prefixes for directories."""
    where = storage.path(out_dir)
    if not where.exists():
        return
    if not overwrite:
        raise EntityClipError(f"{out_dir} exists; choose a new destination or pass --overwrite")
    for path in (p for p in protect if p):
        other = storage.absolute(path)
        if other == out_dir or other.startswith(out_dir + "/") or out_dir.startswith(other + "/"):
            raise EntityClipError(f"--overwrite refused: {out_dir} is, holds or lies inside {path}, which is "
                                  "being exported; choose a destination outside it")
    marker = where / EXPORT_MARKER
    if not marker.is_file():
        raise EntityClipError(f"--overwrite refused: {out_dir} is not an earlier `entityclip export-hf` "
                              f"directory (no {EXPORT_MARKER}); choose a new destination or remove it yourself")
    try:
        ours = set(json.loads(marker.read_text())["files"])
    except (ValueError, KeyError, TypeError) as err:
        raise EntityClipError(f"--overwrite refused: {marker} is unreadable ({err}); remove {out_dir} yourself")
    foreign = sorted(p.name for p in where.iterdir() if p.name not in ours or p.is_dir())
    if foreign:
        raise EntityClipError(f"--overwrite refused: {out_dir} holds files export-hf did not write, e.g. "
                              f"{', '.join(foreign[:3])}; move them away or choose a new destination")


def upload_export(local_dir, out_dir):
    """Copies a finished local export to object storage, replacing an earlier export there (already
    checked to be ours); its marker goes last, so a directory without it was never completed."""
    target = storage.path(out_dir)
    target.rmtree(missing_ok=True)
    names = storage.listdir(local_dir)
    for name in [n for n in names if n != EXPORT_MARKER] + [EXPORT_MARKER]:
        storage.copy(storage.join(local_dir, name), target / name)
    return out_dir

