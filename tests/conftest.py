"""Test setup: 8 fake CPU devices and XLA's backend at optimisation level 0, set before jax is imported anywhere."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["XLA_FLAGS"] += "" if "device_count" in os.environ["XLA_FLAGS"] else " --xla_force_host_platform_device_count=8"
# LLVM's optimisations off: the suite compiles hundreds of small programs and runs each a few
# times, so optimising costs more than it saves (a tiny training run 21 s -> 17 s, the fast set
# 123 s -> 102 s). XLA's own passes, and so the program, are unchanged; the processes the tests
# start inherit it.
os.environ["XLA_FLAGS"] += "" if "optimization_level" in os.environ["XLA_FLAGS"] else " --xla_backend_optimization_level=0"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def tiny_hf_clip_config(**text_overrides):
    """A tiny transformers CLIPConfig: 2 layers per tower, odd sizes to catch transposes."""
    import transformers
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, eos_token_id=98,
                bos_token_id=97, pad_token_id=0)
    text.update(text_overrides)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=30, patch_size=6)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)


def tiny_hf_clip(seed=0, **text_overrides):
    """A random transformers CLIPModel (PyTorch), the reference our Flax model must match."""
    import torch
    import transformers
    torch.manual_seed(seed)
    model = transformers.CLIPModel(tiny_hf_clip_config(**text_overrides)).eval()
    with torch.no_grad():  # a non-default logit_scale, so a dropped value shows
        model.logit_scale.fill_(3.1)
    return model


@pytest.fixture
def tiny_hf_dir(tmp_path):
    """A saved tiny CLIPModel directory (config.json + model.safetensors)."""
    path = tmp_path / "tiny_clip"
    tiny_hf_clip().save_pretrained(path)
    return str(path)
