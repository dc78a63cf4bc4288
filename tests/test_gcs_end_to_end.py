"""Every path on a real Cloud Storage emulator (tests/gcs_emulator.py): write-records to gs://,
train with a gs:// workdir and gs:// records, kill -9 mid-run, rerun the same command (it
resumes), then eval from gs:// into gs:// and export-hf from gs:// to gs://. Each command runs as its own process with the
emulator variables, as a user's would; what lands in the bucket is read from the emulator."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from entityclip_jax.checkpoints.run import TOWERS_CONFIG
from entityclip_jax.checkpoints.run_config import TRAIN_CONFIG
from entityclip_jax.checkpoints.run_tokenizer import RUN_TOKENIZER
from tests import gcs_emulator
from tests._child_process import child_env
from tests._raw_layouts import write_tiny_clip_tokenizer

ROOT = pathlib.Path(__file__).parents[1]
BUCKET = "e2e"

pytestmark = pytest.mark.slow  # every stage on the GCS emulator, with a kill


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    with gcs_emulator.running(tmp_path_factory.mktemp("gcs")) as running:
        running.make_bucket(BUCKET)
        yield running


def _env(emulator):
    return child_env(**emulator.env)


def _entityclip(emulator, *argv, timeout=240):
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "entityclip_jax.cli", *argv], env=_env(emulator), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, start_new_session=True)
    assert done.returncode == 0, f"entityclip {argv[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    print(f"entityclip {argv[0]}: {time.monotonic() - started:.1f} s")
    return done.stdout


def _read(emulator, name):
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{emulator.url}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media") as response:
        return response.read()


def _read_metrics(emulator, workdir):
    """The run's metrics.jsonl through its one reader, in a process with the emulator variables."""
    read = ("import json, sys; from entityclip_jax.train.loop import read_metrics; "
            "print(json.dumps(read_metrics(sys.argv[1])))")
    done = subprocess.run([sys.executable, "-c", read, workdir], env=_env(emulator), cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_records_train_kill_resume_eval_export_all_on_gcs(emulator, tmp_path):
    from entityclip_jax.data.synthetic import write_synthetic_dataset
    from entityclip_jax.data.tokenizer import load_tokenizer
    started = time.monotonic()
    raw = tmp_path / "raw"  # the raw photos stay local, as they come from a user's disk
    write_synthetic_dataset(raw, 32, seed=0, filename="train.jsonl")
    write_synthetic_dataset(raw, 16, seed=1, filename="val.jsonl")
    texts = [text for split in ("train", "val") for line in open(raw / f"{split}.jsonl")
             for text in (json.loads(line)["query"], json.loads(line)["explanation"])]
    write_tiny_clip_tokenizer(tmp_path / "tokenizer", corpus=texts, vocab_size=300)
    records, workdir = f"gs://{BUCKET}/records", f"gs://{BUCKET}/run"
    for split in ("train", "val"):
        _entityclip(emulator, "write-records", "--source", "jsonl", "--root", str(raw), "--split", split,
                    "--tokenizer", str(tmp_path / "tokenizer"), "--out", records, "--workers", "1",
                    "--examples-per-shard", "16")
    objects = emulator.objects(BUCKET)
    meta = json.loads(_read(emulator, "records/entityclip_meta.json"))
    assert [s["file"] for s in meta["splits"]["train"]["shards"]] == [
        "entityclip-train.tfrecord-00000-of-00002", "entityclip-train.tfrecord-00001-of-00002"]
    for shard in meta["splits"]["train"]["shards"] + meta["splits"]["val"]["shards"]:
        assert len(_read(emulator, f"records/{shard['file']}")) == shard["num_bytes"]
    assert not [name for name in objects if ".tmp-" in name], objects  # shards were moved out of the temp prefix

    tokenizer = load_tokenizer(str(tmp_path / "tokenizer"))
    train = ["train", "--config", str(ROOT / "configs" / "tiny_cpu.py"), "--workdir", workdir,
             f"--config.data.dir={records}", f"--config.model.vocab_size={tokenizer.vocab_size}",
             f"--config.model.eos_token_id={tokenizer.eos_token_id}", "--config.model.mode=clip_finetune",
             "--config.batch_size=16", "--config.num_train_steps=6", "--config.checkpoint.every_steps=2",
             "--config.checkpoint.keep=2", "--config.checkpoint.async_save=False", "--config.eval.every_steps=0",
             "--config.optimizer.warmup_steps=1", "--config.log.every_steps=1"]
    first = subprocess.Popen([sys.executable, "-m", "entityclip_jax.cli", *train], env=_env(emulator), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:  # kill -9 once step 2's checkpoint is committed in the bucket
        deadline = time.monotonic() + 180
        while "run/checkpoints/2/commit_success.txt" not in emulator.objects(BUCKET):
            assert first.poll() is None, f"training ended before it was killed:\n{first.stdout.read()[-4000:]}"
            assert time.monotonic() < deadline, "no checkpoint after 180 s"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    killed_at = max(int(name.split("/")[2]) for name in emulator.objects(BUCKET)
                    if name.startswith("run/checkpoints/") and name.endswith("commit_success.txt"))
    assert killed_at < 6

    output = _entityclip(emulator, *train)  # the same command resumes
    assert f"resumed from step {killed_at}" in output, output[-3000:]
    objects = emulator.objects(BUCKET)
    steps = [record["step"] for record in _read_metrics(emulator, workdir)]
    assert steps == list(range(1, 7))  # the killed run's lines after its checkpoint were dropped, none lost
    assert any(name.startswith("run/metrics/") for name in objects) and "run/metrics.jsonl" not in objects
    for name in (TRAIN_CONFIG, TOWERS_CONFIG, RUN_TOKENIZER, "configs/train_config.0.json"):
        assert f"run/{name}" in objects, name
    assert "run/checkpoints/6/commit_success.txt" in objects
    assert any(name.startswith("run/events.out.tfevents.") for name in objects), objects  # TensorBoard via TF's gs://
    assert not [name for name in objects if name.startswith(("gs:", "/"))]

    _entityclip(emulator, "eval", "--checkpoint", workdir, "--data", records, "--split", "val",
                "--out", f"gs://{BUCKET}/eval", "--batch-size", "8")
    report = json.loads(_read(emulator, "eval/retrieval.json"))
    assert report["num_texts"] == 16 and 0 <= report["i2t"]["R@1"] <= 100
    assert _read(emulator, "eval/retrieval.png").startswith(b"\x89PNG")

    # --no-verify as in test_resume: the tiny run keeps CLIP's BOS id outside its 300-token vocabulary
    _entityclip(emulator, "export-hf", workdir, f"gs://{BUCKET}/hf", "--no-verify")  # built locally, then uploaded
    exported = {name.removeprefix("hf/") for name in emulator.objects(BUCKET) if name.startswith("hf/")}
    marker = json.loads(_read(emulator, "hf/entityclip_export.json"))
    assert {"config.json", "model.safetensors", RUN_TOKENIZER, "entityclip_export.json"} <= exported
    assert set(marker["files"]) | {"entityclip_export.json"} == exported
    assert _read(emulator, f"hf/{RUN_TOKENIZER}") == _read(emulator, f"run/{RUN_TOKENIZER}")
    print(f"gcs end to end: {time.monotonic() - started:.1f} s")
