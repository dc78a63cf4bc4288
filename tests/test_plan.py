"""`entityclip plan`: the training and validation steps compiled for TPU slices and GPUs this
machine does not have (libtpu and the CUDA plugin as compilers only, installed beside the
environment by `make`), the report's numbers checked against the compiler on CPU devices,
the topology-aware mesh, and libtpu kept away from every other command."""
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from entityclip_jax import cli
from entityclip_jax.config import load_config
from entityclip_jax.errors import EntityClipError
from entityclip_jax.models.clip_config import PRESETS
from entityclip_jax.commands import plan as plan_command
from entityclip_jax.parallel.mesh import make_mesh
from entityclip_jax.plan import accelerators, planner
from entityclip_jax.plan.architecture import architecture
from entityclip_jax.train import chips

ROOT = pathlib.Path(__file__).parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.py")
# clip_finetune: the same towers, optimizer and step without the heads, whose loss triples the compile
# time; the full EntityCLIP step is compiled once, in the first test.
FAST = ["--config.model.mode=clip_finetune"]
FSDP_4 = ["--config.mesh=(('data', -1), ('fsdp', 4))", "--config.sharding.rules=(('.*', 'fsdp'),)",
          "--config.sharding.fsdp_min_size=1"]
# Everything that pins a v5e-4 chip at more than its 16 GiB: 2^24 x 64 fp32 token embeddings are 4 GiB,
# 12 GiB with Adam's two moments, replicated on every chip.
HUGE_VOCABULARY = ["--config.model.vocab_size=16777216"]
REPORT_FIELDS = {"global_batch", "per_device_batch", "devices", "arguments", "compile_seconds", "memory", "fits",
                 "flops_per_device", "flops_per_step", "flops_per_example", "step_time_floor_seconds",
                 "examples_per_second_ceiling", "collectives", "mesh", "context_length"}
MEMORY_FIELDS = {"arguments", "outputs", "aliased", "temporaries", "code", "peak", "limit"}


def plan(capsys, *args, config=TINY):
    code = cli.main(["plan", "--config", config, *args])
    out, err = capsys.readouterr()
    return code, out, err


def tpu_devices(name, slices=1):
    return accelerators.devices(accelerators.parse(name, slices))


