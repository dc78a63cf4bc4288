"""`entityclip plan --config C --accelerator v5e-16 [--slices N] [--json] [--suggest] [--config.a.b=v ...]`

Compiles the training step and the validation encode step of `entityclip train`
with that config for that accelerator, on this machine, and reports per chip
whether they fit, their memory, FLOPs, speed ceiling and collectives (entityclip_jax/plan/).

Exit status: 0 both programs fit; 3 one does not (the line saying so names what
dominates and what to try; --suggest compiles those options and says which fit);
2 bad input (an unknown accelerator, a bad slice count, a config error), one line.
"""
import contextlib
import json

import jax

from entityclip_jax.config import load_config
from entityclip_jax.errors import EntityClipError
from entityclip_jax.plan import accelerators, planner
from entityclip_jax.train import chips

ACCEPTS_OVERRIDES = True  # --config.a.b=value pass through as args.overrides
EXIT_DOES_NOT_FIT = 3
NAMES = {planner.TRAIN: "train step", planner.EVAL: "eval encode step"}


def configure(parser):
    parser.add_argument("--config", required=True,
                        help="config file with get_config(), as for `entityclip train`, e.g. configs/n24news.py:b16")
    parser.add_argument("--accelerator", required=True,
                        help=f"what to plan for: {accelerators.ACCEPTED}")
    parser.add_argument("--slices", default="1", help="number of TPU slices (multislice; the data axis spans them)")
    parser.add_argument("--json", action="store_true", help="print the whole plan as one JSON object")
    parser.add_argument("--suggest", action="store_true",
                        help="when it does not fit: compile remat, bf16, fsdp and a smaller batch and say which fit")


def run(args):
    slices = int(args.slices) if str(args.slices).isdigit() else args.slices
    accelerator = accelerators.parse(args.accelerator, slices)
    config = load_config(args.config, args.overrides)
    _compile_only()
    reports = planner.plan(config, accelerator)
    fits = all(report["fits"] for report in reports.values())
    result = dict(config=args.config, overrides=list(args.overrides), accelerator=_describe(accelerator),
                  model=dict(init=config.model.init, mode=config.model.mode, dtype=config.model.dtype,
                             remat=bool(config.model.remat)),
                  fits=fits, **reports)
    if not args.json:
        _print_plan(result, accelerator)
    if args.suggest and not fits:
        result["suggestions"] = _suggest(args, config, accelerator, reports, echo=not args.json)
    if args.json:
        print(json.dumps(result, indent=1))
    return 0 if fits else EXIT_DOES_NOT_FIT


def _compile_only():
    """Plan compiles only; its own backend is the CPU whatever the machine (a TPU VM busy training
    included). Set before JAX starts a backend; a process that started them already keeps its own."""
    if jax.config.jax_platforms is None:
        with contextlib.suppress(RuntimeError):
            jax.config.update("jax_platforms", "cpu")


def _describe(accelerator):
    chip = chips.chip(accelerator.device_kind)
    return dict(name=accelerator.name, platform=accelerator.platform, slices=accelerator.num_slices,
                chips_per_slice=accelerator.chips, chips=accelerator.total_chips, device_kind=accelerator.device_kind,
                topology=accelerator.topology, chip_config_name=accelerator.chip_config_name,
                chips_per_host_bounds=list(accelerator.host_bounds), peak_bf16_flops=chip.peak_bf16_flops,
                memory_bytes=chip.memory_bytes, source=chip.source)


def _suggest(args, config, accelerator, reports, echo):
    """Compiles each alternative for the programs that did not fit, then all of them together when
    none fits alone; [{what, overrides, fits, memory or error}]."""
    failing = tuple(name for name, report in reports.items() if not report["fits"])
    options = planner.alternatives(config, accelerator, failing)
    found = []
    for what, extra in options:
        found.append(_try(args, accelerator, failing, what, extra, echo))
    if len(options) > 1 and not any(item["fits"] for item in found):
        together = [override for _, extra in options for override in extra]
        found.append(_try(args, accelerator, failing, "all of these together", together, echo))
    return found


