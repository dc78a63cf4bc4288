"""JAX's persistent compilation cache for training runs: a resumed run loads its compiled
step (and the other jitted functions that took over a second to compile) instead of
compiling them again, minutes for ViT-B/16 on a pod.

config.compilation_cache_dir:
  "auto"  on TPU and GPU: WORKDIR/compilation_cache (or JAX_COMPILATION_CACHE_DIR when set);
          on CPU: JAX_COMPILATION_CACHE_DIR when set, else none (CPU runs are trials, the
          demo and the tests, and with several CPU devices the cache is unsafe: below);
  ""      no cache (JAX_COMPILATION_CACHE_DIR ignored);
  a directory, local or gs://: that one. Several runs may share one: an entry's key is the
          program, its shardings, the devices and the compiler version.
It is set through jax.config before the run compiles anything (JAX reads it at its first
compile, once per process).

CPU hazard (XLA:CPU, jax 0.10.2): a step with collectives loaded from the cache by a process
with several CPU devices hangs or computes wrong values. Measured on the tiny EntityCLIP
config: with 8 devices in one process the first cached step deadlocked ("Expected 8 threads
to join the rendezvous, but only 7 of them arrived"); with 2 processes of 4 devices, 5 of 5
runs that loaded the step parted from the 1-process reference (by 5e-3..0.13 in the loss)
while 7 of 7 that compiled it matched it (5e-7). So with more than one CPU device in the
process the cache is switched off, with a one-line note when it was asked for. With one CPU
device per process it is used (tests/test_compilation_cache.py). TPU and GPU collectives do
not take XLA:CPU's path (not measured here: no accelerator was lent).
"""
import logging

import jax

from entityclip_jax import storage
from entityclip_jax.errors import EntityClipError

log = logging.getLogger(__name__)
AUTO = "auto"
WORKDIR_CACHE = "compilation_cache"


def choose(setting, workdir, platform, local_devices, jax_setting=None):
    """(directory or None, note or None): the cache a run uses, and why an asked-for one is off.

    jax_setting: what JAX already holds (JAX_COMPILATION_CACHE_DIR)."""
    if setting == AUTO:
        chosen = jax_setting or (storage.join(workdir, WORKDIR_CACHE) if platform in ("tpu", "gpu") else None)
    else:
        chosen = storage.absolute(setting) if setting else None
    if chosen and platform == "cpu" and local_devices > 1:
        return None, (f"compilation cache {chosen} switched off: with {local_devices} CPU devices in one process, "
                      "XLA:CPU (jax 0.10.2) can hang or miscompute a step loaded from it; it is used with one CPU "
                      "device per process, and on TPU and GPU")
    return chosen, None


def use(config, workdir):
    """Points JAX at the run's compilation cache (or at none) before anything compiles; returns the directory."""
    directory, note = choose(config.compilation_cache_dir, workdir, jax.default_backend(), jax.local_device_count(),
                             jax.config.jax_compilation_cache_dir)
    if note:
        log.warning(note)
    if directory and not storage.is_remote(directory):
        try:
            storage.path(directory).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise EntityClipError(f"compilation_cache_dir {directory} cannot be created ({err.strerror}); point "
                                  "--config.compilation_cache_dir at a writable directory, or '' for none") from None
    jax.config.update("jax_compilation_cache_dir", directory)
    if directory:
        log.info("compilation cache: %s", directory)
    return directory
