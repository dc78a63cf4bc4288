"""Which environments start jax.distributed, with which arguments (jax.distributed.initialize
replaced by a recorder), and the single-process SIGTERM handler."""
import importlib.util
import os
import signal

import jax
import pytest

from entityclip_jax.config import default_config, validate_config
from entityclip_jax.errors import EntityClipError
from entityclip_jax.train import distributed

SLURM = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "1", "SLURM_STEP_NODELIST": "gpu[1-4]"}


def section(**values):
    cfg = default_config().distributed
    for name, value in values.items():
        cfg[name] = value
    return cfg


@pytest.fixture
def calls(monkeypatch):
    """Arguments of every jax.distributed.initialize call, none of which starts anything."""
    recorded = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: recorded.append(kwargs))
    return recorded


@pytest.mark.parametrize("mode, environ, tpu_host, expected", [
    ("auto", {}, False, None),                                          # a CPU box, one GPU host
    ("auto", {}, True, {}),                                             # TPU VM or pod host: JAX detects
    ("auto", SLURM, False, {}),                                         # SLURM, several tasks
    ("auto", dict(SLURM, SLURM_NTASKS="1"), False, None),               # SLURM, one task
    ("auto", {"OMPI_COMM_WORLD_SIZE": "2"}, False, {}),                 # Open MPI
    ("auto", {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, False, {}),  # JAX's own variable
    ("auto", {"TPU_WORKER_HOSTNAMES": "a,b"}, False, {}),               # TPU on GKE
    ("always", {}, False, {}),
    ("never", SLURM, True, None),                                       # single-host debugging on a pod
])
def test_which_environments_initialize(calls, monkeypatch, mode, environ, tpu_host, expected):
    monkeypatch.setattr(distributed, "_tpu_host", lambda: tpu_host)
    distributed.initialize(section(initialize=mode, heartbeat_timeout_seconds=7), environ)
    assert calls == ([] if expected is None else [dict(expected, heartbeat_timeout_seconds=7)])


def test_a_tpu_vm_has_libtpu_and_tpu_chips_on_its_pci_bus(monkeypatch, tmp_path):
    """libtpu alone (installed on a laptop to plan) does not make a TPU VM: the chips must be there."""
    for device, vendor in (("0000:00:04.0", "0x1af4"), ("0000:00:05.0", "0x1ae0")):
        (tmp_path / device).mkdir()
        (tmp_path / device / "vendor").write_text(vendor + "\n")
    monkeypatch.setattr(distributed, "PCI_DEVICES", str(tmp_path))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "libtpu" else find_spec(name))
    assert distributed._tpu_host()
    (tmp_path / "0000:00:05.0" / "vendor").write_text("0x1af4\n")  # no Google device: a laptop, a GPU box
    assert not distributed._tpu_host()
    monkeypatch.setattr(distributed, "PCI_DEVICES", str(tmp_path / "missing"))  # no sysfs at all
    assert not distributed._tpu_host()


def test_an_explicit_coordinator_is_passed_on(calls, monkeypatch):
    monkeypatch.setattr(distributed, "_tpu_host", lambda: False)
    distributed.initialize(section(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1), {})
    assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1,
                          heartbeat_timeout_seconds=100)]


def test_half_an_explicit_coordinator_or_a_bad_mode_is_refused(calls):
    with pytest.raises(EntityClipError, match="needs coordinator_address, num_processes and process_id"):
        distributed.initialize(section(coordinator_address="10.0.0.1:1234"), {})
    config = default_config()
    config.distributed.initialize = "yes"
    with pytest.raises(EntityClipError, match="is not one of"):  # the config check, before anything starts
        validate_config(config)
    assert calls == []


def test_always_without_a_cluster_says_what_to_set(monkeypatch):
    def initialize(**_):
        raise ValueError("coordinator_address should be defined.")
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    with pytest.raises(EntityClipError, match="coordinator_address should be defined.*distributed.coordinator_address"):
        distributed.initialize(section(initialize="always"), {})


def test_an_initialized_system_is_left_alone(monkeypatch):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **_: pytest.fail("initialized twice"))
    distributed.initialize(section(initialize="always"), SLURM)


def test_one_process_remembers_sigterm_and_restores_the_previous_handler():
    previous = signal.getsignal(signal.SIGTERM)
    preemption = distributed.Preemption()
    assert not preemption.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert preemption.should_stop(2)
    preemption.restore()
    assert signal.getsignal(signal.SIGTERM) == previous
