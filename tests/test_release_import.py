"""Import of the EntityCLIP release's expert/gate/ITM weights, checked against a
PyTorch transcription of the release's modules (wangyxxjtu/ETE clip/model.py:
ExpertBlock, expert_forward, Gate_Attn) evaluated on the same state dict."""
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from torch import nn

from entityclip_jax.weights.release import (
    release_expert_counts, release_heads_to_flax, split_release_state_dict)
from entityclip_jax.errors import EntityClipError
from entityclip_jax.models import gi_itm
from entityclip_jax.models.heads import HeadsConfig, init_heads

B, S_IMG, L, D = 3, 5, 7, 8
N_V, N_S, N_T = 2, 3, 4
CFG = HeadsConfig(num_image_experts=N_V, num_explanation_experts=N_S, num_text_experts=N_T)


# ---- PyTorch transcription of the release ----
class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ReleaseExpertBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 1, batch_first=True)
        self.ln_1 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d, 4 * d)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * d, d))]))
        self.ln_2 = nn.LayerNorm(d)

    def forward(self, x, y):
        x = x + self.attn(self.ln_1(x), self.ln_1(y), self.ln_1(y), need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ReleaseHeads(nn.Module):
    """The head attributes of the release's CLIP class (towers left out)."""

    def __init__(self, d, n_v, n_s, n_t):
        super().__init__()
        self.n_v, self.n_s, self.n_t = n_v, n_s, n_t
        for i in range(n_v):
            setattr(self, f"vision_expert_{i}", ReleaseExpertBlock(d))
        for i in range(n_s):
            setattr(self, f"share_expert_{i}", ReleaseExpertBlock(d))
        for i in range(n_t):
            setattr(self, f"text_expert_{i}", ReleaseExpertBlock(d))
        self.weight_attn_vis = nn.Linear(d, n_v + n_s)
        self.weight_attn_txt = nn.Linear(d, n_t + n_s)
        self.itm_head = nn.Linear(d, 2)
        self.weight_full = nn.Linear(2 * d, n_t + 2 * n_s + n_v)

    def forward(self, V, T, E, eot):
        """(itm logits, V*, T*) of the positive triples, as the release computes them."""
        rows = torch.arange(V.shape[0])
        image_list = [getattr(self, f"vision_expert_{i}")(V, V)[:, 0] for i in range(self.n_v)]
        text_list = [getattr(self, f"text_expert_{i}")(T, T)[rows, eot] for i in range(self.n_t)]
        for i in range(self.n_s):
            share = getattr(self, f"share_expert_{i}")
            image_list.append(share(V, E)[:, 0])
            text_list.append(share(T, E)[rows, eot])
        image_exp, text_exp = torch.stack(image_list, 1), torch.stack(text_list, 1)
        gate = lambda linear, x, tensors: torch.matmul(torch.softmax(linear(x), -1).unsqueeze(1), tensors)[:, 0]
        fused = gate(self.weight_full, torch.cat([V[:, 0], T[rows, eot]], 1), torch.cat([image_exp, text_exp], 1))
        return (self.itm_head(fused), gate(self.weight_attn_vis, V[:, 0], image_exp),
                gate(self.weight_attn_txt, T[rows, eot], text_exp))


@pytest.fixture(scope="module")
def release():
    torch.manual_seed(0)
    model = ReleaseHeads(D, N_V, N_S, N_T).double()
    with torch.no_grad():
        for p in model.parameters():  # move off the defaults: nonzero biases, LN scale != 1
            p.add_(0.2 * torch.randn_like(p))
    state_dict = {k: v.float().numpy() for k, v in model.state_dict().items()}
    return model, state_dict


# ---- tests ----
def test_imported_heads_compute_what_the_release_computes(release):
    model, state_dict = release
    params = jax.tree.map(jnp.asarray, release_heads_to_flax(state_dict, CFG))
    rs = np.random.RandomState(0)
    V, T, E = rs.normal(size=(B, S_IMG, D)), rs.normal(size=(B, L, D)), rs.normal(size=(B, L, D))
    eot = np.array([2, 6, 4])
    with torch.no_grad():
        want = [t.numpy() for t in model(*(torch.from_numpy(a) for a in (V, T, E)), torch.from_numpy(eot))]

    @jax.jit
    def ours(params, V, T, E, eot):
        experts = gi_itm.expert_features(params, V, T, None, eot, E, None)  # the release masks nothing
        v_cls, t_eot = V[:, 0], T[jnp.arange(B), eot]
        return (gi_itm.itm_logits(params, v_cls, t_eot, experts),
                gi_itm.image_star(params, v_cls, experts["e_v"], experts["s_v"]),
                gi_itm.text_star(params, t_eot, experts["e_t"], experts["s_t"]))

    with jax.default_matmul_precision("highest"):
        got = ours(params, *(jnp.asarray(a, jnp.float32) for a in (V, T, E)), jnp.asarray(eot))
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-5)