@pytest.mark.slow
def test_the_entityclip_step_on_v5e_4_reports_every_field(capsys):
    code, out, err = plan(capsys, "--accelerator", "v5e-4", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["fits"] and result["model"]["mode"] == "entityclip"
    assert result["accelerator"] | {"source": None} == dict(
        name="v5e-4", platform="tpu", slices=1, chips_per_slice=4, chips=4, device_kind="TPU v5 lite",
        topology="v5e:2x2", chip_config_name="default", chips_per_host_bounds=[2, 2, 1], peak_bf16_flops=197e12,
        memory_bytes=16 * 2 ** 30, source=None)
    for name, batch in (("train", 32), ("eval", 64)):
        report = result[name]
        assert REPORT_FIELDS <= set(report) and MEMORY_FIELDS == set(report["memory"]), name
        assert report["global_batch"] == batch and report["per_device_batch"] == batch / 4
        assert report["mesh"] == {"data": 4, "fsdp": 1} and report["context_length"] == 77
        memory = report["memory"]
        assert 0 < memory["arguments"] <= memory["peak"] <= memory["limit"] == 16 * 2 ** 30
        assert report["flops_per_step"] == report["flops_per_device"] * 4 > 0
        assert report["flops_per_example"] == pytest.approx(report["flops_per_step"] / batch)
        assert report["step_time_floor_seconds"] == pytest.approx(report["flops_per_device"] / 197e12)
        assert report["examples_per_second_ceiling"] == pytest.approx(batch / report["step_time_floor_seconds"])
        assert report["compile_seconds"] > 0
    train = result["train"]
    assert set(train["arguments"]) == {"parameters", "optimizer_state", "batch"}
    assert train["arguments"]["optimizer_state"] == pytest.approx(2 * train["arguments"]["parameters"], abs=64)  # mu, nu
    assert result["eval"]["memory"]["aliased"] == 0
    assert train["memory"]["aliased"] > 0.9 * train["memory"]["outputs"]  # the state is donated
    # replicated parameters: the gradients are all-reduced, every fp32 byte of them
    all_reduce = next(c for c in train["collectives"] if c["kind"] == "all-reduce")
    assert all_reduce["count"] >= 1 and all_reduce["bytes"] >= train["arguments"]["parameters"]


def test_two_slices_put_the_data_axis_across_them(capsys):
    code, out, err = plan(capsys, "--accelerator", "v5litepod-4", "--slices", "2", *FAST)
    assert code == 0, err
    assert out.startswith(f"plan: {TINY} on 2 x v5e-4: 8 x TPU v5e (197 TFLOP/s bf16 and 16.00 GiB each")
    assert "mesh data=8 fsdp=1" in out and "train step, batch 32 (4 per chip): fits: peak" in out
    assert "eval encode step, batch 64 (8 per chip): fits" in out and out.rstrip().endswith("(exit status 0)")
    for line in ("FLOPs: ", "ceiling at 197 TFLOP/s per chip", "collectives per step (per chip): ",
                 "memory per chip: parameters", "compiled in"):
        assert out.count(line) == 2, line
    # the gradients' all-reduce, split by the compiler: reduce-scatter in a slice, all-reduce across, all-gather
    train_collectives = next(line for line in out.splitlines() if "collectives" in line)
    assert all(kind in train_collectives for kind in ("reduce-scatter", "all-reduce", "all-gather"))


@pytest.mark.slow  # three step compiles
def test_flops_per_chip_times_the_chips_are_the_one_device_flops(capsys):
    """With everything sharded, the 4 chips of a v5e-4 split the work of one device: the same step
    compiled for one CPU device counts the same FLOPs, within 3% (the two compilers fuse differently).
    With replicated parameters every chip also runs the whole optimizer update: more, not an error."""
    one_device = planner.compile_programs(load_config(TINY, FAST), jax.devices("cpu")[:1], programs=("train",))
    sharded = planner.compile_programs(load_config(TINY, FAST + FSDP_4), tpu_devices("v5e-4"),
                                       chips.chip("TPU v5 lite"), programs=("train",))
    replicated = planner.compile_programs(load_config(TINY, FAST), tpu_devices("v5e-4"),
                                          chips.chip("TPU v5 lite"), programs=("train",))
    expected = one_device["train"]["flops_per_device"]
    assert sharded["train"]["flops_per_step"] == pytest.approx(expected, rel=0.03)
    assert replicated["train"]["flops_per_step"] > sharded["train"]["flops_per_step"]
    # the argument bytes follow the sharding on the TPU too (plus its tile padding): fsdp over 4 holds a quarter
    ratio = sharded["train"]["memory"]["arguments"] / replicated["train"]["memory"]["arguments"]
    assert 0.25 < ratio < 0.35


def state_bytes(config, fsdp_size):
    """Parameter + optimizer bytes one device holds, from the shapes alone: everything whole when
    replicated; with fsdp over N (every rule fsdp, min size 1) an array with an axis N divides in N parts."""
    import optax
    from entityclip_jax.config import model_from_config
    from entityclip_jax.models.entityclip import abstract_params
    params = abstract_params(model_from_config(config, architecture(config)))
    adam = jax.eval_shape(optax.adam(1e-3).init, params)
    total = 0
    for leaf in jax.tree.leaves((params, adam)):
        size = math.prod(leaf.shape) * leaf.dtype.itemsize
        total += size // fsdp_size if any(d % fsdp_size == 0 for d in leaf.shape) else size
    return total


@pytest.mark.parametrize("overrides, fsdp_size", [([], 1), pytest.param(FSDP_4, 4, marks=pytest.mark.slow)])
def test_argument_bytes_per_device_are_what_the_sharding_implies(overrides, fsdp_size):
    """On 4 CPU devices (no tile padding), the compiler's argument bytes per device are the state the
    sharding implies plus at most the batch's quarter (arrays the step never reads are pruned)."""
    config = load_config(TINY, FAST + overrides)
    report = planner.compile_programs(config, jax.devices()[:4], programs=("train",))["train"]
    state = state_bytes(config, fsdp_size)
    assert report["arguments"]["parameters"] + report["arguments"]["optimizer_state"] == pytest.approx(state, abs=64)
    assert state <= report["memory"]["arguments"] <= state + report["arguments"]["batch"] + 64
    assert report["fits"] and report["memory"]["limit"] is None  # a CPU: no HBM to compare with


def test_a_config_that_does_not_fit_is_one_line_with_exit_status_3(capsys):
    code, out, err = plan(capsys, "--accelerator", "v5e-4", *FAST, *HUGE_VOCABULARY)
    assert code == plan_command.EXIT_DOES_NOT_FIT == 3, err
    [line] = [line for line in out.splitlines() if "does not fit" in line]
    assert line.startswith("train step, batch 32 (8 per chip): does not fit: the compiler needs ")
    assert "GiB per chip, 15.75 GiB available; most of it is parameters and optimizer state (12.00 GiB" in line
    assert "--config.mesh=\"(('data', -1), ('fsdp', 4))\" --config.sharding.rules=\"(('.*', 'fsdp'),)\"" in line
    assert "eval encode step, batch 64 (16 per chip): fits" in out and "verdict: DOES NOT FIT" in out


@pytest.mark.slow  # four more compiles
def test_suggest_compiles_the_options_and_finds_the_one_that_fits(capsys):
    code, out, err = plan(capsys, "--accelerator", "v5e-4", "--suggest", "--json", *FAST, *HUGE_VOCABULARY)
    assert code == 3, err
    result = json.loads(out)
    assert not result["fits"] and result["train"]["dominant"] == "parameters and optimizer state"
    found = {item["what"]: item for item in result["suggestions"]}
    assert set(found) == {"rematerialised tower layers", "bfloat16 compute", "half the training batch",
                          "parameters and optimizer state sharded over the 4 chips of a slice"}
    fsdp = found.pop("parameters and optimizer state sharded over the 4 chips of a slice")
    assert fsdp["fits"] and fsdp["overrides"] == FSDP_4[:2] and fsdp["memory"]["train"] < 16 * 2 ** 30
    assert not any(item["fits"] for item in found.values())
    assert found["half the training batch"]["overrides"] == ["--config.batch_size=16"]


@pytest.mark.parametrize("args, says", [
    (["--accelerator", "v5e-3"], "v5e-N takes N in [1, 4, 8, 16, 32, 64, 128, 256]"),
    (["--accelerator", "v4-6"], "v4-N takes N in [8, 16, 32,"),
    (["--accelerator", "v4-8192"], "v4-N takes N in [8, 16, 32,"),
    (["--accelerator", "v7-8"], "unknown accelerator 'v7-8'; accepted: v4-N and v5p-N"),
    (["--accelerator", "v5litepod"], "unknown accelerator 'v5litepod'; accepted:"),
    (["--accelerator", "b200x8"], "unknown accelerator 'b200x8'; accepted:"),
    (["--accelerator", "h100x0"], "h100x0: 0 GPUs on one host; use 1 to 16"),
    (["--accelerator", "v5e-16", "--slices", "0"], "--slices must be a whole number >= 1, got 0"),
    (["--accelerator", "v5e-16", "--slices", "two"], "--slices must be a whole number >= 1, got 'two'"),
    (["--accelerator", "v5e-16", "--slices", "-2"], "--slices must be a whole number >= 1, got '-2'"),
    (["--accelerator", "h100x8", "--slices", "2"], "GPUs are planned one host at a time"),
])
def test_unknown_accelerators_and_bad_slice_counts_are_one_line(capsys, args, says):
    code, out, err = plan(capsys, *args)
    assert code == 2 and out == ""
    assert err.startswith("entityclip plan: error: ") and err.count("\n") == 1 and says in err, err


@pytest.mark.parametrize("name, topology, config, bounds, chips", [
    ("v4-8", "v4:2x2x1", "megacore", (2, 2, 1), 4), ("v4-32", "v4:2x2x4", "megacore", (2, 2, 1), 16),
    ("v4-4096", "v4:8x16x16", "megacore", (2, 2, 1), 2048), ("v5p-8", "v5:2x2x1", "megacore", (2, 2, 1), 4),
    ("v5p-12288", "v5:16x16x24", "megacore", (2, 2, 1), 6144), ("v5litepod-1", "v5e:1x1", "default", (1, 1, 1), 1),
    ("v5e-8", "v5e:2x4", "default", (2, 4, 1), 8), ("v5e-256", "v5e:16x16", "default", (2, 2, 1), 256),
    ("v6e-64", "v6e:8x8", "default", (2, 2, 1), 64),
])
def test_product_names_map_to_libtpu_topologies(name, topology, config, bounds, chips):
    accelerator = accelerators.parse(name)
    assert (accelerator.topology, accelerator.chip_config_name, accelerator.host_bounds, accelerator.chips) == (
        topology, config, bounds, chips)


@pytest.mark.parametrize("name, kind", [("v4-16", "TPU v4"), ("v5p-16", "TPU v5"), ("v6e-8", "TPU v6 lite")])
def test_libtpu_gives_one_device_per_chip_of_the_named_kind(name, kind):
    devices = tpu_devices(name)
    assert len(devices) == accelerators.parse(name).chips and {d.device_kind for d in devices} == {kind}
    assert chips.chip(kind) is not None


@pytest.mark.slow  # two compiles by the CUDA plugin
def test_gpus_are_planned_for_memory_with_no_flops_invented(capsys):
    code, out, err = plan(capsys, "--accelerator", "h100x8", "--json", *FAST)
    assert code == 0, err
    result = json.loads(out)
    assert result["accelerator"]["device_kind"] == "NVIDIA H100 80GB HBM3" and result["accelerator"]["chips"] == 8
    for name in ("train", "eval"):
        report = result[name]
        assert report["fits"] and report["memory"]["limit"] == 80 * 10 ** 9 and report["memory"]["peak"] > 0
        assert report["flops_per_device"] is None and "step_time_floor_seconds" not in report
    assert any(c["kind"] == "all-reduce" for c in result["train"]["collectives"])


def coords(device):
    return tuple(device.coords)


def neighbours(a, b):
    return sum(abs(x - y) for x, y in zip(coords(a), coords(b))) == 1


def test_the_mesh_follows_the_v5e_torus():
    devices = tpu_devices("v5e-16")
    ring = make_mesh((("data", -1), ("fsdp", 1)), devices).devices[:, 0]
    assert sorted(d.id for d in ring) == sorted(d.id for d in devices)
    assert all(neighbours(ring[i], ring[(i + 1) % 16]) for i in range(16))  # a ring on the 4x4 chips
    assert not all(neighbours(devices[i], devices[i + 1]) for i in range(15))  # which the plain order is not
    grid = make_mesh((("data", 4), ("fsdp", 4)), devices).devices
    for row in grid:  # each fsdp group: four chips in a line
        assert all(neighbours(row[i], row[i + 1]) for i in range(3))


def test_the_data_axis_runs_across_slices():
    devices = tpu_devices("v5e-4", slices=2)
    assert sorted({d.slice_index for d in devices}) == [0, 1]
    grid = make_mesh((("data", -1), ("fsdp", 4)), devices).devices
    assert grid.shape == (2, 4) and [{d.slice_index for d in row} for row in grid] == [{0}, {1}]
    column = make_mesh((("data", -1), ("fsdp", 1)), devices).devices[:, 0]
    assert [d.slice_index for d in column] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert all(neighbours(column[i], column[i + 1]) for i in (0, 1, 2, 4, 5, 6))
    with pytest.raises(EntityClipError, match="mesh axis 'data' of size 1 does not split over 2 slices"):
        make_mesh((("data", 1), ("fsdp", 8)), devices)


def test_cpu_devices_keep_their_order():
    mesh = make_mesh((("data", 2), ("fsdp", 4)))
    assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()]


