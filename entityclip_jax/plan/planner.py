"""Compile a config's training step and validation encode step for devices one does not have.

The step is the one `entityclip train` runs: train/setup.py builds it from the config
(model, optimizer, mesh, sharding rules, donation, dtype, remat, batch, mode and
heads) for both; here its arguments are abstract (jax.eval_shape: no weights loaded,
nothing allocated) and the batch's shapes come from the config: batch_size, the
towers' image size, and the records' context length when data.dir can be read, else
the text tower's positions. The validation encode step is train/validation.py's, at
eval.batch_size, with the parameters laid out as training lays them out.

Each program's report holds, per device (= per chip on TPU v4/v5p megacore and on
the others): memory against the chip's HBM, FLOPs from the compiler's cost analysis,
the step-time floor at the chip's peak bf16 FLOP/s and the examples/s ceiling it
implies, the collectives, and the compile time. Running out of memory is the
compiler's answer (XLA:TPU refuses to compile): it is reported, not raised.
"""
import time

import jax

from entityclip_jax.config import model_from_config, validate_config
from entityclip_jax.data import pipeline, records
from entityclip_jax.errors import EntityClipError
from entityclip_jax.models.entityclip import abstract_params
from entityclip_jax.parallel import sharding
from entityclip_jax.parallel.mesh import make_mesh
from entityclip_jax.plan import accelerators, analysis
from entityclip_jax.plan.architecture import architecture
from entityclip_jax.train import chips, setup
from entityclip_jax.train.validation import Validator

TRAIN, EVAL = "train", "eval"
# XLA:GPU autotunes its Triton GEMMs on a real device; compiling without one needs them off.
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def plan(config, accelerator, programs=(TRAIN, EVAL)):
    """compile_programs for an accelerators.Accelerator, with its chip's peak and memory."""
    options = GPU_COMPILER_OPTIONS if accelerator.platform == "gpu" else None
    reports = compile_programs(config, accelerators.devices(accelerator), chips.chip(accelerator.device_kind),
                               options, programs)
    for name, report in reports.items():
        if not report["fits"]:
            report["dominant"] = dominant_part(report)[0]
            report["advice"] = advice(config, report, accelerator, name)
    return reports


def compile_programs(config, devices, chip=None, compiler_options=None, programs=(TRAIN, EVAL)):
    """{"train": report, "eval": report} of `config` compiled for `devices` (see the module doc);
    chip: the devices' train/chips.Chip (fit, step-time floor), None where unknown (a CPU)."""
    validate_config(config, device_count=len(devices))
    mesh = make_mesh(config.mesh, devices)
    model = model_from_config(config, architecture(config))
    program = setup.train_program(config, model, abstract_params(model), mesh, _schedule_steps(config))
    state = program.sharded_state()
    context_length = _context_length(config, model.clip)

    def batch(size):
        shapes = pipeline.batch_shapes(size, model.clip.vision.image_size, context_length,
                                       config.data.normalize_on_host)
        return setup.batch_with_shardings(mesh, shapes)

    reports = {}
    if TRAIN in programs:
        train_batch = batch(config.batch_size)
        reports[TRAIN] = _report(lambda: program.compile(state, train_batch, compiler_options),
                                 config.batch_size, len(devices), chip,
                                 dict(parameters=state.params, optimizer_state=state.opt_state, batch=train_batch))
    if EVAL in programs:
        eval_batch = batch(config.eval.batch_size)
        encode = Validator(model, config, mesh).encode
        reports[EVAL] = _report(lambda: encode.lower(state.params["clip"], eval_batch).compile(compiler_options),
                                config.eval.batch_size, len(devices), chip,
                                dict(parameters=state.params["clip"], batch=eval_batch))
    for report in reports.values():
        report.update(mesh=dict(mesh.shape), context_length=context_length)
    return reports


def _schedule_steps(config):
    """The run's length only sets the learning-rate schedule's constants, never a shape."""
    return config.num_train_steps if config.num_train_steps > 0 else config.optimizer.warmup_steps + 1


def _context_length(config, clip):
    """Tokens per text: the records' when data.dir holds readable ones, else the text tower's positions."""
    if config.data.dir:
        try:
            return int(records.read_meta(config.data.dir)["context_length"])
        except (EntityClipError, OSError, KeyError, TypeError, ValueError):
            pass
    return clip.text.max_position_embeddings


