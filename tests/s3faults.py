"""Fault injection for S3 tests: moto has none of its own.

Two ways in, one plan format:
- :func:`install_hook` adds a botocore ``before-send`` handler to a client under ``mock_aws``
  (in-process); it answers, raises or lets moto's stubber handle the request.
- :class:`FaultProxy` is a small HTTP proxy in front of moto's ``ThreadedMotoServer``; it
  answers, resets the TCP connection before or after forwarding, delays, or corrupts.

A :class:`FaultPlan` holds rules (which request, what fault, how many times) and records
every HTTP attempt that reached it, so tests can count attempts exactly.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

import boto3
import pytest

ACTIONS = ("503", "409", "reset", "lost", "delay", "bad_checksum", "corrupt")

_ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "409": (409, "ConditionalRequestConflict", "A conflicting conditional operation is in progress."),
}


@dataclass(frozen=True)
class Req:
    method: str
    key: str  # the path after the bucket, unquoted
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes

    @classmethod
    def from_url(cls, method: str, url: str, headers: dict[str, str], body: bytes) -> Req:
        parts = urlsplit(url)
        path = unquote(parts.path).lstrip("/")
        key = path.partition("/")[2]  # path-style: /bucket/key
        query = {k: v[0] if v else "" for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        return cls(method.upper(), key, query, {k.lower(): v for k, v in headers.items()}, body)

    @property
    def op(self) -> str:
        """The S3 operation, as far as tests need to tell them apart."""
        q = self.query
        if self.method == "PUT" and "partNumber" in q:
            return "UploadPart"
        if self.method == "POST" and "uploads" in q:
            return "CreateMultipartUpload"
        if self.method == "POST" and "uploadId" in q:
            return "CompleteMultipartUpload"
        if self.method == "DELETE" and "uploadId" in q:
            return "AbortMultipartUpload"
        return {
            "PUT": "PutObject",
            "GET": "GetObject",
            "HEAD": "HeadObject",
            "DELETE": "DeleteObject",
            "POST": "Post",
        }.get(self.method, self.method)


@dataclass
class Rule:
    match: Callable[[Req], bool]
    action: str
    times: int | None = 1  # None: every matching request
    delay: float = 0.0
    fired: int = 0

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown fault {self.action!r}")


def on(op: str, key_suffix: str = "", **query: str) -> Callable[[Req], bool]:
    """Match an operation on keys ending with ``key_suffix`` (and query values, e.g. partNumber='2')."""
    return lambda r: r.op == op and r.key.endswith(key_suffix) and all(r.query.get(k) == v for k, v in query.items())


@dataclass
class FaultPlan:
    rules: list[Rule] = field(default_factory=list)
    seen: list[tuple[Req, str | None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, match: Callable[[Req], bool], action: str, times: int | None = 1, delay: float = 0.0) -> FaultPlan:
        self.rules.append(Rule(match, action, times, delay))
        return self

    def decide(self, req: Req) -> Rule | None:
        with self._lock:
            chosen = None
            for rule in self.rules:
                if (rule.times is None or rule.fired < rule.times) and rule.match(req):
                    rule.fired += 1
                    chosen = rule
                    break
            self.seen.append((req, chosen.action if chosen else None))
            return chosen

    def attempts(self, op: str, key_suffix: str = "", **query: str) -> int:
        """HTTP attempts that reached the plan for this operation (faulted or not)."""
        match = on(op, key_suffix, **query)
        with self._lock:
            return sum(1 for req, _ in self.seen if match(req))

    def faults(self) -> list[str]:
        with self._lock:
            return [f"{req.op} {req.key}: {action}" for req, action in self.seen if action]


def _error_body(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
        f"<Message>{message}</Message><RequestId>fault</RequestId></Error>"
    ).encode()


def _wrong(checksum: str) -> str:
    return "AAAAAA==" if checksum != "AAAAAA==" else "/////w=="


# --------------------------------------------------------------------------- in-process hooks


def install_hook(client, plan: FaultPlan) -> None:
    """Inject the plan's faults into one boto3 client running under ``mock_aws``."""
    from botocore.awsrequest import AWSResponse
    from botocore.exceptions import ConnectionClosedError
    from moto.core.botocore_stubber import MockRawResponse
    from moto.core.models import botocore_stubber

    def handler(request, **kwargs):
        # The body stays unread: over HTTPS it is an aws-chunked stream that botocore rewinds itself.
        req = Req.from_url(request.method, request.url, dict(request.headers), b"")
        rule = plan.decide(req)
        if rule is None:
            return None
        if rule.action in _ERRORS:
            status, code, message = _ERRORS[rule.action]
            return AWSResponse(
                request.url, status, {"Content-Type": "application/xml"}, MockRawResponse(_error_body(code, message))
            )
        if rule.action == "reset":
            raise ConnectionClosedError(endpoint_url=request.url)
        if rule.action == "delay":
            time.sleep(rule.delay)
            return None
        response = botocore_stubber(kwargs.get("event_name", "before-send.s3"), request)
        if rule.action == "lost":  # the store committed; the client never hears about it
            raise ConnectionClosedError(endpoint_url=request.url)
        if rule.action == "bad_checksum":
            for name in list(response.headers):
                if name.lower() == "x-amz-checksum-crc32":
                    response.headers[name] = _wrong(response.headers[name])
            return response
        raise ValueError(f"fault {rule.action!r} needs the proxy")

    client.meta.events.register_first("before-send.s3", handler)


