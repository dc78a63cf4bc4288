"""Orbax checkpoints of a training run, and the run's files beside them.

    WORKDIR/towers_config.json    the towers' architecture (a CLIPConfig)
    WORKDIR/train_config.json     the training config in force (history: configs/, run_config.py)
    WORKDIR/checkpoints/<step>/   state (TrainState) + data (position in the data stream)

(Not clip_config.json / config.json: checkpoints.py takes a directory holding
those for a towers directory / a Hugging Face checkpoint.) This module owns the
Orbax format of a run; checkpoints.py decides what a path a user gives us is and
reads a run's parameters through run_step_dirs and restore_subtree below.

Saves are asynchronous (training goes on while the arrays are written). Kept:
the last `keep` steps plus the best one by `best_metric` (METHOD.md's model
selection: the lowest validation VTC loss). Restoring takes an abstract
TrainState whose leaves carry the TARGET shardings, so a checkpoint written on
one mesh loads onto any other mesh or device count, or onto one CPU.

Integrity: every array chunk is written with a CRC-32C that TensorStore checks
on each read (Orbax itself checksums only the zarr3 shard index), and every
restored parameter and optimizer moment must be finite and below MAX_ABS. A
step that fails either check, or whose files are missing or cut short, is
reported in one line and the step before it is used; training moves it aside
to WORKDIR/damaged_checkpoints/ so its step number can be saved again.
"""
import collections
import contextlib
import functools
import json
import logging
import secrets
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint._src.serialization import tensorstore_utils

from entityclip_jax import storage
from entityclip_jax.errors import EntityClipError
from entityclip_jax.models.clip_config import CLIPConfig
from entityclip_jax.train.run_config import TRAIN_CONFIG, write_config
from entityclip_jax.train.sharding import path_name

CHECKPOINTS = "checkpoints"
DAMAGED = "damaged_checkpoints"
CLIP_CONFIG = "towers_config.json"
# No parameter or Adam moment of a sane run comes near this; a flipped exponent bit lands far above it.
MAX_ABS = 1e10
log = logging.getLogger(__name__)


def _with_chunk_checksums(build_zarr3_metadata):
    """Orbax 0.12's zarr3 layout checksums the shard index only and has no option for the
    data; TensorStore's crc32c codec after the chunk codecs covers every chunk's bytes."""
    @functools.wraps(build_zarr3_metadata)
    def build(*args, **kwargs):
        metadata = build_zarr3_metadata(*args, **kwargs)
        for codec in metadata.get("codecs", ()):
            chunk_codecs = codec.get("configuration", {}).get("codecs")
            if codec.get("name") == "sharding_indexed" and {"name": "crc32c"} not in chunk_codecs:
                chunk_codecs.append({"name": "crc32c"})
        return metadata
    build.adds_chunk_checksums = True
    return build


if not getattr(tensorstore_utils._build_zarr3_metadata, "adds_chunk_checksums", False):
    tensorstore_utils._build_zarr3_metadata = _with_chunk_checksums(tensorstore_utils._build_zarr3_metadata)


class DamagedCheckpoint(EntityClipError):
    """A saved step that cannot be read back intact (the message is one line)."""


# What reading a damaged step raises: missing or unreadable files, garbled JSON, and TensorStore's
# DATA_LOSS (checksum) / NOT_FOUND / OUT_OF_RANGE (cut short) statuses, which come as ValueErrors
# that Orbax often wraps in a bare Exception. Anything else is a bug, not damage: it propagates.
_DAMAGE_STATUSES = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE", "Digest mismatch")


def read_problem(err):
    """One line naming the storage error at the root of `err`, or None when it is no such error."""
    causes = []
    while err is not None and len(causes) < 20:
        causes.append(err)
        err = err.__cause__ or err.__context__
    for cause in reversed(causes):
        if isinstance(cause, (OSError, json.JSONDecodeError)) or (
                isinstance(cause, ValueError) and any(status in str(cause) for status in _DAMAGE_STATUSES)):
            text = str(cause).strip().splitlines()
            return f"{type(cause).__name__}: {text[0][:400] if text else ''}"
    return None


@jax.jit
def _peaks(leaves):
    """max |x| per leaf, inf when it holds a NaN or Inf (XLA's max may skip NaN)."""
    return [jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), jnp.inf)) for x in leaves]