def _report(compile_fn, global_batch, num_devices, chip, arguments):
    """One program's report; `arguments`: the abstract inputs whose per-device bytes are named."""
    report = dict(global_batch=int(global_batch), per_device_batch=global_batch / num_devices,
                  devices=num_devices, arguments={k: analysis.bytes_per_device(v) for k, v in arguments.items()})
    start = time.perf_counter()
    try:
        compiled = compile_fn()
    except jax.errors.JaxRuntimeError as err:
        message = str(err)
        oom = analysis.out_of_memory(message)
        if oom is None:
            first = message.strip().splitlines()[0] if message.strip() else type(err).__name__
            raise EntityClipError(f"the compiler refused the program: {first}") from None
        report.update(compile_seconds=time.perf_counter() - start, fits=False,
                      memory=dict(needed=oom[0], available=oom[1], limit=chip.memory_bytes if chip else None))
        return report
    report["compile_seconds"] = time.perf_counter() - start
    memory = analysis.memory(compiled)
    memory["limit"] = chip.memory_bytes if chip else None
    report["memory"] = memory
    report["fits"] = chip is None or memory["peak"] <= chip.memory_bytes
    flops = setup.flops_per_device(compiled)
    report["flops_per_device"] = flops
    if flops is not None:
        report["flops_per_step"] = flops * num_devices
        report["flops_per_example"] = flops * num_devices / global_batch
        if chip is not None:
            report["step_time_floor_seconds"] = flops / chip.peak_bf16_flops
            report["examples_per_second_ceiling"] = global_batch / report["step_time_floor_seconds"]
    report["collectives"] = analysis.collectives(compiled.as_text())
    return report


def dominant_part(report):
    """(name, bytes) of the largest part of a program's memory per device: the parameters and
    optimizer state, the batch, or what the program computes (activations, gradients, scratch)."""
    arguments = report["arguments"]
    parts = {"parameters and optimizer state": arguments.get("parameters", 0) + arguments.get("optimizer_state", 0),
             "batch": arguments.get("batch", 0)}
    memory = report["memory"]
    total = memory["needed"] if "needed" in memory else memory["peak"]
    parts["activations and temporaries"] = max(total - sum(parts.values()), 0)
    return max(parts.items(), key=lambda item: item[1])


def advice(config, report, accelerator, program=TRAIN):
    """One sentence: what to try when a program does not fit, by the part of memory that dominates."""
    part, size = dominant_part(report)
    if part == "parameters and optimizer state":
        tries = (["a slice with more chips or more memory per chip"] if _is_fsdp(config, accelerator) else
                 [f"sharding them over the chips: {' '.join(map(shell_quoted, _fsdp(accelerator)))}"])
    else:
        tries = ["--config.model.remat=True"] if program == TRAIN else []
        if config.model.dtype == "float32":
            tries.append("--config.model.dtype=bfloat16")
        if part == "batch" and config.data.normalize_on_host:
            tries.append("uint8 pixels normalised on the chip: --config.data.normalize_on_host=False")
        tries += [f"a smaller batch per chip: {override}" for override in _smaller_batch(config, accelerator, program)]
    return f"most of it is {part} ({_gib(size)} per chip); try {', or '.join(tries)}; --suggest compiles the options"


def alternatives(config, accelerator, programs=(TRAIN,)):
    """[(what, overrides)]: the changes --suggest compiles, each on its own, for the programs that do not fit."""
    found = []
    if TRAIN in programs and not config.model.remat:
        found.append(("rematerialised tower layers", ["--config.model.remat=True"]))
    if config.model.dtype == "float32":
        found.append(("bfloat16 compute", ["--config.model.dtype=bfloat16"]))
    if accelerator.chips > 1 and not _is_fsdp(config, accelerator):
        found.append((f"parameters and optimizer state sharded over the {accelerator.chips} chips of a slice",
                      _fsdp(accelerator)))
    for program in programs:
        found += [(f"half the {'training' if program == TRAIN else 'validation'} batch", [override])
                  for override in _smaller_batch(config, accelerator, program)]
    return found


def _smaller_batch(config, accelerator, program):
    """[the override halving the program's batch], or [] when half no longer splits over the chips."""
    name = "batch_size" if program == TRAIN else "eval.batch_size"
    half = (config.batch_size if program == TRAIN else config.eval.batch_size) // 2
    devices = accelerator.total_chips
    return [f"--config.{name}={half}"] if half >= devices and half % devices == 0 else []


def _is_fsdp(config, accelerator):
    """Whether every parameter is already split over all chips of a slice."""
    return (dict(config.mesh).get(sharding.FSDP_AXIS) == accelerator.chips
            and tuple(map(tuple, config.sharding.rules)) == ((".*", "fsdp"),))


def _fsdp(accelerator):
    return [f"--config.mesh=(('data', -1), ('fsdp', {accelerator.chips}))", "--config.sharding.rules=(('.*', 'fsdp'),)"]


def shell_quoted(override):
    """--config.a=value as typed in a shell: the value quoted when it holds spaces or parentheses."""
    name, _, value = override.partition("=")
    return f'{name}="{value}"' if any(c in value for c in " ()'") else override


def _gib(size):
    return f"{size / 2 ** 30:.2f} GiB"
