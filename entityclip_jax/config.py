"""Training configs: ml_collections ConfigDicts from Python files, CLI overrides.

A config file (configs/*.py) defines get_config(arg=None) -> ConfigDict and
usually starts from default_config() below, which documents every knob.
`load_config("configs/n24news.py:b16", ["--config.batch_size=64"])` reads one
the way ml_collections' config_flags does (the ":b16" part is get_config's arg).
"""
import difflib
import functools
import re

import ml_collections
from absl import flags
from ml_collections import config_flags
from ml_collections.config_dict import placeholder

from entityclip_jax import storage
from entityclip_jax.errors import EntityClipError
from entityclip_jax.models.clip_config import PRESETS
from entityclip_jax.models.entityclip import MODES, EntityCLIPConfig
from entityclip_jax.models.heads import HeadsConfig
from entityclip_jax.parallel.mesh import check_mesh_axes, mesh_shape
from entityclip_jax.parallel.sharding import STRATEGIES

RANDOM_PREFIX = "random:"
PRETRAINED_BY_PRESET = {"vit-b-32": "openai/clip-vit-base-patch32", "vit-b-16": "openai/clip-vit-base-patch16",
                        "vit-l-14": "openai/clip-vit-large-patch14"}


def default_config():
    """The release recipe's knobs (METHOD.md) at ViT-B/32; experiment files change a few."""
    c = ml_collections.ConfigDict()
    c.seed = 42  # parameters, hard negatives and the data order all derive from it

    c.model = ml_collections.ConfigDict()
    # Towers: a Hugging Face hub id ("org/name" or "org/name@revision", through
    # huggingface_hub's cache: HF_HOME, HF_HUB_OFFLINE), a Hugging Face CLIPModel dir,
    # an OpenAI-layout .pt file, a towers dir or training workdir; or
    # "random:PRESET" (vit-b-32, vit-b-16, vit-l-14, tiny) for RANDOM towers.
    c.model.init = "openai/clip-vit-base-patch32"
    c.model.mode = "entityclip"        # or "clip_finetune": plain CLIP VTC only, no heads (the baseline)
    c.model.dtype = "float32"          # compute dtype (bfloat16 on TPU/GPU); params and losses stay fp32
    c.model.remat = False              # rematerialise tower layers to save activation memory
    # Random towers only: the text tower must match the tokenizer the records were written with.
    # Unset, all three are OpenAI's (49408, 49407, 49406); bos_token_id unset with eos_token_id set
    # is eos_token_id - 1, as in CLIP's tokenizers. A new run checks the BOS against the records'
    # first ids; it goes into an export's config.json.
    c.model.vocab_size = placeholder(int)
    c.model.eos_token_id = placeholder(int)
    c.model.bos_token_id = placeholder(int)

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
    # A jax.profiler trace of num_steps steps from first_step on (step 1 is the first) into
    # WORKDIR/profile, for TensorBoard's profile tab (train/profiling.py); num_steps=0: none.
    c.profile = _section(first_step=10, num_steps=0)
    # JAX's persistent compilation cache (train/compilation_cache.py), so a resume does not compile
    # the step again: "auto" = WORKDIR/compilation_cache on TPU and GPU, none on CPU; "" = none;
    # or a directory, local or gs://. Off with several CPU devices per process (an XLA:CPU hazard).
    c.compilation_cache_dir = "auto"
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
    for override in overrides:
        if not override.startswith("--config."):
            raise EntityClipError(f"unrecognized argument {override!r}; config overrides look like "
                                  "--config.optimizer.learning_rate=5e-6")
    path = spec if storage.is_remote(spec) else spec.split(":", 1)[0]  # "file.py:arg"; gs:// has its own colon
    if storage.is_remote(path):  # config_flags imports the file as a Python module, from the local disk only
        raise EntityClipError(f"config file {path} is on object storage; a config is a Python file imported "
                              "from the local disk: copy it there, e.g. --config configs/tiny_cpu.py")
    if not storage.path(path).is_file():
        raise EntityClipError(f"config file {path} does not exist; pass a file with get_config(), "
                              "e.g. --config configs/tiny_cpu.py")
    try:
        base = _parse(spec, ())
    except Exception as err:  # noqa: BLE001 -- the file is the user's Python code: whatever it raises is theirs
        raise EntityClipError(f"config file {path} cannot be loaded ({_describe_code_error(err)}); it must define "
                              "get_config() returning a ConfigDict, as configs/tiny_cpu.py does") from None
    if not isinstance(base, ml_collections.ConfigDict):
        raise EntityClipError(f"config file {path}: get_config() returned a {type(base).__name__}, not a ConfigDict; "
                              "start from entityclip_jax.config.default_config(), as configs/tiny_cpu.py does")
    missing = sorted(_key_paths(default_config()) - _key_paths(base))
    if missing:
        raise EntityClipError(f"config file {path} lacks {len(missing)} knob(s) the trainer reads, e.g. "
                              f"{', '.join(missing[:3])}; start from entityclip_jax.config.default_config(), as "
                              "configs/tiny_cpu.py does")
    if not overrides:
        return base
    try:
        return _parse(spec, overrides)
    except flags.Error as err:
        raise EntityClipError(f"cannot load config {spec!r} with overrides {list(overrides)}: {err}") from None
    except (KeyError, AttributeError, ValueError, TypeError) as err:
        unknown = _unknown_override(base, overrides)
        if unknown:
            raise EntityClipError(unknown) from None
        raise EntityClipError(f"bad config override in {list(overrides)}: {err}; "
                              "see entityclip_jax/config.py for the knobs") from None


