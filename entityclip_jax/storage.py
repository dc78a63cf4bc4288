"""The one place that names storage: local paths and gs:// alike, through etils.epath.

Every path a user hands us (records, workdirs, run files, metrics, checkpoints, eval
outputs, exports, indexes) goes through `path()` / `absolute()` here and is then
read and written with epath's pathlib-like API, the library Orbax itself uses.

Backend (decided here, once): gs:// goes through fsspec/gcsfs, not tf.io.gfile
(EPATH_USE_TF=0 unless the user set it). So the tests, which point gcsfs at a Cloud
Storage emulator with STORAGE_EMULATOR_HOST, run the same code as production, and
epath skips its per-bucket zonal-bucket probe. Reading and writing TFRecords
(tf.data, tf.io.TFRecordWriter) and TensorBoard events stay on TensorFlow's own gs://
client: it is what TPU users run and the fastest reader there.

Object storage has no rename and no append, so:
  * atomic writes: locally, write beside then rename into place; on gs:// an object
    appears whole when its upload is closed, so a plain write is already atomic;
  * directories that must appear complete (records, exports) get a marker file
    written last (entityclip_meta.json, the export marker), never a rename;
  * append (metrics.jsonl): one new object per flush, see JsonLines;
  * exclusive ownership (train's workdir lease): a generation precondition on gs://
    (write_object_if), an flock on a local disk (lock_file).

A gs:// path is checked against Cloud Storage's bucket naming rules when it is first
turned into a path (check_bucket_name), so a name the service refuses fails in one line
up front, not after minutes of work.
"""
import contextlib
import fcntl
import functools
import io
import ipaddress
import json
import os
import posixpath
import re
import secrets
import shutil
import tempfile
import time

from etils import epath

from entityclip_jax.errors import EntityClipError

os.environ.setdefault("EPATH_USE_TF", "0")  # gs:// through gcsfs everywhere (see above); read at every call

REMOTE_PREFIXES = ("gs://",)


def is_remote(p):
    """True for object storage (gs://), where there is no rename and no append."""
    return str(p).startswith(REMOTE_PREFIXES)


_BUCKET_CHARACTERS = re.compile(r"[a-z0-9][a-z0-9._-]*[a-z0-9]")


def check_bucket_name(p):
    """Refuses (EntityClipError) a gs:// path whose bucket name Cloud Storage would refuse
    (cloud.google.com/storage/docs/buckets#naming): 3-63 characters (222 with dots, 63 between
    them) of lower-case letters, digits, "-", "_" and ".", starting and ending with a letter or
    digit, not an IP address, not starting with "goog" nor holding "google"."""
    if not is_remote(p):
        return
    bucket = str(p).split("://", 1)[1].split("/", 1)[0]
    problem = None
    if not 3 <= len(bucket) <= (222 if "." in bucket else 63):
        problem = "it must have 3 to 63 characters (up to 222 with dots)"
    elif not _BUCKET_CHARACTERS.fullmatch(bucket):
        problem = ("it may hold only lower-case letters, digits, '-', '_' and '.', and must start and end "
                   "with a letter or digit")
    elif any(not part or len(part) > 63 for part in bucket.split(".")):
        problem = "each dot-separated part must have 1 to 63 characters"
    elif bucket.startswith("goog") or "google" in bucket or "g00gle" in bucket:
        problem = "it may not start with 'goog' or contain 'google'"
    else:
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(bucket)
            problem = "it may not be an IP address"
    if problem:
        raise EntityClipError(f"{p}: {bucket!r} is not a valid Cloud Storage bucket name ({problem}); "
                              "use the name of a bucket you created, e.g. gs://my-bucket/run1")


def path(p):
    """A user path as an epath.Path: gs://bucket/... (its bucket name checked) or a local path (~ expanded)."""
    if is_remote(p):
        check_bucket_name(p)
        return epath.Path(p)
    return epath.Path(os.path.expanduser(str(p)))


def absolute(p):
    """A user path as a string that stays valid after a chdir: local made absolute, gs:// as given."""
    if is_remote(p):
        check_bucket_name(p)
        return str(p).rstrip("/")
    return os.path.abspath(os.path.expanduser(str(p)))


