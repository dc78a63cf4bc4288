"""Image and text encoding throughput: our jitted Flax CLIP vs transformers' PyTorch CLIPModel.

Same architecture (ViT-B/32 by default), same random weights, same synthetic
inputs (no TensorFlow needed). After a warm-up call of each, the four sides
(JAX image, PyTorch image, JAX text, PyTorch text) alternate over --rounds
rounds of --calls calls each, the order reversed every other round; a figure is
the median over rounds of PyTorch time / JAX time (> 1: JAX faster) with its
min-max spread. Prints one JSON line per tower.

    python benchmarks/bench_encode.py [--preset vit-b-32] [--batch 32] [--rounds 5] [--calls 2]
"""
import argparse
import os
import platform
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rounds import alternate, emit, ratio, spread  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vit-b-32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2, help="calls of each side per round")
    parser.add_argument("--dtype", default="float32", help="JAX compute dtype (bfloat16 on GPU/TPU)")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from entityclip_jax.weights.hf import expected_params
    from entityclip_jax.weights.layout import state_dict_to_flax
    from entityclip_jax.models.clip import CLIPModel
    from entityclip_jax.models.clip_config import preset

    config = preset(args.preset)
    torch.manual_seed(0)
    torch_model = transformers.CLIPModel(config.to_hf()).eval()
    params = state_dict_to_flax({k: v.numpy() for k, v in torch_model.state_dict().items()},
                                expected_params(config))
    params = jax.device_put(params)

    rng = np.random.default_rng(0)
    size, length = config.vision.image_size, config.text.max_position_embeddings
    pixels = rng.standard_normal((args.batch, size, size, 3)).astype(np.float32)
    ids = rng.integers(1, 49000, (args.batch, length))
    ids[:, 0], ids[:, -1] = 49406, 49407

    model = CLIPModel(config, dtype=jnp.dtype(args.dtype))
    encode_image = jax.jit(lambda p, x: model.apply({"params": p}, x, method=CLIPModel.encode_image).embeds)
    encode_text = jax.jit(lambda p, t: model.apply({"params": p}, t, method=CLIPModel.encode_text).embeds)
    jax_pixels, jax_ids = jnp.asarray(pixels), jnp.asarray(ids)
    torch_pixels, torch_ids = torch.from_numpy(pixels.transpose(0, 3, 1, 2)).contiguous(), torch.from_numpy(ids)

    def repeated(fn):
        def run():
            for _ in range(args.calls):
                fn()
        return run

    sides = {
        "jax_image": repeated(lambda: encode_image(params, jax_pixels).block_until_ready()),
        "torch_image": repeated(lambda: torch_model.get_image_features(pixel_values=torch_pixels)),
        "jax_text": repeated(lambda: encode_text(params, jax_ids).block_until_ready()),
        "torch_text": repeated(lambda: torch_model.get_text_features(input_ids=torch_ids)),
    }
    with torch.inference_mode():
        for side in sides.values():     # warm-up: compilation, allocator
            side()
        seconds = alternate(sides, args.rounds)

    machine = dict(machine=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                   jax=jax.__version__, jax_device=jax.devices()[0].platform, torch=torch.__version__,
                   torch_threads=torch.get_num_threads(), load_average=os.getloadavg()[0])
    for tower in ("image", "text"):
        items = args.batch * args.calls
        emit(f"encode_{tower}", preset=args.preset, batch=args.batch, dtype=args.dtype, rounds=args.rounds,
             jax_items_per_s=spread([items / s for s in seconds[f"jax_{tower}"]]),
             torch_items_per_s=spread([items / s for s in seconds[f"torch_{tower}"]]),
             jax_speedup_over_torch=ratio(seconds[f"torch_{tower}"], seconds[f"jax_{tower}"]), **machine)


if __name__ == "__main__":
    main()
