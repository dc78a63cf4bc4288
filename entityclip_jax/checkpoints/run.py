"""Orbax checkpoints of a training run, and the run's files beside them.

    WORKDIR/towers_config.json    the towers' architecture (a CLIPConfig)
    WORKDIR/train_config.json     the training config in force (history: configs/, run_config.py)
    WORKDIR/checkpoints/<step>/   state (TrainState), data (position in the data stream),
                                  integrity (a checksum of every saved array, integrity.py)

This module owns the Orbax format of a run; towers.py decides what a path a user
gives us is and reads a run's parameters through run_step_dirs and restore_subtree.

Saves are asynchronous (training goes on while the arrays are written). Kept:
the last `keep` steps plus the best one by `best_metric` (METHOD.md's model
selection: the lowest validation VTC loss). Restoring takes an abstract
TrainState whose leaves carry the TARGET shardings, so a checkpoint written on
one mesh loads onto any other mesh or device count, or onto one CPU.

Damage: a step that cannot be read back, whatever fails (missing or cut-short
files, garbled metadata, a codec error, values that differ from their saved
checksums, NaN/Inf), is reported in one line and the step before it is used;
training moves it aside to WORKDIR/damaged_checkpoints/ so its step number can
be saved again. Only an unreadable checkpoints directory is a different error.
"""
import collections
import contextlib
import json
import logging
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from entityclip_jax import storage
from entityclip_jax.checkpoints.integrity import (DamagedCheckpoint, check_checksums, check_values,
                                                  describe_failure, ignore_orphaned_callbacks, value_checksums)
from entityclip_jax.checkpoints.run_config import TRAIN_CONFIG, write_config
from entityclip_jax.errors import EntityClipError
from entityclip_jax.models.clip_config import CLIPConfig
from entityclip_jax.parallel.sharding import path_name

CHECKPOINTS = "checkpoints"
DAMAGED = "damaged_checkpoints"
TOWERS_CONFIG = "towers_config.json"        # the towers' architecture, in a run and in a towers directory
LEGACY_TOWERS_CONFIG = "clip_config.json"   # its name in towers directories written before 0.2
INTEGRITY_VERSION = 1
log = logging.getLogger(__name__)


def _all_processes_agree(ok):
    """True only when every process found its part of the step intact (each reads its own chunks)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def check_writable(workdir):
    """One-line error before any step when WORKDIR or its checkpoints/ cannot be written."""
    for directory in (workdir, storage.join(workdir, CHECKPOINTS)):
        storage.check_writable(directory, "give a --workdir you can write to, or fix its permissions")


def write_run_files(workdir, clip_config, config):
    """The towers' architecture and the training config, written by process 0."""
    if jax.process_index() != 0:
        return
    storage.write_json_atomic(storage.join(workdir, TOWERS_CONFIG), clip_config.to_dict())
    write_config(workdir, config, step=0)


def towers_config_path(directory):
    """The towers' architecture file of a run or towers directory (either name), or None."""
    for name in (TOWERS_CONFIG, LEGACY_TOWERS_CONFIG):
        if storage.path(directory).joinpath(name).is_file():
            return storage.join(directory, name)
    return None


def read_towers_config(directory):
    """The CLIPConfig a run or towers directory keeps beside its parameters."""
    path = towers_config_path(directory)
    if path is None:
        raise EntityClipError(f"{directory} has no {TOWERS_CONFIG}; it is not an `entityclip train` workdir "
                              "or a towers directory")
    try:
        return CLIPConfig.from_dict(json.loads(storage.path(path).read_text()))
    except EntityClipError as err:  # readable, but no architecture the towers can have
        raise EntityClipError(f"{path}: {err}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise EntityClipError(f"{path} is damaged ({type(err).__name__}: {err}); restore it from a copy of "
                              "the run, or start a new --workdir") from None


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


class _OrbaxThreadErrors(logging.Filter):
    """Orbax logs a save that failed in one of its threads (a full disk, a lost bucket) with the
    traceback, then raises the same error to the caller, where Checkpointer.save / wait says it in
    one line: the log record goes."""

    def filter(self, record):
        return not (record.exc_info and record.levelno >= logging.ERROR and "orbax" in record.pathname)