def _try(args, accelerator, programs, what, extra, echo):
    try:
        reports = planner.plan(load_config(args.config, [*args.overrides, *extra]), accelerator, programs)
    except EntityClipError as err:  # e.g. a mesh the slice cannot take: say so, try the next
        item = dict(what=what, overrides=extra, fits=False, error=str(err))
    else:
        item = dict(what=what, overrides=extra, fits=all(r["fits"] for r in reports.values()),
                    memory={name: _peak(r) for name, r in reports.items()})
    if echo:
        verdict = ("fits" if item["fits"] else "does not fit") + (
            f" ({item['error']})" if "error" in item else
            ": " + ", ".join(f"{NAMES[n]} {_size(m)} per chip" for n, m in item["memory"].items()))
        print(f"suggest: {what}: {verdict}; {' '.join(map(planner.shell_quoted, extra))}", flush=True)
    return item


def _peak(report):
    memory = report["memory"]
    return memory.get("needed", memory.get("peak"))


def _print_plan(result, accelerator):
    info = result["accelerator"]
    model = result["model"]
    print(f"plan: {result['config']} on {accelerator.label}: {info['chips']} x {chips.chip(info['device_kind']).name} "
          f"({info['peak_bf16_flops'] / 1e12:g} TFLOP/s bf16 and {_size(info['memory_bytes'])} each: "
          f"{info['source']})")
    any_report = result[planner.TRAIN]
    mesh = " ".join(f"{k}={v}" for k, v in any_report["mesh"].items())
    print(f"model: {model['init']}, mode {model['mode']}, dtype {model['dtype']}, remat {model['remat']}; "
          f"mesh {mesh}; {any_report['context_length']} tokens per text")
    unit = "GPU" if accelerator.platform == "gpu" else "chip"
    for name in (planner.TRAIN, planner.EVAL):
        _print_program(NAMES[name], result[name], result["accelerator"]["peak_bf16_flops"], unit)
    verdict = "fits" if result["fits"] else "DOES NOT FIT"
    print(f"verdict: {verdict} on {accelerator.label} (exit status {0 if result['fits'] else EXIT_DOES_NOT_FIT})")


def _print_program(title, report, peak_flops, unit):
    memory = report["memory"]
    head = f"{title}, batch {report['global_batch']} ({report['per_device_batch']:g} per {unit})"
    if "needed" in memory:
        print(f"{head}: does not fit: the compiler needs {_size(memory['needed'])} per {unit}, "
              f"{_size(memory['available'])} available; {report['advice']} "
              f"(compile {report['compile_seconds']:.1f} s)")
        return
    free = memory["limit"] - memory["peak"]
    state = "fits" if report["fits"] else "does not fit"
    advice = "" if report["fits"] else f"; {report['advice']}"
    print(f"{head}: {state}: peak {_size(memory['peak'])} of {_size(memory['limit'])} per {unit} "
          f"({'free' if free >= 0 else 'over'} {_size(abs(free))}){advice}")
    arguments = report["arguments"]
    parts = [f"{name.replace('_', ' ')} {_size(size)}" for name, size in arguments.items()]
    print(f"  memory per {unit}: {', '.join(parts)} (arguments {_size(memory['arguments'])} as laid out); "
          f"temporaries {_size(memory['temporaries'])}, outputs not aliased "
          f"{_size(memory['outputs'] - memory['aliased'])}, code {_size(memory['code'])}")
    if report.get("flops_per_device") is None:
        print("  FLOPs: not counted by the CUDA compiler without a GPU (cost_analysis() is None); the same config "
              "planned for a TPU gives the step's FLOPs, and a training run logs its own")
    else:
        print(f"  FLOPs: {report['flops_per_device'] / 1e9:.4g} GFLOP per {unit} per step, "
              f"{report['flops_per_example'] / 1e9:.4g} GFLOP per example")
        print(f"  ceiling at {peak_flops / 1e12:g} TFLOP/s per {unit}: "
              f"{_duration(report['step_time_floor_seconds'])} per step, "
              f"{report['examples_per_second_ceiling']:,.0f} examples/s")
    collectives = ", ".join(f"{c['kind']} x{c['count']} {_size(c['bytes'])}" for c in report["collectives"])
    print(f"  collectives per step (per {unit}): {collectives or 'none'}")
    print(f"  compiled in {report['compile_seconds']:.1f} s")


def _size(size):
    if size is None:
        return "?"
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def _duration(seconds):
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"
