"""Damaged checkpoints never restore silently: flipped bytes anywhere in the stored data
(caught by the checksums of the values saved with each step, checkpoints/integrity.py,
even when the values stay finite; no private Orbax function is patched for it), NaN or
absurd values, truncated or deleted files, garbage metadata. Training falls back to the
step before, in one log line, and moves the damaged step aside; eval/export
(towers.load_towers) fall back too; no intact step left is a clear error."""
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

from entityclip_jax.checkpoints import towers as checkpoints
from entityclip_jax.errors import EntityClipError
from entityclip_jax.checkpoints import run as ckpt
from entityclip_jax.parallel import sharding
from entityclip_jax.parallel.mesh import make_mesh
from entityclip_jax.models.clip_config import PRESETS
from entityclip_jax.train.state import abstract_state, create_train_state, state_specs
from tests._child_process import child_env
from tests._tiny_training import tiny_config

STEPS = (1, 2, 3)

# Orbax's reads still in flight when one fails end in an exception nobody can catch; the CLI's hook
# silences them (ignore_orphaned_callbacks, checked on a real stderr in test_cli_errors), but pytest
# puts its own hook in place of ours and would print each as a page of TensorStore spec, under
# whichever of this file's tests is running when it is collected.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <coroutine object _read_array_index_and_device_put:pytest.PytestUnraisableExceptionWarning")


