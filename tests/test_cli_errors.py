"""Every CLI error path ends in ONE line, never a traceback: a table of bad inputs for every
subcommand (missing, empty and corrupt files, bad flags and values, bad paths, gs:// with a
bucket name Cloud Storage refuses, unreadable and unwritable places, a full disk, damaged
checkpoints, a signal), each run end to end through `entityclip_jax.cli.main`.

A row fails on any "Traceback" in what the command printed, on more than one error line, on
an exit status other than the one documented for it (errors.py), and when its error line does
not say what it should. Rows run in this process (capfd sees C-level output too), or in a
subprocess where the process is the point: another user, a file size limit, a signal, and
the "Event loop is closed" callbacks TensorStore raises after a failed read, which only show
on a real stderr. Extend the table as you fix."""
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import pytest

from entityclip_jax import cli
from entityclip_jax.checkpoints import run as run_format
from entityclip_jax.checkpoints import run_tokenizer
from entityclip_jax.checkpoints.model_init import init_entityclip
from entityclip_jax.config import load_config
from entityclip_jax.errors import EXIT_REFUSED
from entityclip_jax.parallel.mesh import make_mesh
from entityclip_jax.train import input_stream
from tests._child_process import child_env
from tests._tiny_training import build_state, write_tiny_records
from tests.conftest import tiny_hf_clip
from tests.test_checkpoint_integrity import flip

ROOT = pathlib.Path(__file__).parents[1]
CONFIG = str(ROOT / "configs" / "tiny_cpu.py")
ERROR_LINE = re.compile(r"\berror:", re.IGNORECASE)  # ours, argparse's, logging's ERROR:


def check_output(code, out, err, expected_code, says):
    """The rules every row obeys; `says` is a regex the one error line must match."""
    text = out + err
    assert "Traceback" not in text, text[-6000:]
    errors = [line for line in text.splitlines() if ERROR_LINE.search(line)]
    assert code == expected_code, (code, text[-3000:])
    if expected_code == EXIT_REFUSED:
        assert len(errors) == 1, errors
        assert re.search(says, errors[0]), errors[0]
    else:
        assert not errors, errors
        assert re.search(says, text), text[-3000:]


def run_in_process(argv, capfd):
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    out, err = capfd.readouterr()
    return code, out, err


def run_subprocess(argv, *, prefix=(), env=None, timeout=180):
    done = subprocess.run([*prefix, sys.executable, "-m", "entityclip_jax.cli", *argv], capture_output=True,
                          text=True, timeout=timeout, env=child_env(**(env or {})))
    return done.returncode, done.stdout, done.stderr


# ---------------------------------------------------------------- the files the rows break

