"""Accelerators as users name them, and the compile-only devices that stand in for them.

TPU product names, as `gcloud compute tpus tpu-vm create --accelerator-type` takes them:
  v4-N, v5p-N           N counts TensorCores: N/2 chips, each one device (megacore);
                        N = 8, 16, 32, ... (powers of two; v4 up to 4096, v5p up to 8192, and v5p-12288)
  v5litepod-N, v5e-N    N chips: 1, 4, 8, 16, 32, 64, 128, 256
  v6e-N                 N chips: 1, 4, 8, 16, 32, 64, 128, 256
libtpu refuses these names; it wants its topology names (v5e:4x4, v4:2x2x4 with the
"megacore" chip config), the host bounds, and the number of slices. GPUs: h100, a100,
h200, optionally xN for N GPUs on one host (h100x8), compiled by the CUDA plugin for a
GpuTargetConfigProto describing the card (no GPU, no driver needed).

The TPU compiler is libtpu, the GPU one the jax-cuda12 plugin: neither may be imported
by any other command (installed beside the environment, not in it; see the README), so
they are put on sys.path here, when a plan asks for them. libtpu is kept from looking
for a real TPU or asking a metadata server (TPU_SKIP_MDS_QUERY), and given a host list
and accelerator type so that it does not warn about their absence.
"""
import contextlib
import dataclasses
import importlib
import importlib.util
import os
import sys

from jax.experimental import topologies

from entityclip_jax.errors import EntityClipError

LIBTPU_DIR = "libtpu"      # <environment>/libtpu: pip install --target it, libtpu==<jax[tpu]'s pin>
CUDA_PLUGIN_DIR = "jax-cuda"  # <environment>/jax-cuda: pip install --target it, jax-cuda12-plugin + -pjrt
ACCEPTED = ("v4-N and v5p-N (N TensorCores = 2 x chips: 8, 16, 32, ... 4096; v5p up to 8192 and 12288), "
            "v5litepod-N, v5e-N and v6e-N (N chips: 1, 4, 8, 16, 32, 64, 128, 256), "
            "h100, a100 or h200 with xN GPUs on one host (e.g. h100x8)")


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str                 # the product name, normalised (v5litepod-16 -> v5e-16)
    platform: str             # "tpu" or "gpu"
    device_kind: str          # jax's device_kind (train/chips.py's key)
    chips: int                # per slice (GPUs: per host)
    num_slices: int = 1
    topology: str = ""        # libtpu's topology name, or the GPU's "1x1xN"
    chip_config_name: str = "default"
    host_bounds: tuple = (1, 1, 1)

    @property
    def total_chips(self):
        return self.chips * self.num_slices

    @property
    def label(self):
        return self.name if self.num_slices == 1 else f"{self.num_slices} x {self.name}"


# Two-dimensional slices (v5e, v6e): chips -> topology.
_TORUS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
# Three-dimensional slices (v4, v5p): chips -> topology; each doubling grows z, then y, then x.
_TORUS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16", 6144: "16x16x24"}
# generation -> (libtpu prefix, jax device_kind, chips of the largest slice, megacore)
_TPUS = {"v4": ("v4", "TPU v4", 2048, True), "v5p": ("v5", "TPU v5", 6144, True),
         "v5e": ("v5e", "TPU v5 lite", 256, False), "v6e": ("v6e", "TPU v6 lite", 256, False)}
_ALIASES = {"v5litepod": "v5e"}

