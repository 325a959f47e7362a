"""Puts TensorFlow's own GCS client (tf.io.gfile, used by tf.Transform and the Trainer) on the emulator.

TensorFlow's C++ client has Google's endpoints built in and honours no emulator variable, but
it honours HTTPS_PROXY and CURL_CA_BUNDLE. So this is an HTTPS proxy on loopback that accepts
CONNECT to Google's storage hosts only, terminates TLS with a certificate of a throwaway test
CA, and forwards each HTTP request to the plain-HTTP emulator: bodies de-chunked (the emulator
speaks HTTP/1.0), Host rewritten to the emulator (so the links it builds point at itself), and
emulator URLs in response headers rewritten back to Google's (so resumable uploads come back
through the proxy). Nothing leaves the machine; any other host is refused. The proxy runs in a
process of its own (TfGcsProxy says why) and can log every request it relays.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import re
import select
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import urllib.parse

from beam_services import stop_process  # tests/ is on sys.path (also when run as the proxy process)

HOSTS = ("www.googleapis.com", "storage.googleapis.com")
GOOGLE_BASE = "https://www.googleapis.com"
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "content-length",
    "host",
}
UPSTREAM_TIMEOUT_S = 60
START_TIMEOUT_S = 20.0  # certificates, bind, report the port
STOP_TIMEOUT_S = 5.0
CERT_DAYS = 2


def _certificates(directory: str) -> tuple[str, str, str]:
    """(CA cert, leaf cert, leaf key) PEM paths: a test CA and a leaf for HOSTS, valid CERT_DAYS."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=CERT_DAYS)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tripletflow test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTS[0])]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in HOSTS]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = [os.path.join(directory, name) for name in ("ca.pem", "leaf.pem", "leaf.key")]
    for path, data in zip(
        paths,
        (
            ca.public_bytes(serialization.Encoding.PEM),
            leaf.public_bytes(serialization.Encoding.PEM),
            leaf_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        ),
    ):
        with open(path, "wb") as f:
            f.write(data)
    return paths[0], paths[1], paths[2]


def _read_head(stream) -> tuple[str, list[tuple[str, str]]] | None:
    """(request line, headers) of the next request on `stream`, None at end of stream."""
    line = stream.readline()
    if not line:
        return None
    headers = []
    while (header := stream.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = header.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    return line.decode("latin-1").strip(), headers


def _read_body(stream, headers: dict) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while (size := int(stream.readline().split(b";")[0].strip() or b"0", 16)) > 0:
            chunks.append(stream.read(size))
            stream.readline()  # the CRLF after each chunk
        while stream.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(chunks)
    return stream.read(int(headers.get("content-length", 0)))


MULTIPART_BOUNDARY = "tripletflow-proxy"


def _as_multipart(path: str, head):
    """An empty media upload (TensorFlow's "directory" markers) as the multipart upload the emulator can store.

    The emulator fails on a media upload without a body; a multipart one with empty content works.
    """
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
    metadata = json.dumps({"name": query["name"][0]})
    body = (
        f"--{MULTIPART_BOUNDARY}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{metadata}\r\n"
        f"--{MULTIPART_BOUNDARY}\r\nContent-Type: application/octet-stream\r\n\r\n\r\n"
        f"--{MULTIPART_BOUNDARY}--\r\n"
    ).encode()
    headers = [(n, v) for n, v in head[1] if n.lower() != "content-type"]
    headers.append(("Content-Type", f"multipart/related; boundary={MULTIPART_BOUNDARY}"))
    return path.replace("uploadType=media", "uploadType=multipart"), body, (head[0], headers)


STORAGE_LAYOUT = re.compile(r"^/storage/v1/b/([^/?]+)/storageLayout(?:\?.*)?$")


def _storage_layout(method: str, path: str) -> bytes | None:
    """GCS's answer to a bucket's storageLayout request for a flat bucket; None for any other request.

    TensorFlow renames a directory (tf.Transform publishes its transform graph that way) only
    after asking the bucket's storage layout: hierarchical-namespace buckets get one folder
    rename, flat ones a copy per object. The emulator lacks this endpoint (404, which TensorFlow
    treats as a failed rename), so the proxy answers as GCS does for a bucket without
    hierarchical namespace: no `hierarchicalNamespace` field (tsl gcs_file_system.cc,
    ParseIsHnsEnabled: absent means disabled).
    """
    match = STORAGE_LAYOUT.match(path) if method == "GET" else None
    if match is None:
        return None
    bucket = urllib.parse.unquote(match.group(1))
    return json.dumps(
        {"kind": "storage#storageLayout", "bucket": bucket, "location": "US", "locationType": "multi-region"}
    ).encode()


class _Server:
    """The proxy itself: a loopback listener, one daemon thread per client connection."""

    def __init__(self, emulator_url: str, directory: str, log_path: str | None):
        self._emulator = emulator_url.rstrip("/")
        host_port = self._emulator.split("://", 1)[1]
        self._host, self._port = host_port.rsplit(":", 1)[0], int(host_port.rsplit(":", 1)[1])
        _, cert, key = _certificates(directory)
        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._tls.load_cert_chain(cert, key)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._log = open(log_path, "a", buffering=1) if log_path else None  # line-buffered
        self._log_lock = threading.Lock()

    def serve_forever(self) -> None:
        while True:
            connection, _ = self._listener.accept()
            threading.Thread(target=self._tunnel, args=(connection,), daemon=True).start()

    def _record(self, method: str, path: str, status: int, sent: int, received: int) -> None:
        """One line per relayed request: method, path and query, status, request and response body bytes."""
        if self._log is not None:
            with self._log_lock:
                self._log.write(f"{method} {path} {status} {sent} {received}\n")

    def _tunnel(self, connection: socket.socket) -> None:
        try:
            with connection:
                head = _read_head(connection.makefile("rb"))
                if head is None:
                    return
                method, target = head[0].split(" ")[:2]
                if method != "CONNECT" or target.rsplit(":", 1)[0] not in HOSTS:
                    connection.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                    return
                connection.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                with self._tls.wrap_socket(connection, server_side=True) as tls:
                    self._relay(tls)
        except (OSError, ssl.SSLError, ValueError):
            pass  # the client went away; TensorFlow retries on its own

    def _relay(self, tls: ssl.SSLSocket) -> None:
        """Answers the requests of one TLS connection (keep-alive) from the emulator."""
        reader = tls.makefile("rb")
        while (head := _read_head(reader)) is not None:
            method, path = head[0].split(" ")[:2]
            headers = {name.lower(): value for name, value in head[1]}
            chunked = headers.get("transfer-encoding", "").lower() == "chunked"
            has_body = chunked or int(headers.get("content-length", 0))
            if headers.get("expect", "").lower() == "100-continue" and has_body:  # curl waits for it only then
                tls.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = _read_body(reader, headers)
            if (layout := _storage_layout(method, path)) is not None:
                tls.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=UTF-8\r\n"
                    + f"Content-Length: {len(layout)}\r\n\r\n".encode()
                    + layout
                )
                self._record(method, path, 200, len(body), len(layout))
                continue
            if method == "POST" and not body and "uploadType=media" in path:
                path, body, head = _as_multipart(path, head)
            upstream = http.client.HTTPConnection(self._host, self._port, timeout=UPSTREAM_TIMEOUT_S)
            try:
                forwarded = {name: value for name, value in head[1] if name.lower() not in HOP_BY_HOP}
                upstream.request(
                    method, path, body=body if body or method in ("POST", "PUT", "PATCH") else None, headers=forwarded
                )
                response = upstream.getresponse()
                data = b"" if method == "HEAD" else response.read()
                lines = [f"HTTP/1.1 {response.status} {response.reason}"]
                for name, value in response.getheaders():
                    if name.lower() not in HOP_BY_HOP:
                        lines.append(f"{name}: {value.replace(self._emulator, GOOGLE_BASE)}")
                length = len(data) if method != "HEAD" else response.getheader("Content-Length", 0)
                lines.append(f"Content-Length: {length}")
                tls.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data)
                self._record(method, path, response.status, len(body), len(data))
            finally:
                upstream.close()


