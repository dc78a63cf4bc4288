"""HTTP CONNECT proxy that sends TensorFlow's hard-wired Cloud Storage hosts to the local emulator.

TensorFlow's gs:// client has no endpoint variable (it always calls www.googleapis.com and
storage.googleapis.com), but its libcurl honours HTTPS_PROXY/http_proxy and CURL_CA_BUNDLE.
This proxy accepts only *.googleapis.com, terminates TLS with a test certificate, and forwards
plain HTTP to the emulator; every other host gets 403, so no request leaves the machine.
Run as its own process: TF holds the GIL during some HTTP calls, so an in-process proxy deadlocks.

usage: python _gcs_proxy.py EMULATOR_PORT CERT.pem KEY.pem   (prints its own port, then serves)
"""
import socket
import ssl
import sys
import threading

# TF's curl sends this with a Content-Length on uploads; the emulator (Go net/http) answers 501.
_BAD_HEADER = b"\r\nTransfer-Encoding: identity\r\n"


def _pipe(src, dst, fix=False):
    try:
        while data := src.recv(65536):
            dst.sendall(data.replace(_BAD_HEADER, b"\r\n") if fix else data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _handle(client, target, tls):
    try:
        head = b""
        while b"\r\n\r\n" not in head:
            data = client.recv(4096)
            if not data:
                return client.close()
            head += data
        method, hostport, _ = head.split(b"\r\n", 1)[0].decode("latin1").split(" ", 2)
        host = hostport.split("://")[-1].split("/")[0].rsplit(":", 1)[0]
        if not host.endswith("googleapis.com"):
            client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return client.close()
        upstream = socket.create_connection(target)
        if method == "CONNECT":
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            client = tls.wrap_socket(client, server_side=True)
        else:  # plain-http proxy request (resumable upload URLs): the emulator accepts absolute-form targets
            upstream.sendall(head.replace(_BAD_HEADER, b"\r\n"))
        threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
        _pipe(client, upstream, fix=True)
    except (OSError, ValueError):
        client.close()


def main(emulator_port, certfile, keyfile):
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(certfile, keyfile)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    print(server.getsockname()[1], flush=True)
    while True:
        client, _ = server.accept()
        threading.Thread(target=_handle, args=(client, ("127.0.0.1", emulator_port), tls), daemon=True).start()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
