"""A fault-injecting HTTP proxy between workers and the S3 server, for tests and benchmarks.

Unlike tests/faults.py (a TCP proxy: outages, resets, a bandwidth cap), this one
understands S3 requests, so it can answer them the way a struggling S3 does:

- added latency before each request is forwarded;
- 503 SlowDown (or 500 InternalError) for a share of requests, or whenever more than
  a number of requests are in flight (S3 throttling a client that pushes too hard);
- a connection reset part-way through a request body;
- a bandwidth cap on request bodies;
- 403 "Request has expired" for a presigned URL past its X-Amz-Date + X-Amz-Expires
  (moto does not check expiry).

It counts what it saw: requests, in flight now and at most, and every fault it injected.

    proxy = FaultProxy("http://127.0.0.1:5000"); proxy.configure(slowdown_above=4)
    ... AWS_ENDPOINT_URL=proxy.url ...; proxy.close()
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import http.client
import random
import socket
import struct
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = 256 * 1024

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")
INTERNAL = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
            b"<Message>We encountered an internal error. Please try again.</Message></Error>")
EXPIRED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
           b"<Message>Request has expired</Message></Error>")


@dataclasses.dataclass
class Faults:
    latency: float = 0.0  # seconds added before forwarding
    latency_methods: tuple[str, ...] | None = None  # which requests get the latency (None: all)
    slowdown_share: float = 0.0  # share of requests answered 503 SlowDown
    error_share: float = 0.0  # share of requests answered 500 InternalError
    slowdown_above: int | None = None  # 503 SlowDown while more than this many requests are in flight
    reset_share: float = 0.0  # share of uploads whose connection is reset half-way through the body
    bytes_per_second: float | None = None  # cap on request bodies, all connections together
    check_expiry: bool = True  # 403 for presigned URLs past their expiry
    expire_share: float = 0.0  # share of presigned requests answered 403 expired anyway (a URL that waited too long)
    only_methods: tuple[str, ...] = ("PUT",)  # which requests the shares and the cap apply to


@dataclasses.dataclass
class Counts:
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    slowdowns: int = 0
    errors: int = 0
    resets: int = 0
    expired: int = 0
    body_bytes: int = 0  # request body bytes received (forwarded, discarded or cut off)


class FaultProxy:
    def __init__(self, upstream: str, seed: int = 0) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.faults = Faults()
        self.counts = Counts()
        self.lock = threading.Lock()
        self.random = random.Random(seed)
        self._budget_at = time.monotonic()
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def configure(self, **faults: object) -> None:
        """Replace the faults (unnamed ones go back to none)."""
        with self.lock:
            self.faults = Faults(**faults)  # type: ignore[arg-type]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- used by the handler ------------------------------------------------------------

    def _enter(self) -> int:
        with self.lock:
            self.counts.requests += 1
            self.counts.in_flight += 1
            self.counts.max_in_flight = max(self.counts.max_in_flight, self.counts.in_flight)
            return self.counts.in_flight

    def _leave(self) -> None:
        with self.lock:
            self.counts.in_flight -= 1

    def _roll(self, share: float) -> bool:
        with self.lock:
            return share > 0 and self.random.random() < share

    def _count(self, name: str, by: int = 1) -> None:
        with self.lock:
            setattr(self.counts, name, getattr(self.counts, name) + by)

    def _throttle(self, size: int) -> None:
        """Token bucket shared by all connections: each chunk waits for its turn."""
        rate = self.faults.bytes_per_second
        if not rate:
            return
        with self.lock:
            now = time.monotonic()
            self._budget_at = max(self._budget_at, now) + size / rate
            wait = self._budget_at - now - size / rate
        if wait > 0:
            time.sleep(wait)


def expired(query: dict[str, list[str]], now: dt.datetime | None = None) -> bool:
    """A presigned URL past its expiry: SigV4 (X-Amz-Date + X-Amz-Expires) or SigV2 (Expires)."""
    now = now or dt.datetime.now(dt.UTC)
    if "Expires" in query and "Signature" in query:
        return now.timestamp() > int(query["Expires"][0])
    if "X-Amz-Date" not in query or "X-Amz-Expires" not in query:
        return False
    signed = dt.datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    deadline = signed + dt.timedelta(seconds=int(query["X-Amz-Expires"][0]))
    return now > deadline


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy

    def log_message(self, *_: object) -> None:
        pass

    def handle_expect_100(self) -> bool:
        """Answer `Expect: 100-continue` later, as S3 does: a refusal (SlowDown, expired) comes
        before the client sends the body, so it costs no bytes; 100 Continue only when forwarding."""
        self._continue_pending = True
        return True

    def _continue(self) -> None:
        if getattr(self, "_continue_pending", False):
            self._continue_pending = False
            self.send_response_only(100)
            self.end_headers()

    def _handle(self) -> None:
        proxy = self.owner
        faults = proxy.faults
        in_flight = proxy._enter()
        try:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            length = int(self.headers.get("Content-Length") or 0)
            applies = self.command in faults.only_methods
            if faults.latency and (faults.latency_methods is None or self.command in faults.latency_methods):
                time.sleep(faults.latency)
            if faults.check_expiry and expired(query):
                proxy._count("expired")
                return self._refuse(403, EXPIRED, length)
            if applies and "X-Amz-Signature" in query and proxy._roll(faults.expire_share):
                proxy._count("expired")
                return self._refuse(403, EXPIRED, length)
            if applies and faults.slowdown_above is not None and in_flight > faults.slowdown_above:
                proxy._count("slowdowns")
                return self._refuse(503, SLOWDOWN, length)
            if applies and proxy._roll(faults.slowdown_share):
                proxy._count("slowdowns")
                return self._refuse(503, SLOWDOWN, length)
            if applies and proxy._roll(faults.error_share):
                proxy._count("errors")
                return self._refuse(500, INTERNAL, length)
            reset_at = length // 2 if applies and length and proxy._roll(faults.reset_share) else None
            self._forward(length, reset_at, applies)
        finally:
            proxy._leave()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle  # noqa: N815

    def _refuse(self, status: int, body: bytes, length: int) -> None:
        closing = getattr(self, "_continue_pending", False)
        if closing:
            self._continue_pending = False  # the client waits: it never sends the body
            self.close_connection = True
        else:
            self._discard(length)
        self.send_response(status)
        if closing:  # so the client does not reuse a connection this side is about to close
            self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _discard(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(CHUNK, length))
            if not chunk:
                break
            length -= len(chunk)
            self.owner._count("body_bytes", len(chunk))

    def _forward(self, length: int, reset_at: int | None, capped: bool) -> None:
        proxy = self.owner
        upstream = http.client.HTTPConnection(*proxy.upstream, timeout=300)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                upstream.putheader(name, value)
            upstream.endheaders()
            self._continue()
            sent = 0
            while sent < length:
                chunk = self.rfile.read(min(CHUNK, length - sent))
                if not chunk:
                    break
                proxy._count("body_bytes", len(chunk))
                if reset_at is not None and sent + len(chunk) > reset_at:
                    proxy._count("resets")
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()  # RST to the client, mid-body
                    return
                if capped:
                    proxy._throttle(len(chunk))
                upstream.send(chunk)
                sent += len(chunk)
            response = upstream.getresponse()
            body = response.read()
            self.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(name, value)
            # HEAD: the object's length, as the server gave it; otherwise the body we relay
            self.send_header("Content-Length", response.getheader("Content-Length", "0") if self.command == "HEAD"
                             else str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        finally:
            upstream.close()
