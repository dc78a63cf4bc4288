"""entityclip_jax.storage on a local disk and on the Cloud Storage emulator: paths keep gs://,
atomic writes leave nothing beside, metrics lines survive where append does not exist."""
import json
import os
import pathlib
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pytest

from entityclip_jax import storage
from entityclip_jax.errors import EntityClipError
from entityclip_jax.explain.cache import CacheWriter
from tests import gcs_emulator

ROOT = pathlib.Path(__file__).parents[1]


def test_user_paths_keep_gs_and_make_local_ones_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("gs://b/run1/") == "gs://b/run1"
    assert storage.join("gs://b/run1", "checkpoints", 3) == "gs://b/run1/checkpoints/3"
    assert storage.absolute("run1") == str(tmp_path / "run1")
    assert storage.is_remote("gs://b") and not storage.is_remote(str(tmp_path))


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
    storage.JsonLines(tmp_path / "m.jsonl").keep(lambda record: record["step"] <= 2)
    assert storage.JsonLines(tmp_path / "m.jsonl").read() == [{"step": 1}, {"step": 2}]


ON_GCS = r'''
import json, pathlib, sys
from entityclip_jax import storage
from entityclip_jax.errors import EntityClipError
from entityclip_jax.explain.cache import CacheWriter
root, local = sys.argv[1], sys.argv[2]
lines = storage.JsonLines(storage.join(root, "metrics.jsonl"), flush_seconds=3600)
lines.append({"step": 1}); lines.append({"step": 2})
assert not storage.path(root).joinpath("metrics.jsonl").exists()   # held until a flush: gs:// cannot append
lines.flush(); lines.append({"step": 3}); lines.close()
again = storage.JsonLines(storage.join(root, "metrics.jsonl"))
again.keep(lambda r: r["step"] != 2); again.append({"step": 4}); again.close()
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
                              text=True, timeout=120, env={**os.environ, **emulator.env, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.splitlines()[-1])
        objects = sorted(emulator.objects("unit"))
        metrics = [json.loads(line) for line in gcs_read(emulator, "unit", "r/metrics.jsonl").splitlines()]
    assert metrics == [{"step": 1}, {"step": 3}, {"step": 4}]
    assert objects == ["r/aside/run/c.json", "r/aside/run/deep/b.json", "r/metrics.jsonl"]
    assert result == {"downloaded": ["c.json", "deep/b.json"], "size": len(json.dumps({"x": 1}, indent=2)) + 1,
                      "run_exists": False}
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}


def gcs_read(emulator, bucket, name):
    with urllib.request.urlopen(f"{emulator.url}/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}"
                                "?alt=media") as response:
        return response.read().decode()


def test_the_proxy_refuses_every_host_but_googleapis(tmp_path):
    with gcs_emulator.running(tmp_path) as emulator:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": emulator.env["http_proxy"]}))
        with pytest.raises(urllib.error.HTTPError, match="403"):
            opener.open("http://example.com/", timeout=10)


def test_the_explanation_cache_is_refused_on_gcs():
    with pytest.raises(EntityClipError, match="must be a local file"):
        CacheWriter("gs://bucket/explanations.jsonl")