def small_state(mesh):
    """(TrainState, its abstract target) of a few arrays under the names the checks report:
    a full tiny EntityCLIP state has thousands of leaves and saves slowly."""
    rng = np.random.default_rng(0)
    params = {"clip": {"visual_projection": {"kernel": rng.normal(size=(256, 64)).astype(np.float32)},
                       "logit_scale": np.float32(2.6)},
              "heads": {"itm_head": {"kernel": rng.normal(size=(64, 2)).astype(np.float32)}}}
    tx = optax.adam(1e-3)
    abstract = abstract_state(jax.eval_shape(lambda p: p, params), tx)
    shardings = sharding.to_shardings(state_specs(abstract, mesh, ((".*", "replicate"),), 0), mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return create_train_state(params, tx, shardings), target


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A workdir with checkpoints at steps 1..3 (keep=3) and the host state of each step."""
    workdir = tmp_path_factory.mktemp("run")
    config = tiny_config(**{"checkpoint.keep": 3, "checkpoint.best_metric": ""})
    state, _ = small_state(make_mesh(config.mesh))
    ckpt.write_run_files(workdir, PRESETS["tiny"], config)
    checkpointer = ckpt.Checkpointer(workdir, config.checkpoint)
    advance = jax.jit(lambda s: s.replace(step=s.step + 1, params=jax.tree.map(lambda x: x + 1.0, s.params)))
    states = {}
    for step in STEPS:
        state = advance(state)
        checkpointer.save(step, state, {"step": step})
        states[step] = jax.device_get(state)
    checkpointer.close()
    return workdir, config, states


@pytest.fixture
def run(saved, tmp_path):
    """A fresh copy of the saved workdir for a test to damage."""
    workdir, config, states = saved
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    return copy, config, states


def largest_value(workdir, step, key=""):
    """(data file, offset, length) of the step's largest stored array chunk (of the arrays whose
    name holds `key`, e.g. "params.clip"), read from the OCDBT b-tree with TensorStore itself (the
    data files also hold bytes no key refers to)."""
    state = workdir / "checkpoints" / str(step) / "state"
    base = ts.KvStore.open(f"file://{state}/").result()
    root = ts.ocdbt.dump(base).result()["versions"][-1]["root"]["location"]
    values = []
    for entry in ts.ocdbt.dump(base, root).result()["entries"]:
        if "indirect_value" in entry and key in str(entry.get("key")):  # value:<process dir>:<file>:<offset>:<length>
            _, directory, name, offset, length = entry["indirect_value"].split(":")
            values.append((str(state / directory / name), int(offset), int(length)))
    return max(values, key=lambda value: value[2])


def flip(workdir, step, where=0.5, count=1, mask=1, key=""):
    """XORs `count` bytes of the step's largest stored chunk (of arrays named with `key`) with `mask`, from
    `where` (a fraction of it) on; the default flips one low bit mid-chunk: the float stays finite and near
    its value."""
    path, offset, length = largest_value(workdir, step, key)
    data = bytearray(open(path, "rb").read())
    start = offset + min(int(length * where), length - count)
    for i in range(start, start + count):
        data[i] ^= mask
    open(path, "wb").write(bytes(data))


def flip_low_bit(workdir, step):
    flip(workdir, step)


def truncate(workdir, step):
    path, offset, length = largest_value(workdir, step)
    os.truncate(path, offset + length // 2)


def target(config):
    return small_state(make_mesh(config.mesh))[1]


def resume(workdir, config):
    checkpointer = ckpt.Checkpointer(workdir, config.checkpoint)
    try:
        return checkpointer.restore_latest_intact(target(config))
    finally:
        checkpointer.close()


def assert_state(state, expected):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), expected)


def garbage(path):
    path.write_bytes(b"\x00garbage{not json")


DAMAGE = {
    "flip_low_bit_mid_chunk": lambda w: flip(w, 3),
    "flip_first_byte": lambda w: flip(w, 3, where=0.0, mask=0xFF),   # a codec header: the read fails
    "flip_last_byte": lambda w: flip(w, 3, where=1.0, mask=0x80),
    "flip_16_bytes": lambda w: flip(w, 3, where=0.25, count=16, mask=0x5A),
    "truncate_chunk": lambda w: truncate(w, 3),
    "truncate_to_zero": lambda w: os.truncate(largest_value(w, 3)[0], 0),
    "delete_data_file": lambda w: os.remove(largest_value(w, 3)[0]),
    "delete_state": lambda w: shutil.rmtree(w / "checkpoints" / "3" / "state"),
    "garbage_state_metadata": lambda w: garbage(w / "checkpoints" / "3" / "state" / "_METADATA"),
    "garbage_manifest": lambda w: garbage(w / "checkpoints" / "3" / "state" / "manifest.ocdbt"),
    "garbage_data_position": lambda w: garbage(w / "checkpoints" / "3" / "data" / "metadata"),
    "garbage_checksums": lambda w: garbage(w / "checkpoints" / "3" / "integrity" / "metadata"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_falls_back_to_the_step_before_a_damaged_one(run, damage, caplog):
    workdir, config, states = run
    DAMAGE[damage](workdir)
    with caplog.at_level(logging.WARNING, logger=ckpt.__name__):
        state, position, step = resume(workdir, config)
    assert step == 2 and position == {"step": 2}
    assert_state(state, states[2])
    damaged = [r.getMessage() for r in caplog.records if "damaged checkpoint" in r.getMessage()]
    assert len(damaged) == 1 and "\n" not in damaged[0] and "/checkpoints/3: " in damaged[0], damaged
    assert any("resuming from step 2, the newest intact" in r.getMessage() for r in caplog.records)
    # moved aside, so the rerun starts from step 2 without a word and step 3 can be saved again
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
    assert [name.split("-")[0] for name in os.listdir(workdir / ckpt.DAMAGED)] == ["3"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=ckpt.__name__):
        assert resume(workdir, config)[2] == 2
    assert not caplog.records


@pytest.mark.parametrize("value", [np.nan, np.inf, 1e37])
def test_values_that_no_run_holds_are_damage(run, value):
    """Written with valid checksums (a bug or a bad disk before the write), still refused."""
    workdir, config, states = run
    restore_to = target(config)
    def poison(path, leaf, target_leaf):  # the optimizer moments are checked too, not only the parameters
        leaf = np.array(leaf)
        if sharding.path_name(path).endswith("mu/clip/visual_projection/kernel"):
            leaf[0, 0] = value
        return jax.device_put(leaf, target_leaf.sharding)
    bad = jax.tree_util.tree_map_with_path(poison, states[3], restore_to)
    checkpointer = ckpt.Checkpointer(workdir, config.checkpoint)
    checkpointer.save(4, bad, {"step": 4})
    checkpointer.close()
    checkpointer = ckpt.Checkpointer(workdir, config.checkpoint)
    with pytest.raises(ckpt.DamagedCheckpoint, match="mu/clip/visual_projection/kernel holds"):
        checkpointer.restore(restore_to, 4)
    checkpointer.close()
    assert resume(workdir, config)[2] == 3


def test_no_intact_step_is_a_clear_error(run):
    workdir, config, _ = run
    for step in STEPS:
        flip_low_bit(workdir, step)
    with pytest.raises(EntityClipError, match=r"no intact checkpoint in .*damaged: steps 3, 2, 1, each"):
        resume(workdir, config)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2", "3"]  # nothing moved


@pytest.mark.parametrize("damage", sorted(set(DAMAGE) - {"garbage_data_position"}))  # readers skip data/
@pytest.mark.parametrize("reader", ["load_towers", "load_towers_and_heads"])  # eval and search | export-hf
def test_readers_skip_a_damaged_step(run, damage, reader, caplog):
    workdir, _, states = run
    DAMAGE[damage](workdir)
    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        towers = getattr(checkpoints, reader)(str(workdir))[1]
    jax.tree.map(np.testing.assert_array_equal, towers, states[2].params["clip"])
    assert any("damaged checkpoint" in r.getMessage() and "checkpoints/3" in r.getMessage() for r in caplog.records)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2", "3"]  # readers move nothing
    with pytest.raises(EntityClipError, match=r"checkpoints/3"):  # the step alone: nothing to fall back to
        checkpoints.load_towers(str(workdir / "checkpoints" / "3"))


def test_all_steps_damaged_for_load_towers(run):
    workdir, _, _ = run
    for step in STEPS:
        truncate(workdir, step)
    with pytest.raises(EntityClipError, match="no intact checkpoint in"):
        checkpoints.load_towers(str(workdir))


def test_unwritable_workdir_fails_before_anything(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    config = tiny_config()
    with pytest.raises(EntityClipError, match=r"cannot write to .*a_file/run"):
        ckpt.Checkpointer(blocker / "run", config.checkpoint)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ckpt.CHECKPOINTS).write_text("")  # a file where the checkpoints directory goes
    with pytest.raises(EntityClipError, match=r"cannot write to .*run/checkpoints"):
        ckpt.Checkpointer(tmp_path / "run", config.checkpoint)


def test_any_failure_to_read_a_step_is_that_steps_damage(run, monkeypatch, caplog):
    """Whatever a reader raises, with whatever text (a status no list of names foresees): the
    step cannot be read, so it is damaged and the step before it is used."""
    workdir, config, states = run
    checkpointer = ckpt.Checkpointer(workdir, config.checkpoint)
    restore = checkpointer.manager.restore

    def failing_for_step_3(step, *args, **kwargs):
        if step == 3:
            raise RuntimeError("FAILED_PRECONDITION: ZSTD_decompressStream() failed\nsecond line")
        return restore(step, *args, **kwargs)
    monkeypatch.setattr(checkpointer.manager, "restore", failing_for_step_3)
    with caplog.at_level(logging.WARNING, logger=ckpt.__name__):
        state, _, step = checkpointer.restore_latest_intact(target(config))
    checkpointer.close()
    assert step == 2
    assert_state(state, states[2])
    assert any("checkpoints/3: RuntimeError: FAILED_PRECONDITION: ZSTD_decompressStream() failed" in r.getMessage()
               and "second line" not in r.getMessage() for r in caplog.records)


def test_checkpoints_written_before_the_checksums_still_restore(tmp_path):
    """Steps saved as zarr2 by StandardCheckpointHandler, without checksums (before 0.2), resume and load."""
    config = tiny_config()
    state, restore_to = small_state(make_mesh(config.mesh))
    ckpt.write_run_files(tmp_path, PRESETS["tiny"], config)
    old = ocp.CheckpointManager(tmp_path / "checkpoints", item_handlers={
        "state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})
    old.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"step": 5})))
    old.close()
    checkpointer = ckpt.Checkpointer(tmp_path, config.checkpoint)
    restored, position, step = checkpointer.restore_latest_intact(restore_to)
    checkpointer.close()
    assert (step, position) == (5, {"step": 5})
    assert_state(restored, jax.device_get(state))
    _, towers = checkpoints.load_towers(str(tmp_path))
    np.testing.assert_array_equal(towers["visual_projection"]["kernel"],
                                  jax.device_get(state.params["clip"]["visual_projection"]["kernel"]))


ORPHANED_TASKS = """
import asyncio, sys
from entityclip_jax.checkpoints import integrity
integrity.ignore_orphaned_callbacks()
sys.path.insert(0, sys.argv[1])
import serialization  # stands for Orbax's: its file is in a folder named orbax

