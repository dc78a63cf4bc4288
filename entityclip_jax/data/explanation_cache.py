"""The explanation cache: an append-only JSONL file, one record per query id.

Record fields: id, query, explanation, backend, model, prompt_version,
status ("ok" or "failed"), reason (failed only), created (ISO time), tokens.

Layout choice: ids that share a query text each get their own record carrying
the same generated text (generated once). Later records win over earlier ones,
so a retry that succeeds supersedes an earlier "failed" record for the same id.
A killed writer can leave a torn last line; readers ignore it and the writer
truncates it before appending, so no record is ever half-written. A last line
that is a whole record and lacks only its newline is kept (and the newline added).
"""
import datetime
import json
import os

from entityclip_jax import storage
from entityclip_jax.errors import EntityClipError

OK = "ok"
FAILED = "failed"


def cache_key(query, prompt_version, model):
    """Identical (query, prompt, model) triples are generated once."""
    return (query, prompt_version, model)


def make_record(id, query, explanation, *, backend, model, prompt_version,
                status=OK, reason=None, tokens=0):
    record = {"id": str(id), "query": query, "explanation": explanation,
              "backend": backend, "model": model, "prompt_version": prompt_version,
              "status": status,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "tokens": int(tokens)}
    if status != OK:
        record["reason"] = reason or "unknown"
    return record


def iter_records(path):
    """Yields the parsed records in file order; skips a torn or corrupt line."""
    if not storage.path(path).exists():
        return
    with storage.open(path, "rb") as f:  # a local file or gs:// (read-only there)
        for line in f:
            record = _record(line)
            if record is not None:
                yield record


def _record(line):
    """The record on one line, or None for a corrupt or torn one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "id" in record and "status" in record else None


def read_explanations(path, *, model=None, prompt_version=None):
    """Returns (by_id, by_query): explanations of status "ok" only.

    Later records win. Pass model / prompt_version to keep only explanations
    made by that model or prompt (default: all of them).
    """
    if not storage.path(path).exists():
        raise EntityClipError(f"explanation cache {path} does not exist; "
                              "create it with `entityclip explain` or `entityclip explain-import`")
    by_id, by_query = {}, {}
    lines = records = 0
    with storage.open(path, "rb") as f:
        for line in f:
            lines += bool(line.strip())
            record = _record(line)
            if record is None:  # a torn or corrupt line
                continue
            records += 1
            _index(record, by_id, by_query, model, prompt_version)
    if lines and not records:  # not a torn line: not a cache at all
        raise EntityClipError(f"{path} holds no explanation-cache record (none of its {lines} lines is one); pass "
                              "the JSONL `entityclip explain` writes, or the release's CapDsc file with --capdsc")
    return by_id, by_query


def _index(record, by_id, by_query, model, prompt_version):
    """Adds one cache record to the maps when it is a good explanation of the wanted model and prompt."""
    if record.get("status") != OK or not record.get("explanation"):
        return
    if model is not None and record.get("model") != model:
        return
    if prompt_version is not None and record.get("prompt_version") != prompt_version:
        return
    by_id[str(record["id"])] = record["explanation"]
    if record.get("query"):
        by_query[record["query"]] = record["explanation"]


def repair_torn_tail(path):
    """Cuts a torn last line (no trailing newline) left by a killed writer."""
    if not storage.path(path).exists():
        return 0
    with storage.open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Walk back to the last newline in blocks.
        end = size
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            block = f.read(end - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        else:
            keep = 0
        f.seek(keep)
        if _record(f.read()) is not None:  # a whole record without its newline: keep it
            f.seek(size)
            f.write(b"\n")
            return 0
        f.truncate(keep)
        return size - keep


class CacheWriter:
    """Appends records, flushing each one, and fsyncs every `sync_every` records (and on close)."""

    def __init__(self, path, sync_every=32):
        if storage.is_remote(path):  # resumability rests on append + fsync, which object storage lacks
            raise EntityClipError(f"the explanation cache {path} must be a local file (it is appended and synced "
                                  "record by record); write it locally, then copy it to the bucket "
                                  "(gcloud storage cp) and pass that gs:// path to write-records")
        storage.path(path).parent.mkdir(parents=True, exist_ok=True)
        self.torn_bytes = repair_torn_tail(path)
        self.path = path
        self.sync_every = sync_every
        self._pending = 0
        self._file = storage.open(path, "a")

    def write(self, record):
        # Each record reaches the OS at once (a killed process loses none);
        # fsync, which guards against power loss, is batched because it is slow.
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        self._pending += 1
        if self._pending >= self.sync_every:
            self.sync()

    def sync(self):
        self._file.flush()
        os.fsync(self._file.fileno())
        self._pending = 0

    def close(self):
        if not self._file.closed:
            self.sync()
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
