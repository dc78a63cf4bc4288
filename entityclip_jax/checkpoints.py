"""Open whatever a checkpoint path holds: the one place that decides what a path is.

A user names weights in one of these ways (local, gs:// or a Hugging Face hub id,
see hub.py), and checkpoint_kind tells them apart:

  TRAINING_RUN     an `entityclip train` workdir (checkpoints/ + run files): its best
                   step by its metric, else the latest; a damaged step falls back to
                   the next one (train/checkpoint.py owns that Orbax format)
  CHECKPOINT_STEP  one step of a run, WORKDIR/checkpoints/<step> (state/): only it
  TOWERS           a towers directory written by save_towers (clip_config.json + Orbax params)
  HF               a Hugging Face CLIPModel directory (config.json + weights)
  HF_EXPORT        an `entityclip export-hf` directory: HF plus the experts, gates and
                   ITM head (entityclip_heads.safetensors) to resume training from
  STATE_DICT_FILE  an OpenAI-layout .pt/.pth/.bin/.safetensors file (OpenAI's CLIP, or
                   the EntityCLIP release, which also holds the heads)

load_towers is what eval, search and classify read (the plain CLIP towers);
load_towers_and_heads is what export and training's model.init read; init_entityclip
turns config.model.init ("random:PRESET" or any of the above) into a model and its
parameters. Everything comes back as host arrays, whatever mesh wrote it.
"""
import dataclasses
import json
import logging

import jax
import orbax.checkpoint as ocp

from entityclip_jax import storage
from entityclip_jax.config import PRETRAINED_BY_PRESET, heads_config, model_from_config, random_preset
from entityclip_jax.convert.heads_file import HEADS_FILE, load_heads
from entityclip_jax.convert.hf import load_hf_checkpoint
from entityclip_jax.convert.openai import openai_to_flax, read_openai_checkpoint
from entityclip_jax.convert.release import release_heads_to_flax, split_release_state_dict
from entityclip_jax.errors import EntityClipError
from entityclip_jax.hub import resolve_checkpoint
from entityclip_jax.models.clip import init_params
from entityclip_jax.models.clip_config import PRESETS, CLIPConfig
from entityclip_jax.models.heads import init_heads
from entityclip_jax.train import checkpoint as run_format

TRAINING_RUN = "training run"
CHECKPOINT_STEP = "checkpoint step"
TOWERS = "towers directory"
HF = "Hugging Face CLIPModel directory"
HF_EXPORT = "export-hf directory"
STATE_DICT_FILE = "OpenAI-layout file"

TOWERS_CONFIG = "clip_config.json"  # a towers directory's architecture (a run keeps its own: towers_config.json)
HF_CONFIG = "config.json"
log = logging.getLogger(__name__)


def checkpoint_kind(path):
    """Which of the kinds above `path` (local or gs://, a hub id already resolved) holds."""
    where = storage.path(path)
    if where.is_file():
        return STATE_DICT_FILE
    if (where / TOWERS_CONFIG).is_file():
        return TOWERS
    if (where / HF_CONFIG).is_file():
        return HF_EXPORT if (where / HEADS_FILE).is_file() else HF
    if (where / "state").is_dir():
        return CHECKPOINT_STEP
    if (where / run_format.CHECKPOINTS).is_dir():
        return TRAINING_RUN
    what = "holds none of their files" if where.is_dir() else "does not exist"
    raise EntityClipError(f"{path} {what}; pass a training workdir or one of its checkpoints/<step>, a towers "
                          "directory, a Hugging Face CLIPModel directory or hub id (org/name[@revision]), "
                          "or an OpenAI-layout .pt/.safetensors file")


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
        config = CLIPConfig.from_dict(json.loads(storage.path(path).joinpath(TOWERS_CONFIG).read_text()))
        towers = ocp.StandardCheckpointer().restore(storage.join(storage.absolute(path), "params"))
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
    config = run_format.read_clip_config(workdir)
    subtree = ("params",) if with_heads else ("params", "clip")
    problems = []
    for step_dir in step_dirs:
        try:
            restored = run_format.restore_subtree(step_dir, subtree)
        except run_format.DamagedCheckpoint as err:
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
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(storage.join(out_dir, "params"), params)
    checkpointer.wait_until_finished()
    storage.write_json_atomic(storage.join(out_dir, TOWERS_CONFIG), config.to_dict())
    return out_dir


def describe_init(init):
    """One line saying where the towers start from (a training run's first log line)."""
    name = random_preset(init)
    if name is not None:
        return (f"towers: RANDOM weights ({init}), not pretrained: every weight is learned from this data; "
                f"set model.init to a checkpoint or hub id (e.g. {PRETRAINED_BY_PRESET.get(name, 'org/name')}) "
                "to fine-tune pretrained towers")
    return f"towers: pretrained, from {init}"


def tower_source(config):
    """What config.model.init brings: (CLIPConfig, tower params or None, head params or None).

    "random:PRESET" gives only an architecture, to initialise randomly; anything else is
    read once (load_towers_and_heads), its heads too in EntityCLIP mode: a training run's,
    an export-hf directory's or an EntityCLIP release checkpoint's (the authors' code), so
    a trained model continues here."""
    overrides = {k: config.model[k] for k in ("vocab_size", "eos_token_id") if config.model.get(k) is not None}
    name = random_preset(config.model.init)
    if name is not None:
        clip = PRESETS[name]
        return dataclasses.replace(clip, text=dataclasses.replace(clip.text, **overrides)), None, None
    if overrides:
        raise EntityClipError(f"model.vocab_size / model.eos_token_id apply to random towers only; "
                              f"{config.model.init!r} brings its own text config: drop those overrides")
    if config.model.mode != "entityclip":
        return (*load_towers(config.model.init), None)
    return load_towers_and_heads(config.model.init, heads_config(config))


def init_entityclip(rng, config):
    """(EntityCLIP, params) for a training config: towers from config.model.init, heads from it
    too when it brings them (tower_source), else freshly initialised as the release does."""
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
