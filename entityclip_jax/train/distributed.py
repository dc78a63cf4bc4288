"""Several processes (the hosts of a TPU pod, GPU nodes): starting JAX's
distributed system, and stopping together on SIGTERM.

config.distributed.initialize decides whether jax.distributed.initialize runs:
  auto    on a TPU VM (libtpu installed), or under SLURM / Open MPI with several
          tasks, or with JAX_COORDINATOR_ADDRESS set: jax.distributed.initialize()
          and JAX's own cluster detection finds the other processes (the TPU
          metadata server, SLURM's or MPI's variables); a single-host TPU VM
          becomes a cluster of one. With distributed.coordinator_address (plus
          num_processes and process_id) set: that explicit coordinator, e.g. on
          GPU hosts without a scheduler. Anywhere else (a CPU box, one GPU host):
          one process, nothing to initialize.
  always  call it whatever the environment; an error where JAX finds no cluster
          and no coordinator is given.
  never   one process, even on a pod host (single-host debugging).
A process that dies (kill -9, a crashed host) stops the others: JAX's
coordination service notices its missing heartbeats after
distributed.heartbeat_timeout_seconds and terminates every process with an
error ("the JAX distributed service detected fatal errors").

Preemption notices arrive as SIGTERM. With one process a Python handler
remembers the signal. With several, jax.distributed.initialize has installed
XLA's preemption notifier: it owns SIGTERM (a Python handler would silence it)
and the preemption sync manager picks the one step at which every process stops
(reached_preemption_sync_point, asked at every step).
"""
import importlib.util
import logging
import os
import signal

import jax
from jax.experimental import multihost_utils

from entityclip_jax.errors import EntityClipError

log = logging.getLogger(__name__)
EXPLICIT = ("coordinator_address", "num_processes", "process_id")


GOOGLE_PCI_VENDOR = "0x1ae0"  # the vendor id of TPU chips on a TPU VM's PCI bus
PCI_DEVICES = "/sys/bus/pci/devices"  # not a user path: the kernel's view of the hardware


def _tpu_chips_attached():
    """True when a Google (TPU) device sits on this machine's PCI bus, as on every TPU VM."""
    try:
        devices = os.listdir(PCI_DEVICES)  # not a user path: sysfs
    except OSError:  # no sysfs (not Linux, a sandbox)
        return False
    for device in devices:
        try:
            with open(os.path.join(PCI_DEVICES, device, "vendor")) as f:  # not a user path: sysfs
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def _tpu_host():
    """A TPU VM: libtpu installed AND TPU chips attached, which is how JAX itself tells one (checked
    without starting a backend). libtpu alone, e.g. installed on a laptop to plan, is not one."""
    return importlib.util.find_spec("libtpu") is not None and _tpu_chips_attached()


def _cluster_environment(environ):
    """Variables of a launcher that starts several processes, which JAX's cluster detection reads."""
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:  # TPU on GKE
        return True
    slurm = "SLURM_JOB_ID" in environ and int(environ.get("SLURM_NTASKS", "1") or 1) > 1
    return slurm or int(environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1


def initialize_args(cfg, environ, tpu_host):
    """The keyword arguments for jax.distributed.initialize, or None to stay a single process."""
    if cfg.initialize == "never":
        return None
    explicit = {name: cfg[name] for name in EXPLICIT if cfg.get(name) is not None}
    if explicit and len(explicit) < len(EXPLICIT):
        raise EntityClipError(f"distributed: {sorted(explicit)} set but not {sorted(set(EXPLICIT) - set(explicit))}; "
                              "an explicit coordinator needs coordinator_address, num_processes and process_id")
    if cfg.initialize == "always" or explicit or tpu_host or _cluster_environment(environ):
        return dict(explicit, heartbeat_timeout_seconds=int(cfg.heartbeat_timeout_seconds))
    return None


def initialize(cfg, environ):
    """Starts JAX's distributed system when config.distributed says so (see the module docstring)."""
    if jax.distributed.is_initialized():
        return
    kwargs = initialize_args(cfg, environ, _tpu_host())
    if kwargs is None:
        return
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as err:  # JAX found no cluster and was given no coordinator
        raise EntityClipError(f"jax.distributed.initialize: {err}; set distributed.coordinator_address, "
                              "num_processes and process_id, or distributed.initialize=auto") from None
    log.info("process %d of %d, %d local devices of %d", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


class Preemption:
    """Tells the loop, step by step, whether to save and stop (every process at the same step)."""

    def __init__(self):
        self.requested = False
        self.previous = None
        self.synced = jax.process_count() > 1 and jax.config.jax_enable_preemption_service
        if jax.process_count() == 1:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        elif not self.synced:
            log.warning("jax_enable_preemption_service is off: SIGTERM ends the processes without a checkpoint; "
                        "a rerun resumes from the last periodic one")

    def _handle(self, *_):
        self.requested = True

    def should_stop(self, step):
        """Asked once per step, with the step number, by every process."""
        if self.synced:
            return multihost_utils.reached_preemption_sync_point(int(step))
        return self.requested

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