def _parse(spec, overrides):
    argv = ["entityclip", f"--config={spec}", *overrides]
    values = flags.FlagValues()
    # sys_argv: config_flags reads the file at definition time to register the override flags.
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return values.config


def _describe_code_error(err):
    if isinstance(err, SyntaxError):
        return f"SyntaxError at line {err.lineno}: {err.msg}"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")


def _unknown_override(config, overrides):
    """'unknown config key X (did you mean Y?)' for the first override naming no knob of config, or None."""
    known = _key_paths(config)
    sections = {k.rpartition(".")[0] for k in known}
    for override in overrides:
        key = override[len("--config."):].split("=", 1)[0]
        whole = next((prefix for prefix in _prefixes(key) if prefix in known and prefix not in sections), None)
        if whole is not None:  # mesh.data: a key inside a knob that is not a section
            now = functools.reduce(lambda section, name: section[name], whole.split("."), config)
            shown = now if isinstance(now, str) else repr(now)
            shown = f'"{shown}"' if re.search(r"[\s()'\"]", shown) else shown
            return f"{override}: {whole} is one knob, not a section; set it whole, e.g. --config.{whole}={shown}"
        if key not in known and not any(k.startswith(key + ".") for k in known):
            close = closest_key(key, known)
            hint = f"did you mean --config.{close}?" if close else "see entityclip_jax/config.py for the knobs"
            return f"unknown config key {key!r} in {override}; {hint}"
    return None


def _prefixes(key):
    """mesh.data.x -> mesh, mesh.data: the sections (or knobs) a dotted key passes through."""
    parts = key.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts))]


def closest_key(key, known):
    """The knob a mistyped dotted key most likely meant, or None. The last part is what was typed
    with care: a knob of that name anywhere (the shallowest), else a close spelling of it in the
    section named (when that section exists) or at the top level (when it does not:
    train.bathc_size -> batch_size), and only then, for a misspelt section, a close spelling of
    the whole path (mdoel.init -> model.init)."""
    sections = {k.rpartition(".")[0] for k in known}
    knobs = [k for k in known if k not in sections]
    parent, _, leaf = key.rpartition(".")
    same_leaf = sorted((k for k in knobs if k.rpartition(".")[2] == leaf), key=lambda k: (k.count("."), k))
    if same_leaf:
        return same_leaf[0]
    section = parent if parent in known else ""
    siblings = {k.rpartition(".")[2]: k for k in knobs if k.rpartition(".")[0] == section}
    close = difflib.get_close_matches(leaf, siblings, n=1)
    if close:
        return siblings[close[0]]
    if parent in sections:  # a section we have: a whole-path match would be only its name
        return None
    close = difflib.get_close_matches(key, knobs, n=1)
    return close[0] if close else None