# The cards, as the CUDA plugin's compiler sees them (GpuTargetConfigProto text): compute
# capability and per-SM limits from NVIDIA's CUDA programming guide (compute capabilities 8.0
# and 9.0), SM count, clock, L2, memory size and bandwidth from each card's datasheet.
_GPU_TARGET = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {smem_per_sm} shared_memory_per_block_optin: {smem_optin}
  threads_per_core_limit: 2048 core_count: {sms} fpus_per_core: {fpus}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth} l2_cache_size: {l2} clock_rate_ghz: {clock}
  device_memory_size: {memory} cuda_compute_capability {{ major: {major} minor: 0 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
device_description_str: "{kind}"
"""
_GPUS = {
    "a100": dict(kind="NVIDIA A100-SXM4-80GB", major=8, sms=108, fpus=64, smem_per_sm=167936, smem_optin=166912,
                 bandwidth=2039000000000, l2=41943040, clock=1.41, memory=80 * 10 ** 9),
    "h100": dict(kind="NVIDIA H100 80GB HBM3", major=9, sms=132, fpus=128, smem_per_sm=233472, smem_optin=232448,
                 bandwidth=3350000000000, l2=52428800, clock=1.98, memory=80 * 10 ** 9),
    "h200": dict(kind="NVIDIA H200", major=9, sms=132, fpus=128, smem_per_sm=233472, smem_optin=232448,
                 bandwidth=4800000000000, l2=52428800, clock=1.98, memory=141 * 10 ** 9),
}
MAX_GPUS_PER_HOST = 16


def parse(name, slices=1):
    """The Accelerator a user names (e.g. "v5e-16", "v4-32", "h100x8") on `slices` slices."""
    text = str(name).strip().lower()
    if not isinstance(slices, int) or slices < 1:
        raise EntityClipError(f"--slices must be a whole number >= 1, got {slices!r}")
    generation, _, count = text.partition("-")
    generation = _ALIASES.get(generation, generation)
    if generation in _TPUS and count.isdigit():
        return _tpu(text, generation, int(count), slices)
    gpu, _, per_host = text.partition("x")
    if gpu in _GPUS and (per_host == "" or per_host.isdigit()):
        count = int(per_host or 1)
        if not 1 <= count <= MAX_GPUS_PER_HOST:
            raise EntityClipError(f"{name}: {count} GPUs on one host; use 1 to {MAX_GPUS_PER_HOST}, e.g. {gpu}x8")
        if slices != 1:
            raise EntityClipError(f"--slices {slices}: GPUs are planned one host at a time; plan {gpu}x{count} "
                                  "without --slices")
        return Accelerator(name=f"{gpu}x{count}", platform="gpu", device_kind=_GPUS[gpu]["kind"], chips=count,
                           topology=f"1x1x{count}")
    raise EntityClipError(f"unknown accelerator {name!r}; accepted: {ACCEPTED}")


def _tpu(text, generation, count, slices):
    prefix, kind, largest, megacore = _TPUS[generation]
    chips = count // 2 if megacore else count
    shapes = _TORUS_3D if megacore else _TORUS_2D
    if (megacore and count % 2) or chips not in shapes or chips > largest:
        sizes = sorted(c * 2 if megacore else c for c in shapes if c <= largest)
        raise EntityClipError(f"{text}: no {generation} slice of {count} {'TensorCores' if megacore else 'chips'}; "
                              f"{generation}-N takes N in {sizes}")
    topology = shapes[chips]
    dims = [int(d) for d in topology.split("x")] + ([1] if not megacore else [])
    bounds = tuple(dims) if chips <= (4 if megacore else 8) else (2, 2, 1)  # single host, else 4-chip hosts
    return Accelerator(name=f"{generation}-{count}", platform="tpu", device_kind=kind, chips=chips,
                       num_slices=slices, topology=f"{prefix}:{topology}",
                       chip_config_name="megacore" if megacore else "default", host_bounds=bounds)


def devices(accelerator):
    """The accelerator's devices, for compiling only (no hardware needed)."""
    if accelerator.platform == "tpu":
        with _beside("libtpu", LIBTPU_DIR, "libtpu==0.0.42.1 (the libtpu jax[tpu]==0.10.2 pins)"), _environment(
                TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1", TPU_WORKER_HOSTNAMES="localhost",
                TPU_ACCELERATOR_TYPE="v4-8"):
            topology = topologies.get_topology_desc(
                platform="tpu", topology_name=accelerator.topology, chip_config_name=accelerator.chip_config_name,
                chips_per_host_bounds=accelerator.host_bounds, num_slices=accelerator.num_slices)
        return list(topology.devices)
    target = _GPU_TARGET.format(**_GPUS[accelerator.name.partition("x")[0]])
    with _beside("jax_plugins.xla_cuda12", CUDA_PLUGIN_DIR, "jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2"), \
            _environment(JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1"):  # no CUDA libraries here, and none needed
        try:
            topology = topologies.get_topology_desc("aot", "cuda", target_config=target,
                                                    topology=accelerator.topology)
        except NotImplementedError:  # JAX looked for plugins before the directory was on sys.path
            importlib.import_module("jax_plugins.xla_cuda12").initialize()
            topology = topologies.get_topology_desc("aot", "cuda", target_config=target,
                                                    topology=accelerator.topology)
    return list(topology.devices)


@contextlib.contextmanager
def _beside(module, directory, requirement):
    """<environment>/<directory> on sys.path while the compiler loads, unless `module` is importable
    already (a TPU VM's libtpu). Afterwards sys.path and sys.modules are as they were: the loaded
    compiler stays loaded, but nothing else in the process finds it (train's TPU-VM check looks
    for libtpu; tests run train after plan in one process)."""
    with contextlib.suppress(ModuleNotFoundError):
        if importlib.util.find_spec(module) is not None:
            yield
            return
    beside = os.path.join(sys.prefix, directory)  # not a user path: the install location the Makefile uses
    if not os.path.isdir(beside):  # not a user path: as above
        raise EntityClipError(f"planning needs the compiler that {module} brings and it is not installed; run "
                              f"`make plan-deps`, or: pip install --no-deps --target {beside} {requirement}")
    before = set(sys.modules)
    sys.path.append(beside)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path.remove(beside)
        for name in set(sys.modules) - before:
            found = sys.modules[name]
            places = [getattr(found, "__file__", None) or "", *(getattr(found, "__path__", None) or [])]
            if any(str(place).startswith(beside) for place in places):
                del sys.modules[name]
        importlib.invalidate_caches()


@contextlib.contextmanager
def _environment(**variables):
    """Sets the variables the user has not; afterwards the environment is as it was, also where the
    loaded compiler wrote to it (libtpu sets TPU_LIBRARY_PATH, which would make every subprocess,
    a test's `entityclip train` among them, load libtpu too)."""
    before = dict(os.environ)
    os.environ.update({k: v for k, v in variables.items() if k not in before})
    try:
        yield
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        os.environ.update({k: v for k, v in before.items() if os.environ.get(k) != v})
