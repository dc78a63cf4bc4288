"""Train-step throughput: the full EntityCLIP step beside a plain CLIP (VTC-only)
fine-tuning step of our own, and optionally transformers' PyTorch CLIPModel.

    python benchmarks/bench_train_step.py                         # tiny towers, batch 32, CPU
    python benchmarks/bench_train_step.py --preset vit-b-32 --dtype bfloat16 --batch 192 --torch   # on a GPU
    python benchmarks/bench_train_step.py --preset vit-b-16 --dtype bfloat16 --batch 192 --torch

Reports samples/s, model FLOPs per sample from XLA's cost analysis of the
compiled step (forward + backward + optimizer, per device program times the
device count), and utilisation = achieved FLOP/s / peak where the peak is known
(--peak-tflops, or a table of dense bf16/fp32 peaks for common GPUs/TPUs; never
guessed for CPUs). Same synthetic batch (no TensorFlow needed), same optimizer
(the release's Adam) for every step measured. After compilation and --warmup
steps, the sides alternate over --rounds rounds of --steps steps, the order
reversed every other round; ratios are medians of per-round ratios with their
min-max spread. Prints one JSON line per figure; --out also writes them all.
"""
import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rounds import alternate, emit, ratio, spread  # noqa: E402

# Dense peak TFLOP/s per device (bf16, fp32) from the vendors' data sheets.
PEAK_TFLOPS = {
    "H100": (989.0, 67.0), "H200": (989.0, 67.0), "A100": (312.0, 19.5), "L4": (121.0, 30.3),
    "TPU v4": (275.0, None), "TPU v5 lite": (197.0, None), "TPU v5p": (459.0, None),
}


def known_peak(device, dtype):
    kind = getattr(device, "device_kind", "")
    for name, (bf16, fp32) in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return bf16 if dtype == "bfloat16" else fp32
    return None