def test_imported_tree_has_the_layout_of_init_heads(release):
    _, state_dict = release
    imported = release_heads_to_flax(state_dict, CFG)
    initialised = init_heads(jax.random.key(0), CFG, D)
    assert jax.tree.structure(imported) == jax.tree.structure(initialised)
    assert jax.tree.map(np.shape, imported) == jax.tree.map(np.shape, initialised)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(imported))
    # spot-check one transposed slice of the packed q/k/v weight
    np.testing.assert_array_equal(imported["explanation_experts"]["self_attn"]["v_proj"]["kernel"][1],
                                  state_dict["share_expert_1.attn.in_proj_weight"][2 * D:].T)
    assert release_expert_counts(state_dict) == (N_V, N_S, N_T)


def test_bad_checkpoints_are_refused_with_the_key_named(release):
    _, state_dict = release
    missing = {k: v for k, v in state_dict.items() if k != "share_expert_1.ln_2.bias"}
    with pytest.raises(EntityClipError, match=r"missing share_expert_1\.ln_2\.bias \(expected shape \[8\]\)"):
        release_heads_to_flax(missing, CFG)

    misshapen = dict(state_dict, **{"weight_full.weight": np.zeros((11, 2 * D), np.float32)})
    with pytest.raises(EntityClipError, match=r"weight_full\.weight has shape \[11, 16\], expected \[12, 16\]"):
        release_heads_to_flax(misshapen, CFG)

    fewer_experts = HeadsConfig(num_image_experts=N_V, num_explanation_experts=N_S - 1, num_text_experts=N_T)
    with pytest.raises(EntityClipError, match=r"unexpected share_expert_2\..*expert_config '234'"):
        release_heads_to_flax(state_dict, fewer_experts)

    with pytest.raises(EntityClipError, match=r"tower keys \(visual\.proj\)"):
        release_heads_to_flax(dict(state_dict, **{"visual.proj": np.zeros((4, D))}), CFG)


def test_split_separates_towers_from_heads_and_refuses_strangers(release):
    _, heads = release
    towers = {"visual.proj": np.zeros((4, D)), "transformer.resblocks.0.ln_1.weight": np.ones(4),
              "logit_scale": np.zeros(()), "token_embedding.weight": np.zeros((10, 4))}
    got_towers, got_heads = split_release_state_dict({**towers, **heads})
    assert set(got_towers) == set(towers) and set(got_heads) == set(heads)
    with pytest.raises(EntityClipError, match=r"neither .* rank_head\.weight"):
        split_release_state_dict({**towers, **heads, "rank_head.weight": np.zeros(2)})


def test_release_checkpoint_initialises_training(tmp_path):
    """A whole release checkpoint (OpenAI-layout towers + heads) starts `entityclip train`
    with every weight it holds, and evaluates as plain towers."""
    import pathlib

    from entityclip_jax.checkpoints.model_init import init_entityclip
    from entityclip_jax.checkpoints.towers import load_towers
    from entityclip_jax.config import load_config
    from tests.test_convert import openai_state_dict_from_hf, tiny_openai_model

    torch.manual_seed(1)
    heads = ReleaseHeads(24, N_V, N_S, N_T)  # 24 = the tiny towers' projection width
    state = openai_state_dict_from_hf(tiny_openai_model())
    state.update({k: v.numpy() for k, v in heads.state_dict().items()})
    path = tmp_path / "entityclip_release.pt"
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, path)

    config = load_config(str(pathlib.Path(__file__).parents[1] / "configs" / "tiny_cpu.py"))
    with config.unlocked():
        config.model.init = str(path)
        config.heads.num_image_experts, config.heads.num_explanation_experts = N_V, N_S
        config.heads.num_text_experts = N_T
    model, params = init_entityclip(jax.random.key(0), config)
    heads_state = {k: v.numpy() for k, v in heads.state_dict().items()}
    got = traverse_util.flatten_dict(jax.device_get(params["heads"]), sep="/")
    want = expected_heads(heads_state, 24)
    assert got.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg=key)
    _, towers = load_towers(str(path))
    for tree in (params["clip"], towers):
        flat = traverse_util.flatten_dict(jax.device_get(tree), sep="/")
        for key, value in expected_tower_samples(state).items():
            np.testing.assert_array_equal(np.asarray(flat[key]), value, err_msg=key)