# --------------------------------------------------------------------------- HTTP proxy


class FaultProxy:
    """One request per connection, forwarded to ``upstream`` unless the plan says otherwise."""

    def __init__(self, upstream: tuple[str, int], plan: FaultPlan):
        self.upstream = upstream
        self.plan = plan
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._server.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            reader = conn.makefile("rb")
            request_line = reader.readline()
            if not request_line:
                return
            method, target, _version = request_line.decode("latin-1").split()
            headers = _read_headers(reader)
            lower = {k.lower(): v for k, v in headers}
            if lower.get("expect", "").lower() == "100-continue":
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = _read_body(reader, lower)
            req = Req.from_url(method, target, lower, body)
            rule = self.plan.decide(req)
            action = rule.action if rule else None
            if action in _ERRORS:
                status, code, message = _ERRORS[action]
                payload = _error_body(code, message)
                conn.sendall(
                    f"HTTP/1.1 {status} {code}\r\nContent-Type: application/xml\r\n"
                    f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                    + payload
                )
                return
            if action == "reset":
                _reset(conn)
                return
            if action == "delay":
                time.sleep(rule.delay)
            if action == "corrupt" and body:
                body = body[:-1] + bytes([body[-1] ^ 0x01])
            response = self._forward(method, target, headers, body)
            if action == "lost":
                _reset(conn)
                return
            conn.sendall(_rewrite_response(response, bad_checksum=action == "bad_checksum"))
        except (OSError, ValueError):
            pass
        finally:
            conn.close()

    def _forward(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
        drop = {"connection", "expect", "transfer-encoding", "content-length", "keep-alive"}
        lines = [f"{method} {target} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in headers if k.lower() not in drop]
        lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
        with socket.create_connection(self.upstream) as up:
            up.sendall("\r\n".join(lines).encode("latin-1") + body)
            chunks = []
            while chunk := up.recv(1 << 16):
                chunks.append(chunk)
        return b"".join(chunks)


def _read_headers(reader) -> list[tuple[str, str]]:
    headers = []
    while True:
        line = reader.readline().decode("latin-1")
        if line in ("\r\n", "\n", ""):
            return headers
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))


def _read_body(reader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int(reader.readline().split(b";")[0].strip(), 16)
            if size == 0:
                _read_headers(reader)  # trailers
                return b"".join(parts)
            parts.append(reader.read(size))
            reader.readline()
    length = int(headers.get("content-length", "0") or 0)
    return reader.read(length) if length else b""


def _rewrite_response(raw: bytes, bad_checksum: bool) -> bytes:
    """Close the connection after every response (one request per connection), maybe lie about the checksum."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    out = [lines[0]]
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() in ("connection", "keep-alive"):
            continue
        if bad_checksum and name.strip().lower() == "x-amz-checksum-crc32":
            line = f"{name}: {_wrong(value.strip())}"
        out.append(line)
    out.append("Connection: close")
    return "\r\n".join(out).encode("latin-1") + sep + body


def _reset(conn: socket.socket) -> None:
    """Close with RST, as a dropped connection looks to the client."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


# --------------------------------------------------------------------------- shared test helpers


def make_bundle(directory, weights: bytes = b"\x00" * 64, extra: dict[str, bytes] | None = None):
    """A minimal bundle directory (content need not load; publishing only moves bytes)."""
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapters.safetensors").write_bytes(weights)
    (directory / "adapter_config.json").write_text('{"fine_tune_type": "lora"}')
    (directory / "metrics.json").write_text('{"val_loss": 1.0}')
    for name, data in (extra or {}).items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    return directory


def no_backoff(monkeypatch) -> None:
    """Keep botocore's retry decisions and attempt counts, drop its sleeps (tests only)."""
    from botocore.retries.standard import ExponentialBackoff

    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0.0)


def raw_client(endpoint_url: str | None = None, key: str | None = None):
    """A plain boto3 S3 client for test setup and inspection, built like the project's (shared model loader:
    ``boto3.client`` parses the S3 model again each time, ~0.3 s)."""
    from finetune.config import StorageConfig
    from finetune.store import s3_client

    creds = {"access_key_id": key, "secret_access_key": key} if key else {}
    return s3_client(StorageConfig(region="us-east-1", endpoint_url=endpoint_url, addressing_style="path", **creds))


@contextlib.contextmanager
def bucket_endpoint(host_and_port: tuple[str, int], bucket: str, credentials: dict[str, str]) -> Iterator[str]:
    """moto's URL with ``bucket`` created, and ``credentials`` in os.environ until exit (for subprocesses)."""
    host, port = host_and_port
    url = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in credentials}
    os.environ.update(credentials)
    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=bucket)
    try:
        yield url
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def moto_server():
    """moto's HTTP server on 127.0.0.1 (a free port), one per test module that imports this fixture."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield server.get_host_and_port()
    server.stop()
