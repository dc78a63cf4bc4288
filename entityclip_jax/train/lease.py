"""One owner per workdir: the lease `entityclip train` holds on WORKDIR/train_lease.json.

Two trainers on one workdir (a relaunch while the old job still runs, two pods started with
the same run name) would both write checkpoints, and each one's Orbax start-up deletes the
other's unfinished step. So process 0 takes the lease before anything is written (the other
processes of a pod learn from it whether it did) and a live lease held by another run is
refused in one line naming its owner: host, process id, start and last renewal.

Local disk: the file is held with an flock (storage.lock_file) for the life of the run. The
kernel drops the lock when the run ends or dies, kill -9 included, so a crashed run never
blocks its rerun and nothing has to be renewed. (A workdir on NFS is exclusive across
machines only where the server supports locks.)

Object storage (gs://) has no locks. The lease is a JSON object that is only ever written
under a generation precondition (storage.write_object_if, one atomic request): taken when
there is none or it was released; renewed every `renew_seconds` by a background thread; taken
over from another owner only when stale, i.e. not renewed for `stale_seconds` (its run died
without releasing it: kill -9, a VM lost without notice), or at once when its owner ran on
this very machine (the same boot and process namespace) and its process is gone. Each write names the generation it
replaces, so of two trainers racing for the lease exactly one wins, and an owner whose stale
lease was taken over finds out at its next renewal or checkpoint, whichever comes first, and
stops without saving. Staleness compares the owner's renewal time with this machine's clock:
two machines whose clocks differ by more than stale_seconds - renew_seconds (GCE's are
NTP-synchronised to milliseconds) could take a live lease.
"""
import contextlib
import datetime
import json
import logging
import os
import secrets
import socket
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from entityclip_jax import storage
from entityclip_jax.errors import EntityClipError

LEASE_FILE = "train_lease.json"
RENEW_SECONDS = 60.0
STALE_SECONDS = 300.0  # 5 renewals missed: the owner is dead (a re-created TPU VM takes longer to come back)
log = logging.getLogger(__name__)


def _now():
    return time.time()


def _when(seconds):
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe_owner(owner, now=None):
    """'host H, pid P, started ..., renewed N s ago' of a lease's JSON (what a refusal names)."""
    if not isinstance(owner, dict):
        return "an unreadable owner"
    words = f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}"
    try:  # a lease file edited by hand names what it can
        if "started" in owner:
            words += f", started {_when(float(owner['started']))}"
        if "renewed" in owner and now is not None:
            words += f", renewed {max(0.0, now - float(owner['renewed'])):.0f} s ago"
    except (TypeError, ValueError, OverflowError, OSError):
        pass
    return words