def random_batch(clip_config, batch_size, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    text = clip_config.text
    length, size = text.max_position_embeddings, clip_config.vision.image_size

    def ids():
        out = np.full((batch_size, length), text.pad_token_id, np.int32)
        for row in out:
            n = rng.integers(8, length)
            row[0], row[1:n - 1], row[n - 1] = text.bos_token_id, rng.integers(1, 40000, n - 2), text.eos_token_id
        return out
    return {"pixel_values": rng.normal(size=(batch_size, size, size, 3)).astype(np.float32),
            "query_ids": ids(), "explanation_ids": ids()}


def prepare_jax(mode, args):
    """(run: args.steps steps, info) of our jitted train step in `mode`."""
    import jax

    from entityclip_jax.config import default_config
    from entityclip_jax.checkpoints.model_init import init_entityclip
    from entityclip_jax.parallel import sharding
    from entityclip_jax.parallel.mesh import make_mesh
    from entityclip_jax.train import optimizer
    from entityclip_jax.train.state import abstract_state, create_train_state, state_specs
    from entityclip_jax.train.step import make_train_step

    config = default_config()
    config.model.init, config.model.mode, config.model.dtype = f"random:{args.preset}", mode, args.dtype
    config.model.remat = args.remat
    config.batch_size = args.batch
    model, params = init_entityclip(jax.random.key(0), config)
    mesh = make_mesh(config.mesh)
    tx = optimizer.make_optimizer(config.optimizer, 1000, params)
    schedule = optimizer.learning_rate_schedule(config.optimizer, 1000)
    abstract = abstract_state(params, tx)
    shardings = sharding.to_shardings(state_specs(abstract, mesh, config.sharding.rules, 0), mesh)
    state = create_train_state(params, tx, shardings)
    del params
    host = random_batch(model.clip, args.batch)
    batch_shardings = sharding.batch_shardings(mesh, host)
    batch = jax.device_put(host, batch_shardings)
    step = make_train_step(model, tx, schedule, mesh, shardings, batch_shardings, seed=0)

    started = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - started
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops_per_step = float(cost.get("flops", 0.0)) * mesh.size  # cost of one device's program

    holder = {"state": state}

    def run():
        for _ in range(args.steps):
            holder["state"], holder["metrics"] = compiled(holder["state"], batch)
        jax.block_until_ready((holder["state"], holder["metrics"]))

    for _ in range(args.warmup):
        holder["state"], holder["metrics"] = compiled(holder["state"], batch)
    jax.block_until_ready(holder["metrics"])
    peak = args.peak_tflops or known_peak(jax.devices()[0], args.dtype)
    info = dict(impl=f"jax {mode}", compile_s=compile_s, flops_per_step=flops_per_step,
                gflops_per_sample=flops_per_step / args.batch / 1e9, peak_tflops=peak, devices=mesh.size)
    return run, info


def prepare_torch(args):
    """transformers' CLIPModel fine-tuning step (VTC via return_loss, Adam) at the same shape."""
    import torch
    import transformers

    from entityclip_jax.models.clip_config import preset

    clip_config = preset(args.preset)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = transformers.CLIPModel(clip_config.to_hf()).to(device).train()
    optim = torch.optim.Adam(model.parameters(), lr=1e-5, betas=(0.9, 0.999))
    host = random_batch(clip_config, args.batch)
    pixel_values = torch.from_numpy(host["pixel_values"]).permute(0, 3, 1, 2).contiguous().to(device)
    input_ids = torch.from_numpy(host["query_ids"]).long().to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def step():
        optim.zero_grad(set_to_none=True)
        with autocast:
            loss = model(input_ids=input_ids, pixel_values=pixel_values, return_loss=True).loss
        loss.backward()
        optim.step()
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        for _ in range(args.steps):
            step()
        sync()

    for _ in range(args.warmup):
        step()
    sync()
    return run, dict(impl="torch transformers CLIPModel (VTC)", devices=1, torch_threads=torch.get_num_threads())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="tower architecture: tiny, vit-b-32, vit-b-16, vit-l-14")
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the compared sides")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument("--remat", action="store_true", help="rematerialise tower layers")
    parser.add_argument("--torch", action="store_true", help="also time transformers' PyTorch CLIPModel")
    parser.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per device, for utilisation")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    import jax
    sides = {"entityclip": prepare_jax("entityclip", args), "clip_finetune": prepare_jax("clip_finetune", args)}
    if args.torch:
        sides["torch"] = prepare_torch(args)
    seconds = alternate({name: run for name, (run, _) in sides.items()}, args.rounds)
    machine = dict(platform=platform.platform(), cpu_count=os.cpu_count(), jax=jax.__version__,
                   device=str(jax.devices()[0].device_kind), device_count=jax.device_count(),
                   load_average=os.getloadavg()[0])
    shape = dict(preset=args.preset, batch=args.batch, dtype=args.dtype, rounds=args.rounds, steps=args.steps)
    figures = []
    for name, (_, info) in sides.items():
        step_s = [s / args.steps for s in seconds[name]]
        figure = dict(figure=f"train_step_{name}", **shape, **info, samples_per_s=spread([args.batch / s for s in step_s]),
                      step_ms=spread([1e3 * s for s in step_s]), **machine)
        if info.get("peak_tflops"):
            figure["utilisation"] = info["flops_per_step"] / min(step_s) / 1e12 / (info["peak_tflops"] * info["devices"])
        figures.append(figure)
    figures.append(dict(figure="train_step_entityclip_over_clip_finetune", **shape,
                        step_time_ratio=ratio(seconds["entityclip"], seconds["clip_finetune"]), **machine))
    if args.torch:
        figures.append(dict(figure="train_step_clip_finetune_over_torch", **shape,
                            step_time_ratio=ratio(seconds["clip_finetune"], seconds["torch"]), **machine))
    for figure in figures:
        emit(**figure)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