async def someone_elses():
    raise ValueError("a failure of somebody else's task")

async def start():  # nobody awaits what this starts
    asyncio.create_task(serialization.write())
    asyncio.create_task(someone_elses())
    asyncio.gather(serialization.write())

loop = asyncio.new_event_loop()
loop.run_until_complete(start())
loop.run_until_complete(asyncio.sleep(0.01))
print("done", flush=True)
"""  # asyncio logs an unretrieved exception when its task or future is collected: here at exit


def test_orbax_tasks_failing_after_the_reported_failure_log_nothing(tmp_path):
    """A full disk fails every write of a step: Orbax raises the first, the others are never awaited,
    and asyncio logs each with a traceback (a Task's or a gather's) when it is collected: seen after
    the one-line error of test_cli_errors' full-disk row. Only errors raised in Orbax's code are dropped."""
    (tmp_path / "orbax").mkdir()
    (tmp_path / "orbax" / "serialization.py").write_text(
        'async def write():\n    raise ValueError("RESOURCE_EXHAUSTED: No space left on device")\n')
    done = subprocess.run([sys.executable, "-c", ORPHANED_TASKS, str(tmp_path / "orbax")], capture_output=True,
                          text=True, timeout=120, env=child_env())
    assert done.returncode == 0 and done.stdout == "done\n", done.stderr[-3000:]
    assert done.stderr.count("exception was never retrieved") == 1, done.stderr[-3000:]
    assert "someone_elses" in done.stderr and "No space left" not in done.stderr, done.stderr[-3000:]
