"""Import the EntityCLIP release's expert, gate and ITM-head weights.

The authors' checkpoint (wangyxxjtu/ETE, main.py: torch.save(model.state_dict()))
holds the OpenAI-layout towers (visual.*, transformer.*, token_embedding.weight,
positional_embedding, ln_final.*, text_projection, logit_scale; converted by
weights/openai.py) and, from clip/model.py's CLIP class:
    vision_expert_{i}, share_expert_{i}, text_expert_{i}   ExpertBlock:
        attn.in_proj_weight [3D, D] (q; k; v rows), attn.in_proj_bias [3D],
        attn.out_proj.{weight [D, D], bias}, ln_1.{weight, bias},
        mlp.c_fc.{weight [4D, D], bias}, mlp.c_proj.{weight [D, 4D], bias}, ln_2.{weight, bias}
    weight_attn_vis  nn.Linear(D, n_v + n_s)     -> image_gate
    weight_attn_txt  nn.Linear(D, n_t + n_s)     -> text_gate
    weight_full      nn.Linear(2D, n_v + 2 n_s + n_t), input [v_cls; t_eot] -> itm_gate
    itm_head         nn.Linear(D, 2)             -> itm_head
"share" experts are our explanation experts. The release orders the gates'
outputs exactly as we do: [vision; share] for images, [text; share] for
queries, [vision; share(image side); text; share(query side)] for the ITM gate.
"""
import re

import jax
import numpy as np

from entityclip_jax.errors import EntityClipError

HEAD_PREFIXES = ("vision_expert_", "share_expert_", "text_expert_",
                 "weight_attn_vis.", "weight_attn_txt.", "weight_full.", "itm_head.")
TOWER_PREFIXES = ("visual.", "transformer.", "token_embedding.", "positional_embedding", "ln_final.",
                  "text_projection", "logit_scale", "input_resolution", "context_length", "vocab_size")
# our stack name -> the release's attribute prefix
EXPERT_GROUPS = {"image_experts": "vision_expert", "explanation_experts": "share_expert",
                 "text_experts": "text_expert"}


def _listing(keys, limit=8):
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def _as_numpy(value):
    if hasattr(value, "detach"):  # a torch tensor (possibly fp16 or bf16)
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, np.float32)


def split_release_state_dict(state_dict):
    """(tower keys, head keys) of a release checkpoint; refuses keys that are neither."""
    towers = {k: v for k, v in state_dict.items() if k.startswith(TOWER_PREFIXES)}
    heads = {k: v for k, v in state_dict.items() if k.startswith(HEAD_PREFIXES)}
    leftover = set(state_dict) - set(towers) - set(heads)
    if leftover:
        raise EntityClipError(
            f"the checkpoint has {len(leftover)} key(s) that are neither CLIP tower nor EntityCLIP head "
            f"weights: {_listing(leftover)}; is it an EntityCLIP release (wangyxxjtu/ETE) state dict?")
    return towers, heads


def release_expert_counts(state_dict):
    """(vision, share, text) expert counts found in a release state dict, e.g. (4, 4, 4) for '444'."""
    def count(prefix):
        found = {int(m.group(1)) for k in state_dict if (m := re.match(rf"{prefix}_(\d+)\.", k))}
        return len(found)
    return tuple(count(EXPERT_GROUPS[name]) for name in ("image_experts", "explanation_experts", "text_experts"))


def release_heads_to_flax(state_dict, cfg, dim=None):
    """Release head weights -> our heads parameter tree (numpy float32, layout of models/heads.py).

    state_dict: the release's head keys only (see split_release_state_dict);
    values are numpy arrays or torch tensors. cfg: expert counts
    (num_image_experts, num_explanation_experts, num_text_experts). dim: the
    projection width D; read from itm_head.weight when None.
    Raises EntityClipError naming every missing, unexpected or misshapen key.
    """
    tower_keys = [k for k in state_dict if k.startswith(TOWER_PREFIXES)]
    if tower_keys:
        raise EntityClipError(
            f"release_heads_to_flax got CLIP tower keys ({_listing(tower_keys)}); pass only the head keys "
            "(split_release_state_dict) and convert the towers with weights/openai.py")
    if dim is None:
        if "itm_head.weight" not in state_dict:
            raise EntityClipError("the checkpoint has no itm_head.weight [2, D]: not an EntityCLIP release "
                                  "checkpoint, or its heads were stripped")
        dim = int(np.shape(state_dict["itm_head.weight"])[1])

    remaining = dict(state_dict)
    problems = []

    def take(key, shape):
        if key not in remaining:
            problems.append(f"missing {key} (expected shape {list(shape)})")
            return np.zeros(shape, np.float32)
        value = _as_numpy(remaining.pop(key))
        if value.shape != tuple(shape):
            problems.append(f"{key} has shape {list(value.shape)}, expected {list(shape)}")
            return np.zeros(shape, np.float32)
        return value

    def linear(prefix, fan_in, fan_out):  # torch weight [out, in] -> Flax kernel [in, out]
        return dict(kernel=take(f"{prefix}.weight", (fan_out, fan_in)).T, bias=take(f"{prefix}.bias", (fan_out,)))

    def layer_norm(prefix):
        return dict(scale=take(f"{prefix}.weight", (dim,)), bias=take(f"{prefix}.bias", (dim,)))

    def expert(prefix):
        in_w = take(f"{prefix}.attn.in_proj_weight", (3 * dim, dim))
        in_b = take(f"{prefix}.attn.in_proj_bias", (3 * dim,))
        qkv = {name: dict(kernel=in_w[k * dim:(k + 1) * dim].T, bias=in_b[k * dim:(k + 1) * dim])
               for k, name in enumerate(("q_proj", "k_proj", "v_proj"))}
        return dict(layer_norm1=layer_norm(f"{prefix}.ln_1"),
                    self_attn=dict(qkv, out_proj=linear(f"{prefix}.attn.out_proj", dim, dim)),
                    layer_norm2=layer_norm(f"{prefix}.ln_2"),
                    mlp=dict(fc1=linear(f"{prefix}.mlp.c_fc", dim, 4 * dim),
                             fc2=linear(f"{prefix}.mlp.c_proj", 4 * dim, dim)))

    counts = dict(image_experts=cfg.num_image_experts, explanation_experts=cfg.num_explanation_experts,
                  text_experts=cfg.num_text_experts)
    params = {}
    for name, prefix in EXPERT_GROUPS.items():
        experts = [expert(f"{prefix}_{i}") for i in range(counts[name])]
        params[name] = jax.tree.map(lambda *leaves: np.stack(leaves), *experts)
    n_v, n_s, n_t = counts["image_experts"], counts["explanation_experts"], counts["text_experts"]
    params["image_gate"] = linear("weight_attn_vis", dim, n_v + n_s)
    params["text_gate"] = linear("weight_attn_txt", dim, n_t + n_s)
    params["itm_gate"] = linear("weight_full", 2 * dim, n_v + n_s + n_t + n_s)
    params["itm_head"] = linear("itm_head", dim, 2)

    problems += [f"unexpected {key}" for key in sorted(remaining)]
    if problems:
        found = release_expert_counts(state_dict)
        hint = ""
        if found != (n_v, n_s, n_t):
            hint = (f"; the checkpoint holds expert_config '{''.join(map(str, found))}' (vision, share, text) "
                    f"but the config asks for '{n_v}{n_s}{n_t}': set num_image_experts, "
                    "num_explanation_experts and num_text_experts to match")
        raise EntityClipError(f"cannot import the release's heads ({len(problems)} problem(s)): "
                              + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else "") + hint)
    return params

