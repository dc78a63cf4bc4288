"""An OpenAI-compatible HTTP backend: what vLLM, llama.cpp's server, Ollama and TGI speak.

A small standard-library client rather than the `openai` package: it needs
separate connect/read timeouts and a whole-request deadline (a server that
drips bytes never trips a per-read timeout), retries on timeouts, 5xx, 429 (honouring
Retry-After in seconds or as an HTTP date) and on malformed JSON in a 200
answer, and a cancel switch for Ctrl-C; the `openai` client does not retry
malformed bodies and would add a dependency for ~100 lines of code.
One prompt per request; the runner's thread pool gives the concurrency.
"""
import email.utils
import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.parse

from entityclip_jax.explain.backends import BackendError, Generation

# Answers that no retry can fix: the run's configuration is wrong.
_FATAL = {401: "the API key was refused; set it in the environment variable named by --api-key-env",
          403: "access was refused; check the API key and the server's permissions",
          404: "the endpoint or model was not found; check --base-url (usually ends in /v1) and --model"}


def parse_retry_after(value, now=None):
    """Seconds to wait from a Retry-After header (delta seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


class _Retryable(Exception):
    def __init__(self, reason, retry_after=None, final=False):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.final = final   # a failure of this prompt that a retry cannot fix


class OpenAIHTTPBackend:
    name = "openai-http"
    batch_size = 1

    def __init__(self, base_url, model, *, api_key_env="OPENAI_API_KEY", connect_timeout=10.0,
                 read_timeout=120.0, request_timeout=300.0, retries=5, backoff_base=1.0, backoff_max=60.0,
                 max_retry_after=600.0, temperature=0.0, retry_temperature=0.7):
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise BackendError(f"--base-url {base_url!r} is not an http(s) URL; "
                               "use e.g. http://localhost:8000/v1")
        if not model:
            raise BackendError("the HTTP backend needs --model, the model name the server serves")
        self.model = model
        self._url = url
        self._path = url.path.rstrip("/")
        self._api_key = os.environ.get(api_key_env) if api_key_env else None
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.request_timeout = request_timeout
        self.retries, self.backoff_base, self.backoff_max = retries, backoff_base, backoff_max
        self.max_retry_after = max_retry_after
        self.temperature, self.retry_temperature = temperature, retry_temperature
        self._cancelled = threading.Event()
        self._local = threading.local()   # one keep-alive connection per worker thread

    def cancel(self):
        self._cancelled.set()

    def generate(self, prompts, *, chat, max_new_tokens, stop=(), sample=False):
        return [self._generate_one(p, chat, max_new_tokens, stop, sample) for p in prompts]

    # -- one prompt, with retries ----------------------------------------------------------
    def _generate_one(self, prompt, chat, max_new_tokens, stop, sample):
        payload = {"model": self.model, "max_tokens": max_new_tokens,
                   "temperature": self.retry_temperature if sample else self.temperature}
        if stop:
            payload["stop"] = list(stop)
        if chat:
            endpoint, payload["messages"] = "/chat/completions", [{"role": "user", "content": prompt}]
        else:
            endpoint, payload["prompt"] = "/completions", prompt
        reason = "cancelled"
        for attempt in range(self.retries + 1):
            if self._cancelled.is_set():
                break
            try:
                return self._parse(self._post(endpoint, payload), chat)
            except _Retryable as err:
                reason = err.reason
                if err.final or attempt == self.retries:
                    break
                delay = err.retry_after
                if delay is None:
                    cap = min(self.backoff_max, self.backoff_base * 2 ** attempt)
                    delay = cap / 2 + random.uniform(0, cap / 2)   # exponential, with jitter
                self._cancelled.wait(min(delay, self.max_retry_after))
        return Generation(error=reason)

    def _connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._url.scheme == "https" else http.client.HTTPConnection
            conn = cls(self._url.hostname, self._url.port, timeout=self.connect_timeout)
            conn.connect()
            conn.sock.settimeout(self.read_timeout)   # connect and read timeouts differ
            self._local.conn = conn
        return conn

    def _drop_connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _post(self, endpoint, payload):
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        try:
            conn = self._connection()
        except (socket.timeout, TimeoutError) as err:
            self._drop_connection()
            raise _Retryable("timeout") from err
        except (OSError, http.client.HTTPException) as err:
            self._drop_connection()
            raise _Retryable("connection") from err
        expired = threading.Event()

        def expire():  # the deadline: shutting the socket down ends a read that is still dripping
            expired.set()
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except (OSError, AttributeError):
                pass
        timer = threading.Timer(self.request_timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            conn.request("POST", self._path + endpoint, body=json.dumps(payload).encode(), headers=headers)
            response = conn.getresponse()
            body = response.read()
        except (socket.timeout, TimeoutError) as err:
            self._drop_connection()
            raise _Retryable("timeout") from err
        except (OSError, http.client.HTTPException) as err:
            self._drop_connection()
            raise _Retryable("timeout" if expired.is_set() else "connection") from err
        finally:
            timer.cancel()
        if expired.is_set():  # a body cut short by the deadline is no answer
            self._drop_connection()
            raise _Retryable("timeout")
        if response.getheader("Connection", "").lower() == "close":
            self._drop_connection()
        status = response.status
        if status == 200:
            try:
                return json.loads(body)
            except ValueError as err:
                raise _Retryable("malformed_json") from err
        if status == 429 or status >= 500:
            raise _Retryable(f"http_{status}", parse_retry_after(response.getheader("Retry-After")))
        if status in _FATAL:
            raise BackendError(f"{self._url.geturl()}{endpoint} answered {status}: {_FATAL[status]}")
        raise _Retryable(f"http_{status}", final=True)   # e.g. 400: this prompt is refused

    @staticmethod
    def _parse(data, chat):
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
            if text is not None and not isinstance(text, str):
                raise TypeError(type(text))
            usage = data.get("usage") or {}
            tokens = int(usage.get("completion_tokens") or 0)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
            raise _Retryable("malformed_json") from err
        return Generation(text=text or "", tokens=tokens, truncated=choice.get("finish_reason") == "length")