def _key_paths(config, prefix=""):
    paths = set()
    for key, value in config.items():
        paths.add(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            paths |= _key_paths(value, f"{prefix}{key}.")
    return paths


DTYPES = ("float32", "bfloat16", "float16")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("cosine", "constant")
DISTRIBUTED_MODES = ("auto", "always", "never")


def validate_config(config, device_count=None):
    """Every knob checked before any data is read; the first problem as one EntityClipError line.

    The one place that checks a config: train and plan run it, and the modules that read a
    config (optimizer, sharding, the mesh, the checkpointer) rely on it. With device_count
    (train: jax.device_count() once jax.distributed has started; plan: the target slice's),
    the mesh and the batch must also fit that many devices (check_devices).
    """
    def fail(message):
        raise EntityClipError(message)

    for name, allowed in (("model.mode", MODES), ("model.dtype", DTYPES), ("optimizer.name", OPTIMIZERS),
                          ("optimizer.schedule", SCHEDULES), ("checkpoint.best_mode", ("min", "max")),
                          ("distributed.initialize", DISTRIBUTED_MODES)):
        if _get(config, name) not in allowed:
            fail(f"{name} {_get(config, name)!r} is not one of {allowed}")
    if config.optimizer.name == "adam" and config.optimizer.weight_decay:
        fail("optimizer.weight_decay needs optimizer.name='adamw' (Adam has none in the release)")
    for name, patterns in (("optimizer.freeze", config.optimizer.freeze),
                           ("optimizer.lr_multipliers", [p for p, _ in _pairs(config.optimizer.lr_multipliers,
                                                                              "optimizer.lr_multipliers")]),
                           ("sharding.rules", [p for p, _ in _pairs(config.sharding.rules, "sharding.rules")])):
        if isinstance(patterns, str):
            fail(f"{name} must be a tuple of regexes, got the string {patterns!r}; write ({patterns!r},)")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as err:
                fail(f"{name}: {pattern!r} is not a valid regex ({err})")
    for pattern, multiplier in _pairs(config.optimizer.lr_multipliers, "optimizer.lr_multipliers"):
        if not isinstance(multiplier, (int, float)) or not multiplier >= 0:
            fail(f"optimizer.lr_multipliers: the multiplier of {pattern!r} must be a number >= 0, got {multiplier!r}")
    for pattern, strategy in _pairs(config.sharding.rules, "sharding.rules"):
        if strategy not in STRATEGIES:
            fail(f"sharding.rules: {pattern!r} -> {strategy!r}; the strategy must be one of {STRATEGIES}")
    if not config.optimizer.learning_rate >= 0:  # also refuses NaN
        fail(f"optimizer.learning_rate must be >= 0, got {config.optimizer.learning_rate}")
    if config.num_train_steps == 0 or config.num_train_steps < -1:
        fail(f"num_train_steps must be > 0 (or -1: use num_epochs), got {config.num_train_steps}")
    if config.num_train_steps == -1 and config.num_epochs < 1:
        fail(f"num_epochs must be >= 1, got {config.num_epochs} (or set num_train_steps > 0)")
    for name in ("checkpoint.every_steps", "log.every_steps", "accumulation_steps", "profile.first_step"):
        if _get(config, name) < 1:
            fail(f"{name} must be >= 1, got {_get(config, name)}")
    if config.profile.num_steps < 0:
        fail(f"profile.num_steps must be >= 0 (0: no profile), got {config.profile.num_steps}")
    if config.batch_size < 1:
        fail(f"batch_size must be >= 1, got {config.batch_size}")
    if config.batch_size % config.accumulation_steps:
        fail(f"batch_size {config.batch_size} does not split into accumulation_steps={config.accumulation_steps} "
             "micro-batches; make it a multiple")
    check_mesh_axes(config.mesh)
    random_preset(config.model.init)  # a bare preset name is refused here, not after the data loads
    if device_count is not None:
        check_devices(config, device_count)
    return config


def check_devices(config, device_count):
    """The mesh and the global batch split over device_count devices."""
    mesh_shape(config.mesh, device_count)
    if config.batch_size % device_count:
        raise EntityClipError(
            f"batch_size {config.batch_size} does not split over the {device_count} devices; use a multiple of "
            f"{device_count}, e.g. --config.batch_size={max(1, config.batch_size // device_count) * device_count}")


def _get(config, dotted):
    for key in dotted.split("."):
        config = config[key]
    return config


def _pairs(value, name):
    if isinstance(value, str) or any(not isinstance(p, (tuple, list)) or len(p) != 2 for p in value):
        raise EntityClipError(f"{name} must be a tuple of (regex, value) pairs, got {value!r}")
    return list(value)


def heads_config(config):
    """The HeadsConfig of config.heads."""
    return HeadsConfig(**config.heads.to_dict())


def model_from_config(config, clip_config):
    """The EntityCLIPConfig of a training config and the towers' architecture."""
    return EntityCLIPConfig(clip=clip_config, heads=heads_config(config), mode=config.model.mode,
                            dtype=config.model.dtype, remat=config.model.remat)


def random_preset(init):
    """The preset name of model.init="random:NAME", None for a checkpoint path or hub id. A bare
    preset name is refused: random towers must be asked for, never implied."""
    if init in PRESETS:
        pretrained = PRETRAINED_BY_PRESET.get(init)
        hint = f", or {pretrained} for OpenAI's pretrained weights" if pretrained else ""
        raise EntityClipError(f"model.init={init!r} names an architecture, not weights: write "
                              f"--config.model.init={RANDOM_PREFIX}{init} for RANDOM towers{hint}")
    if not init.startswith(RANDOM_PREFIX):
        return None
    name = init[len(RANDOM_PREFIX):]
    if name not in PRESETS:
        raise EntityClipError(f"unknown architecture in model.init={init!r}; choose one of "
                              f"{[RANDOM_PREFIX + n for n in sorted(PRESETS)]}")
    return name


RELEASE_ARCHITECTURES = {"b32": "openai/clip-vit-base-patch32", "b16": "openai/clip-vit-base-patch16"}


def release_config(data_dir, learning_rate, arch=None):
    """The EntityCLIP release recipe (METHOD.md) for one dataset.

    Adam(0.9, 0.999), no weight decay, cosine decay over all steps, no warmup,
    20 epochs, batch 192, seed 42, eta = lambda = 0.1, model selection by the
    lowest validation VTC loss. arch: "b32" (default) or "b16": the towers start,
    as the paper's do, from OpenAI's pretrained CLIP by hub id (downloaded once
    into the Hugging Face cache). Random towers are an explicit choice:
    --config.model.init=random:vit-b-32.
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
