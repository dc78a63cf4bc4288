"""Bad training configs fail in one line before any data is read."""
import json

import pytest

from entityclip_jax.cli import main as cli_main
from entityclip_jax.config import default_config, validate_config
from entityclip_jax.data import pipeline
from entityclip_jax.data.records import SCHEMA_VERSION
from entityclip_jax.errors import EntityClipError


@pytest.fixture
def records(tmp_path):
    """A records directory whose meta says 100 tokens per text (its shards are never reached)."""
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "entityclip_meta.json").write_text(json.dumps({"context_length": 100, "splits": {}}))
    return tmp_path / "records"


BAD = [
    ("--config.model.dtype=float8", "model.dtype 'float8' is not one of"),
    ("--config.mesh=data8", "mesh"),
    ("--config.mesh=(('data', -1), ('data', 2))", "repeats an axis name"),
    ("--config.mesh=(('data', -1), ('fsdp', -1))", "more than one axis of size -1"),
    ("--config.mesh=(('data', 0),)", "is not (name, size)"),
    ("--config.optimizer.freeze=('[unclosed',)", "optimizer.freeze: '[unclosed' is not a valid regex"),
    ("--config.optimizer.lr_multipliers=(('(bad', 0.1),)", "optimizer.lr_multipliers: '(bad' is not a valid regex"),
    ("--config.sharding.rules=(('*', 'replicate'),)", "sharding.rules: '*' is not a valid regex"),
    ("--config.optimizer.learning_rate=-1e-5", "learning_rate must be >= 0"),
    ("--config.num_epochs=0", "num_epochs must be >= 1"),
    ("--config.num_train_steps=0", "num_train_steps must be > 0"),
    ("--config.batch_size=12", "batch_size 12 does not split over the 8 devices"),
    ("--config.train.batch_size=8", "unknown config key 'train.batch_size' in --config.train.batch_size=8; "
                                    "did you mean --config.batch_size?"),
    ("--config.train.bathc_size=8", "unknown config key 'train.bathc_size' in --config.train.bathc_size=8; "
                                    "did you mean --config.batch_size?"),  # not eval.batch_size
    ("--config.optimizer.lerning_rate=1", "did you mean --config.optimizer.learning_rate?"),
    ("--config.mdoel.init=x", "did you mean --config.model.init?"),
    ("--config.optimizer.lr=1", "unknown config key 'optimizer.lr'"),
    ("--config.mesh.data=4", "--config.mesh.data=4: mesh is one knob, not a section; set it whole, e.g. "
                             "--config.mesh=\"(('data', -1), ('fsdp', 1))\""),
    ("--config.model.init.name=x", "model.init is one knob, not a section; set it whole, e.g. "
                                   "--config.model.init=random:tiny"),
    ("--config.model.init=vit-b-16", "names an architecture, not weights: write --config.model.init=random:vit-b-16"),
]


@pytest.mark.parametrize("override, message", BAD)
def test_bad_config_is_one_line_before_data(override, message, records, tmp_path, monkeypatch, capsys):
    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before the config was checked")
    monkeypatch.setattr(pipeline, "split_size", no_data)
    monkeypatch.setattr(pipeline, "make_dataset", no_data)
    code = cli_main(["train", "--config", "configs/tiny_cpu.py", "--workdir", str(tmp_path / "run"),
                     "--config.model.init=random:vit-b-32", "--config.data.dir=/nonexistent", override])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("init", ["random:vit-b-32", "random:tiny"])
def test_context_length_longer_than_the_towers_positions(records, tmp_path, init, capsys):
    """Checked against the towers' architecture before any weight is read or anything written."""
    meta = records / "entityclip_meta.json"
    meta.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "context_length": 100,
                                "splits": {"train": {"num_examples": 4096, "shards": []}}}))
    code = cli_main(["train", "--config", "configs/tiny_cpu.py", "--workdir", str(tmp_path / "run"),
                     f"--config.model.init={init}", f"--config.data.dir={records}"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "holds texts of 100 tokens, the model has 77 positions" in err and "--context-length 77" in err, err
    assert not (tmp_path / "run").exists()


def test_a_warmup_as_long_as_the_run_is_refused_before_anything_is_written(records, tmp_path, capsys):
    meta = records / "entityclip_meta.json"
    meta.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "context_length": 16,
                                "splits": {"train": {"num_examples": 4096, "shards": []}}}))
    code = cli_main(["train", "--config", "configs/tiny_cpu.py", "--workdir", str(tmp_path / "run"),
                     f"--config.data.dir={records}", "--config.num_train_steps=3", "--config.optimizer.warmup_steps=5"])
    err = capsys.readouterr().err
    assert code == 2 and "optimizer.warmup_steps 5 must be in [0, total steps 3)" in err, err
    assert not (tmp_path / "run").exists()


def test_the_default_and_shipped_configs_pass():
    from entityclip_jax.config import load_config
    for spec in ("configs/tiny_cpu.py", "configs/n24news.py", "configs/n24news.py:b16"):
        validate_config(load_config(spec), device_count=8)
    validate_config(default_config(), device_count=1)


def test_a_config_file_on_gcs_or_missing_is_one_line(tmp_path):
    from entityclip_jax.config import load_config
    with pytest.raises(EntityClipError, match="on object storage.*copy it there"):
        load_config("gs://bucket/configs/tiny_cpu.py")
    with pytest.raises(EntityClipError, match="no_such.py"):
        load_config(str(tmp_path / "no_such.py"))
