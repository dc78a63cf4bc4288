"""The explanation cache, the runner's resume/dedup/failure logic, and the CapDsc import.

The runner tests use a scripted in-memory backend, so every outcome is chosen
by the test; the real backends have their own test files.
"""
import collections
import json
import threading

import pytest

from entityclip_jax.errors import EntityClipError
from entityclip_jax.data import explanation_cache
from entityclip_jax.explain.backends import BackendError, Generation
from entityclip_jax.explain.prompts import Prompt
from entityclip_jax.explain.runner import generate_explanations

QUEEN = "Queen Elizabeth waves at the crowd"
PROMPT = Prompt("test", "Caption: {query}\nExplanation:", chat=False, stop=("\n",))


def good(query):
    return f"An explanation of {query} with the people, their looks and the occasion."


class ScriptedBackend:
    """Answers each query from a script of Generations (then good text); counts calls."""
    name, model, batch_size = "scripted", "scripted-model", 2

    def __init__(self, script=None):
        self.script = {q: list(v) for q, v in (script or {}).items()}
        self.calls = collections.Counter()
        self.samples = collections.Counter()
        self.lock = threading.Lock()

    def cancel(self):
        pass

    def generate(self, prompts, *, chat, max_new_tokens, stop=(), sample=False):
        out = []
        for p in prompts:
            query = p[len("Caption: "):-len("\nExplanation:")]
            with self.lock:
                self.calls[query] += 1
                self.samples[query] += sample
                step = self.script.get(query, [])
                answer = step.pop(0) if step else None
            if isinstance(answer, BaseException):
                raise answer
            out.append(answer or Generation(text=" " + good(query) + "\nCaption: next", tokens=11))
        return out


def records(path):
    return list(explanation_cache.iter_records(path))


def ok_ids(path):
    return collections.Counter(r["id"] for r in records(path) if r["status"] == "ok")


def test_read_explanations_hides_failures_and_torn_lines(tmp_path):
    path = tmp_path / "c.jsonl"
    with pytest.raises(EntityClipError, match="does not exist"):
        explanation_cache.read_explanations(path)
    meta = dict(backend="b", model="m", prompt_version="v")
    with explanation_cache.CacheWriter(path, sync_every=2) as writer:
        writer.write(explanation_cache.make_record("1", "q1", None, status="failed", reason="timeout", **meta))
        writer.write(explanation_cache.make_record("1", "q1", "first", **meta))
        writer.write(explanation_cache.make_record("2", "q2", None, status="failed", reason="echo", **meta))
        writer.write(explanation_cache.make_record("3", "q3", "other model", **{**meta, "model": "m2"}))
        writer.write(explanation_cache.make_record("1", "q1", "second", **meta))
    with open(path, "a") as f:
        f.write('{"id": "4", "query": "q4", "explanation": "torn", "st')
    by_id, by_query = explanation_cache.read_explanations(path)
    assert by_id == {"1": "second", "3": "other model"} and by_query == {"q1": "second", "q3": "other model"}
    assert explanation_cache.read_explanations(path, model="m")[0] == {"1": "second"}
    failed = [r for r in records(path) if r["status"] == "failed"]
    assert [(r["id"], r["reason"]) for r in failed] == [("1", "timeout"), ("2", "echo")]
    size = path.stat().st_size
    with explanation_cache.CacheWriter(path) as writer:   # the writer cuts the torn tail before appending
        assert writer.torn_bytes == len('{"id": "4", "query": "q4", "explanation": "torn", "st')
    assert path.stat().st_size == size - writer.torn_bytes
    assert all(line.endswith("}") for line in path.read_text().splitlines())


