"""The environment of a process a test starts: `entityclip ...` or a snippet of our code."""
import os
import pathlib
import re

ROOT = pathlib.Path(__file__).parents[1]
_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\d+")


def child_env(devices=1, **extra):
    """os.environ with our package importable, JAX on the CPU with `devices` devices, and `extra`.

    One device unless the test is about sharding: a command tested for what it writes, says and
    does on a signal compiles its step for one device in half the time of the suite's 8 (a tiny
    EntityCLIP run of 24 steps: 21 s against 37 s here)."""
    flags = _DEVICE_COUNT.sub("", os.environ.get("XLA_FLAGS", "")).strip()
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip(), **extra}
