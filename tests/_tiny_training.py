"""Builders shared by the training tests: a tiny config and random batches for it."""
import numpy as np

VOCAB, EOS, CONTEXT = 100, 99, 16


def tiny_config(**overrides):
    """configs/tiny_cpu.py with a 100-token vocabulary (EOS 99), every knob overridable
    by dotted name: tiny_config(**{"optimizer.eps": 1.0})."""
    from entityclip_jax.config import load_config
    import pathlib
    config = load_config(str(pathlib.Path(__file__).parents[1] / "configs" / "tiny_cpu.py"))
    with config.unlocked():
        config.model.vocab_size, config.model.eos_token_id = VOCAB, EOS
        for name, value in overrides.items():
            *parents, leaf = name.split(".")
            node = config
            for parent in parents:
                node = node[parent]
            node[leaf] = value
    return config


def random_batch(batch_size, image_size=64, seed=0):
    """Token ids BOS..EOS then padding 0, random pixels: the pipeline's batch layout."""
    rng = np.random.default_rng(seed)

    def ids():
        out = np.zeros((batch_size, CONTEXT), np.int32)
        for row in out:
            length = rng.integers(3, CONTEXT)
            row[:length - 1] = rng.integers(1, EOS - 1, length - 1)
            row[length - 1] = EOS
        return out
    return {"pixel_values": rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32),
            "query_ids": ids(), "explanation_ids": ids(), "mask": np.ones(batch_size, bool)}


def write_tiny_records(root, num_train=256, num_val=64):
    """Synthetic entity photos (data/synthetic.py) as TFRecords, through `entityclip write-records`,
    with a small BPE trained on their texts. Returns (records_dir, vocab_size, eos_id)."""
    import json
    import pathlib

    from entityclip_jax import cli
    from entityclip_jax.data.synthetic import write_synthetic_dataset
    from entityclip_jax.data.tokenizer import load_tokenizer
    from tests._raw_layouts import write_tiny_clip_tokenizer

    root = pathlib.Path(root)
    raw, records = root / "raw", root / "records"
    write_synthetic_dataset(raw, num_train, seed=0, filename="train.jsonl")
    write_synthetic_dataset(raw, num_val, seed=1, filename="val.jsonl")
    texts = [text for split in ("train", "val") for line in open(raw / f"{split}.jsonl")
             for text in (json.loads(line)["query"], json.loads(line)["explanation"])]
    write_tiny_clip_tokenizer(root / "tokenizer", corpus=texts, vocab_size=300)
    for split in ("train", "val"):
        code = cli.main(["write-records", "--source", "jsonl", "--root", str(raw), "--split", split,
                         "--tokenizer", str(root / "tokenizer"), "--out", str(records), "--workers", "1",
                         "--examples-per-shard", "64"])
        assert code == 0
    tokenizer = load_tokenizer(str(root / "tokenizer"))
    return str(records), tokenizer.vocab_size, tokenizer.eos_token_id


_MODELS = {}


def tiny_model(mode="entityclip"):
    """(EntityCLIP, params) of tiny_config(), initialised once per test session."""
    if mode not in _MODELS:
        import jax
        from entityclip_jax.checkpoints.model_init import init_entityclip
        from entityclip_jax.config import model_from_config
        if "entityclip" not in _MODELS:
            _MODELS["entityclip"] = init_entityclip(jax.random.key(0), tiny_config())
        model, params = _MODELS["entityclip"]
        # the plain-CLIP baseline: the same towers, no heads
        _MODELS["clip_finetune"] = (model_from_config(tiny_config(**{"model.mode": "clip_finetune"}), model.clip),
                                    {"clip": params["clip"]})
    return _MODELS[mode]


def build_state(model, params, config, mesh, total_steps=10):
    """(train_step, state, shardings, tx) on `mesh` for config's optimizer and sharding rules."""
    from entityclip_jax.parallel import sharding
    from entityclip_jax.train import optimizer
    from entityclip_jax.train.state import abstract_state, create_train_state, state_specs
    from entityclip_jax.train.step import make_train_step
    tx = optimizer.make_optimizer(config.optimizer, total_steps, params)
    schedule = optimizer.learning_rate_schedule(config.optimizer, total_steps)
    abstract = abstract_state(params, tx)
    shardings = sharding.to_shardings(
        state_specs(abstract, mesh, config.sharding.rules, config.sharding.fsdp_min_size), mesh)
    state = create_train_state(params, tx, shardings)
    batch_shardings = sharding.batch_shardings(mesh, random_batch(2))
    step = make_train_step(model, tx, schedule, mesh, shardings, batch_shardings, seed=config.seed,
                           accumulation_steps=config.accumulation_steps)
    return step, state, shardings, tx