def test_dedup_retries_and_failures_then_resume(tmp_path):
    path = tmp_path / "c.jsonl"
    queries = [("a", "Merkel in Berlin"), ("b", "Obama meets Putin"), ("c", "Merkel in Berlin"),
               ("d", "Serena wins"), ("e", "Pope visits Rome"), ("f", QUEEN), ("g", "   "),
               ("b", "Obama meets Putin"), ("a", "a different query for a")]
    backend = ScriptedBackend({
        "Obama meets Putin": [Generation(text="")],                            # empty once, then fine
        "Serena wins": [Generation(text="wins wins wins wins wins wins")] * 3,  # always degenerate
        "Pope visits Rome": [Generation(error="timeout")],                    # transport already retried
        QUEEN: [Generation(text="Caption: " + QUEEN)] * 3,                     # echo of the prompt
    })
    summary = generate_explanations(queries, path, backend, PROMPT, concurrency=2, progress=False)
    assert summary.ids == 6 and summary.queries == 5
    assert summary.skipped_input == {"empty_query": 1, "duplicate_id": 1}
    assert backend.calls == {"Merkel in Berlin": 1, "Obama meets Putin": 2, "Serena wins": 3,
                             "Pope visits Rome": 1, QUEEN: 3}
    assert backend.samples["Obama meets Putin"] == 1 and backend.samples["Merkel in Berlin"] == 0
    assert summary.generated == 2 and summary.failed == {"repeated": 1, "timeout": 1, "echo": 1}
    assert not summary.complete
    by_id = {r["id"]: r for r in records(path)}
    assert by_id["a"]["explanation"] == by_id["c"]["explanation"] == good("Merkel in Berlin")
    assert by_id["b"]["status"] == "ok" and by_id["b"]["tokens"] == 11
    assert {by_id[i]["reason"] for i in "def"} == {"repeated", "timeout", "echo"}
    assert all(by_id[i]["explanation"] is None for i in "def")
    assert by_id["a"]["prompt_version"] == PROMPT.version and by_id["a"]["model"] == "scripted-model"

    # keep_failed: nothing is generated, the failures stay.
    kept = generate_explanations(queries, path, ScriptedBackend(), PROMPT, progress=False, keep_failed=True)
    assert kept.kept_failed == 3 and kept.cached == 2 and kept.records_written == 0

    # Default rerun: only the failed queries again, now good; every id exactly once ok.
    backend = ScriptedBackend()
    summary = generate_explanations(queries, path, backend, PROMPT, progress=False)
    assert set(backend.calls) == {"Serena wins", "Pope visits Rome", QUEEN}
    assert summary.complete and summary.cached == 2 and summary.generated == 3
    assert ok_ids(path) == {i: 1 for i in "abcdef"}
    by_id, by_query = explanation_cache.read_explanations(path)
    assert by_id["d"] == good("Serena wins") and len(by_query) == 5

    # A new prompt version is a new cache key: everything is generated again.
    other = Prompt("test2", PROMPT.template + " ", chat=False, stop=("\n",))
    backend = ScriptedBackend()
    generate_explanations(queries, path, backend, other, progress=False)
    assert len(backend.calls) == 5


def test_resume_after_kill_writes_missing_ids_without_generating(tmp_path):
    path = tmp_path / "c.jsonl"
    meta = dict(backend="scripted", model="scripted-model", prompt_version=PROMPT.version)
    with explanation_cache.CacheWriter(path) as writer:  # a killed run: one of two ids of a query written, a torn line
        writer.write(explanation_cache.make_record("a", "Merkel in Berlin", good("Merkel in Berlin"), **meta))
    with open(path, "a") as f:
        f.write('{"id": "c", "query": "Merkel in Ber')
    backend = ScriptedBackend()
    summary = generate_explanations([("a", "Merkel in Berlin"), ("c", "Merkel in Berlin"), ("d", "Serena wins")],
                                    path, backend, PROMPT, progress=False)
    assert backend.calls == {"Serena wins": 1} and summary.cached == 1 and summary.torn_bytes > 0
    assert ok_ids(path) == {"a": 1, "c": 1, "d": 1}


def test_interrupt_keeps_finished_work_and_resumes(tmp_path):
    path = tmp_path / "c.jsonl"
    queries = [(str(i), f"query number {i}") for i in range(10)]
    backend = ScriptedBackend({"query number 6": [KeyboardInterrupt()]})
    backend.batch_size = 1
    summary = generate_explanations(queries, path, backend, PROMPT, concurrency=1, progress=False)
    assert summary.stopped == "interrupted" and 0 < summary.generated < 10
    finished = set(ok_ids(path))
    backend = ScriptedBackend()
    summary = generate_explanations(queries, path, backend, PROMPT, progress=False)
    generated_again = {query.split()[-1] for query in backend.calls}
    assert summary.complete and generated_again and not finished & generated_again
    assert ok_ids(path) == {str(i): 1 for i in range(10)}


