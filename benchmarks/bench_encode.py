"""Image and text encoding throughput: our jitted Flax CLIP vs transformers' PyTorch CLIPModel.

Same architecture (ViT-B/32 by default), same random weights, same inputs, one
run. Prints a Markdown table for BENCHMARKS.md.

    python benchmarks/bench_encode.py [--preset vit-b-32] [--batch 32] [--repeats 5]
"""
import argparse
import os
import platform
import time

import numpy as np


def timed(fn, repeats):
    fn()  # warm-up (compilation for JAX)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vit-b-32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", help="JAX compute dtype (bfloat16 on GPU/TPU)")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from entityclip_jax.convert.hf import expected_params
    from entityclip_jax.convert.layout import state_dict_to_flax
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
    torch_pixels, torch_ids = torch.from_numpy(pixels.transpose(0, 3, 1, 2)), torch.from_numpy(ids)

    results = {}
    with torch.inference_mode():
        results["image"] = (
            timed(lambda: encode_image(params, jax_pixels).block_until_ready(), args.repeats),
            timed(lambda: torch_model.get_image_features(pixel_values=torch_pixels), args.repeats))
        results["text"] = (
            timed(lambda: encode_text(params, jax_ids).block_until_ready(), args.repeats),
            timed(lambda: torch_model.get_text_features(input_ids=torch_ids), args.repeats))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); {args.preset}, batch {args.batch}, {args.dtype}")
    print("| tower | JAX items/s | PyTorch items/s | JAX / PyTorch |")
    print("|---|---|---|---|")
    for tower, (jax_s, torch_s) in results.items():
        print(f"| {tower} | {args.batch / jax_s:.1f} | {args.batch / torch_s:.1f} | {torch_s / jax_s:.2f} |")


if __name__ == "__main__":
    main()
