"""Hugging Face CLIPModel directories <-> (CLIPConfig, Flax params).

Reads config.json plus model.safetensors, sharded safetensors with an index,
or pytorch_model.bin (loaded with weights_only=True, never arbitrary pickle).
Writes a directory that transformers.CLIPModel.from_pretrained loads with no
missing and no unexpected keys; writes go to a temporary directory that is
renamed into place, so a failed export leaves nothing half-written.
"""
import json
import os
import secrets
import shutil

import jax
import numpy as np

from entityclip_jax import storage
from entityclip_jax.convert.layout import flax_to_state_dict, state_dict_to_flax
from entityclip_jax.errors import EntityClipError
from entityclip_jax.models.clip_config import CLIPConfig

# Files a CLIP checkpoint may carry besides weights; copied on export.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
              "special_tokens_map.json", "preprocessor_config.json", "processor_config.json")
# Written into every export: `export-hf --overwrite` replaces only directories that hold it.
EXPORT_MARKER = "entityclip_export.json"


def read_hf_config(directory):
    path = os.path.join(directory, "config.json")
    if not os.path.isdir(directory):
        raise EntityClipError(f"{directory} is not a directory; pass a Hugging Face checkpoint directory")
    if not os.path.exists(path):
        raise EntityClipError(f"{directory} has no config.json; it is not a Hugging Face checkpoint "
                              "(save one with CLIPModel.save_pretrained)")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise EntityClipError(f"{path} is not valid JSON: {err}") from None
    return CLIPConfig.from_hf(data), data


def read_state_dict(directory):
    """All tensors of a checkpoint directory as {key: fp32 numpy array}."""
    candidates = [("model.safetensors.index.json", _read_safetensors_index),
                  ("model.safetensors", _read_safetensors),
                  ("pytorch_model.bin.index.json", _read_torch_index),
                  ("pytorch_model.bin", _read_torch_bin)]
    for name, reader in candidates:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return reader(path), name
    raise EntityClipError(f"{directory} has no weights: expected model.safetensors, "
                          "model.safetensors.index.json or pytorch_model.bin")


def _read_safetensors(path):
    from safetensors.numpy import load_file
    try:
        tensors = load_file(path)
    except Exception as err:  # safetensors raises its own error types for bad files
        raise EntityClipError(f"cannot read {path}: {err}; the file is truncated or not safetensors "
                              "(download it again)") from None
    return {k: _to_fp32(v) for k, v in tensors.items()}


def _read_torch_bin(path):
    import torch
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise EntityClipError(f"cannot read {path} with weights_only=True: {err}") from None
    return {k: v.float().numpy() for k, v in tensors.items()}


def _read_index(path, reader):
    with open(path) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for shard in shards:
        shard_path = os.path.join(os.path.dirname(path), shard)
        if not os.path.exists(shard_path):
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
    from entityclip_jax.models.clip import init_params
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def load_hf_checkpoint(directory):
    """A Hugging Face CLIPModel directory -> (CLIPConfig, Flax params as numpy fp32)."""
    config, _ = read_hf_config(directory)
    state_dict, weights_file = read_state_dict(directory)
    params = state_dict_to_flax(state_dict, expected_params(config),
                                source=os.path.join(directory, weights_file))
    return config, params


def save_hf_checkpoint(params, config, out_dir, source_dir=None, overwrite=False, protect=(), extra=None):
    """Write a CLIPModel directory (config.json + model.safetensors, fp32).

    Tokenizer and preprocessor files are copied from source_dir when it has
    them; extra(directory) may add files of its own (the experts). The
    directory appears atomically: written beside, then renamed. overwrite
    replaces only an earlier export of ours (see check_export_destination), never a
    path in `protect` (what is being exported), a directory holding one, or one inside one.
    Modes follow the umask, as save_pretrained's do (mkdtemp's 0700 would hide the export).
    """
    from safetensors.numpy import save_file
    out_dir = os.path.abspath(out_dir)
    check_export_destination(out_dir, overwrite, (*protect, source_dir))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".export-{secrets.token_hex(6)}")
    os.mkdir(tmp)
    try:
        config.to_hf().save_pretrained(tmp)
        save_file(flax_to_state_dict(params), os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        for name in SIDE_FILES if source_dir else ():
            if storage.path(source_dir).joinpath(name).is_file():
                storage.copy(storage.join(source_dir, name), os.path.join(tmp, name))
        if extra is not None:
            extra(tmp)
        with open(os.path.join(tmp, EXPORT_MARKER), "w") as f:
            json.dump({"written_by": "entityclip export-hf", "files": sorted(os.listdir(tmp))}, f, indent=1)
        file_mode = os.stat(tmp).st_mode & 0o666  # mkdir applied the umask; safetensors writes 0600
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), file_mode)
        if os.path.lexists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def check_export_destination(out_dir, overwrite=False, protect=()):
    """Refuses an existing out_dir unless overwrite and it is an earlier export: a directory
    with our marker holding only the files the marker lists, and no path of `protect`
    (the source) is it, holds it or lies inside it. Cheap: export-hf calls it before reading."""
    if storage.is_remote(out_dir):
        return _check_remote_export_destination(out_dir, overwrite, protect)
    if not os.path.lexists(out_dir):
        return
    if not overwrite:
        raise EntityClipError(f"{out_dir} exists; choose a new destination or pass --overwrite")
    protect = [p for p in protect if p]
    real = os.path.realpath(out_dir)
    for path in protect:
        other = os.path.realpath(path)
        if os.path.commonpath([real, other]) in (real, other):
            raise EntityClipError(f"--overwrite refused: {out_dir} is, holds or lies inside {path}, which is "
                                  "being exported; choose a destination outside it")
    marker = os.path.join(out_dir, EXPORT_MARKER)
    if os.path.islink(out_dir) or not os.path.isfile(marker):
        raise EntityClipError(f"--overwrite refused: {out_dir} is not an earlier `entityclip export-hf` "
                              f"directory (no {EXPORT_MARKER}); choose a new destination or remove it yourself")
    try:
        with open(marker) as f:
            ours = set(json.load(f)["files"])
    except (ValueError, KeyError, TypeError) as err:
        raise EntityClipError(f"--overwrite refused: {marker} is unreadable ({err}); remove {out_dir} yourself")
    foreign = sorted(name for name in os.listdir(out_dir)
                     if name not in ours or not os.path.isfile(os.path.join(out_dir, name))
                     or os.path.islink(os.path.join(out_dir, name)))
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
    names = sorted(os.listdir(local_dir))
    for name in [n for n in names if n != EXPORT_MARKER] + [EXPORT_MARKER]:
        storage.copy(os.path.join(local_dir, name), target / name)
    return out_dir

