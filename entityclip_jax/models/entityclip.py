"""EntityCLIP = the CLIP towers (clip.py) + the training-only heads (heads.py).

Parameters: {"clip": tower params under Hugging Face names, "heads": the
experts, gates and ITM head}. In "clip_finetune" mode there are no heads and
the loss is CLIP's VTC alone: the plain fine-tuning baseline.

Which weights the towers and heads start from (config.model.init) is decided
above this layer, in checkpoints/; the loss of a batch is objective/batch_loss.py.
"""
import dataclasses

import jax
import jax.numpy as jnp

from entityclip_jax.models.clip import CLIPModel, init_params
from entityclip_jax.models.clip_config import CLIPConfig
from entityclip_jax.models.heads import HeadsConfig, init_heads

MODES = ("entityclip", "clip_finetune")


@dataclasses.dataclass(frozen=True)
class EntityCLIPConfig:
    """What the step needs to know about the model (hashable: a static jit argument).

    dtype: the compute dtype of towers and heads alike (parameters, LayerNorm,
    softmax and losses stay fp32)."""
    clip: CLIPConfig
    heads: HeadsConfig
    mode: str = "entityclip"       # one of MODES (config.validate_config checks it)
    dtype: str = "float32"
    remat: bool = False

    @property
    def towers(self):
        return CLIPModel(self.clip, jnp.dtype(self.dtype), self.remat)


def abstract_params(model):
    """The params tree as jax.ShapeDtypeStruct leaves (no memory), for restoring."""

    def init(rng):
        params = {"clip": init_params(model.clip, rng)}
        if model.mode == "entityclip":
            params["heads"] = init_heads(rng, model.heads, model.clip.projection_dim)
        return params
    return jax.eval_shape(init, jax.random.key(0))