def test_a_failing_backend_stops_the_run(tmp_path):
    path = tmp_path / "c.jsonl"
    queries = [(str(i), f"query number {i}") for i in range(30)]
    script = {q: [Generation(error="connection")] for _, q in queries}
    backend = ScriptedBackend(script)
    summary = generate_explanations(queries, path, backend, PROMPT, progress=False, max_consecutive_failures=4)
    assert summary.stopped and "connection" in summary.stopped
    assert 4 <= sum(summary.failed.values()) < 30 and sum(backend.calls.values()) < 30
    backend = ScriptedBackend({"query number 3": [BackendError("bad key")]})
    with pytest.raises(BackendError, match="bad key"):
        generate_explanations(queries, path, backend, PROMPT, progress=False)


def test_capdsc_import_with_and_without_a_source(tmp_path):
    from PIL import Image

    from entityclip_jax.data.example import SkipReport
    from entityclip_jax.data.sources import read_source
    from entityclip_jax.explain.release import RELEASE_MODEL, import_capdsc

    root = tmp_path / "data"
    (root / "img" / "bbc").mkdir(parents=True)
    lines = []
    for i, name in enumerate(["a.jpg", "b.jpg", "c.jpg"]):
        Image.new("RGB", (4, 4), (i * 40, 0, 0)).save(root / "img" / "bbc" / name)
        lines.append(json.dumps({"id": f"id{i}", "image": f"img/bbc/{name}", "query": f"caption {i}"}))
    (root / "test.jsonl").write_text("\n".join(lines) + "\n")
    capdsc = tmp_path / "CapDsc_mistral_test.json"
    capdsc.write_text(json.dumps({"/home/authors/img/bbc/a.jpg": "Explains a.", "b.jpg": "Explains b.",
                                  "zzz.jpg": "No example has it."}))
    out = tmp_path / "c.jsonl"
    counts = import_capdsc(capdsc, out, read_source("jsonl", str(root), "test", SkipReport()))
    assert counts == {"imported": 2, "example_without_explanation": 1}
    by_id, by_query = explanation_cache.read_explanations(out)
    assert by_id == {"id0": "Explains a.", "id1": "Explains b."}
    assert by_query == {"caption 0": "Explains a.", "caption 1": "Explains b."}
    assert {r["model"] for r in records(out)} == {RELEASE_MODEL}
    again = import_capdsc(capdsc, out, read_source("jsonl", str(root), "test", SkipReport()))
    assert again["imported"] == 0 and again["already_cached"] == 2

    bare = tmp_path / "bare.jsonl"
    counts = import_capdsc(capdsc, bare)
    assert counts == {"imported": 3}
    assert explanation_cache.read_explanations(bare)[0] == {"/home/authors/img/bbc/a.jpg": "Explains a.",
                                               "b.jpg": "Explains b.", "zzz.jpg": "No example has it."}


def test_cli_explain_import(tmp_path, capsys):
    from entityclip_jax.cli import main

    capdsc = tmp_path / "CapDsc_mistral_val.json"
    capdsc.write_text(json.dumps({"images/1.jpg": "One.", "2.jpg": "Two."}))
    out = tmp_path / "c.jsonl"
    assert main(["explain-import", "--capdsc", str(capdsc), "--out", str(out)]) == 0
    assert "imported=2" in capsys.readouterr().err
    assert explanation_cache.read_explanations(out)[0] == {"images/1.jpg": "One.", "2.jpg": "Two."}
    assert main(["explain-import", "--capdsc", str(tmp_path / "missing.json"), "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err


def test_a_last_record_missing_only_its_newline_is_kept(tmp_path):
    path = tmp_path / "c.jsonl"
    meta = dict(backend="b", model="m", prompt_version="v")
    with explanation_cache.CacheWriter(path) as writer:
        writer.write(explanation_cache.make_record("1", "q1", "first", **meta))
    last = json.dumps(explanation_cache.make_record("2", "q2", "second", **meta))
    with open(path, "a") as f:
        f.write(last)  # e.g. a file edited by hand, or copied without its final newline
    assert explanation_cache.read_explanations(path)[0] == {"1": "first", "2": "second"}
    with explanation_cache.CacheWriter(path) as writer:  # the writer keeps it and appends after it
        assert writer.torn_bytes == 0
        writer.write(explanation_cache.make_record("3", "q3", "third", **meta))
    assert explanation_cache.read_explanations(path)[0] == {"1": "first", "2": "second", "3": "third"}
    assert path.read_text().splitlines()[1] == last