def join(root, *parts):
    """root/part/... as a string, gs:// kept intact (pathlib.Path would turn gs://b into gs:/b)."""
    return str(path(root).joinpath(*map(str, parts)))


def parent(p):
    """The directory holding p, as a string (gs:// kept intact)."""
    return str(path(absolute(p)).parent)


def is_absolute(p):
    """True for gs:// and for an absolute local path (a relative one is read against a root)."""
    return is_remote(p) or os.path.isabs(os.path.expanduser(str(p)))


def resolve(p):
    """p as a string with ".." and, locally, symlinks resolved (for containment checks):
    a local path through realpath; gs:// has no links, only its ".." are folded."""
    if is_remote(p):
        scheme, rest = str(p).split("://", 1)
        return f"{scheme}://{posixpath.normpath(rest)}"
    return os.path.realpath(os.path.expanduser(str(p)))


def open(p, mode="r", encoding="utf-8", errors=None, newline=None):  # noqa: A001 (storage.open, like io.open)
    """A file object on p, local or gs://, with io.open's text options (epath's own open refuses
    errors= and newline=). Locally every mode works (append, "rb+"); gs:// objects are read or
    written whole, so "a" and "+" modes are an error there."""
    if not is_remote(p):
        return io.open(path(p), mode, encoding=None if "b" in mode else encoding, errors=errors, newline=newline)
    if "a" in mode or "+" in mode:
        raise ValueError(f"{p}: object storage cannot append or update in place; rewrite the whole object")
    binary = path(p).open(mode if "b" in mode else mode.replace("t", "") + "b")
    if "b" in mode:
        return binary
    return io.TextIOWrapper(binary, encoding=encoding, errors=errors, newline=newline)


def check_writable(directory, fix):
    """Refuses (EntityClipError, one line ending in `fix`) a directory nothing can be written in,
    before a command spends time on work it could not save. Locally a temporary file is created
    in it (the directory and its missing parents made for that, and removed again); on gs:// a
    probe object is written and deleted. Leaves no trace."""
    try:
        if is_remote(directory):  # no directories there: write and delete one probe object
            probe = path(directory) / f".write-probe-{secrets.token_hex(6)}"
            try:
                probe.write_text("")
            except FileNotFoundError:  # gcsfs names only the request URL
                bucket = str(directory).split("://", 1)[1].split("/", 1)[0]
                raise OSError(f"bucket {bucket} does not exist, or you may not see it") from None
            probe.unlink()
            return
        target = path(absolute(directory))
        missing = [d for d in [target, *target.parents] if not d.exists()]
        try:
            target.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=target):
                pass
        finally:
            for made in missing:  # deepest first; only what this check made, and only while empty
                with contextlib.suppress(OSError):
                    made.rmdir()
    except OSError as err:
        raise EntityClipError(f"cannot write to {directory} ({err.strerror or err}); {fix}") from None


def listdir(p):
    """Every name in directory p, sorted (epath's local iterdir hides names ending in "~")."""
    return sorted(item.name for item in path(p).iterdir()) if is_remote(p) else sorted(os.listdir(path(p)))


def size(p):
    """Bytes in the file p."""
    return path(p).stat().length


def write_text_atomic(p, text):
    """Writes a whole file that readers see either old or new, never half written."""
    write_bytes_atomic(p, text.encode("utf-8"))


def write_bytes_atomic(p, data):
    """write_text_atomic for bytes."""
    target = path(p)
    if is_remote(target):  # the object is created whole when the upload closes
        target.write_bytes(data)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(p, value, indent=2):
    write_text_atomic(p, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")


def copy(src, dst):
    """Copies one file, also between a local disk and object storage; returns dst as a string."""
    src, dst = path(src), path(dst)
    if not is_remote(dst):
        dst.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(src) == is_remote(dst):
        src.copy(dst, overwrite=True)
    else:  # each epath backend copies only within itself
        dst.write_bytes(src.read_bytes())
    return str(dst)


def replace(src, dst):
    """Moves one file onto dst: an atomic rename locally, copy then delete on object storage."""
    src, dst = path(src), path(dst)
    if is_remote(src) or is_remote(dst):
        src.copy(dst, overwrite=True)
        src.unlink()
    else:
        os.replace(src, dst)


def move_tree(src, dst):
    """Moves a directory to dst (whose parent is created): a rename locally, on object storage a copy of
    every object then a delete of the source (not atomic: a crash in between leaves both, never neither)."""
    src, dst = path(src), path(dst)
    if not (is_remote(src) or is_remote(dst)):
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src, dst)
        return
    for item in files(src):
        copy(item, dst / str(item)[len(str(src)) + 1:])
    src.rmtree()


