"""One owner per workdir (train/lease.py): a second trainer on a live workdir is refused in one
line naming the owner, before it writes anything; a crashed run's lease does not block the rerun.
Locally (an flock: the kernel releases it when the owner dies) and on the Cloud Storage emulator
(generation preconditions, renewal, a stale lease taken over, exactly one winner of a race)."""
import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from entityclip_jax import cli
from entityclip_jax.errors import EntityClipError
from entityclip_jax.train import lease, loop
from tests import gcs_emulator
from tests._child_process import child_env

ROOT = pathlib.Path(__file__).parents[1]
CONFIG = str(ROOT / "configs" / "tiny_cpu.py")


def test_a_live_local_lease_is_refused_naming_its_owner_then_taken_once_released(tmp_path):
    first = lease.WorkdirLease(tmp_path).take()
    with pytest.raises(EntityClipError, match=rf"{tmp_path} is in use by another `entityclip train` "
                                              rf"\(host .*, pid {os.getpid()}, started .*stop that run first"):
        lease.WorkdirLease(tmp_path).take()
    first.check()  # a local lock cannot be lost
    first.release()
    lease.WorkdirLease(tmp_path).take().release()


HOLD = r'''
import sys, time
from entityclip_jax.train import lease, loop
owner = lease.WorkdirLease(sys.argv[1]).take()
print("held", flush=True)
time.sleep(600)
'''


def test_a_killed_owner_does_not_block_the_rerun(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                             env=child_env())
    try:
        assert owner.stdout.readline().strip() == "held"
        with pytest.raises(EntityClipError, match=f"pid {owner.pid},"):
            lease.WorkdirLease(tmp_path).take()
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    lease.WorkdirLease(tmp_path).take().release()  # at once: the kernel dropped the dead run's lock


def test_a_second_train_is_refused_before_it_writes_anything(tmp_path, capsys, monkeypatch):
    """The second trainer used to delete the first run's unfinished checkpoint folder: now it stops
    at the lease, before any Checkpointer exists, and the folder and every file stay as they were."""
    monkeypatch.setattr(loop, "_check_data_fits", lambda config, workdir: True)  # these only read: no records needed
    monkeypatch.setattr(loop.input_stream, "steps_per_epoch", lambda config, processes: 10)
    monkeypatch.setattr(loop.run_format, "Checkpointer", lambda *a: pytest.fail("a Checkpointer was made"))
    unfinished = tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1765000000"
    (unfinished / "state").mkdir(parents=True)
    (unfinished / "state" / "part").write_bytes(b"being written by the first run")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    owner = lease.WorkdirLease(tmp_path).take()
    try:
        code = cli.main(["train", "--config", CONFIG, "--workdir", str(tmp_path),
                         "--config.data.dir=/nonexistent/records"])
    finally:
        owner.release()
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"entityclip train: error: {tmp_path} is in use by another `entityclip train` (host ")
    assert f"pid {os.getpid()}" in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before + [pathlib.Path(lease.LEASE_FILE)]
    assert (unfinished / "state" / "part").read_bytes() == b"being written by the first run"


