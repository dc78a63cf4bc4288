"""entityclip_jax.storage on a local disk and on the Cloud Storage emulator: paths keep gs://,
atomic writes leave nothing beside, metrics lines survive where append does not exist."""
import json
import os
import pathlib
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
import safetensors.numpy

from entityclip_jax import storage
from entityclip_jax.errors import EntityClipError
from entityclip_jax.data.explanation_cache import CacheWriter
from tests import gcs_emulator
from tests._child_process import child_env

ROOT = pathlib.Path(__file__).parents[1]


def test_user_paths_keep_gs_and_make_local_ones_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("gs://bkt/run1/") == "gs://bkt/run1"
    assert storage.join("gs://bkt/run1", "checkpoints", 3) == "gs://bkt/run1/checkpoints/3"
    assert storage.absolute("run1") == str(tmp_path / "run1")
    assert storage.is_remote("gs://bkt") and not storage.is_remote(str(tmp_path))


@pytest.mark.parametrize("bucket, problem", [
    ("my-bucket_2", None), ("a.b.c", None), ("x" * 63, None), ("a" * 63 + "." + "b" * 63, None),
    ("ab", "3 to 63 characters"), ("x" * 64, "3 to 63 characters"), ("My-Bucket", "lower-case letters"),
    ("-bucket", "start and end"), ("bucket_", "start and end"), ("a..b", "dot-separated part"),
    ("goog-data", "'goog'"), ("my-google-data", "'google'"), ("192.168.5.4", "IP address"),
])
def test_bucket_names_cloud_storage_refuses_are_refused_up_front(bucket, problem):
    path = f"gs://{bucket}/run1"
    if problem is None:
        assert storage.absolute(path) == path and str(storage.path(path)) == path
        return
    for call in (storage.absolute, storage.path, storage.join):
        with pytest.raises(EntityClipError, match=f"{bucket!r} is not a valid Cloud Storage bucket name .*{problem}"):
            call(path)


def test_local_atomic_write_replace_and_json_lines(tmp_path):
    target = tmp_path / "sub" / "a.json"
    storage.write_json_atomic(target, {"x": 1})
    storage.write_json_atomic(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2} and os.listdir(target.parent) == ["a.json"]
    storage.replace(target, tmp_path / "b.json")
    assert not target.exists() and json.loads((tmp_path / "b.json").read_text()) == {"x": 2}
    lines = storage.JsonLines(tmp_path / "m.jsonl")
    for step in (1, 2, 3):
        lines.append({"step": step})
    assert [json.loads(line)["step"] for line in (tmp_path / "m.jsonl").read_text().splitlines()] == [1, 2, 3]
    storage.JsonLines(tmp_path / "m.jsonl").truncate_after(2)
    assert storage.JsonLines(tmp_path / "m.jsonl").read() == [{"step": 1}, {"step": 2}]
    with open(tmp_path / "m.jsonl", "ab") as f:  # a kill -9 or a full disk mid-append: a torn last line
        f.write(b'{"step": 3, "lo\xc3')
    assert storage.JsonLines(tmp_path / "m.jsonl").read() == [{"step": 1}, {"step": 2}]


ON_GCS = r'''
import json, pathlib, sys
from entityclip_jax import storage
from entityclip_jax.errors import EntityClipError
from entityclip_jax.data.explanation_cache import CacheWriter
root, local = sys.argv[1], sys.argv[2]
storage.write_json_atomic(storage.join(root, "run", "a.json"), {"x": 1})
storage.copy(storage.join(root, "run", "a.json"), local + "/a.json")          # gs:// -> local
storage.copy(local + "/a.json", storage.join(root, "run", "deep", "b.json"))  # local -> gs://
storage.replace(storage.join(root, "run", "a.json"), storage.join(root, "run", "c.json"))
storage.move_tree(storage.join(root, "run"), storage.join(root, "aside", "run"))
with storage.local_copy(storage.join(root, "aside", "run")) as copied:
    downloaded = sorted(str(p.relative_to(copied)) for p in pathlib.Path(copied).rglob("*.json"))
print(json.dumps({"downloaded": downloaded, "size": storage.size(storage.join(root, "aside", "run", "c.json")),
                  "run_exists": storage.path(storage.join(root, "run")).exists()}))
'''