def save_fake_run(workdir, records, vocab, eos, steps=(1, 2)):
    """A training workdir as `entityclip train` leaves it, with freshly initialised parameters
    saved at `steps` (no step trained: the rows need its files, not a learnt model)."""
    config = load_config(CONFIG, [f"--config.data.dir={records}", f"--config.model.vocab_size={vocab}",
                                  f"--config.model.eos_token_id={eos}", "--config.checkpoint.best_metric=",
                                  "--config.batch_size=8"])
    model, params = init_entityclip(jax.random.key(0), config)
    _, state, _, _ = build_state(model, params, config, make_mesh(config.mesh))
    run_format.write_run_files(str(workdir), model.clip, config)
    run_tokenizer.record_run_tokenizer(str(workdir), config, model.clip.text)
    checkpointer = run_format.Checkpointer(str(workdir), config.checkpoint)
    steps_in_epoch = input_stream.steps_per_epoch(config)
    for step in steps:
        checkpointer.save(step, state, input_stream.position(step, steps_in_epoch, config))
    checkpointer.close()
    return config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny records (with the raw data and tokenizer they came from), a Hugging Face checkpoint,
    a training workdir and a few broken files, in a directory every user may read."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="entityclip-cli-errors-"))
    root.chmod(0o755)
    records, vocab, eos = write_tiny_records(root, num_train=16, num_val=8)
    tiny_hf_clip().save_pretrained(root / "hf")
    save_fake_run(root / "run", records, vocab, eos)
    (root / "garbage.json").write_bytes(b"\x00{not json")
    (root / "a_file").write_text("not a directory\n")
    (root / "bad_config.py").write_text("def get_config(:\n")
    (root / "no_get_config.py").write_text("X = 1\n")
    (root / "empty_dir").mkdir()
    (root / "garbage.pt").write_bytes(b"PK\x03\x04 not a zip")
    (root / "int_config.py").write_text("def get_config():\n    return 1\n")
    (root / "small_config.py").write_text("import ml_collections\n\n\ndef get_config():\n"
                                          "    return ml_collections.ConfigDict({'seed': 1})\n")
    (root / "raw_numeric" / "images").mkdir(parents=True)
    shutil.copy(next((root / "raw" / "images").iterdir()), root / "raw_numeric" / "images" / "a.jpg")
    (root / "raw_numeric" / "train.jsonl").write_text('{"id": "n", "image": "images/a.jpg", "query": 1999}\n'
                                                      '{"id": "t", "image": "images/a.jpg", "query": "Merkel"}\n')
    (root / "queries_numeric.jsonl").write_text('{"id": "a", "query": 2024}\n{"id": "b", "query": "Merkel"}\n')
    for path in root.rglob("*"):
        path.chmod(path.stat().st_mode | 0o755 if path.is_dir() else path.stat().st_mode | 0o644)
    yield {"root": root, "records": records, "vocab": vocab, "eos": eos, "raw": root / "raw",
           "tokenizer": root / "tokenizer", "hf": root / "hf", "run": root / "run"}
    shutil.rmtree(root, ignore_errors=True)


def copy_of(world, name, tmp_path):
    target = tmp_path / name
    shutil.copytree(world[name], target)
    return target


def train_args(world, workdir, *extra):
    return ["train", "--config", CONFIG, "--workdir", str(workdir), f"--config.data.dir={world['records']}",
            f"--config.model.vocab_size={world['vocab']}", f"--config.model.eos_token_id={world['eos']}",
            "--config.checkpoint.best_metric=", "--config.batch_size=8", *extra]


# ---------------------------------------------------------------- in-process rows
# (name, argv(world, tmp_path) -> list, expected exit status, what the one error line says)

