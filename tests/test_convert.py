"""Hugging Face and OpenAI layouts in and out, and every bad input refused clearly."""
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from conftest import tiny_hf_clip
from entityclip_jax.cli import main as cli_main
from entityclip_jax.weights.hf import load_hf_checkpoint, save_hf_checkpoint
from entityclip_jax.weights.openai import openai_to_flax, read_openai_checkpoint
from entityclip_jax.errors import EntityClipError


def flat(params):
    return traverse_util.flatten_dict(jax.device_get(params), sep=".")


def test_round_trip_is_bit_identical_and_loads_cleanly(tiny_hf_dir, tmp_path):
    config, params = load_hf_checkpoint(tiny_hf_dir)
    out = save_hf_checkpoint(params, config, tmp_path / "export")
    original = {k: v.numpy() for k, v in transformers.CLIPModel.from_pretrained(tiny_hf_dir).state_dict().items()}
    reloaded, info = transformers.CLIPModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    exported = {k: v.numpy() for k, v in reloaded.state_dict().items()}
    assert exported.keys() == original.keys()
    for key in original:
        assert np.array_equal(exported[key], original[key]), key


def test_bf16_params_are_written_as_fp32(tiny_hf_dir, tmp_path):
    config, params = load_hf_checkpoint(tiny_hf_dir)
    bf16 = jax.tree.map(lambda x: np.asarray(x).astype(jax.numpy.bfloat16), params)
    out = save_hf_checkpoint(bf16, config, tmp_path / "bf16")
    from safetensors.numpy import load_file
    assert {v.dtype for v in load_file(os.path.join(out, "model.safetensors")).values()} == {np.dtype("float32")}


def test_sharded_safetensors_and_pytorch_bin_load_the_same(tiny_hf_dir, tmp_path):
    model = tiny_hf_clip()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    (tmp_path / "bin").mkdir()
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    _, reference = load_hf_checkpoint(tiny_hf_dir)
    for directory in (tmp_path / "sharded", tmp_path / "bin"):
        _, params = load_hf_checkpoint(str(directory))
        for key, value in flat(reference).items():
            assert np.array_equal(flat(params)[key], value), (directory, key)


def test_side_files_are_copied(tiny_hf_dir, tmp_path):
    for name in ("vocab.json", "preprocessor_config.json"):
        (tmp_path / "tiny_clip" / name).write_text("{}")
    config, params = load_hf_checkpoint(tiny_hf_dir)
    out = save_hf_checkpoint(params, config, tmp_path / "with_files", source_dir=tiny_hf_dir)
    assert {"vocab.json", "preprocessor_config.json"} <= set(os.listdir(out))


def openai_state_dict_from_hf(model):
    """The documented mapping HF -> OpenAI layout, written independently of our importer."""
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    out = {
        "logit_scale": sd["logit_scale"],
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].T,
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].T,
    }
    for hf_prefix, oa_prefix in (("text_model.encoder.layers.", "transformer.resblocks."),
                                 ("vision_model.encoder.layers.", "visual.transformer.resblocks.")):
        for i in range(2):
            h, o = f"{hf_prefix}{i}.", f"{oa_prefix}{i}."
            out[o + "attn.in_proj_weight"] = np.concatenate(
                [sd[h + f"self_attn.{p}_proj.weight"] for p in "qkv"])
            out[o + "attn.in_proj_bias"] = np.concatenate([sd[h + f"self_attn.{p}_proj.bias"] for p in "qkv"])
            for oa, hfn in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                            ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[o + oa + ".weight"] = sd[h + hfn + ".weight"]
                out[o + oa + ".bias"] = sd[h + hfn + ".bias"]
    return out


def tiny_openai_model():
    """A tiny CLIPModel in OpenAI's conventions: heads = width // 64, 4*width MLPs,
    the OpenAI vocabulary's BOS/EOT ids, so the OpenAI layout describes it fully."""
    import transformers as tf_
    text = tiny_hf_clip(hidden_size=64, intermediate_size=256, num_attention_heads=1, vocab_size=49408,
                        bos_token_id=49406, eos_token_id=49407).config.text_config
    vision = dict(tiny_hf_clip().config.vision_config.to_dict(), hidden_size=64, intermediate_size=256,
                  num_attention_heads=1)
    torch.manual_seed(1)
    return tf_.CLIPModel(tf_.CLIPConfig(text_config=text.to_dict(), vision_config=vision,
                                        projection_dim=24)).eval()