ON_GCS = r'''
import json, sys, threading, time, logging
from entityclip_jax import storage
from entityclip_jax.errors import EntityClipError
from entityclip_jax.train import lease, loop
workdir = sys.argv[1]
out = {}

def refusal(**timing):
    try:
        lease.WorkdirLease(workdir, **timing).take().release()
    except EntityClipError as err:
        return str(err)
    return None

# taken; a second one refused naming the owner; released: taken at once
a = lease.WorkdirLease(workdir, renew_seconds=0.2, stale_seconds=1.5).take()
time.sleep(2.0)                                   # renewed meanwhile: still live after stale_seconds
out["live_refusal"] = refusal(stale_seconds=1.5)
a.check()
a.release()
out["after_release"] = refusal()
out["released_record"] = json.loads(storage.read_object(storage.join(workdir, lease.LEASE_FILE))[0])

# an owner that stopped renewing (a dead run): stale after stale_seconds, taken over; the old owner finds out
dead = lease.WorkdirLease(workdir, renew_seconds=3600, stale_seconds=1.0).take()
out["refused_while_fresh"] = refusal(stale_seconds=1.0) is not None
time.sleep(1.5)
newcomer = lease.WorkdirLease(workdir, renew_seconds=3600, stale_seconds=1.0).take()
try:
    dead.check()
    out["lost"] = None
except EntityClipError as err:
    out["lost"] = str(err)
dead.release()                                     # must not release the newcomer's lease
out["newcomer_kept"] = refusal(stale_seconds=1.0) is not None
newcomer.release()

# an owner killed on this machine (kill -9: no release): its lease is taken at once, not after stale_seconds
import signal, subprocess
holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom entityclip_jax.train import lease\n"
                           "held = lease.WorkdirLease(sys.argv[1], renew_seconds=3600).take()\nprint('held', flush=True)\n"
                           "time.sleep(600)", workdir], stdout=subprocess.PIPE, text=True)
assert holder.stdout.readline().strip() == "held"
out["live_holder_refused"] = refusal(stale_seconds=3600) is not None
holder.send_signal(signal.SIGKILL)
holder.wait()
out["dead_owner_refusal"] = refusal(stale_seconds=3600)
gone = holder.pid
elsewhere = lease.WorkdirLease(workdir, renew_seconds=3600, stale_seconds=3600)
elsewhere.me.update(pid=gone, process_space="another-machine")  # a dead pid, but of another machine
gen = storage.read_object(storage.join(workdir, lease.LEASE_FILE))[1]
storage.write_object_if(storage.join(workdir, lease.LEASE_FILE), elsewhere._record(), gen)
out["other_machine_refused"] = refusal(stale_seconds=3600) is not None   # its pid means nothing here: wait
gen = storage.read_object(storage.join(workdir, lease.LEASE_FILE))[1]
storage.write_object_if(storage.join(workdir, lease.LEASE_FILE), elsewhere._record(released=1.0), gen)

# a race for a free lease: exactly one of eight wins
results, barrier = [], threading.Barrier(8)
def contender():
    candidate = lease.WorkdirLease(workdir, renew_seconds=3600)
    barrier.wait()
    try:
        candidate.take()
        results.append(candidate)
    except EntityClipError:
        results.append(None)
threads = [threading.Thread(target=contender) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
out["winners"] = sum(r is not None for r in results)
for r in results:
    if r is not None: r.release()

# a bucket that does not exist: one line, not the client's traceback
try:
    lease.WorkdirLease("gs://no-such-bucket/run").take()
    out["missing_bucket"] = None
except EntityClipError as err:
    out["missing_bucket"] = str(err)
print(json.dumps(out))
'''


def test_lease_on_the_gcs_emulator(tmp_path):
    with gcs_emulator.running(tmp_path) as emulator:
        emulator.make_bucket("leases")
        done = subprocess.run([sys.executable, "-c", ON_GCS, "gs://leases/run1"], capture_output=True, text=True,
                              timeout=120, env=child_env(**emulator.env))
        assert done.returncode == 0, done.stderr[-3000:]
        objects = emulator.objects("leases")
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["live_refusal"].startswith("gs://leases/run1 is in use by another `entityclip train` (host ")
    assert "renewed 0 s ago" in out["live_refusal"] and "counts as stale 2 s after its last renewal" in out["live_refusal"]
    assert "\n" not in out["live_refusal"]
    assert out["after_release"] is None and "released" in out["released_record"]
    assert out["refused_while_fresh"] and out["newcomer_kept"]
    assert out["lost"].startswith("lost the workdir lease gs://leases/run1/train_lease.json to another run")
    assert "took over the stale workdir lease of host" in done.stderr
    assert out["live_holder_refused"] and out["dead_owner_refusal"] is None and out["other_machine_refused"]
    assert out["winners"] == 1
    assert objects == ["run1/train_lease.json"]
    assert out["missing_bucket"] == ("cannot write to gs://no-such-bucket/run (bucket no-such-bucket does not exist, "
                                     "or you may not see it); give a --workdir you can write to, or fix its permissions")