class ProxyError(RuntimeError):
    """The proxy process did not start (it died, or did not report its port in time)."""


class TfGcsProxy:
    """The proxy in its own process, on a free loopback port; `env` is what TensorFlow needs.

    A separate process, not threads of the test's: some TensorFlow calls reach GCS while holding
    Python's GIL (e.g. `pywrap_saved_model.Save`, called by tf.saved_model.save after the
    variables and assets are written, stats the export directory), and a proxy thread of the same
    interpreter could then never run to answer them: the request hangs until curl's idle timeout
    aborts it (libcurl code 42), retry after retry. `log_path`, when given, gets one line per
    relayed request (see _Server._record).
    """

    def __init__(self, emulator_url: str, log_path: str | None = None):
        self._dir = tempfile.mkdtemp(prefix="tf-gcs-proxy-")
        self.ca_path = os.path.join(self._dir, "ca.pem")
        self.log_path = log_path
        command = [sys.executable, os.path.abspath(__file__), emulator_url, self._dir, log_path or ""]
        # Its stdin is a pipe it watches: the proxy ends with this process, however this one ends.
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = select.select([self._process.stdout], [], [], START_TIMEOUT_S)[0]
        line = self._process.stdout.readline().strip() if ready else ""
        if not line.isdigit():
            self.close()
            raise ProxyError(f"the TLS proxy did not start within {START_TIMEOUT_S} s (said {line!r})")
        self.url = f"http://127.0.0.1:{line}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "HTTPS_PROXY": self.url,
            "https_proxy": self.url,
            "CURL_CA_BUNDLE": self.ca_path,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorFlow's own offline token
            "NO_GCE_CHECK": "True",
        }

    def close(self) -> None:
        """Stops the proxy process and removes its certificates."""
        if self._process.poll() is None:
            stop_process(self._process, STOP_TIMEOUT_S)
        self._process.stdout.close()
        self._process.stdin.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def main(argv: list[str]) -> None:
    """`gcs_tls_proxy.py EMULATOR_URL DIR [LOG]`: writes DIR/ca.pem, prints the port, serves until killed."""
    emulator_url, directory, log_path = (argv + [""])[:3]
    server = _Server(emulator_url, directory, log_path or None)
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()  # parent gone: end
    print(server.port, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