def expected_heads(sd, d):
    """Our heads tree straight from the release's tensors (nn.Linear weights are [out, in]: kernels are .T)."""
    out = {}
    for ours, theirs in (("image_experts", "vision_expert"), ("explanation_experts", "share_expert"),
                         ("text_experts", "text_expert")):
        count = len({k.split(".")[0] for k in sd if k.startswith(theirs + "_")})
        stack = lambda fn: np.stack([fn(f"{theirs}_{i}.") for i in range(count)])  # noqa: E731
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{ours}/self_attn/{name}/kernel"] = stack(lambda p: sd[p + "attn.in_proj_weight"][j * d:(j + 1) * d].T)
            out[f"{ours}/self_attn/{name}/bias"] = stack(lambda p: sd[p + "attn.in_proj_bias"][j * d:(j + 1) * d])
        for flax_name, torch_name in (("self_attn/out_proj", "attn.out_proj"), ("mlp/fc1", "mlp.c_fc"),
                                      ("mlp/fc2", "mlp.c_proj")):
            out[f"{ours}/{flax_name}/kernel"] = stack(lambda p: sd[f"{p}{torch_name}.weight"].T)
            out[f"{ours}/{flax_name}/bias"] = stack(lambda p: sd[f"{p}{torch_name}.bias"])
        for flax_name, torch_name in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2")):
            out[f"{ours}/{flax_name}/scale"] = stack(lambda p: sd[f"{p}{torch_name}.weight"])
            out[f"{ours}/{flax_name}/bias"] = stack(lambda p: sd[f"{p}{torch_name}.bias"])
    for ours, theirs in (("image_gate", "weight_attn_vis"), ("text_gate", "weight_attn_txt"),
                         ("itm_gate", "weight_full"), ("itm_head", "itm_head")):
        out[f"{ours}/kernel"], out[f"{ours}/bias"] = sd[f"{theirs}.weight"].T, sd[f"{theirs}.bias"]
    return out


def expected_tower_samples(sd):
    """One tensor of each kind of the OpenAI -> Flax tower mapping, straight from the state dict."""
    w = sd["ln_final.weight"].shape[0]
    block, vblock = "transformer.resblocks.0.", "visual.transformer.resblocks.1."
    return {
        "logit_scale": sd["logit_scale"],
        "text_model/embeddings/token_embedding/embedding": sd["token_embedding.weight"],
        "text_model/embeddings/position_embedding/embedding": sd["positional_embedding"],
        "text_model/final_layer_norm/scale": sd["ln_final.weight"],
        "text_projection/kernel": sd["text_projection"],  # OpenAI multiplies x @ proj already
        "visual_projection/kernel": sd["visual.proj"],
        "text_model/encoder/layers/0/self_attn/q_proj/kernel": sd[block + "attn.in_proj_weight"][:w].T,
        "text_model/encoder/layers/0/self_attn/v_proj/bias": sd[block + "attn.in_proj_bias"][2 * w:],
        "text_model/encoder/layers/0/mlp/fc1/kernel": sd[block + "mlp.c_fc.weight"].T,
        "vision_model/encoder/layers/1/self_attn/k_proj/kernel":
            sd[vblock + "attn.in_proj_weight"][w:2 * w].T,
        "vision_model/embeddings/patch_embedding/kernel": sd["visual.conv1.weight"].transpose(2, 3, 1, 0),
        "vision_model/embeddings/class_embedding": sd["visual.class_embedding"],
        "vision_model/pre_layrnorm/scale": sd["visual.ln_pre.weight"],
    }