def check_values(tree, where):
    """Refuses (DamagedCheckpoint) a tree with a NaN/Inf or |x| > MAX_ABS in any float leaf."""
    named = [(path_name(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
             if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.size]
    on_device = [(name, leaf) for name, leaf in named if isinstance(leaf, jax.Array)]
    on_host = [(name, leaf) for name, leaf in named if not isinstance(leaf, jax.Array)]
    peaks = [float(p) for p in jax.device_get(_peaks([leaf for _, leaf in on_device]))] if on_device else []
    peaks += [float(np.max(np.where(np.isfinite(leaf), np.abs(leaf), np.inf))) for _, leaf in on_host]
    for (name, _), peak in zip(on_device + on_host, peaks):
        if not np.isfinite(peak):
            raise DamagedCheckpoint(f"{where}: {name} holds NaN or Inf")
        if peak > MAX_ABS:
            raise DamagedCheckpoint(f"{where}: {name} holds |x| = {peak:.3g} (> {MAX_ABS:.0e})")


def _all_processes_agree(ok):
    """True only when every process found its part of the step intact (each reads its own chunks)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def check_writable(workdir):
    """One-line error before any step when WORKDIR or its checkpoints/ cannot be written."""
    for directory in (workdir, storage.join(workdir, CHECKPOINTS)):
        try:
            if storage.is_remote(directory):  # no directories there: write and delete one probe object
                probe = storage.path(directory) / f".write-probe-{secrets.token_hex(6)}"
                probe.write_text("")
                probe.unlink()
                continue
            storage.path(directory).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as err:
            raise EntityClipError(f"cannot write to {directory} ({err.strerror or err}); give a --workdir "
                                  "you can write to, or fix its permissions") from None


def write_run_files(workdir, clip_config, config):
    """The towers' architecture and the training config, written by process 0."""
    if jax.process_index() != 0:
        return
    storage.write_json_atomic(storage.join(workdir, CLIP_CONFIG), clip_config.to_dict())
    write_config(workdir, config, step=0)


def read_clip_config(workdir):
    path = storage.path(workdir) / CLIP_CONFIG
    if not path.is_file():
        raise EntityClipError(f"{workdir} has no {CLIP_CONFIG}; it is not an `entityclip train` workdir")
    return CLIPConfig.from_dict(json.loads(path.read_text()))


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
    # zarr3 so that chunks carry the crc32c above; checkpoints written as zarr2 still restore.
    return {"state": ocp.PyTreeCheckpointHandler(use_zarr3=True), "data": ocp.JsonCheckpointHandler()}


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
        self.workdir = storage.absolute(workdir)
        check_writable(self.workdir)
        self.directory = storage.join(self.workdir, CHECKPOINTS)
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
            state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_position)),
            metrics=tracked, force=True)

    def restore(self, abstract_state, step=None):
        """(state, data position) of `step` (default: latest) laid out as abstract_state's shardings.

        Raises DamagedCheckpoint when the step cannot be read back intact, EntityClipError
        when it was written for another architecture or optimizer."""
        step = self.latest_step() if step is None else step
        where = f"{self.directory}/{step}"
        try:
            saved = self.manager.item_metadata(step)["state"]
        except KeyError:  # the manager found no state/ item in the step
            saved = None
        except Exception as err:  # noqa: BLE001 -- read_problem keeps only storage errors
            if read_problem(err) is None:
                raise
            raise DamagedCheckpoint(f"{where}: unreadable metadata ({read_problem(err)})") from None
        if saved is None:
            raise DamagedCheckpoint(f"{where}: its state/ is missing or has no metadata")
        check_compatible(saved["params"], abstract_state.params, where)
        _check_optimizer_layout(saved["opt_state"], abstract_state.opt_state, where)
        problem = None
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=abstract_state, restore_args=ocp.checkpoint_utils
                                             .construct_restore_args(abstract_state)),
                data=ocp.args.JsonRestore()))
            check_values(restored["state"], where)
        except DamagedCheckpoint as err:
            problem = str(err)
        except Exception as err:  # noqa: BLE001 -- read_problem keeps only storage errors
            if read_problem(err) is None:
                raise
            problem = f"{where}: {read_problem(err)}"
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


def run_step_dirs(workdir):
    """The step directories of a training run, in the order to try them: its best step by its
    config's metric (else the latest), then the others, newest first."""
    cfg = json.loads(storage.path(workdir).joinpath(TRAIN_CONFIG).read_text())["checkpoint"]
    metric = cfg.get("best_metric")
    with _quiet_absl():  # a read-only manager warns about every option it ignores
        options = ocp.CheckpointManagerOptions(read_only=True, best_mode=cfg.get("best_mode", "min"),
                                               best_fn=(lambda metrics: metrics[metric]) if metric else None)
        manager = ocp.CheckpointManager(storage.join(workdir, CHECKPOINTS), item_handlers=_handlers(),
                                        options=options)
        best = manager.best_step()
        steps = sorted(manager.all_steps(), reverse=True)
        manager.close()
    if not steps:
        raise EntityClipError(f"{workdir} holds no finished checkpoint yet")
    if best is not None:  # None: no checkpoint carries the metric
        steps = [best] + [step for step in steps if step != best]
    return [storage.join(workdir, CHECKPOINTS, str(step)) for step in steps]


def restore_subtree(step_dir, subtree):
    """`subtree` of the TrainState saved in step_dir as host numpy arrays, whatever mesh wrote it;
    DamagedCheckpoint if unreadable or not finite."""
    state_dir = storage.join(step_dir, "state")
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        with _quiet_absl():  # the step's own metadata file is the manager's, not this checkpointer's
            wanted = checkpointer.metadata(state_dir).item_metadata
            for key in subtree:
                wanted = wanted[key]
            for key in reversed(subtree):
                wanted = {key: wanted}
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
            restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
                item=wanted, restore_args=restore_args, partial_restore=True))
    except Exception as err:  # noqa: BLE001 -- read_problem keeps only storage errors
        if read_problem(err) is None:
            raise
        raise DamagedCheckpoint(f"{step_dir}: {read_problem(err)}") from None
    if restored is None:
        raise DamagedCheckpoint(f"{step_dir}: its state/ has no metadata")
    for key in subtree:
        restored = restored[key]
    check_values(restored, step_dir)
    return restored