def test_the_architecture_comes_from_the_config_without_weights(tmp_path):
    def arch(init, **model):
        config = load_config(TINY, [f"--config.model.init={init}", *(f"--config.model.{k}={v}" for k, v in model.items())])
        return architecture(config)
    tiny = arch("random:tiny", vocab_size=300, eos_token_id=299)
    assert tiny.vision == PRESETS["tiny"].vision and (tiny.text.vocab_size, tiny.text.eos_token_id) == (300, 299)
    assert arch("openai/clip-vit-base-patch16@main") == PRESETS["vit-b-16"]
    assert arch("openai/clip-vit-large-patch14") == PRESETS["vit-l-14"]
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "model_type": "clip", "projection_dim": 24,
        "text_config": {"vocab_size": 99, "hidden_size": 32, "max_position_embeddings": 16},
        "vision_config": {"hidden_size": 48, "image_size": 30, "patch_size": 6}}))
    found = arch(str(hf))
    assert (found.projection_dim, found.text.max_position_embeddings, found.vision.patch_size) == (24, 16, 6)
    towers = tmp_path / "towers"
    towers.mkdir()
    (towers / "clip_config.json").write_text(json.dumps(PRESETS["vit-b-32"].to_dict()))
    assert arch(str(towers)) == PRESETS["vit-b-32"]
    for unknown in ("someone/their-clip", str(tmp_path / "missing"), "gs://bucket/towers"):
        with pytest.raises(EntityClipError, match="plan cannot tell the architecture of model.init="):
            arch(unknown)


