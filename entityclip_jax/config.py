"""Training configs: ml_collections ConfigDicts from Python files, CLI overrides.

A config file (configs/*.py) defines get_config(arg=None) -> ConfigDict and
usually starts from default_config() below, which documents every knob.
`load_config("configs/n24news.py:b16", ["--config.batch_size=64"])` reads one
the way ml_collections' config_flags does (the ":b16" part is get_config's arg).
"""
import os

import ml_collections
from ml_collections.config_dict import placeholder

from entityclip_jax.errors import EntityClipError


def default_config():
    """The release recipe's knobs (METHOD.md) at ViT-B/32; experiment files change a few."""
    c = ml_collections.ConfigDict()
    c.seed = 42  # parameters, hard negatives and the data order all derive from it

    c.model = ml_collections.ConfigDict()
    # Towers: a preset name (vit-b-32, vit-b-16, vit-l-14, tiny; random init), a
    # Hugging Face CLIPModel dir, an OpenAI-layout .pt file or a towers dir.
    c.model.init = "vit-b-32"
    c.model.mode = "entityclip"        # or "clip_finetune": plain CLIP VTC only, no heads (the baseline)
    c.model.dtype = "float32"          # compute dtype (bfloat16 on TPU/GPU); params and losses stay fp32
    c.model.remat = False              # rematerialise tower layers to save activation memory
    # Preset towers only: the text tower must match the tokenizer the records were written with.
    c.model.vocab_size = placeholder(int)
    c.model.eos_token_id = placeholder(int)

    c.heads = ml_collections.ConfigDict()  # HeadsConfig (models/heads.py)
    c.heads.num_image_experts = 4           # release expert_config "444"
    c.heads.num_explanation_experts = 4
    c.heads.num_text_experts = 4
    c.heads.itm_weight = 0.1                # eta
    c.heads.expert_vtc_weight = 0.1         # lambda
    c.heads.faithful_release = False        # reproduce the release's quirks (METHOD.md)

    c.data = ml_collections.ConfigDict()   # records written by `entityclip write-records`
    c.data.dir = placeholder(str)
    c.data.train_split = "train"
    c.data.val_split = "val"
    c.data.shuffle_buffer = 4096
    c.data.random_crop = False              # release: resize + center crop only
    c.data.normalize_on_host = True
    c.data.dct_scaling = False
    c.data.prefetch_to_device = 2           # batches put on the devices ahead of the step that uses them

    c.batch_size = 192        # GLOBAL batch: the contrastive loss sees all of it
    c.num_epochs = 20
    c.num_train_steps = -1    # > 0 overrides num_epochs
    # > 1: the batch is split into this many micro-batches whose gradients are
    # averaged. Contrastive terms and hard negatives then see a micro-batch,
    # not the whole batch: it saves memory but is NOT the same objective.
    c.accumulation_steps = 1

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adam"               # release: Adam(0.9, 0.999), no weight decay; or "adamw"
    c.optimizer.learning_rate = 1e-5
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.0          # adamw only
    c.optimizer.schedule = "cosine"         # over all steps (release); or "constant"
    c.optimizer.warmup_steps = 0
    c.optimizer.grad_clip_norm = 0.0        # > 0: clip by global norm
    # ((regex, multiplier), ...): learning rate multiplier of the parameters whose
    # "/"-joined path (e.g. "clip/vision_model/encoder/layers/0/mlp/fc1/kernel",
    # "heads/itm_head/kernel") the regex matches (re.search); first match wins.
    c.optimizer.lr_multipliers = ()
    c.optimizer.freeze = ()                 # (regex, ...): parameters left untouched

    # Device mesh: (axis name, size) pairs, one size may be -1 (all the rest).
    # The batch is split over every axis; parameters over 'fsdp' by the rules below.
    c.mesh = (("data", -1), ("fsdp", 1))
    c.sharding = ml_collections.ConfigDict()
    # ((regex, "replicate" | "fsdp"), ...) on the parameter path, first match wins.
    # fsdp shards a parameter's largest axis divisible by the fsdp axis size.
    c.sharding.rules = ((".*", "replicate"),)
    c.sharding.fsdp_min_size = 2 ** 14      # smaller arrays stay replicated

    c.checkpoint = _section(every_steps=1000, keep=2, best_metric="val/vtc_loss", best_mode="min",
                                async_save=True)
    # Validation on data.val_split with the plain CLIP towers: VTC loss, Recall@1/5/10.
    # every_steps <= 0 validates once per epoch; at_start logs the zero-shot numbers.
    c.eval = _section(every_steps=-1, batch_size=256, at_start=True)
    c.log = _section(every_steps=50)
    # Several processes (train/distributed.py): whether jax.distributed.initialize runs.
    #   "auto": on a TPU VM (single host or pod) and under SLURM / Open MPI with several tasks,
    #     jax.distributed.initialize() with JAX's own cluster detection; on GPU hosts without a
    #     scheduler, the explicit coordinator below; on a CPU box or one GPU host, nothing (one process).
    #   "always": call it in any environment (an error where JAX finds no cluster and no coordinator).
    #   "never": one process, even on a TPU pod host (single-host debugging).
    # Explicit coordinator (all three, on every host): "10.0.0.1:1234", the process count, this host's id.
    # heartbeat_timeout_seconds: how long the other processes wait for a dead one before they all stop
    # with an error.
    c.distributed = _section(initialize="auto", coordinator_address=placeholder(str),
                             num_processes=placeholder(int), process_id=placeholder(int),
                             heartbeat_timeout_seconds=100)
    return c


