"""CLIP architecture hyper-parameters, to and from Hugging Face CLIPConfig.

Frozen dataclasses (hashable, so they can be Flax module attributes) holding
only what the towers need. Hugging Face's config is the exchange format: we
read any CLIPConfig (ViT-B/32, B/16, L/14, tiny test models) and write one back
that transformers.CLIPModel.from_pretrained accepts.
"""
import dataclasses

from entityclip_jax.errors import EntityClipError


def _check_heads(config, tower):
    """Each attention head gets hidden_size / num_attention_heads dimensions: refuse a config where
    that is not a whole number (a checkpoint's config.json edited by hand, or from another model)."""
    if config.num_attention_heads < 1 or config.hidden_size % config.num_attention_heads:
        raise EntityClipError(
            f"{tower}: hidden_size {config.hidden_size} does not split into num_attention_heads "
            f"{config.num_attention_heads} equal heads; the config is inconsistent (a CLIP checkpoint has "
            "hidden_size a multiple of num_attention_heads, e.g. 512 and 8)")


LEGACY_EOS_TOKEN_ID = 2  # Hugging Face CLIP configs before transformers 4.31 pool at the argmax of the ids


def pools_at_argmax(eos_token_id):
    """True for a legacy config whose text features are read at the largest id (OpenAI's EOT)."""
    return eos_token_id == LEGACY_EOS_TOKEN_ID


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    bos_token_id: int = 49406
    pad_token_id: int = 1

    def __post_init__(self):
        _check_heads(self, "text_config")

    @property
    def end_of_text_id(self):
        """The id the text features are read at: eos_token_id, or in a legacy config the largest id."""
        return self.vocab_size - 1 if pools_at_argmax(self.eos_token_id) else self.eos_token_id


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        _check_heads(self, "vision_config")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    text: TextConfig = TextConfig()
    vision: VisionConfig = VisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_hf(cls, hf_config):
        """From a transformers.CLIPConfig (or its to_dict())."""
        data = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        model_type = data.get("model_type")
        if model_type != "clip" or "text_config" not in data or "vision_config" not in data:
            raise EntityClipError(
                f"expected a CLIP config (model_type 'clip' with text_config and vision_config), "
                f"got model_type {model_type!r}; point at a Hugging Face CLIPModel checkpoint "
                "such as openai/clip-vit-base-patch32")
        return cls(text=_pick(TextConfig, data["text_config"]),
                   vision=_pick(VisionConfig, data["vision_config"]),
                   projection_dim=data.get("projection_dim", cls.projection_dim),
                   logit_scale_init_value=data.get("logit_scale_init_value", cls.logit_scale_init_value))

    def to_hf(self):
        """A transformers.CLIPConfig describing the same towers."""
        import transformers  # lazy: heavy (torch), needed only to export or compare with PyTorch
        return transformers.CLIPConfig(
            text_config=dataclasses.asdict(self.text),
            vision_config=dataclasses.asdict(self.vision),
            projection_dim=self.projection_dim,
            logit_scale_init_value=self.logit_scale_init_value)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        return cls(text=TextConfig(**data["text"]), vision=VisionConfig(**data["vision"]),
                   projection_dim=data["projection_dim"],
                   logit_scale_init_value=data["logit_scale_init_value"])


def _pick(config_class, data):
    """The fields of config_class found in data; defaults for the rest."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in data.items() if k in names and v is not None})


# Named architectures: the Hugging Face configs of OpenAI's checkpoints, and a
# tiny one for tests and the CPU demo.
PRESETS = {
    "vit-b-32": CLIPConfig(),
    "vit-b-16": CLIPConfig(vision=VisionConfig(patch_size=16)),
    "vit-l-14": CLIPConfig(
        text=TextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12),
        vision=VisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                            num_attention_heads=16, patch_size=14),
        projection_dim=768),
    "tiny": CLIPConfig(
        text=TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4),
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, image_size=64, patch_size=16),
        projection_dim=32),
}


def preset(name):
    if name not in PRESETS:
        raise EntityClipError(f"unknown CLIP architecture {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