def test_libtpu_and_the_cuda_plugin_live_beside_the_environment_for_plan_only():
    """Installing them for plan changes nothing for the other commands: they are not importable there
    (libtpu would make train take a CPU box for a TPU VM and print TPU warnings), `entityclip --help`
    and a CPU backend start in silence, and a process that planned finds them no more afterwards."""
    assert len(tpu_devices("v5e-4")) == 4 and len(accelerators.devices(accelerators.parse("h100"))) == 1
    for directory in (accelerators.LIBTPU_DIR, accelerators.CUDA_PLUGIN_DIR):
        assert os.path.isdir(os.path.join(sys.prefix, directory)), f"run `make plan-deps` ({directory})"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    env["PYTHONPATH"] = str(ROOT)
    probe = ("import importlib.util, jax\n"
             "from entityclip_jax.train import distributed\n"
             "print(importlib.util.find_spec('libtpu'), importlib.util.find_spec('jax_plugins'), "
             "distributed._tpu_host(), jax.devices())\n")
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "None None False [CpuDevice(id=0)]", result.stderr
    assert result.stderr == ""
    result = subprocess.run([sys.executable, "-m", "entityclip_jax.cli", "--help"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "plan" in result.stdout and result.stderr == ""
    # this process planned: the compilers are loaded, yet nothing here finds them
    from entityclip_jax.train import distributed
    assert importlib.util.find_spec("libtpu") is None and not distributed._tpu_host()
    assert importlib.util.find_spec("jax_plugins") is None


def test_chip_table_names_its_sources():
    for kind, chip in chips.CHIPS.items():
        assert chip.peak_bf16_flops > 1e14 and chip.memory_bytes > 10 * 2 ** 30, kind
        assert ("cloud.google.com/tpu/docs/" in chip.source) == kind.startswith("TPU"), kind
        assert kind.startswith("TPU") or "NVIDIA" in chip.source
    assert chips.chip("cpu") is None and np.isclose(chips.chip("TPU v5 lite").peak_bf16_flops, 197e12)