def test_storage_on_the_emulator(tmp_path):
    with gcs_emulator.running(tmp_path) as emulator:
        emulator.make_bucket("unit")
        done = subprocess.run([sys.executable, "-c", ON_GCS, "gs://unit/r", str(tmp_path)], capture_output=True,
                              text=True, timeout=120, env=child_env(**emulator.env))
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.splitlines()[-1])
        objects = sorted(emulator.objects("unit"))
    assert objects == ["r/aside/run/c.json", "r/aside/run/deep/b.json"]
    assert result == {"downloaded": ["c.json", "deep/b.json"], "size": len(json.dumps({"x": 1}, indent=2)) + 1,
                      "run_exists": False}
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}


METRICS_ON_GCS = r"""
import json, sys
from entityclip_jax import storage
root, intervals, per_interval = sys.argv[1], int(sys.argv[2]), 5
log = storage.JsonLines(root + "/metrics.jsonl", flush_seconds=3600)
for step in range(1, intervals * per_interval + 1):
    log.append({"step": step, "loss": 1 / step})
    if step == 1:
        log.append({"step": 1, "val/vtc_loss": 0.5})
    if step % per_interval == 0:
        assert step > per_interval or not storage.path(root + "/metrics").exists()  # held until a flush
        log.flush()   # a checkpoint, or flush_seconds gone by
log.close()
written = storage.JsonLines(root + "/metrics.jsonl").read()
resumed = storage.JsonLines(root + "/metrics.jsonl", flush_seconds=0)   # resumes at step 7, mid-piece
resumed.truncate_after(7)
for step in range(8, 13):
    resumed.append({"step": step, "loss": 2.0})
resumed.close()
print(json.dumps({"written": written, "resumed": storage.JsonLines(root + "/metrics.jsonl").read()}))
"""


def test_metrics_on_gcs_upload_each_line_once_and_a_resume_drops_the_later_lines(tmp_path):
    lines = {}
    with gcs_emulator.running(tmp_path) as emulator:
        emulator.make_bucket("metrics", versioning=True)  # keeps every upload, overwritten or deleted
        for intervals in (2, 8):
            done = subprocess.run([sys.executable, "-c", METRICS_ON_GCS, f"gs://metrics/run{intervals}",
                                   str(intervals)], capture_output=True, text=True, timeout=120,
                                  env=child_env(**emulator.env))
            assert done.returncode == 0, done.stderr[-3000:]
            lines[intervals] = json.loads(done.stdout.splitlines()[-1])
        uploads = {n: emulator.uploads("metrics", f"run{n}/") for n in lines}
        remaining = sorted(emulator.objects("metrics"))
    for intervals, result in lines.items():
        written = result["written"]
        assert [r["step"] for r in written] == [1, 1, *range(2, intervals * 5 + 1)]
        assert written[0] == {"step": 1, "loss": 1.0} and written[1] == {"step": 1, "val/vtc_loss": 0.5}
        log_bytes = sum(len(json.dumps(record)) + 1 for record in written)
        # One object per interval, each line uploaded once: the bytes grow with the log, not its square.
        first_run = uploads[intervals][:intervals]
        assert [name for name, _ in first_run] == [f"run{intervals}/metrics/{5 * i + 1:09d}.jsonl"
                                                   for i in range(intervals)]
        assert sum(size for _, size in first_run) == log_bytes
        # The resume keeps steps 1..7, drops 8..: the pieces starting after 7 deleted, the one holding 7 cut.
        assert result["resumed"] == written[:8] + [{"step": step, "loss": 2.0} for step in range(8, 13)]
        resume_uploads = uploads[intervals][intervals:]
        assert resume_uploads[0] == (f"run{intervals}/metrics/000000006.jsonl",
                                     sum(len(json.dumps(record)) + 1 for record in written[6:8]))
        assert [name for name, _ in resume_uploads[1:]] == [f"run{intervals}/metrics/{s:09d}.jsonl"
                                                            for s in range(8, 13)]
    assert len(remaining) == 2 * 7 and all(name.endswith(".jsonl") for name in remaining)


def test_the_proxy_refuses_every_host_but_googleapis(tmp_path):
    with gcs_emulator.running(tmp_path) as emulator:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": emulator.env["http_proxy"]}))
        with pytest.raises(urllib.error.HTTPError, match="403"):
            opener.open("http://example.com/", timeout=10)


def test_the_explanation_cache_is_refused_on_gcs():
    with pytest.raises(EntityClipError, match="must be a local file"):
        CacheWriter("gs://bucket/explanations.jsonl")


# ---- user paths on gs://: raw data roots, HF imports, a checkpoint's tokenizer, explain inputs.
# One emulator for these tests; each runs its commands in one process with the emulator's variables.

@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    with gcs_emulator.running(tmp_path_factory.mktemp("gcs")) as emulator:
        emulator.make_bucket("paths")
        yield emulator


def _on_gcs(emulator, script, *argv):
    done = subprocess.run([sys.executable, "-c", script, *map(str, argv)], capture_output=True, text=True,
                          timeout=180, env=child_env(**emulator.env))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


RAW_ROOT_ON_GCS = r'''
import json, sys
from entityclip_jax import cli, storage
from entityclip_jax.data.synthetic import write_synthetic_dataset
from tests._raw_layouts import write_tiny_clip_tokenizer
root, local = sys.argv[1], sys.argv[2]
jsonl = write_synthetic_dataset(root + "/raw", 5, filename="train.jsonl")   # JPEGs and JSONL straight to gs://
storage.copy(root + "/raw/images/syn-00000.jpg", root + "/outside.jpg")     # exists, but outside the root
bad = [{"id": "escapes", "image": "../outside.jpg", "query": "a"}, {"id": "gone", "image": "images/no.jpg", "query": "b"}]
storage.path(jsonl).write_text(storage.path(jsonl).read_text() + "".join(json.dumps(r) + "\n" for r in bad))
tokenizer = write_tiny_clip_tokenizer(local + "/tok")
storage.copy(tokenizer / "tokenizer.json", root + "/tok/tokenizer.json")
code = cli.main(["write-records", "--source", "jsonl", "--root", root + "/raw", "--split", "train", "--tokenizer",
                 root + "/tok", "--out", root + "/records", "--workers", "1", "--examples-per-shard", "4"])
entry = json.loads(storage.path(root + "/records/entityclip_meta.json").read_text())["splits"]["train"]
print(json.dumps({"code": code, "jsonl": jsonl, "examples": entry["num_examples"], "skipped": entry["skipped"],
                  "shards": len(entry["shards"])}))
'''


def test_raw_jsonl_root_on_gcs_to_records_on_gcs(gcs, tmp_path):
    result = _on_gcs(gcs, RAW_ROOT_ON_GCS, "gs://paths/a", tmp_path)
    assert result["code"] == 0 and result["jsonl"] == "gs://paths/a/raw/train.jsonl"
    assert result["examples"] == 5 and result["shards"] == 2
    assert result["skipped"]["by_reason"] == {"path_escapes_root": 1, "missing_image": 1}, result["skipped"]
    objects = gcs.objects("paths")
    assert sum(name.startswith("a/raw/images/") for name in objects) == 5
    assert not [name for name in objects if name.startswith(("gs:", "/"))]


