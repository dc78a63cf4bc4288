"""EntityCLIP's training-only heads: the expert stacks, the gates and the ITM head.

The linen module only creates parameters; the math lives in mmae.py, gi_itm.py
and objective/losses.py (entityclip_loss applies it to this tree). Parameter tree (n_v, n_s, n_t expert counts, D width):
    image_experts, explanation_experts, text_experts: stacked expert blocks
        {layer_norm1: {scale, bias}, self_attn: {q_proj, k_proj, v_proj, out_proj},
         layer_norm2: {scale, bias}, mlp: {fc1 [D, 4D], fc2 [4D, D]}}, each leaf [n, ...]
    image_gate {kernel [D, n_v + n_s], bias}   text_gate {kernel [D, n_t + n_s], bias}
    itm_gate {kernel [2D, n_v + n_s + n_t + n_s], bias}   itm_head {kernel [D, 2], bias}

Initialisation copies what the release gets: its initialize_parameters() leaves
experts, gates and head alone, so they carry PyTorch's defaults. nn.Linear:
weight and bias U(+-1/sqrt(fan_in)). nn.MultiheadAttention: the packed q/k/v
weight [3D, D] xavier-uniform, i.e. U(+-sqrt(6 / 4D)), its biases zero;
out_proj weight U(+-1/sqrt(D)), bias zero. LayerNorm: scale 1, bias 0.
"""
import dataclasses
import functools
import itertools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
    num_image_experts: int = 4          # release expert_config "444": vision, share, text
    num_explanation_experts: int = 4
    num_text_experts: int = 4
    itm_weight: float = 0.1             # eta
    expert_vtc_weight: float = 0.1      # lambda
    faithful_release: bool = False      # reproduce the release's quirks (METHOD.md)


class Uniform(NamedTuple):
    """Spec of a leaf drawn from U(-bound, bound); bound 0 gives zeros."""
    shape: tuple
    bound: float


def _draw(rng, specs, batch=()):
    """Fill a tree of Uniform specs from ONE random draw (one draw compiles far
    faster on XLA:CPU than one per leaf). `batch` prepends axes, e.g. (n_experts,)."""
    is_spec = lambda x: isinstance(x, Uniform)
    specs, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    sizes = [math.prod(spec.shape) for spec in specs]
    noise = jax.random.uniform(rng, (*batch, sum(sizes)), jnp.float32, -1.0, 1.0)
    parts = jnp.split(noise, list(itertools.accumulate(sizes))[:-1], axis=-1)
    return treedef.unflatten([part.reshape(*batch, *spec.shape) * spec.bound for part, spec in zip(parts, specs)])


def _torch_linear(fan_in, fan_out, zero_bias=False):
    """nn.Linear's default init of a Flax Dense {kernel [in, out], bias}."""
    bound = fan_in ** -0.5
    return dict(kernel=Uniform((fan_in, fan_out), bound), bias=Uniform((fan_out,), 0.0 if zero_bias else bound))


def _expert_specs(dim):
    in_proj_bound = (6.0 / (dim + 3 * dim)) ** 0.5  # xavier over the packed [3D, D] q/k/v weight
    qkv = dict(kernel=Uniform((dim, dim), in_proj_bound), bias=Uniform((dim,), 0.0))
    return dict(self_attn=dict(q_proj=qkv, k_proj=qkv, v_proj=qkv, out_proj=_torch_linear(dim, dim, zero_bias=True)),
                mlp=dict(fc1=_torch_linear(dim, 4 * dim), fc2=_torch_linear(4 * dim, dim)))


def init_expert_stack(rng, num_experts, dim):
    """num_experts independent experts with the release's initialisation, leaves stacked on axis 0."""
    layer_norm = dict(scale=jnp.ones((num_experts, dim), jnp.float32), bias=jnp.zeros((num_experts, dim), jnp.float32))
    return dict(_draw(rng, _expert_specs(dim), batch=(num_experts,)), layer_norm1=layer_norm, layer_norm2=layer_norm)


class EntityHeads(nn.Module):
    num_image_experts: int = 4
    num_explanation_experts: int = 4
    num_text_experts: int = 4
    dim: int = 512

    def setup(self):
        n_v, n_s, n_t, dim = self.num_image_experts, self.num_explanation_experts, self.num_text_experts, self.dim
        stack = lambda n: lambda rng: init_expert_stack(rng, n, dim)
        linear = lambda fan_in, fan_out: lambda rng: _draw(rng, _torch_linear(fan_in, fan_out))
        self.image_experts = self.param("image_experts", stack(n_v))
        self.explanation_experts = self.param("explanation_experts", stack(n_s))
        self.text_experts = self.param("text_experts", stack(n_t))
        self.image_gate = self.param("image_gate", linear(dim, n_v + n_s))
        self.text_gate = self.param("text_gate", linear(dim, n_t + n_s))
        self.itm_gate = self.param("itm_gate", linear(2 * dim, n_v + n_s + n_t + n_s))
        self.itm_head = self.param("itm_head", linear(dim, 2))

    def parameters(self):
        """The whole parameter tree (use with .init(rng, method=...) to create it without inputs)."""
        names = ("image_experts", "explanation_experts", "text_experts",
                 "image_gate", "text_gate", "itm_gate", "itm_head")
        return {name: getattr(self, name) for name in names}


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _init_heads(rng, num_image_experts, num_explanation_experts, num_text_experts, dim):
    # jit: one compilation (cached per shape) instead of one per eager random op.
    module = EntityHeads(num_image_experts, num_explanation_experts, num_text_experts, dim)
    return module.init(rng, method=EntityHeads.parameters)["params"]


def init_heads(rng, cfg, dim):
    """The heads' parameter tree (plain dict, no 'params' wrapper) for a HeadsConfig-like cfg."""
    return _init_heads(rng, cfg.num_image_experts, cfg.num_explanation_experts, cfg.num_text_experts, dim)
