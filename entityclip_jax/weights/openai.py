"""OpenAI CLIP state dicts (the layout of OpenAI's release and of the EntityCLIP
authors' release) -> (CLIPConfig, Flax params).

The architecture is read off the tensor shapes, as OpenAI's build_model does.
The fused attention projection in_proj_weight [3W, W] splits into q, k, v.
"""
import re

import numpy as np
import safetensors.numpy

from entityclip_jax import storage
from entityclip_jax.weights.hf import expected_params
from entityclip_jax.weights.layout import state_dict_to_flax
from entityclip_jax.weights.torchscript import NotReadable, is_torchscript, read_torchscript_tensors
from entityclip_jax.errors import EntityClipError
from entityclip_jax.models.clip_config import CLIPConfig, TextConfig, VisionConfig

_TOWER_KEY = re.compile(r"^(visual\.|transformer\.|token_embedding\.|positional_embedding$|"
                        r"ln_final\.|text_projection$|logit_scale$)")
_HEAD_WIDTH = 64  # OpenAI CLIP: heads = width // 64


def read_openai_checkpoint(path, trust_torchscript=False):
    """A .pt/.pth/.bin/.safetensors file -> {key: fp32 array}, prefixes stripped.

    Accepts TorchScript archives (OpenAI's downloads; their tensors are read
    without running their code, see torchscript.py), plain state dicts, and
    training checkpoints that nest them under state_dict / model_state_dict /
    model, with or without DataParallel's 'module.' prefix. Only
    trust_torchscript lets torch.jit.load run an archive that cannot be read safely.
    The file may be on gs://: it is read from a local copy.
    """
    path = str(path)
    if not storage.path(path).is_file():
        raise EntityClipError(f"{path} is not a file; pass an OpenAI-layout checkpoint (.pt/.pth/.safetensors)")
    with storage.local_copy(path) as local:  # torch and safetensors read local files only
        if path.endswith(".safetensors"):
            try:
                tensors = safetensors.numpy.load_file(local)
            except Exception as err:
                raise EntityClipError(f"cannot read {path}: {err}") from None
        elif is_torchscript(local):
            tensors = _read_torchscript(local, trust_torchscript, shown=path)
        else:
            tensors = _read_torch(local, shown=path)
    return {k.removeprefix("module."): np.asarray(v, dtype=np.float32) for k, v in tensors.items()}


def _read_torchscript(path, trust, shown):
    try:
        return read_torchscript_tensors(path)
    except NotReadable as err:
        if not trust:
            raise EntityClipError(
                f"{shown} is a TorchScript archive whose tensors cannot be read without running its code "
                f"({err}); use a Hugging Face CLIPModel directory or hub id (e.g. openai/clip-vit-base-patch32) "
                f"instead, or, only if you trust the file, `entityclip import-openai {shown} OUT "
                "--trust-torchscript` and use OUT") from None
    import torch  # lazy: heavy; only for an archive the user said to trust
    try:
        return {k: v.float().numpy() for k, v in torch.jit.load(path, map_location="cpu").state_dict().items()}
    except Exception as err:
        raise EntityClipError(f"cannot read {shown} as a TorchScript archive: {err}") from None


def _read_torch(path, shown):
    import torch  # lazy: heavy; only for .pt files
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise EntityClipError(f"cannot read {shown} as a weights-only state dict: {err}") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise EntityClipError(f"{shown} holds a {type(obj).__name__}, not a state dict")
    return {k: v.float().numpy() for k, v in obj.items() if hasattr(v, "float")}


def split_tower_keys(state_dict):
    """(tower tensors, everything else): the rest holds e.g. EntityCLIP's experts."""
    towers = {k: v for k, v in state_dict.items() if _TOWER_KEY.match(k)}
    return towers, {k: v for k, v in state_dict.items() if k not in towers}


def config_from_openai(state_dict):
    """The architecture, read off the shapes."""
    def need(key):
        if key not in state_dict:
            raise EntityClipError(f"OpenAI-layout checkpoint lacks {key}; is it a CLIP state dict "
                                  "(visual.conv1.weight, transformer.resblocks.N..., token_embedding.weight)?")
        return state_dict[key]

    conv = need("visual.conv1.weight")
    vision_width, patch = conv.shape[0], conv.shape[-1]
    grid = int(round((need("visual.positional_embedding").shape[0] - 1) ** 0.5))
    text_width = need("ln_final.weight").shape[0]
    for name, width in (("text", text_width), ("vision", vision_width)):
        if width % _HEAD_WIDTH:
            raise EntityClipError(f"the {name} tower is {width} wide, not a multiple of {_HEAD_WIDTH}: OpenAI CLIP "
                                  "has one attention head per 64 channels, so this is no OpenAI-layout CLIP")
    count = lambda prefix: len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})
    text = TextConfig(vocab_size=need("token_embedding.weight").shape[0], hidden_size=text_width,
                      intermediate_size=4 * text_width,
                      num_hidden_layers=count("transformer.resblocks."),
                      num_attention_heads=text_width // _HEAD_WIDTH,
                      max_position_embeddings=need("positional_embedding").shape[0])
    vision = VisionConfig(hidden_size=vision_width, intermediate_size=4 * vision_width,
                          num_hidden_layers=count("visual.transformer.resblocks."),
                          num_attention_heads=vision_width // _HEAD_WIDTH,
                          image_size=patch * grid, patch_size=patch)
    return CLIPConfig(text=text, vision=vision, projection_dim=need("text_projection").shape[1])