logging.getLogger("absl").addFilter(_OrbaxThreadErrors())


def _handlers():
    # zarr3, Orbax's default since 0.11; checkpoints written as zarr2 still restore.
    return {"state": ocp.PyTreeCheckpointHandler(use_zarr3=True), "data": ocp.JsonCheckpointHandler(),
            "integrity": ocp.JsonCheckpointHandler()}


def _check_optimizer_layout(saved_opt_state, expected_opt_state, where):
    saved = collections.Counter(_shapes(saved_opt_state).values())
    if saved != collections.Counter(_shapes(expected_opt_state).values()):
        raise EntityClipError(f"checkpoint {where} does not fit this config's optimizer state; resume with the "
                              "optimizer settings it was trained with (optimizer.freeze / lr_multipliers change "
                              "the state's layout)")


class Checkpointer:
    """Thin policy layer over ocp.CheckpointManager for TrainState + data position."""

    def __init__(self, workdir, cfg):
        best_metric = cfg.best_metric
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
        ignore_orphaned_callbacks()  # a failed save or restore leaves TensorStore callbacks in flight
        self.workdir = storage.absolute(workdir)
        check_writable(self.workdir)
        self.directory = storage.join(self.workdir, CHECKPOINTS)
        self.manager = ocp.CheckpointManager(self.directory, item_handlers=_handlers(), options=options)

    def latest_step(self):
        return self.manager.latest_step()

    def best_step(self):
        return self.manager.best_step()

    def save(self, step, state, data_position, metrics=None):
        """Starts an (async) save; metrics count for the best checkpoint when they hold best_metric.
        The values' checksums are computed from `state` first (on the devices), saved beside it."""
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        tracked = metrics if self.best_metric and self.best_metric in metrics else None
        integrity = {"version": INTEGRITY_VERSION, "checksums": value_checksums(state)}
        try:
            self.manager.save(int(step), args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_position),
                integrity=ocp.args.JsonSave(integrity)), metrics=tracked, force=True)
        except Exception as err:  # noqa: BLE001 -- a full disk, a lost bucket: whatever the storage says
            raise self._failed_save(err, f"step {step}") from None

    def restore(self, abstract_state, step=None):
        """(state, data position) of `step` (default: latest) laid out as abstract_state's shardings.

        Raises DamagedCheckpoint when the step cannot be read back intact (whatever fails),
        EntityClipError when it was written for another architecture or optimizer."""
        step = self.latest_step() if step is None else step
        where = f"{self.directory}/{step}"
        try:
            saved = self.manager.item_metadata(step)["state"]
        except Exception as err:  # noqa: BLE001 -- any failure to read a step is that step's damage
            raise DamagedCheckpoint(f"{where}: unreadable metadata ({describe_failure(err)})") from None
        if saved is None:
            raise DamagedCheckpoint(f"{where}: its state/ is missing or has no metadata")
        check_compatible(saved["params"], abstract_state.params, where)
        _check_optimizer_layout(saved["opt_state"], abstract_state.opt_state, where)
        problem = None
        wanted = dict(state=ocp.args.PyTreeRestore(
            item=abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
            data=ocp.args.JsonRestore())
        if storage.path(where).joinpath("integrity").is_dir():  # steps saved before 0.2 have none
            wanted["integrity"] = ocp.args.JsonRestore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**wanted))
            check_values(restored["state"], where)
            if "integrity" in wanted:
                check_checksums(restored["state"], restored["integrity"]["checksums"], where)
        except DamagedCheckpoint as err:
            problem = str(err)
        except Exception as err:  # noqa: BLE001 -- any failure to read a step is that step's damage
            problem = f"{where}: {describe_failure(err)}"
        if not _all_processes_agree(problem is None):
            raise DamagedCheckpoint(problem or f"{where}: damaged on another process")
        return restored["state"], restored["data"]

    def restore_latest_intact(self, abstract_state):
        """(state, data position, step) of the newest step that reads back intact.

        Each damaged step is reported in one line; once an intact one is found, the damaged
        steps after it move to WORKDIR/damaged_checkpoints/ (so training can save those step
        numbers again). None intact is an EntityClipError, and nothing is moved."""
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, position = self.restore(abstract_state, step)
            except DamagedCheckpoint as err:
                log.warning("damaged checkpoint %s", err)
                damaged.append(step)
                continue
            if damaged:
                moved = [self._move_aside(bad) for bad in damaged]
                log.warning("resuming from step %d, the newest intact checkpoint; moved the damaged step(s) to %s",
                            step, ", ".join(moved))
            return state, position, step
        raise EntityClipError(
            f"no intact checkpoint in {self.directory} (damaged: steps {', '.join(map(str, damaged))}, each "
            "reported above). Start over in a new --workdir, or restore the checkpoints from a backup")

    def _move_aside(self, step):
        """checkpoints/<step> -> damaged_checkpoints/<step>-<time>, by process 0; every process reloads."""
        target = storage.join(self.workdir, DAMAGED, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0:  # on gs:// a copy then a delete: Orbax sees the step gone only at the end
            storage.move_tree(storage.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"moved damaged checkpoint {step}")
        self.manager.reload()
        return target

    def wait(self):
        """Until the saves in flight are written; one line (EntityClipError) when one failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001 -- as in save: an asynchronous save fails here
            raise self._failed_save(err, "a step") from None

    def _failed_save(self, err, what):
        latest = self.manager.latest_step()
        return EntityClipError(
            f"cannot save {what} to {self.directory} ({describe_failure(err)}); free space there or fix the "
            f"storage, then rerun the same command: it resumes from "
            f"{'step ' + str(latest) if latest is not None else 'the start'}, the last step saved whole")

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


def run_step_dirs(workdir):
    """The step directories of a training run, in the order to try them: its best step by its
    config's metric (else the latest), then the others, newest first."""
    try:
        cfg = json.loads(storage.path(workdir).joinpath(TRAIN_CONFIG).read_text())["checkpoint"]
        with _quiet_absl():  # a read-only manager warns about every option it ignores
            metric = cfg.get("best_metric")
            options = ocp.CheckpointManagerOptions(read_only=True, best_mode=cfg.get("best_mode", "min"),
                                                   best_fn=(lambda metrics: metrics[metric]) if metric else None)
            manager = ocp.CheckpointManager(storage.join(workdir, CHECKPOINTS), item_handlers=_handlers(),
                                            options=options)
            best = manager.best_step()
            steps = sorted(manager.all_steps(), reverse=True)
            manager.close()
    except Exception as err:  # noqa: BLE001 -- the run itself, not one step, cannot be read
        raise EntityClipError(f"cannot read the training run {workdir} ({describe_failure(err)}); check the path "
                              "and your read access to it") from None
    if not steps:
        raise EntityClipError(f"{workdir} holds no finished checkpoint yet")
    if best is not None:  # None: no checkpoint carries the metric
        steps = [best] + [step for step in steps if step != best]
    return [storage.join(workdir, CHECKPOINTS, str(step)) for step in steps]


def restore_subtree(step_dir, subtree):
    """`subtree` of the TrainState saved in step_dir as host numpy arrays, whatever mesh wrote it;
    DamagedCheckpoint if anything about it cannot be read, or its values are not those saved."""
    if not storage.path(step_dir).joinpath("state").is_dir():
        raise DamagedCheckpoint(f"{step_dir}: its state/ is missing")
    ignore_orphaned_callbacks()  # a failed read leaves TensorStore callbacks in flight
    try:
        with _quiet_absl():  # the step's own metadata file is the manager's, not this checkpointer's
            restored = _restore_host_arrays(storage.join(step_dir, "state"), subtree)
            integrity = _read_integrity(step_dir)
    except Exception as err:  # noqa: BLE001 -- any failure to read a step is that step's damage
        raise DamagedCheckpoint(f"{step_dir}: {describe_failure(err)}") from None
    check_values(restored, step_dir)
    if integrity is not None:
        check_checksums(restored, integrity["checksums"], step_dir, prefix="/".join(subtree) + "/")
    return restored


def _restore_host_arrays(state_dir, subtree):
    checkpointer = ocp.PyTreeCheckpointer()
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
    return restored


def _read_integrity(step_dir):
    """The checksums saved with a step, None for a step saved before 0.2 (it has no integrity/)."""
    directory = storage.join(step_dir, "integrity")
    if not storage.path(directory).is_dir():
        return None
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(directory)