def test_openai_layout_import_equals_hf_import(tmp_path):
    model = tiny_openai_model()
    model.save_pretrained(tmp_path / "hf")
    hf_config, hf_params = load_hf_checkpoint(str(tmp_path / "hf"))
    state = openai_state_dict_from_hf(model)
    # As the EntityCLIP release saves it: nested, DataParallel-prefixed, fp16.
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": torch.from_numpy(v).half() if k != "logit_scale"
                                           else torch.from_numpy(v) for k, v in state.items()}},
               tmp_path / "release.pt")
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "openai.pt")
    config, params = openai_to_flax(read_openai_checkpoint(str(tmp_path / "openai.pt")))
    assert config.text.num_attention_heads == hf_config.text.num_attention_heads
    assert config.vision == hf_config.vision and config.projection_dim == hf_config.projection_dim
    for key, value in flat(hf_params).items():
        assert np.array_equal(flat(params)[key], value), key
    _, half = openai_to_flax(read_openai_checkpoint(str(tmp_path / "release.pt")))
    for key, value in flat(hf_params).items():
        np.testing.assert_allclose(flat(half)[key], value, atol=2e-3, rtol=2e-3, err_msg=key)


def test_cli_import_export_round_trip(tiny_hf_dir, tmp_path, capsys):
    assert cli_main(["import-hf", tiny_hf_dir, str(tmp_path / "towers")]) == 0
    assert cli_main(["export-hf", str(tmp_path / "towers"), str(tmp_path / "hf")]) == 0
    printed = capsys.readouterr().out
    assert "verified with transformers" in printed
    _, a = load_hf_checkpoint(tiny_hf_dir)
    _, b = load_hf_checkpoint(str(tmp_path / "hf"))
    assert all(np.array_equal(flat(a)[k], flat(b)[k]) for k in flat(a))
    # Existing destination is refused with a clear one-line error.
    assert cli_main(["export-hf", str(tmp_path / "towers"), str(tmp_path / "hf")]) == 2
    assert "exists" in capsys.readouterr().err


# ---- bad input ------------------------------------------------------------

def test_directory_without_config(tmp_path):
    with pytest.raises(EntityClipError, match="no config.json"):
        load_hf_checkpoint(str(tmp_path))


def test_bert_and_vision_only_configs_are_refused(tmp_path):
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=37).save_pretrained(tmp_path / "bert")
    with pytest.raises(EntityClipError, match="model_type 'bert'"):
        load_hf_checkpoint(str(tmp_path / "bert"))
    transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=37).save_pretrained(tmp_path / "vision")
    with pytest.raises(EntityClipError, match="clip_vision_model"):
        load_hf_checkpoint(str(tmp_path / "vision"))


def test_truncated_safetensors_names_the_file(tiny_hf_dir):
    path = os.path.join(tiny_hf_dir, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(EntityClipError, match="model.safetensors.*truncated"):
        load_hf_checkpoint(tiny_hf_dir)


def test_wrong_shape_and_unknown_keys_name_the_parameter(tmp_path):
    from safetensors.torch import save_file
    model = tiny_hf_clip()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    model.config.save_pretrained(tmp_path / "shape")
    bad = dict(state)
    bad["text_model.encoder.layers.1.mlp.fc1.weight"] = torch.zeros(5, 32)
    save_file(bad, tmp_path / "shape" / "model.safetensors")
    with pytest.raises(EntityClipError, match=r"text_model\.encoder\.layers\.1\.mlp\.fc1\.weight.*\(5, 32\).*\(37, 32\)"):
        load_hf_checkpoint(str(tmp_path / "shape"))
    model.config.save_pretrained(tmp_path / "extra")
    save_file(dict(state, **{"itm_head.weight": torch.zeros(2, 24)}), tmp_path / "extra" / "model.safetensors")
    with pytest.raises(EntityClipError, match="unexpected key.*itm_head.weight"):
        load_hf_checkpoint(str(tmp_path / "extra"))
    model.config.save_pretrained(tmp_path / "missing")
    save_file({k: v for k, v in state.items() if "visual_projection" not in k},
              tmp_path / "missing" / "model.safetensors")
    with pytest.raises(EntityClipError, match="lacks 1 CLIP parameter.*visual_projection.weight"):
        load_hf_checkpoint(str(tmp_path / "missing"))


def test_failed_export_leaves_nothing_behind(tiny_hf_dir, tmp_path, monkeypatch):
    config, params = load_hf_checkpoint(tiny_hf_dir)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")
    import safetensors.numpy
    monkeypatch.setattr(safetensors.numpy, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_hf_checkpoint(params, config, tmp_path / "dest")
    assert os.listdir(tmp_path) == ["tiny_clip"]  # no destination, no temporary directory


def test_openai_layout_errors(tmp_path):
    torch.save({"visual.conv1.weight": torch.zeros(64, 3, 6, 6)}, tmp_path / "partial.pt")
    with pytest.raises(EntityClipError, match="lacks visual.positional_embedding"):
        openai_to_flax(read_openai_checkpoint(str(tmp_path / "partial.pt")))
    state = openai_state_dict_from_hf(tiny_openai_model())
    state["experts.0.ln_1.weight"] = np.zeros(3, np.float32)
    with pytest.raises(EntityClipError, match="outside the CLIP towers.*experts.0.ln_1.weight"):
        openai_to_flax(state)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(EntityClipError, match="junk.pt"):
        read_openai_checkpoint(str(tmp_path / "junk.pt"))
