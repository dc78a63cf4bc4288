"""Open whatever a checkpoint path holds: the one place that decides what a path is.

A user names weights in one of these ways (local, gs:// or a Hugging Face hub id,
see hub.py), and checkpoint_kind tells them apart:

  TRAINING_RUN     an `entityclip train` workdir (checkpoints/ + run files): its best
                   step by its metric, else the latest; a damaged step falls back to
                   the next one (run.py owns that Orbax format)
  CHECKPOINT_STEP  one step of a run, WORKDIR/checkpoints/<step> (state/): only it
  TOWERS           a towers directory written by save_towers (towers_config.json, or
                   clip_config.json before 0.2, + Orbax params)
  HF               a Hugging Face CLIPModel directory (config.json + weights)
  HF_EXPORT        an `entityclip export-hf` directory: HF plus the experts, gates and
                   ITM head (entityclip_heads.safetensors) to resume training from
  STATE_DICT_FILE  an OpenAI-layout .pt/.pth/.bin/.safetensors file (OpenAI's CLIP, or
                   the EntityCLIP release, which also holds the heads)

load_towers is what eval, search and classify read (the plain CLIP towers);
load_towers_and_heads is what export and training's model.init (model_init.py) read;
read_architecture gives a path's CLIPConfig without reading its weights where the
files allow. Everything comes back as host arrays, whatever mesh wrote it.
"""
import json
import logging

import jax
import orbax.checkpoint as ocp

from entityclip_jax import storage
from entityclip_jax.checkpoints import run as run_format
from entityclip_jax.checkpoints.integrity import DamagedCheckpoint, describe_failure, ignore_orphaned_callbacks
from entityclip_jax.errors import EntityClipError
from entityclip_jax.hub import resolve_checkpoint
from entityclip_jax.models.clip_config import CLIPConfig
from entityclip_jax.models.heads import init_heads
from entityclip_jax.weights.heads_file import HEADS_FILE, load_heads
from entityclip_jax.weights.hf import load_hf_checkpoint
from entityclip_jax.weights.openai import openai_to_flax, read_openai_checkpoint
from entityclip_jax.weights.release import release_heads_to_flax, split_release_state_dict

TRAINING_RUN = "training run"
CHECKPOINT_STEP = "checkpoint step"
TOWERS = "towers directory"
HF = "Hugging Face CLIPModel directory"
HF_EXPORT = "export-hf directory"
STATE_DICT_FILE = "OpenAI-layout file"

HF_CONFIG = "config.json"
log = logging.getLogger(__name__)


def checkpoint_kind(path):
    """Which of the kinds above `path` (local or gs://, a hub id already resolved) holds."""
    where = storage.path(path)
    if where.is_file():
        return STATE_DICT_FILE
    if (where / "state").is_dir():
        return CHECKPOINT_STEP
    if (where / run_format.CHECKPOINTS).is_dir():
        return TRAINING_RUN
    if run_format.towers_config_path(path) is not None:
        return TOWERS
    if (where / HF_CONFIG).is_file():
        return HF_EXPORT if (where / HEADS_FILE).is_file() else HF
    what = "holds none of their files" if where.is_dir() else "does not exist"
    raise EntityClipError(f"{path} {what}; pass a training workdir or one of its checkpoints/<step>, a towers "
                          "directory, a Hugging Face CLIPModel directory or hub id (org/name[@revision]), "
                          "or an OpenAI-layout .pt/.safetensors file")


def read_architecture(spec):
    """The CLIPConfig of `spec` from its config files alone, no weights read; None for an
    OpenAI-layout file, whose architecture only its weights tell."""
    path = resolve_checkpoint(spec)
    kind = checkpoint_kind(path)
    if kind == STATE_DICT_FILE:
        return None
    if kind == CHECKPOINT_STEP:
        return run_format.read_towers_config(str(storage.path(path).parent.parent))
    if kind in (TRAINING_RUN, TOWERS):
        return run_format.read_towers_config(path)
    try:
        return CLIPConfig.from_hf(json.loads(storage.path(path).joinpath(HF_CONFIG).read_text()))
    except ValueError as err:
        raise EntityClipError(f"{path}/{HF_CONFIG} is not valid JSON ({err}); download the checkpoint again") from None
    except EntityClipError as err:
        raise EntityClipError(f"{path}/{HF_CONFIG}: {err}") from None


def run_directory(spec):
    """The training workdir whose run files (run_tokenizer.json, ...) describe `spec`: the run
    itself, a step's workdir, or a directory carrying a copy (an export); None for a file."""
    path = storage.absolute(resolve_checkpoint(spec))
    kind = checkpoint_kind(path)
    if kind == STATE_DICT_FILE:
        return None
    return str(storage.path(path).parent.parent) if kind == CHECKPOINT_STEP else path


