"""A real S3-speaking server on 127.0.0.1 for storage tests (moto's ThreadedMotoServer), reached like real S3."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import pytest

BUCKET = "raylm-test"
DUMMY_KEYS = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-value",
    "AWS_REGION": "us-east-1",
}


@contextmanager
def s3_server() -> Iterator[str]:
    """Start moto on a free port of 127.0.0.1; yields its endpoint URL (http://127.0.0.1:PORT)."""
    server_module = pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A module's S3 server with the test bucket in it (import this fixture into a test module to use it)."""
    with s3_server() as url:
        create_bucket(url)
        yield url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def use_endpoint(monkeypatch, endpoint: str) -> None:
    """Point raylm (through pyarrow, exactly as for real S3) at the server with dummy credentials."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    for name, value in DUMMY_KEYS.items():
        monkeypatch.setenv(name, value)


def create_bucket(endpoint: str, name: str = BUCKET) -> None:
    """Test set-up only (raylm never creates buckets): an empty bucket on the server."""
    client(endpoint).create_bucket(Bucket=name)


def client(endpoint: str):
    """A boto3 client on the server, for test set-up and inspection only (raylm itself goes through pyarrow)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=DUMMY_KEYS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=DUMMY_KEYS["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


def put_object(endpoint: str, key: str, data: bytes, bucket: str = BUCKET) -> None:
    client(endpoint).put_object(Bucket=bucket, Key=key, Body=data)


def keys(endpoint: str, prefix: str, bucket: str = BUCKET) -> dict[str, int]:
    """{key: size} of every object under a prefix."""
    pages = client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {obj["Key"]: obj["Size"] for page in pages for obj in page.get("Contents", [])}


class OutageRelay:
    """A TCP relay on 127.0.0.1 in front of the S3 server that can play a storage outage for real.

    Bytes pass through untouched until a request carrying `trigger` (bytes of its request line, such as a key
    prefix) arrives after arm(): that request is dropped, every open connection is cut and the port refuses
    connections for `down_s` seconds, then listens again. Clients see what a crashed or unreachable server
    gives them (reset connections, then refused ones)."""

    def __init__(self, upstream: str):
        host, _, port = upstream.rpartition("//")[2].partition(":")
        self.upstream = (host, int(port))
        self.port = free_port()
        self.trigger: bytes | None = None
        self.down_s = 0.0
        self.fired = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._listen()
        threading.Thread(target=self._accept, name="outage-relay", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def arm(self, trigger: bytes, down_s: float) -> None:
        self.trigger, self.down_s = trigger, down_s
        self.fired.clear()

    def close(self) -> None:
        self._closed = True
        self._cut()

    def _listen(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:  # closed for an outage: wait for the port to listen again
                time.sleep(0.05)
                continue
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, requests: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                if requests and self.trigger and not self.fired.is_set() and self.trigger in data:
                    self._outage()
                    return
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                _close(sock)

    def _outage(self) -> None:
        self.fired.set()
        self._cut()

        def back() -> None:
            time.sleep(self.down_s)
            if not self._closed:
                self._listen()

        threading.Thread(target=back, daemon=True).start()

    def _cut(self) -> None:
        _close(self._server)
        with self._lock:
            conns, self._conns = self._conns, set()
        for sock in conns:
            _close(sock)


def _close(sock: socket.socket) -> None:
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