ROWS = [
    ("no command", lambda w, t: [], 2, r"required: COMMAND"),
    ("unknown command", lambda w, t: ["fly"], 2, r"invalid choice: 'fly'"),
    ("unknown flag", lambda w, t: ["eval", "--checkpoint", "c", "--data", "d", "--out", "o", "--bogus"],
     2, r"unrecognized arguments: --bogus"),
    # train: config
    ("train config missing", lambda w, t: ["train", "--config", str(t / "nope.py"), "--workdir", str(t / "r")],
     2, r"config file .*nope.py does not exist"),
    ("train config on gs://", lambda w, t: ["train", "--config", "gs://bucket/c.py", "--workdir", str(t / "r")],
     2, r"is on object storage"),
    ("train config syntax error", lambda w, t: ["train", "--config", str(w["root"] / "bad_config.py"),
                                                "--workdir", str(t / "r")], 2, r"bad_config.py"),
    ("train override typo", lambda w, t: train_args(w, t / "r", "--config.train.bathc_size=8"),
     2, r"did you mean --config\.batch_size\?"),
    ("train override bad value", lambda w, t: train_args(w, t / "r", "--config.batch_size=many"),
     2, r"batch_size"),
    ("train override inside a knob", lambda w, t: train_args(w, t / "r", "--config.mesh.data=4"),
     2, r"mesh is one knob, not a section; set it whole, e.g. --config\.mesh="),
    ("train stray argument", lambda w, t: train_args(w, t / "r", "--lr=1"), 2, r"unrecognized argument '--lr=1'"),
    ("train config returns no ConfigDict", lambda w, t: ["train", "--config", str(w["root"] / "int_config.py"),
                                                         "--workdir", str(t / "r")], 2, r"returned a int"),
    ("train config lacks knobs", lambda w, t: ["train", "--config", str(w["root"] / "small_config.py"),
                                               "--workdir", str(t / "r")], 2, r"lacks \d+ knob"),
    # train: a workdir whose run files are damaged
    ("train resume run_tokenizer.json damaged", lambda w, t: train_args(w, broken_run(w, t, "run_tokenizer.json")),
     2, r"run_tokenizer.json is damaged"),
    ("train resume towers_config.json damaged", lambda w, t: train_args(w, broken_run(w, t, "towers_config.json")),
     2, r"towers_config.json is damaged"),
    ("train resume train_config.json damaged", lambda w, t: train_args(w, broken_run(w, t, "train_config.json")),
     2, r"train_config.json is damaged \(.*\); copy the latest .*configs/train_config.<step>.json"),
    ("train resume train_config.json missing", lambda w, t: train_args(
        w, broken_run(w, t, "train_config.json", delete=True)), 2, r"train_config.json is missing"),
    # train: paths
    ("train workdir bucket name refused", lambda w, t: train_args(w, "gs://My_Bucket/run1"),
     2, r"'My_Bucket' is not a valid Cloud Storage bucket name"),
    ("train workdir bucket too short", lambda w, t: train_args(w, "gs://ab/run1"),
     2, r"'ab' is not a valid Cloud Storage bucket name \(it must have 3 to 63"),
    ("train workdir is a file", lambda w, t: train_args(w, w["root"] / "a_file"), 2, r"a_file"),
    ("train workdir is the records", lambda w, t: train_args(w, w["records"]),
     2, r"holds files no training run writes \(dataset_info.json, .*give a new or empty --workdir"),
    ("train workdir is a Hugging Face export", lambda w, t: train_args(w, w["hf"]),
     2, r"holds files no training run writes \(config.json"),
    ("train data missing", lambda w, t: ["train", "--config", CONFIG, "--workdir", str(t / "r"),
                                         f"--config.data.dir={t / 'none'}"], 2, r"none"),
    ("train data is not records", lambda w, t: ["train", "--config", CONFIG, "--workdir", str(t / "r"),
                                                f"--config.data.dir={w['root'] / 'empty_dir'}"], 2, r"empty_dir"),
    ("train random towers with another BOS", lambda w, t: train_args(w, t / "r", "--config.model.bos_token_id=5"),
     2, r"starts its texts with token id 0, the random towers' BOS id is 5: set --config.model.bos_token_id=0"),
    ("train model.init missing", lambda w, t: train_args(w, t / "r", f"--config.model.init={t / 'no_towers'}"),
     2, r"no_towers"),
    ("train model.init hub id not cached", lambda w, t: train_args(w, t / "r", "--config.model.init=nobody/nothing"),
     2, r"nobody/nothing"),
    # eval, classify, search
    ("eval checkpoint missing", lambda w, t: ["eval", "--checkpoint", str(t / "none"), "--data", w["records"],
                                              "--split", "val", "--out", str(t / "out")], 2, r"none"),
    ("eval data missing", lambda w, t: ["eval", "--checkpoint", str(w["run"]), "--data", str(t / "none"),
                                        "--split", "val", "--out", str(t / "out")], 2, r"none"),
    ("eval split missing", lambda w, t: ["eval", "--checkpoint", str(w["run"]), "--data", w["records"],
                                         "--split", "nosplit", "--out", str(t / "out")], 2, r"nosplit"),
    ("eval out is a file", lambda w, t: ["eval", "--checkpoint", str(w["run"]), "--data", w["records"],
                                         "--split", "val", "--out", str(w["root"] / "a_file")], 2, r"a_file"),
    ("eval batch size 0", lambda w, t: ["eval", "--checkpoint", str(w["run"]), "--data", w["records"],
                                        "--split", "val", "--out", str(t / "out"), "--batch-size", "0"],
     2, r"batch"),
    ("classify tokenizer missing", lambda w, t: ["classify", "--checkpoint", str(w["run"]), "--data", w["records"],
                                                 "--split", "val", "--out", str(t / "out"),
                                                 "--tokenizer", str(t / "none")], 2, r"none"),
    ("search-index images missing", lambda w, t: ["search-index", "--checkpoint", str(w["hf"]),
                                                  "--images", str(t / "none"), "--out", str(t / "i.npz")],
     2, r"none"),
    ("search-index no images", lambda w, t: ["search-index", "--checkpoint", str(w["hf"]),
                                             "--images", str(w["root"] / "empty_dir"), "--out", str(t / "i.npz")],
     2, r"empty_dir"),
    ("search index missing", lambda w, t: ["search", "--checkpoint", str(w["hf"]), "--index", str(t / "none.npz"),
                                           "--query", "x"], 2, r"none.npz"),
    ("search index garbage", lambda w, t: ["search", "--checkpoint", str(w["hf"]),
                                           "--index", str(w["root"] / "garbage.json"), "--query", "x"],
     2, r"garbage.json"),
    ("search index cut short", lambda w, t: ["search", "--checkpoint", str(w["hf"]), "--index", cut_zip(t / "i.npz"),
                                             "--query", "x"], 2, r"i.npz is not a search index"),
    ("search empty query", lambda w, t: ["search", "--checkpoint", str(w["hf"]), "--index", str(t / "none.npz"),
                                         "--query", "x", "--query", "  "], 2, r"--query number 2 is empty"),
    ("compare results missing", lambda w, t: ["compare", str(t / "a"), str(t / "b")], 2, r"/a"),
    ("compare details cut short", lambda w, t: ["compare", cut_results(t / "a"), cut_results(t / "b")],
     2, r"retrieval_details.npz is damaged"),
    ("serve index missing", lambda w, t: ["serve", "--index", str(t / "none.npz"), "--checkpoint", str(w["hf"])],
     2, r"none.npz does not exist"),
    ("serve on every interface", lambda w, t: ["serve", "--index", str(t / "none.npz"), "--checkpoint", str(w["hf"]),
                                               "--host", "0.0.0.0"], 2, r"--allow-remote"),
    ("plan unknown accelerator", lambda w, t: ["plan", "--config", CONFIG, "--accelerator", "v9-12345"], 2, r"v9-12345"),
    ("plan config missing", lambda w, t: ["plan", "--config", str(t / "none.py"), "--accelerator", "v5e-4"],
     2, r"none.py does not exist"),
    # conversion
    ("import-hf missing", lambda w, t: ["import-hf", str(t / "none"), str(t / "out")], 2, r"none"),
    ("import-hf config garbage", lambda w, t: ["import-hf", str(hf_with(w, t, config=b"{oops")), str(t / "out")],
     2, r"config.json is not valid JSON"),
    ("import-hf heads do not divide", lambda w, t: ["import-hf", str(hf_with(w, t, heads=5)), str(t / "out")],
     2, r"hidden_size 32 does not split into num_attention_heads 5"),
    ("import-hf weights cut short", lambda w, t: ["import-hf", str(hf_with(w, t, cut=True)), str(t / "out")],
     2, r"model.safetensors"),
    ("import-openai missing", lambda w, t: ["import-openai", str(t / "none.pt"), str(t / "out")], 2, r"none.pt"),
    ("import-openai garbage", lambda w, t: ["import-openai", str(w["root"] / "garbage.pt"), str(t / "out")],
     2, r"garbage.pt"),
    ("export-hf source missing", lambda w, t: ["export-hf", str(t / "none"), str(t / "out")], 2, r"none"),
    ("export-hf out exists", lambda w, t: ["export-hf", str(w["hf"]), str(w["root"] / "empty_dir")],
     2, r"exists; choose a new destination or pass --overwrite"),
    ("export-hf out is gs:// with a bad bucket", lambda w, t: ["export-hf", str(w["hf"]), "gs://UPPER/x"],
     2, r"'UPPER' is not a valid Cloud Storage bucket name"),
    # records
    ("tokenizer bpe missing", lambda w, t: ["tokenizer", "--bpe", str(t / "none.gz"), "--out", str(t / "tok")],
     2, r"none.gz"),
    ("tokenizer bpe garbage", lambda w, t: ["tokenizer", "--bpe", str(w["root"] / "garbage.json"),
                                            "--out", str(t / "tok")], 2, r"garbage.json"),
    ("check-source root missing", lambda w, t: ["check-source", "--source", "jsonl", "--root", str(t / "none"),
                                                "--split", "train"], 2, r"none"),
    ("check-source split missing", lambda w, t: ["check-source", "--source", "jsonl", "--root", str(w["raw"]),
                                                 "--split", "nosplit"], 2, r"nosplit"),
    ("check-source numeric query", lambda w, t: ["check-source", "--source", "jsonl", "--root",
                                                 str(w["root"] / "raw_numeric"), "--split", "train"],
     0, r"1 skipped \{'not_text': 1\}"),
    ("check-source bad option", lambda w, t: ["check-source", "--source", "jsonl", "--root", str(w["raw"]),
                                              "--split", "train", "--source-option", "novalue"],
     2, r"KEY=VALUE"),
    ("write-records out is a file", lambda w, t: write_records(w, w["root"] / "a_file"), 2, r"a_file"),
    ("write-records tokenizer missing", lambda w, t: write_records(w, t / "out", "--tokenizer", str(t / "none")),
     2, r"none"),
    ("write-records explanations garbage", lambda w, t: write_records(
        w, t / "out", "--explanations", str(w["root"] / "garbage.json")), 2, r"garbage.json"),
    ("write-records shard size 0", lambda w, t: write_records(w, t / "out", "--examples-per-shard", "0"),
     2, r"examples_per_shard must be >= 1"),
    ("write-records out bucket refused", lambda w, t: write_records(w, "gs://a_b_/records"),
     2, r"'a_b_' is not a valid Cloud Storage bucket name"),
    # explain
    ("explain queries missing", lambda w, t: ["explain", "--queries", str(t / "none.jsonl"),
                                              "--out", str(t / "c.jsonl"), "--backend", "http", "--model", "m"],
     2, r"none.jsonl not found"),
    ("explain both inputs", lambda w, t: ["explain", "--queries", str(t / "q.jsonl"), "--source", "jsonl",
                                          "--root", str(w["raw"]), "--out", str(t / "c.jsonl")],
     2, r"exactly one input"),
    ("explain-import capdsc missing", lambda w, t: ["explain-import", "--capdsc", str(t / "none.json"),
                                                    "--out", str(t / "c.jsonl")], 2, r"none.json"),
    ("explain-import capdsc garbage", lambda w, t: ["explain-import", "--capdsc", str(w["root"] / "garbage.json"),
                                                    "--out", str(t / "c.jsonl")], 2, r"garbage.json"),
    ("explain numeric query", lambda w, t: ["explain", "--queries", str(w["root"] / "queries_numeric.jsonl"),
                                            "--out", str(t / "c.jsonl"), "--backend", "http", "--model", "m",
                                            "--base-url", "http://127.0.0.1:9/v1", "--retries", "0", "--no-progress"],
     1, r"skipped input: not_text=1"),
    # demo
    ("demo workdir of someone else", lambda w, t: ["demo", "--workdir", str(w["raw"])], 2, r"demo did not write"),
]