def openai_to_hf_state_dict(state_dict):
    """Rename the OpenAI layout into Hugging Face's CLIPModel keys (PyTorch layout)."""
    out = {
        "logit_scale": state_dict["logit_scale"],
        "text_model.embeddings.token_embedding.weight": state_dict["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state_dict["positional_embedding"],
        "text_model.final_layer_norm.weight": state_dict["ln_final.weight"],
        "text_model.final_layer_norm.bias": state_dict["ln_final.bias"],
        "text_projection.weight": state_dict["text_projection"].T,
        "vision_model.embeddings.class_embedding": state_dict["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state_dict["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state_dict["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state_dict["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state_dict["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state_dict["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state_dict["visual.ln_post.bias"],
        "visual_projection.weight": state_dict["visual.proj"].T,
    }
    for src, dst in (("transformer.resblocks.", "text_model.encoder.layers."),
                     ("visual.transformer.resblocks.", "vision_model.encoder.layers.")):
        layers = {k[len(src):].split(".")[0] for k in state_dict if k.startswith(src)}
        for i in layers:
            out.update(_resblock_to_hf(state_dict, f"{src}{i}.", f"{dst}{i}."))
    return out


def _resblock_to_hf(sd, src, dst):
    q, k, v = np.split(sd[src + "attn.in_proj_weight"], 3, axis=0)
    qb, kb, vb = np.split(sd[src + "attn.in_proj_bias"], 3, axis=0)
    renames = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
               "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
    out = {f"{dst}self_attn.q_proj.weight": q, f"{dst}self_attn.k_proj.weight": k,
           f"{dst}self_attn.v_proj.weight": v, f"{dst}self_attn.q_proj.bias": qb,
           f"{dst}self_attn.k_proj.bias": kb, f"{dst}self_attn.v_proj.bias": vb}
    for old, new in renames.items():
        for leaf in ("weight", "bias"):
            out[f"{dst}{new}.{leaf}"] = sd[f"{src}{old}.{leaf}"]
    return out


def openai_to_flax(state_dict, source="checkpoint", allow_extra=False):
    """OpenAI-layout tensors -> (CLIPConfig, Flax params).

    Keys outside the towers are an error unless allow_extra (EntityCLIP release
    checkpoints also hold experts; entityclip_jax.weights.release reads those).
    """
    towers, extra = split_tower_keys(state_dict)
    if extra and not allow_extra:
        raise EntityClipError(f"{source} has {len(extra)} key(s) outside the CLIP towers, e.g. "
                              f"{', '.join(sorted(extra)[:3])}; for an EntityCLIP release checkpoint "
                              "use the release import, which also reads the experts")
    config = config_from_openai(towers)
    try:
        hf_state = openai_to_hf_state_dict(towers)
    except KeyError as err:
        raise EntityClipError(f"{source} lacks {err.args[0]}; it is not a complete OpenAI CLIP state dict") from None
    leftover = set(towers) - _consumed_openai_keys(towers)
    if leftover:
        raise EntityClipError(f"{source} has unexpected tower key(s), e.g. {', '.join(sorted(leftover)[:3])}")
    return config, state_dict_to_flax(hf_state, expected_params(config), source=source)


def _consumed_openai_keys(towers):
    singles = {"logit_scale", "token_embedding.weight", "positional_embedding", "ln_final.weight",
               "ln_final.bias", "text_projection", "visual.class_embedding", "visual.conv1.weight",
               "visual.positional_embedding", "visual.ln_pre.weight", "visual.ln_pre.bias",
               "visual.ln_post.weight", "visual.ln_post.bias", "visual.proj"}
    block = re.compile(r"^(visual\.)?transformer\.resblocks\.\d+\.(ln_[12]|attn\.in_proj|attn\.out_proj|"
                       r"mlp\.c_fc|mlp\.c_proj)(\.weight|\.bias|_weight|_bias)$")
    return {k for k in towers if k in singles or block.match(k)}