HF_ON_GCS = r'''
import json, os, sys
import numpy as np
from entityclip_jax import cli, storage
from entityclip_jax.commands.search import _tokenizer
from entityclip_jax.checkpoints.towers import load_towers
local, root = sys.argv[1], sys.argv[2]
for name in os.listdir(local):
    storage.copy(os.path.join(local, name), root + "/hf/" + name)
code = cli.main(["import-hf", root + "/hf", root + "/towers"])
_, params = load_towers(root + "/towers")
tokenizer = _tokenizer(None, root + "/hf")   # the gs:// checkpoint's own vocab.json + merges.txt
from entityclip_jax.weights.openai import read_openai_checkpoint
storage.copy(sys.argv[3], root + "/openai.safetensors")
openai = {k: v.tolist() for k, v in read_openai_checkpoint(root + "/openai.safetensors").items()}
print(json.dumps({"code": code, "vocab_size": tokenizer.vocab_size, "fingerprint": tokenizer.fingerprint,
                  "ids": tokenizer.encode(["the coach of Real Madrid"])[0][0, :8].tolist(),
                  "token_embedding": np.asarray(params["text_model"]["embeddings"]["token_embedding"]["embedding"]).tolist(),
                  "visual_projection": np.asarray(params["visual_projection"]["kernel"]).tolist(),
                  "openai": openai}))
'''


def test_import_hf_openai_file_and_search_tokenizer_from_gcs(gcs, tmp_path):
    from entityclip_jax.data.tokenizer import load_tokenizer
    from tests._raw_layouts import write_tiny_clip_tokenizer
    from tests.conftest import tiny_hf_clip
    model = tiny_hf_clip()
    model.save_pretrained(tmp_path / "hf")
    write_tiny_clip_tokenizer(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").unlink()  # the slow layout: vocab.json + merges.txt only
    reference = load_tokenizer(tmp_path / "hf")
    proj = np.arange(6, dtype=np.float16).reshape(2, 3)  # an OpenAI-layout file as DataParallel saves it
    safetensors.numpy.save_file({"module.visual.proj": proj}, str(tmp_path / "openai.safetensors"))
    result = _on_gcs(gcs, HF_ON_GCS, tmp_path / "hf", "gs://paths/b", tmp_path / "openai.safetensors")
    assert result["openai"] == {"visual.proj": proj.astype(np.float32).tolist()}
    assert result["code"] == 0
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(result["token_embedding"], state["text_model.embeddings.token_embedding.weight"])
    np.testing.assert_array_equal(result["visual_projection"], state["visual_projection.weight"].T)
    assert (result["vocab_size"], result["fingerprint"]) == (reference.vocab_size, reference.fingerprint)
    assert result["ids"] == reference.encode(["the coach of Real Madrid"])[0][0, :8].tolist()
    assert "b/towers/towers_config.json" in gcs.objects("paths")


EXPLAIN_INPUTS_ON_GCS = r'''
import json, sys, types
from entityclip_jax import storage
from entityclip_jax.data.example import SkipReport
from entityclip_jax.commands.explain import _queries
from entityclip_jax.explain.prompts import load_prompt
root = sys.argv[1]
storage.path(root + "/queries.jsonl").write_text('{"id": "q1", "query": "Obama in Berlin"}\nnot json\n'
                                                 '{"id": 2, "query": "Merkel speaks"}\n')
storage.path(root + "/prompt.txt").write_text("Who is in: {query}\nAnswer:\n")
report = SkipReport()
args = types.SimpleNamespace(queries=root + "/queries.jsonl", source=None, limit=None)
pairs = list(_queries(args, report))
prompt = load_prompt(root + "/prompt.txt", chat=False)
print(json.dumps({"pairs": pairs, "skipped": report.to_dict()["by_reason"], "template": prompt.template,
                  "name": prompt.name}))
'''


def test_explain_reads_queries_and_prompt_from_gcs(gcs):
    result = _on_gcs(gcs, EXPLAIN_INPUTS_ON_GCS, "gs://paths/c")
    assert result["pairs"] == [["q1", "Obama in Berlin"], ["2", "Merkel speaks"]]
    assert result["skipped"] == {"bad_line": 1}
    assert result["template"] == "Who is in: {query}\nAnswer:"  # the file's final newline dropped (base model)
    assert result["name"] == "prompt"