def write_records(world, out, *extra):
    argv = ["write-records", "--source", "jsonl", "--root", str(world["raw"]), "--split", "train",
            "--tokenizer", str(world["tokenizer"]), "--out", str(out), "--workers", "1"]
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


def cut_zip(target):
    """An .npz cut short: a zip file's first bytes, then nothing it promised."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"PK\x03\x04" + bytes(60))
    return str(target)


def cut_results(results):
    """An `entityclip eval --report` output whose details file was cut short."""
    cut_zip(results / "retrieval_details.npz")
    (results / "retrieval.json").write_text("{}")
    return str(results)


def broken_run(world, tmp_path, name, delete=False):
    """A copy of the training workdir with its run file `name` replaced by garbage (or deleted)."""
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    (run / name).unlink()
    if not delete:
        (run / name).write_bytes(b"\x00{garbage")
    return run


def hf_with(world, tmp_path, config=None, heads=None, cut=False):
    """A copy of the tiny Hugging Face checkpoint, broken as asked."""
    target = tmp_path / "hf_broken"
    shutil.copytree(world["hf"], target)
    if config is not None:
        (target / "config.json").write_bytes(config)
    if heads is not None:
        data = json.loads((target / "config.json").read_text())
        data["text_config"]["num_attention_heads"] = heads
        (target / "config.json").write_text(json.dumps(data))
    if cut:
        weights = target / "model.safetensors"
        os.truncate(weights, weights.stat().st_size // 2)
    return target


@pytest.mark.parametrize("name, argv, code, says", ROWS, ids=[row[0] for row in ROWS])
def test_bad_input_is_one_line(world, tmp_path, capfd, name, argv, code, says):
    output = run_in_process(argv(world, tmp_path), capfd)
    check_output(*output, code, says)
    if "model.init" in name:  # nothing claims towers it has not read
        assert "towers: pretrained" not in "".join(map(str, output)), output


# ---------------------------------------------------------------- rows that need a process of their own

def test_a_config_file_without_get_config(world):
    """In a fresh process: ml_collections reloads config files into one module, so in this one an
    earlier config's get_config would still be there."""
    check_output(*run_subprocess(["train", "--config", str(world["root"] / "no_get_config.py"),
                                  "--workdir", str(world["root"] / "never")]),
                 2, r"no_get_config.py cannot be loaded \(AttributeError: .*no attribute 'get_config'\)")