def load_towers(spec):
    """(CLIPConfig, tower params as host arrays) from any kind above or a hub id."""
    config, towers, _ = _open(spec, with_heads=False)
    return config, towers


def load_towers_and_heads(spec, heads=None):
    """(CLIPConfig, tower params, head params or None), each file read once.

    A training run brings the heads it saved (none in clip_finetune mode). Given `heads`
    (the HeadsConfig the caller will train with), an export-hf directory and an EntityCLIP
    release file bring theirs too, and every kind's heads are checked against it."""
    return _open(spec, with_heads=True, heads=heads)


def _open(spec, with_heads, heads=None):
    path = resolve_checkpoint(spec)
    kind = checkpoint_kind(path)
    if kind in (TRAINING_RUN, CHECKPOINT_STEP):
        return _read_run(storage.absolute(path), kind, with_heads, heads)
    if kind == TOWERS:
        config = run_format.read_towers_config(path)
        ignore_orphaned_callbacks()  # a failed read leaves TensorStore callbacks in flight
        try:
            towers = ocp.StandardCheckpointer().restore(storage.join(storage.absolute(path), "params"))
        except Exception as err:  # noqa: BLE001 -- whatever fails, the parameters cannot be read
            raise EntityClipError(f"the parameters in {path} cannot be read ({describe_failure(err)}); "
                                  "write the towers directory again (import-hf / import-openai)") from None
        return config, towers, None
    with storage.local_copy(path) as local:  # safetensors and torch read local files only
        if kind == STATE_DICT_FILE:
            state_dict = read_openai_checkpoint(local)
            config, towers = openai_to_flax(state_dict, source=path, allow_extra=True)
            if heads is None:
                return config, towers, None
            _, head_weights = split_release_state_dict(state_dict)
            found = release_heads_to_flax(head_weights, heads, config.projection_dim) if head_weights else None
            return config, towers, found
        config, towers = load_hf_checkpoint(local)
        if kind == HF or heads is None:
            return config, towers, None
        return config, towers, load_heads(local, _expected_heads(heads, config))


def _expected_heads(heads, clip_config):
    """The heads tree `heads` (a HeadsConfig) builds at the towers' width, as shapes only."""
    return jax.eval_shape(lambda: init_heads(jax.random.key(0), heads, clip_config.projection_dim))


def _read_run(path, kind, with_heads, heads):
    """A training run's towers (and heads), from its best intact step; a step directory: only it."""
    if kind == CHECKPOINT_STEP:
        workdir, step_dirs = str(storage.path(path).parent.parent), [path]
    else:
        workdir, step_dirs = path, run_format.run_step_dirs(path)
    config = run_format.read_towers_config(workdir)
    subtree = ("params",) if with_heads else ("params", "clip")
    problems = []
    for step_dir in step_dirs:
        try:
            restored = run_format.restore_subtree(step_dir, subtree)
        except DamagedCheckpoint as err:
            problems.append(str(err))
            if step_dir != step_dirs[-1]:
                log.warning("damaged checkpoint %s; trying %s", err, step_dirs[len(problems)])
            continue
        if problems:
            log.warning("using checkpoint %s (the ones tried before it are damaged)", step_dir)
        if not with_heads:
            return config, restored, None
        found = restored.get("heads")
        if found is not None and heads is not None:
            run_format.check_compatible({"heads": found}, {"heads": _expected_heads(heads, config)}, step_dir)
        return config, restored["clip"], found
    if len(step_dirs) == 1:
        raise EntityClipError(f"damaged checkpoint {problems[0]}; use another step or the workdir")
    raise EntityClipError(f"no intact checkpoint in {workdir}: {' | '.join(problems)}")


def save_towers(params, config, out_dir):
    """Writes tower params (Orbax) with their architecture beside them: a TOWERS directory."""
    out_dir = storage.absolute(out_dir)
    if storage.path(out_dir).joinpath("params").exists():
        raise EntityClipError(f"{out_dir} already holds params; choose a new directory")
    storage.path(out_dir).mkdir(parents=True, exist_ok=True)
    ignore_orphaned_callbacks()  # a failed write leaves TensorStore callbacks in flight
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(storage.join(out_dir, "params"), params)
        checkpointer.wait_until_finished()
    except Exception as err:  # noqa: BLE001 -- a full disk, a lost bucket: whatever the storage says
        raise EntityClipError(f"cannot write the towers to {out_dir} ({describe_failure(err)}); free space there "
                              "or choose another directory, and rerun") from None
    storage.write_json_atomic(storage.join(out_dir, run_format.TOWERS_CONFIG), config.to_dict())
    return out_dir