def _section(**fields):
    return ml_collections.ConfigDict(fields)


def load_config(spec, overrides=()):
    """A locked ConfigDict from "path/to/file.py[:arg]" plus "--config.a.b=value" overrides."""
    from absl import flags
    from ml_collections import config_flags

    for override in overrides:
        if not override.startswith("--config."):
            raise EntityClipError(f"unrecognized argument {override!r}; config overrides look like "
                                  "--config.optimizer.learning_rate=5e-6")
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
        raise EntityClipError(f"config file {path} does not exist; pass a file with get_config(), "
                              "e.g. --config configs/tiny_cpu.py")
    argv = ["entityclip", f"--config={spec}", *overrides]
    values = flags.FlagValues()
    try:
        # sys_argv: config_flags reads the file at definition time to register the override flags.
        config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True, sys_argv=argv)
        values(argv)
        return values.config
    except flags.Error as err:
        raise EntityClipError(f"cannot load config {spec!r} with overrides {list(overrides)}: {err}") from None
    except (KeyError, AttributeError, ValueError, TypeError) as err:
        raise EntityClipError(f"bad config override in {list(overrides)}: {err}; "
                              "see entityclip_jax/config.py for the knobs") from None


def heads_config(config):
    """The HeadsConfig for entityclip_loss from config.heads and the compute dtype."""
    from entityclip_jax.models.heads import HeadsConfig
    return HeadsConfig(dtype=config.model.dtype, **config.heads.to_dict())


RELEASE_ARCHITECTURES = {"b32": "vit-b-32", "b16": "vit-b-16"}


def release_config(data_dir, learning_rate, arch=None):
    """The EntityCLIP release recipe (METHOD.md) for one dataset.

    Adam(0.9, 0.999), no weight decay, cosine decay over all steps, no warmup,
    20 epochs, batch 192, seed 42, eta = lambda = 0.1, model selection by the
    lowest validation VTC loss. arch: "b32" (default) or "b16".
    Start from OpenAI's weights by pointing model.init at a Hugging Face
    CLIPModel directory (e.g. openai/clip-vit-base-patch32) or an OpenAI .pt
    file; the preset name alone gives the architecture with random weights.
    """
    arch = arch or "b32"
    if arch not in RELEASE_ARCHITECTURES:
        raise EntityClipError(f"unknown architecture {arch!r}; use one of {sorted(RELEASE_ARCHITECTURES)}, "
                              "e.g. --config configs/n24news.py:b16")
    c = default_config()
    c.model.init = RELEASE_ARCHITECTURES[arch]
    c.data.dir = data_dir
    c.optimizer.learning_rate = learning_rate
    c.batch_size, c.num_epochs, c.seed = 192, 20, 42
    c.checkpoint.best_metric, c.checkpoint.best_mode = "val/vtc_loss", "min"
    return c