class WorkdirLease:
    """The lease on one workdir: take() it, check() it before each save, release() it at the end."""

    def __init__(self, workdir, renew_seconds=RENEW_SECONDS, stale_seconds=STALE_SECONDS):
        self.path = storage.join(workdir, LEASE_FILE)
        self.remote = storage.is_remote(self.path)
        self.renew_seconds, self.stale_seconds = renew_seconds, stale_seconds
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now(),
                   "token": secrets.token_hex(8), "process_space": _process_space()}
        self._handle = None       # local: the locked file
        self._generation = None   # gs://: the generation of our last write
        self._lost = None         # gs://: why the lease is no longer ours
        self._stop = threading.Event()
        self._renewer = None

    # ---- taking it

    def take(self):
        """Makes this process the workdir's owner, or raises EntityClipError naming the live one."""
        storage.check_writable(storage.parent(self.path), "give a --workdir you can write to, or fix its permissions")
        try:
            if self.remote:
                self._take_object()
                self._renewer = threading.Thread(target=self._renew_until_stopped, name="workdir-lease",
                                                 daemon=True)
                self._renewer.start()
            else:
                self._take_file()
        except OSError as err:
            raise EntityClipError(f"cannot take the workdir lease {self.path} ({err.strerror or err}); give a "
                                  "--workdir you can write to, or fix its permissions") from None
        return self

    def _refusal(self, owner, now=None):
        stale = (f"; if that run is dead (kill -9, a lost VM) its lease counts as stale {self.stale_seconds:.0f} s "
                 "after its last renewal, at once for a rerun on its own machine") if self.remote else ""
        return (f"{storage.path(self.path).parent} is in use by another `entityclip train` ({describe_owner(owner, now)}, "
                f"{self.path}): stop that run first, or train in another --workdir{stale}")

    def _take_file(self):
        handle = storage.lock_file(self.path)
        if handle is None:  # the kernel says its holder is alive
            raise EntityClipError(self._refusal(_parse(storage.path(self.path).read_text())))
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(self.me) + "\n")
        handle.flush()
        self._handle = handle

    def _record(self, **extra):
        return json.dumps({**self.me, "renewed": _now(), **extra}).encode()

    def _take_object(self):
        for _ in range(3):  # another trainer may write between our read and our write: read again
            current = storage.read_object(self.path)
            generation, owner = (0, None) if current is None else (current[1], _parse(current[0]))
            now = _now()
            if owner is not None and self._live(owner, now):
                raise EntityClipError(self._refusal(owner, now))
            self._generation = storage.write_object_if(self.path, self._record(), generation)
            if self._generation is not None:
                if owner is not None and not owner.get("released"):
                    log.warning("took over the stale workdir lease of %s", describe_owner(owner, now))
                return
        current = storage.read_object(self.path)
        raise EntityClipError(self._refusal(_parse(current[0]) if current else None, _now()))

    def _live(self, owner, now):
        if not isinstance(owner, dict) or owner.get("released"):
            return False
        if owner.get("process_space") and owner["process_space"] == self.me["process_space"] \
                and not storage.process_is_running(owner.get("pid")):
            return False  # its process died on this machine: no need to wait for staleness
        try:
            return now - float(owner.get("renewed", 0)) < self.stale_seconds
        except (TypeError, ValueError):
            return False

    # ---- holding it

    def _renew_until_stopped(self):
        while not self._stop.wait(self.renew_seconds):
            try:
                generation = storage.write_object_if(self.path, self._record(), self._generation)
            except Exception as err:  # noqa: BLE001 -- a network error: try again at the next renewal
                log.warning("could not renew the workdir lease %s (%s); trying again in %.0f s",
                            self.path, err, self.renew_seconds)
                continue
            if generation is None:
                self._lost = self._taken_by()
                log.error("%s", self._lost)
                return
            self._generation = generation

    def _taken_by(self):
        current = storage.read_object(self.path)
        owner = _parse(current[0]) if current else None
        return (f"lost the workdir lease {self.path} to another run ({describe_owner(owner, _now())}): it was not "
                f"renewed for {self.stale_seconds:.0f} s (a stalled process or network?); stopped without saving, "
                "so that run alone writes the workdir")

    def check(self):
        """Before a save: raises EntityClipError when the lease is no longer ours (gs:// only: a
        local lock cannot be lost). One read of the lease object."""
        if not self.remote or self._generation is None:
            return
        if self._lost is None:
            current = storage.read_object(self.path)
            if current is None or current[1] != self._generation:
                self._lost = self._taken_by()
        if self._lost is not None:
            raise EntityClipError(self._lost)

    def release(self):
        """Ends the lease: the lock dropped, or the object marked released (so a rerun takes it at once)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self.remote and self._generation is not None and self._lost is None:
            with contextlib.suppress(Exception):  # at worst the lease goes stale on its own
                storage.write_object_if(self.path, self._record(released=_now()), self._generation)
            self._generation = None


def _process_space():
    """Where a process id means one process: this boot of this kernel and this pid namespace
    (Linux), or None where that cannot be told."""
    try:
        boot = storage.path("/proc/sys/kernel/random/boot_id").read_text().strip()  # not a user path: the kernel's
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _parse(text):
    try:
        owner = json.loads(text)
    except (ValueError, TypeError):
        return None
    return owner if isinstance(owner, dict) else None


@contextlib.contextmanager
def held(workdir, **timing):
    """The workdir's lease for the `with` block, taken by process 0; every process raises the
    refusal (EntityClipError) when process 0 could not take it. Yields the WorkdirLease."""
    lease = WorkdirLease(workdir, **timing)
    refusal = None
    if jax.process_index() == 0:
        try:
            lease.take()
        except EntityClipError as err:
            refusal = str(err)
    if jax.process_count() > 1:  # the others wait for process 0's answer
        refused = bool(multihost_utils.broadcast_one_to_all(np.int32(refusal is not None)))
        if refused and refusal is None:
            refusal = f"process 0 could not take the workdir lease {lease.path}; its message says why"
    if refusal is not None:
        raise EntityClipError(refusal)
    try:
        yield lease
    finally:
        lease.release()