def without_root_powers():
    """The command prefix that makes a permission row mean something: as root (the tests run as
    root here) permissions are not checked at all, so the row runs without the capabilities that
    bypass them (setpriv drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH); as another user, nothing."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("the tests run as root and setpriv (util-linux) is missing to drop root's file permissions")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--"]


@pytest.fixture(scope="module")
def locked(world):
    """A directory nobody may write in (mode 0555), and the prefix that makes that hold for root too."""
    directory = world["root"] / "locked"
    directory.mkdir()
    directory.chmod(0o555)
    prefix = without_root_powers()
    check = subprocess.run([*prefix, sys.executable, "-c", f"import os; print(os.access({str(directory)!r}, os.W_OK))"],
                           capture_output=True, text=True)
    assert check.stdout.strip() == "False", ("the permission rows need a directory they cannot write", check)
    yield {"dir": directory, "prefix": prefix}
    directory.chmod(0o755)


UNWRITABLE = [  # checked before any work: one line naming the place and what to do
    ("write-records", lambda w, out: write_records(w, out),
     r"cannot write to .*locked/write-records_out \(Permission denied\); choose an --out you can write to"),
    ("train", lambda w, out: train_args(w, out),
     r"cannot write to .*locked/train_out \(Permission denied\); give a --workdir"),
    pytest.param("eval", lambda w, out: ["eval", "--checkpoint", str(w["run"]), "--data", w["records"], "--split",
                                         "val", "--out", str(out)],
                 r"cannot write to .*locked/eval_out \(Permission denied\); choose an --out", marks=pytest.mark.slow),
    pytest.param("export-hf", lambda w, out: ["export-hf", str(w["hf"]), str(out), "--no-verify"],
                 r"cannot write to .*locked \(Permission denied\); choose a destination", marks=pytest.mark.slow),
    pytest.param("search-index", lambda w, out: ["search-index", "--checkpoint", str(w["hf"]), "--images",
                                                 str(w["raw"] / "images"), "--out", str(out / "index.npz")],
                 r"cannot write to .*locked/search-index_out \(Permission denied\)", marks=pytest.mark.slow),
    pytest.param("explain", lambda w, out: ["explain", "--queries", str(w["root"] / "queries_numeric.jsonl"),
                                            "--out", str(out / "cache.jsonl"), "--backend", "http", "--model", "m",
                                            "--base-url", "http://127.0.0.1:9/v1"],
                 r"Permission denied: .*locked/explain_out", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("command, argv, says", UNWRITABLE)
def test_a_place_you_cannot_write_is_one_line(world, locked, command, argv, says):
    out = locked["dir"] / f"{command}_out"
    check_output(*run_subprocess(argv(world, out), prefix=locked["prefix"]), 2, says)
    assert not out.exists()


def test_a_file_size_limit_in_write_records_is_one_line(world, tmp_path):
    out = tmp_path / "records"
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit (util-linux) is missing")
    code, stdout, stderr = run_subprocess(write_records(world, out), prefix=["prlimit", "--fsize=32768", "--"])
    check_output(code, stdout, stderr, 2, r"cannot write the 'train' split to .*File too large.*untouched")
    assert not list(out.rglob("*.tfrecord*"))  # no partial shard left behind


def small_disk(tmp_path, size):
    """A tmpfs of `size` ("16k", "3m") at tmp_path/disk, unmounted afterwards: a disk that fills up
    (skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def tiny_disk(tmp_path):
    """16 KiB: no records file fits."""
    yield from small_disk(tmp_path, "16k")


@pytest.mark.slow  # a file size limit above takes the same path
def test_a_full_disk_in_write_records_is_one_line(world, tiny_disk):
    check_output(*run_subprocess(write_records(world, tiny_disk / "records")),
                 2, r"cannot write the 'train' split to .*No space left on device")


def damaged_run(world, tmp_path):
    """A copy of the training workdir whose latest step (2) has a codec header destroyed in the
    towers' largest array: eval and export-hf must fall back to step 1."""
    run = tmp_path / "damaged_run"
    shutil.copytree(world["run"], run)
    flip(run, 2, where=0.0, mask=0xFF, key="params.clip")
    return run


FALLBACK = [
    ("export-hf", lambda w, t: ["export-hf", str(damaged_run(w, t)), str(t / "exported"), "--no-verify"]),
    pytest.param("eval", lambda w, t: ["eval", "--checkpoint", str(damaged_run(w, t)), "--data", w["records"],
                                       "--split", "val", "--out", str(t / "results")], marks=pytest.mark.slow),
]


@pytest.mark.parametrize("command, argv", FALLBACK)
def test_a_damaged_step_is_one_warning_and_the_fallback(world, tmp_path, command, argv):
    """Once per damaged step, one line; not the "Event loop is closed" tracebacks (33 to 180 of
    them) that TensorStore's reads left in flight by the failed one used to print."""
    code, stdout, stderr = run_subprocess(argv(world, tmp_path))
    assert "Event loop is closed" not in stderr
    check_output(code, stdout, stderr, 0, r"damaged checkpoint .*checkpoints/2: ")
    damaged = [line for line in stderr.splitlines() if "damaged checkpoint" in line]
    assert len(damaged) == 1 and "using checkpoint" in stderr and "checkpoints/1" in stderr, stderr[-3000:]


def test_export_of_a_run_with_a_small_tokenizer(world, tmp_path, capfd):
    """Random towers fitted to a 300-token BPE (model.vocab_size / eos_token_id; the BOS read from
    the records): the export is verified against transformers (it used to stop at `low >= high`) and
    its config names the records' BOS, not OpenAI's 49406."""
    from entityclip_jax.data.pipeline import first_token_ids
    bos = int(first_token_ids(world["records"], "train", 1)[0, 0])
    code, out, err = run_in_process(["export-hf", str(world["run"]), str(tmp_path / "hf")], capfd)
    check_output(code, out, err, 0, r"verified with transformers: max \|embedding difference\|")
    assert "bos_token_id must be" not in err
    text = json.loads((tmp_path / "hf" / "config.json").read_text())["text_config"]
    assert (text["vocab_size"], text["eos_token_id"], text["bos_token_id"]) == (world["vocab"], world["eos"], bos)
    assert bos != world["eos"] and bos < world["vocab"]


# ---------------------------------------------------------------- rows that train (slow)

def start_training(world, workdir, *extra):
    argv = train_args(world, workdir, "--config.num_train_steps=400", "--config.checkpoint.every_steps=2",
                      "--config.eval.every_steps=0", "--config.log.every_steps=1", *extra)
    # Started as from a terminal: pytest run as a background job (`cmd &`, nohup) has SIGINT
    # ignored and would hand that to the child, whose Python then installs no KeyboardInterrupt
    # handler: a Ctrl-C before train's own handler would be lost. A signal caught here is reset
    # to its default in the child.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen([sys.executable, "-m", "entityclip_jax.cli", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=child_env())
    finally:
        signal.signal(signal.SIGINT, previous)


def wait_for(path, process, timeout=600):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate(timeout=60)
        time.sleep(0.1)


@pytest.mark.slow  # trains twice
def test_a_second_trainer_is_refused_and_ctrl_c_or_sigterm_saves_with_status_75(world, tmp_path):
    workdir = tmp_path / "run"
    first = start_training(world, workdir)
    try:
        wait_for(workdir / "checkpoints" / "2" / "_CHECKPOINT_METADATA", first)
        # a relaunch while the first run lives: refused in one line naming it; the first goes on saving
        check_output(*run_subprocess(train_args(world, workdir)), 2,
                     rf"is in use by another `entityclip train` \(host .*, pid {first.pid}, started ")
        latest = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
        wait_for(workdir / "checkpoints" / str(latest + 4) / "_CHECKPOINT_METADATA", first)
        first.send_signal(signal.SIGINT)  # Ctrl-C: saved at the next step, then exit 75
        stdout, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    check_output(first.returncode, stdout, stderr, 75, r"SIGINT \(Ctrl-C\): stopped at step \d+ and saved it")
    stopped = int(re.search(r"stopped at step (\d+)", stdout).group(1))
    assert (workdir / "checkpoints" / str(stopped) / "_CHECKPOINT_METADATA").exists()
    assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]

    again = start_training(world, workdir)  # the lease was released: the rerun resumes at once
    try:
        wait_for(workdir / "checkpoints" / str(stopped + 2 - stopped % 2) / "_CHECKPOINT_METADATA", again)
        again.send_signal(signal.SIGTERM)  # a preemption notice: the same, exit 75
        stdout, stderr = again.communicate(timeout=300)
    finally:
        again.kill()
    check_output(again.returncode, stdout, stderr, 75, r"SIGTERM \(preemption\): stopped at step \d+ and saved")
    assert f"resumed from step {stopped}" in stdout + stderr


