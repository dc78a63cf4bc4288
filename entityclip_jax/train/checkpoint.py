"""Orbax checkpoints of a training run, and the run's files beside them.

    WORKDIR/towers_config.json    the towers' architecture (a CLIPConfig)
    WORKDIR/train_config.json     the training config the run started with
    WORKDIR/checkpoints/<step>/   state (TrainState) + data (position in the data stream)

(Not clip_config.json / config.json: models/loading.py takes a directory holding
those for a towers directory / a Hugging Face checkpoint.)

Saves are asynchronous (training goes on while the arrays are written). Kept:
the last `keep` steps plus the best one by `best_metric` (METHOD.md's model
selection: the lowest validation VTC loss). Restoring takes an abstract
TrainState whose leaves carry the TARGET shardings, so a checkpoint written on
one mesh loads onto any other mesh or device count, or onto one CPU.
"""
import contextlib
import json
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from entityclip_jax.errors import EntityClipError
from entityclip_jax.train.sharding import path_name

CHECKPOINTS = "checkpoints"
CLIP_CONFIG = "towers_config.json"
TRAIN_CONFIG = "train_config.json"


def write_run_files(workdir, clip_config, config):
    """The towers' architecture and the training config, written by process 0."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CLIP_CONFIG), "w") as f:
        json.dump(clip_config.to_dict(), f, indent=2)
    with open(os.path.join(workdir, TRAIN_CONFIG), "w") as f:
        f.write(config.to_json(indent=2))


def read_clip_config(workdir):
    from entityclip_jax.models.clip_config import CLIPConfig
    path = os.path.join(workdir, CLIP_CONFIG)
    if not os.path.isfile(path):
        raise EntityClipError(f"{workdir} has no {CLIP_CONFIG}; it is not an `entityclip train` workdir")
    with open(path) as f:
        return CLIPConfig.from_dict(json.load(f))


def _shapes(tree):
    return {path_name(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(leaf, "shape")}


def check_compatible(saved_params, expected_params, where):
    """Refuse a checkpoint whose parameters differ from what the config builds, naming them."""
    saved, expected = _shapes(saved_params), _shapes(expected_params)
    describe = lambda shapes, name: f"shape {shapes[name]}" if name in shapes else "absent"  # noqa: E731
    differences = [f"{name} ({describe(saved, name)} there, {describe(expected, name)} here)"
                   for name in sorted(set(saved) | set(expected)) if saved.get(name) != expected.get(name)]
    if differences:
        more = f" and {len(differences) - 5} more" if len(differences) > 5 else ""
        raise EntityClipError(
            f"checkpoint {where} does not fit this config; parameters that differ: {'; '.join(differences[:5])}"
            f"{more}. Train in a new --workdir or use the config the checkpoint was trained with")


def _handlers():
    return {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}


class Checkpointer:
    """Thin policy layer over ocp.CheckpointManager for TrainState + data position."""

    def __init__(self, workdir, cfg):
        best_metric = cfg.best_metric
        if cfg.best_mode not in ("min", "max"):
            raise EntityClipError(f"checkpoint.best_mode must be 'min' or 'max', got {cfg.best_mode!r}")
        get_metric = lambda metrics: metrics[best_metric]  # noqa: E731
        policies = [ocp.checkpoint_managers.LatestN(n=int(cfg.keep))]
        if best_metric:
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=get_metric, reverse=cfg.best_mode == "min", n=1,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=bool(cfg.async_save), create=True,
            best_fn=get_metric if best_metric else None, best_mode=cfg.best_mode,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies))
        self.best_metric = best_metric
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
        self.manager = ocp.CheckpointManager(self.directory, item_handlers=_handlers(), options=options)

    def latest_step(self):
        return self.manager.latest_step()

    def best_step(self):
        return self.manager.best_step()

    def save(self, step, state, data_position, metrics=None):
        """Starts an (async) save; metrics count for the best checkpoint when they hold best_metric."""
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        tracked = metrics if self.best_metric and self.best_metric in metrics else None
        self.manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)),
            metrics=tracked, force=True)

    def restore(self, abstract_state, step=None):
        """(state, data position) of `step` (default: latest) laid out as abstract_state's shardings."""
        step = self.latest_step() if step is None else step
        saved = self.manager.item_metadata(step)["state"]
        check_compatible(saved["params"], abstract_state.params, f"{self.directory}/{step}")
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except (ValueError, KeyError) as err:
            raise EntityClipError(f"checkpoint {self.directory}/{step} does not fit this config's optimizer "
                                  f"state ({err}); resume with the optimizer settings it was trained with "
                                  "(optimizer.freeze / lr_multipliers change the state's layout)") from None
        return restored["state"], restored["data"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


@contextlib.contextmanager
def _quiet_absl():
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _step_dir(path):
    """(workdir, step directory) for a workdir (best step by its config's metric, else latest)
    or a step directory."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "state")):
        return os.path.dirname(os.path.dirname(path)), path
    if not os.path.isdir(os.path.join(path, CHECKPOINTS)):
        raise EntityClipError(f"{path} is neither a training workdir (with {CHECKPOINTS}/) nor a checkpoint step "
                              "directory (with state/)")
    with open(os.path.join(path, TRAIN_CONFIG)) as f:
        cfg = json.load(f)["checkpoint"]
    metric = cfg.get("best_metric")
    with _quiet_absl():  # a read-only manager warns about every option it ignores
        options = ocp.CheckpointManagerOptions(read_only=True, best_mode=cfg.get("best_mode", "min"),
                                               best_fn=(lambda metrics: metrics[metric]) if metric else None)
        manager = ocp.CheckpointManager(os.path.join(path, CHECKPOINTS), item_handlers=_handlers(),
                                        options=options)
        step = manager.best_step()
        if step is None:  # no checkpoint carries the metric
            step = manager.latest_step()
        manager.close()
    if step is None:
        raise EntityClipError(f"{path} holds no finished checkpoint yet")
    return path, os.path.join(path, CHECKPOINTS, str(step))


def restore_params(path, subtree=("params",)):
    """(CLIPConfig, params as host numpy arrays) from a workdir or a checkpoint step dir.

    A workdir gives its best checkpoint by the tracked metric, else the latest.
    Only `subtree` of the saved TrainState is read, onto the host, whatever mesh
    wrote it: {"clip": towers, "heads": experts, gates and ITM head (EntityCLIP mode)}.
    """
    workdir, step_dir = _step_dir(path)
    clip_config = read_clip_config(workdir)
    state_dir = os.path.join(step_dir, "state")
    checkpointer = ocp.PyTreeCheckpointer()
    with _quiet_absl():  # the step's own metadata file is the manager's, not this checkpointer's
        wanted = checkpointer.metadata(state_dir).item_metadata
        for key in subtree:
            wanted = wanted[key]
        for key in reversed(subtree):
            wanted = {key: wanted}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
            item=wanted, restore_args=restore_args, partial_restore=True))
    for key in subtree:
        restored = restored[key]
    return clip_config, restored


def restore_towers(path):
    """(CLIPConfig, tower params as host numpy arrays): what models/loading.load_towers returns."""
    return restore_params(path, ("params", "clip"))