@contextlib.contextmanager
def local_copy(p):
    """A local path holding what p holds, for readers that only open local files (safetensors,
    torch.load, transformers): p itself when local, else a temporary download deleted on exit."""
    source = path(p)
    if not is_remote(source):
        yield str(source)
        return
    with tempfile.TemporaryDirectory(prefix="entityclip-") as tmp:
        local = os.path.join(tmp, source.name)
        if source.is_dir():
            for item in files(source):
                copy(item, os.path.join(local, str(item)[len(str(source)) + 1:]))
        else:
            copy(source, local)
        yield local


def files(directory):
    """Every file below directory, as epath.Paths (epath's glob refuses "**" on gs://, its walk drops
    the scheme)."""
    for item in path(directory).iterdir():
        if item.is_dir():
            yield from files(item)
        else:
            yield item


def _json_object(line):
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class JsonLines:
    """A step-ordered JSON-lines log (metrics.jsonl): records are dicts with an int "step",
    appended in non-decreasing step order; works on object storage too.

    Locally: the file p, each record appended at once.
    On gs:// (no append; gcsfs's "a" mode silently overwrites): the folder p without its suffix
    (gs://b/run/metrics.jsonl -> gs://b/run/metrics/) holds one piece per flush, named by the first
    step it holds (000000123.jsonl) and holding only the lines since the flush before, so the
    bytes uploaded are the log's bytes, once. Lines are held in memory until a flush: at most every
    `flush_seconds` (between steps, so a step's lines share a piece) and at flush()/close(); a
    crash loses at most that much of the log. read() joins the pieces in step order.

    truncate_after(step) drops the records after `step` (a resumed run rewrites those steps):
    locally by rewriting the file; on gs:// by deleting the pieces that start after it and
    rewriting the one piece that runs past it, whatever the log's length."""

    def __init__(self, p, flush_seconds=30.0):
        self.path = path(p)
        self.remote = is_remote(self.path)
        self.pieces = self.path.parent / self.path.stem  # remote: the folder of pieces
        self.flush_seconds = flush_seconds
        self._pending = []  # remote: the lines since the last flush
        self._last_piece = None  # remote: (name, lines) of the piece this writer wrote last
        self._flushed_at = time.monotonic()

    def read(self):
        """Every record, in order; a line that is not a JSON object (torn by a kill or a full disk) is left out."""
        if not self.remote:
            text = self.path.read_bytes().decode("utf-8", errors="replace") if self.path.exists() else ""
            lines = text.splitlines()
        else:
            lines = [line for name in self._piece_names() for line in self._piece_lines(name)] + self._pending
        return [record for record in map(_json_object, lines) if record is not None]

    def truncate_after(self, step):
        """Drops the records whose step is after `step`."""
        if not self.remote:
            if self.path.exists():
                kept = [record for record in self.read() if record["step"] <= step]
                write_text_atomic(self.path, "".join(json.dumps(record) + "\n" for record in kept))
            return
        self.flush()
        names = self._piece_names()
        for name in names:
            if self._first_step(name) > step:
                (self.pieces / name).unlink()
        self._last_piece = None
        earlier = [name for name in names if self._first_step(name) <= step]
        if earlier:  # only the last piece that starts by `step` can hold steps after it
            lines = self._piece_lines(earlier[-1])
            kept = [line for line in lines if json.loads(line)["step"] <= step]
            if kept != lines:
                (self.pieces / earlier[-1]).write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            self._last_piece = (earlier[-1], kept)  # more lines of its first step go into it

    def append(self, record):
        line = json.dumps(record)
        if not self.remote:
            with self.path.open("a") as f:
                f.write(line + "\n")
            return
        last = json.loads(self._pending[-1])["step"] if self._pending else None
        if record["step"] != last and time.monotonic() - self._flushed_at >= self.flush_seconds:
            self.flush()
        self._pending.append(line)

    def flush(self):
        if self.remote and self._pending:
            first = json.loads(self._pending[0])["step"]
            name, lines = f"{first:09d}.jsonl", self._pending
            if self._last_piece and self._last_piece[0] == name:  # a step flushed, then logged again
                lines = self._last_piece[1] + lines
            (self.pieces / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            self._last_piece, self._pending = (name, lines), []
        self._flushed_at = time.monotonic()

    def close(self):
        self.flush()

    def _piece_names(self):
        """The pieces' names in step order."""
        if not self.pieces.exists():
            return []
        names = [name for name in listdir(self.pieces) if name.endswith(".jsonl") and name.split(".")[0].isdigit()]
        return sorted(names, key=self._first_step)

    def _piece_lines(self, name):
        return [line for line in (self.pieces / name).read_text(encoding="utf-8").splitlines() if line.strip()]

    @staticmethod
    def _first_step(name):
        return int(name.split(".")[0])

# ---- exclusive ownership: conditional writes on gs://, locks on a local disk

@functools.cache
def _gcs_client():
    """google-cloud-storage's client (the one gcsfs itself depends on), made once: it looks up credentials."""
    from google.cloud import storage as gcs  # lazy: only gs:// ownership needs it; every command imports storage
    return gcs.Client()


@contextlib.contextmanager
def _cloud_errors_as_os_errors(p):
    """The client's own errors (a missing bucket, no credentials, 403) as the OSError every caller handles."""
    from google.api_core import exceptions  # lazy: as _gcs_client
    from google.auth import exceptions as auth_exceptions  # lazy: as _gcs_client
    try:
        yield
    except auth_exceptions.DefaultCredentialsError as err:
        raise OSError(f"no Google Cloud credentials to reach {p} ({err}); run `gcloud auth application-default "
                      "login`, or use a VM whose service account may use the bucket") from None
    except exceptions.GoogleAPICallError as err:
        said = " ".join(str(err.message).split())  # the service's answer may hold a JSON body
        raise OSError(f"{p}: {err.code} {said[:200]}") from None


def _bucket_and_name(p):
    """(Bucket, object name) of gs://bucket/name."""
    check_bucket_name(p)
    bucket, name = str(p).split("://", 1)[1].split("/", 1)
    return _gcs_client().bucket(bucket), name


def read_object(p):
    """(bytes, generation) of the gs:// object p, or None when there is none. The generation
    changes at every write: write_object_if compares against it."""
    from google.api_core import exceptions  # lazy: as _gcs_client
    with _cloud_errors_as_os_errors(p):
        bucket, name = _bucket_and_name(p)
        for _ in range(5):  # the object may change between its metadata and its bytes: read both of one generation
            blob = bucket.get_blob(name)
            if blob is None:
                return None
            try:
                return blob.download_as_bytes(if_generation_match=blob.generation), blob.generation
            except (exceptions.PreconditionFailed, exceptions.NotFound):
                continue
    raise OSError(f"{p} changes faster than it can be read")


def write_object_if(p, data, generation):
    """Writes the gs:// object p only while its generation is `generation` (0: only while there is
    none), one atomic request (a generation precondition); returns the new generation, or None when
    another writer came first (precondition failed)."""
    from google.api_core import exceptions  # lazy: as _gcs_client
    with _cloud_errors_as_os_errors(p):
        bucket, name = _bucket_and_name(p)
        blob = bucket.blob(name)
        try:
            blob.upload_from_string(data, content_type="application/json", if_generation_match=generation)
        except exceptions.PreconditionFailed:
            return None
        return blob.generation


def process_is_running(pid):
    """Whether process `pid` of this machine (and pid namespace) still runs: what tells a lease or
    a half-built export of a dead writer from one whose writer is busy. Only a process the kernel
    says is gone is not running: another user's (EPERM), or a pid that cannot be told (a hand-edited
    file), counts as running, so nothing live is ever taken over."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (OSError, TypeError, ValueError, OverflowError):
        return True
    return True


def lock_file(p):
    """A local file p (created if missing) opened and held with an exclusive flock, or None when
    another process holds it. The kernel releases the lock when the file is closed or its
    process exits or dies (kill -9 included); the file itself stays."""
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle = io.open(target, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle
