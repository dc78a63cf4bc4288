"""The OpenAI-compatible HTTP backend against a real loopback server that injects faults.

The fake server speaks chat/completions and completions. A tag in the caption
chooses a fault and how often it happens: "[500:2]" answers 500 to the first two
attempts, "[timeout:always]" never answers in time. Run as a script
(`python tests/test_explain_http.py --port P --log FILE`), it is the server that
the kill tests start, kill and restart.
"""
import argparse
import collections
import email.utils
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from entityclip_jax.data import explanation_cache
from entityclip_jax.explain import prompts
from entityclip_jax.explain.backends import BackendError
from entityclip_jax.explain.backends.openai_http import OpenAIHTTPBackend, parse_retry_after
from entityclip_jax.explain.runner import generate_explanations

TAG = re.compile(r"\[(\w+):(\d+|always)\]")
TIMEOUT_SLEEP = 1.2     # longer than the client's read timeout in these tests
MAX_REQUESTS = 2000     # the request loop is bounded


def good_answer(query):
    return f"This explains {query}: who the people are, how they look, and the occasion."


class FakeState:
    def __init__(self, delay=0.0, log=None, api_key=None):
        self.delay, self.log, self.api_key = delay, log, api_key
        self.attempts = collections.Counter()    # query -> requests seen
        self.requests = []                       # (time, path, query, payload)
        self.healed = False                      # True: every fault is gone
        self.lock = threading.Lock()


class FakeOpenAIHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, as real servers do

    def log_message(self, *args):
        pass

    def _send(self, status, body, headers=()):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        state = self.server.state
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        chat = self.path == "/v1/chat/completions"
        if self.path not in ("/v1/chat/completions", "/v1/completions"):
            return self._send(404, {"error": "not found"})
        if state.api_key and self.headers.get("Authorization") != f"Bearer {state.api_key}":
            return self._send(401, {"error": "bad key"})
        text = payload["messages"][-1]["content"] if chat else payload["prompt"]
        query = re.findall(r"Caption: (.*)", text)[-1]
        with state.lock:
            state.attempts[query] += 1
            attempt = state.attempts[query]
            state.requests.append((time.monotonic(), self.path, query, payload))
            if len(state.requests) > MAX_REQUESTS:
                return self._send(503, {"error": "request budget of the test server spent"})
        if state.log:
            with open(state.log, "a") as f:
                f.write(query + "\n")
        time.sleep(state.delay)
        tag = TAG.search(query)
        fault = None
        if tag and not state.healed and (tag.group(2) == "always" or attempt <= int(tag.group(2))):
            fault = tag.group(1)
        answer = good_answer(query)
        if fault == "timeout":
            time.sleep(TIMEOUT_SLEEP)
        elif fault in ("500", "503", "400"):
            return self._send(int(fault), {"error": "injected"})
        elif fault == "429":
            return self._send(429, {"error": "slow down"}, [("Retry-After", "1")])
        elif fault == "malformed":
            return self._send(200, b'{"choices": [{"message": {"content": "cut')
        elif fault == "badshape":
            return self._send(200, {"choices": []})
        elif fault == "empty":
            answer = ""
        elif fault == "echo":
            answer = query
        elif fault == "repeat":
            answer = "the occasion " * 8
        choice = {"index": 0, "finish_reason": "stop"}
        if chat:
            choice["message"] = {"role": "assistant", "content": answer}
        else:
            choice["text"] = " " + answer + "\nCaption: another one"
        try:
            self._send(200, {"object": "chat.completion", "choices": [choice],
                             "usage": {"prompt_tokens": 50, "completion_tokens": 12}})
        except (BrokenPipeError, ConnectionResetError):
            pass   # the client gave up (timeout); that is the point


def make_server(port, state):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), FakeOpenAIHandler)
    server.daemon_threads = True
    server.state = state
    return server


@pytest.fixture
def fake_server():
    state = FakeState()
    server = make_server(0, state)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server, state, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def backend_for(url, **options):
    settings = dict(read_timeout=0.8, connect_timeout=0.5, retries=2, backoff_base=0.01, backoff_max=0.05)
    return OpenAIHTTPBackend(url, "fake-model", **{**settings, **options})


def test_retry_after_seconds_and_http_date():
    assert parse_retry_after("3") == 3.0 and parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = 1_700_000_000.0
    assert parse_retry_after(email.utils.formatdate(now + 7, usegmt=True), now=now) == pytest.approx(7.0)
    assert parse_retry_after(email.utils.formatdate(now - 7, usegmt=True), now=now) == 0.0


def test_every_fault_is_retried_or_recorded_with_its_reason(fake_server, tmp_path):
    server, state, url = fake_server
    recoverable = ["Merkel speaks in Berlin", "Obama visits Paris [timeout:1]", "Putin in Moscow [500:2]",
                   "Serena at Wimbledon [429:1]", "Messi in Lusail [malformed:1]", "Pope in Rome [badshape:1]",
                   "Queen at the palace [empty:1]", "Macron in Lyon at a rally [echo:1]",
                   "Biden in Delaware [repeat:1]"]
    hopeless = {"Trump in Florida [500:always]": ("http_500", 3), "Xi in Beijing [timeout:always]": ("timeout", 3),
                "Modi in Delhi [malformed:always]": ("malformed_json", 3),
                "Lula in Brasilia at a rally [echo:always]": ("echo", 2),
                "Scholz in Bonn [400:always]": ("http_400", 1)}
    queries = [(f"id{i}", q) for i, q in enumerate(recoverable + list(hopeless))] + [("dup", recoverable[0])]
    path = tmp_path / "cache.jsonl"
    summary = generate_explanations(queries, path, backend_for(url), prompts.INSTRUCTION, concurrency=4,
                                    quality_retries=1, progress=False)
    print(summary)
    by_id = {r["id"]: r for r in explanation_cache.iter_records(path)}
    assert len(by_id) == len(queries) == len(list(explanation_cache.iter_records(path)))
    for record_id, query in queries:
        record = by_id[record_id]
        if query in hopeless:
            reason, attempts = hopeless[query]
            assert record["status"] == "failed" and record["reason"] == reason and record["explanation"] is None
            assert state.attempts[query] == attempts, query
        else:
            assert record["status"] == "ok" and record["explanation"] == good_answer(query)
            assert record["tokens"] >= 12 and record["backend"] == "openai-http" and record["model"] == "fake-model"
    assert state.attempts[recoverable[0]] == 1   # "dup" shares the generation
    assert summary.failed == collections.Counter(reason for reason, _ in hopeless.values())
    # The 429 answer said Retry-After: 1; the next try waited for it.
    serena = [t for t, _, q, _ in state.requests if q.startswith("Serena")]
    assert len(serena) == 2 and serena[1] - serena[0] >= 0.95
    # The first try is greedy; the retry after an empty answer samples.
    queen = [p["temperature"] for _, _, q, p in state.requests if q.startswith("Queen")]
    assert queen == [0.0, 0.7]

    # The faults are gone: a rerun retries only the failed queries, and completes the cache.
    state.healed = True
    seen = collections.Counter(state.attempts)
    summary = generate_explanations(queries, path, backend_for(url), prompts.INSTRUCTION, concurrency=4,
                                    progress=False)
    assert summary.complete and summary.generated == len(hopeless) and summary.cached == len(recoverable)
    assert all(state.attempts[q] == seen[q] for q in recoverable)
    ok = collections.Counter(r["id"] for r in explanation_cache.iter_records(path) if r["status"] == "ok")
    assert ok == {record_id: 1 for record_id, _ in queries}


def test_completions_endpoint_key_and_stop(fake_server, tmp_path, monkeypatch):
    server, state, url = fake_server
    state.api_key = "sekret"
    monkeypatch.setenv("FAKE_KEY", "sekret")
    path = tmp_path / "cache.jsonl"
    summary = generate_explanations([("1", "Angela Merkel in Berlin")], path,
                                    backend_for(url, api_key_env="FAKE_KEY"), prompts.FEW_SHOT, progress=False)
    assert summary.complete
    (_, endpoint, _, payload), = state.requests
    assert endpoint == "/v1/completions" and payload["stop"] == ["\n"] and payload["prompt"].endswith("Explanation:")
    assert explanation_cache.read_explanations(path)[0] == {"1": good_answer("Angela Merkel in Berlin")}
    monkeypatch.delenv("FAKE_KEY")
    with pytest.raises(BackendError, match="401"):
        generate_explanations([("2", "Obama in Paris")], path, backend_for(url, api_key_env="FAKE_KEY"),
                              prompts.FEW_SHOT, progress=False)


# -- kill tests: the CLI in a subprocess, the server in another ------------------------------------

def start_server(port, log, delay):
    process = subprocess.Popen([sys.executable, __file__, "--port", str(port), "--log", str(log),
                                "--delay", str(delay)], stdout=subprocess.PIPE, text=True)
    port = int(process.stdout.readline())
    return process, port


def start_client(url, queries, out):
    command = [sys.executable, "-m", "entityclip_jax.cli", "explain", "--backend", "http", "--base-url", url,
               "--model", "fake-model", "--queries", str(queries), "--out", str(out), "--concurrency", "3",
               "--retries", "1", "--backoff-base", "0.01", "--read-timeout", "2", "--connect-timeout", "0.5",
               "--max-consecutive-failures", "4", "--no-progress"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_lines(path, count, process, limit=30):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        assert process.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.01)
    raise AssertionError(f"{path} never reached {count} lines")


@pytest.mark.slow  # kill and resume
def test_kill_client_kill_server_interrupt_then_resume(tmp_path):
    queries = [(f"id{i}", f"Person number {i % 100} at event {i % 100}") for i in range(120)]  # 20 duplicates
    queries_file = tmp_path / "queries.jsonl"
    queries_file.write_text("".join(json.dumps({"id": i, "query": q}) + "\n" for i, q in queries))
    out, log = tmp_path / "cache.jsonl", tmp_path / "server.log"
    server, port = start_server(0, log, delay=0.05)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        # 1. kill -9 the client mid-run; then a torn record, as a kill during a write leaves.
        client = start_client(url, queries_file, out)
        wait_for_lines(out, 8, client)
        client.kill()
        client.wait()
        time.sleep(0.3)
        done_before = {r["query"] for r in explanation_cache.iter_records(out) if r["status"] == "ok"}
        requests_before = log.read_text().count("\n")
        with open(out, "a") as f:
            f.write('{"id": "id59", "query": "Person num')

        # 2. the server dies mid-run: the client records connection failures and stops early.
        lines = out.read_bytes().count(b"\n")
        client = start_client(url, queries_file, out)
        wait_for_lines(out, lines + 8, client)
        server.kill()
        server.wait()
        _, err = client.communicate(timeout=60)
        print(err)
        assert client.returncode == 75 and "stopped early" in err  # rerun to resume
        reasons = {r.get("reason") for r in explanation_cache.iter_records(out) if r["status"] == "failed"}
        assert reasons and reasons <= {"connection", "timeout"}

        # 3. server back on the same port; Ctrl-C mid-run ends cleanly with exit code 75 (rerun to resume).
        server, _ = start_server(port, log, delay=0.05)
        lines = out.read_bytes().count(b"\n")
        client = start_client(url, queries_file, out)
        wait_for_lines(out, lines + 4, client)
        client.send_signal(signal.SIGINT)
        _, err = client.communicate(timeout=60)
        print(err)
        assert client.returncode == 75 and "interrupted" in err

        # 4. resume to the end.
        client = start_client(url, queries_file, out)
        _, err = client.communicate(timeout=60)
        print(err)
        assert client.returncode == 0, err
    finally:
        server.kill()
        server.wait()
    records = list(explanation_cache.iter_records(out))
    ok = collections.Counter(r["id"] for r in records if r["status"] == "ok")
    assert ok == {record_id: 1 for record_id, _ in queries}
    assert len(records) == len(out.read_text().splitlines())   # no torn or merged line is left
    by_id, _ = explanation_cache.read_explanations(out)
    assert all(by_id[i] == good_answer(q) for i, q in queries)
    # Nothing finished before the first kill was asked for again.
    asked_later = set(log.read_text().splitlines()[requests_before:])
    assert done_before and not done_before & asked_later


def main():
    parser = argparse.ArgumentParser(description="fake OpenAI-compatible server for the explain tests")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--lifetime", type=float, default=120.0, help="seconds before it exits on its own")
    args = parser.parse_args()
    server = make_server(args.port, FakeState(delay=args.delay, log=args.log))
    print(server.server_address[1], flush=True)
    threading.Timer(args.lifetime, lambda: os._exit(0)).start()
    server.serve_forever(poll_interval=0.05)


if __name__ == "__main__":
    main()


def test_request_deadline_stops_a_server_that_drips_bytes():
    """Each byte arrives well within --read-timeout, but the answer would take minutes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def drip():
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        try:
            while not stop.wait(0.05):
                conn.sendall(b" ")
        except OSError:
            pass
        conn.close()
    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    backend = OpenAIHTTPBackend(f"http://127.0.0.1:{listener.getsockname()[1]}/v1", "fake-model",
                                read_timeout=1.0, request_timeout=1.5, retries=0)
    start = time.monotonic()
    [generation] = backend.generate(["Caption: drip"], chat=True, max_new_tokens=8)
    elapsed = time.monotonic() - start
    stop.set()
    listener.close()
    assert generation.error == "timeout" and elapsed < 4, (generation, elapsed)