@pytest.mark.slow  # trains until the first save
def test_a_disk_that_fills_up_during_training_is_one_line(world, tiny_disk_mb):
    process = start_training(world, tiny_disk_mb / "run")
    stdout, stderr = process.communicate(timeout=600)
    check_output(process.returncode, stdout, stderr, 2,
                 r"cannot save step 2 to .*No space left on device.*rerun the same command: it resumes from")


@pytest.fixture
def tiny_disk_mb(tmp_path):
    """3 MiB: the run files fit, the first checkpoint does not."""
    yield from small_disk(tmp_path, "3m")


@pytest.mark.slow  # starts a training run
def test_ctrl_c_before_the_first_step_aborts_in_one_line_with_status_130(world, tmp_path):
    workdir = tmp_path / "run"
    process = start_training(world, workdir)
    try:
        wait_for(workdir / "towers_config.json", process)  # the run is set up, its step not yet compiled
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    check_output(process.returncode, stdout, stderr, 130, r"aborted \(Ctrl-C\) without saving the current step")


@pytest.mark.slow  # a tmpfs of its own
def test_a_full_disk_in_import_hf_is_one_line(world, tiny_disk):
    check_output(*run_subprocess(["import-hf", str(world["hf"]), str(tiny_disk / "towers")]),
                 2, r"cannot write the towers to .*No space left on device.*; free space there")
