"""Kept-alive HTTP/1.1 connections that send a part's bytes without copying them through
Python: os.sendfile over plain HTTP, one reused buffer over TLS; a small pool per process
and endpoint. The transport of workers/sender.py.

`send` takes a request that is already built (and signed, or presigned) and its
reader.RangeReader body, and returns the answer; it fails as botocore's own transport
does (httpsession.URLLib3Session.send), with its exceptions: EndpointConnectionError and
ConnectTimeoutError (nothing reached), ReadTimeoutError, ConnectionClosedError (reset,
closed, garbled), SSLError; or with the body's own read error (the reader's `error`), so
that a source that fails to read is never taken for a failing link.

`Expect: 100-continue`, when the request asks for it: S3 may refuse before the body is
sent; with no answer within CONTINUE_SECONDS the body goes anyway, as botocore does.
After a complete answer without `Connection: close` the connection goes back to the pool
(MAX_IDLE per endpoint); one the server closed meanwhile is noticed and dropped when it
is taken, and a request that fails with a closed or reset connection on a reused one (the
server closed it just then) is sent once more on a new one, as a PUT may be. Pools are
per process: a forked child (prefork workers) starts with none of its parent's connections.
"""

from __future__ import annotations

import dataclasses
import functools
import http.client
import logging
import os
import select
import socket
import ssl
import threading
import urllib.parse
from typing import Any

import botocore.exceptions

from workers import reader

log = logging.getLogger(__name__)

#: The buffer a part's bytes pass through over TLS (one per part in flight).
TLS_BUFFER = 1024 * 1024
#: How long to wait for `100 Continue` before sending the body anyway (botocore's wait).
CONTINUE_SECONDS = 1.0
#: Idle connections kept per endpoint and process.
MAX_IDLE = 16


@dataclasses.dataclass(frozen=True)
class Transport:
    """How to reach an endpoint: timeouts, TLS trust (a CA file; None: the system's)."""

    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    cafile: str | None = None
    keepalive: bool = True


@dataclasses.dataclass(frozen=True)
class Answer:
    status: int
    reason: str
    headers: http.client.HTTPMessage
    data: bytes


def send(method: str, url: str, headers: Any, body: reader.RangeReader, transport: Transport,
         shown: str) -> Answer:
    """Send one request with `body`, on a pooled connection; `shown` is the URL errors name.
    Raises botocore's transport exceptions, or the body's own read error (body.error)."""
    parts = urllib.parse.urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [(name, value) for name, value in headers if _text(name).lower() != "host"]
    lines.insert(0, ("Host", _host(parts)))
    if not any(_text(name).lower() == "content-length" for name, _ in lines):
        lines.append(("Content-Length", str(len(body))))
    expect = any(_text(n).lower() == "expect" and _text(v).lower() == "100-continue" for n, v in lines)
    key = (parts.scheme, parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80), transport)
    for attempt in (1, 2):
        connection = pool().take(key)
        try:
            answer, reusable = _exchange(connection, method, target, lines, expect, body)
        except _StaleConnection as stale:
            connection.close()
            if attempt == 1:
                log.debug("a kept-alive connection to %s://%s was closed by the server; sending again on a "
                          "new one", parts.scheme, parts.netloc)
                continue
            raise _transport_error(stale.error, shown) from None
        except _SourceFailed:
            connection.close()
            raise body.error from None  # type: ignore[misc]
        except _ConnectFailed as failed:
            connection.close()
            raise _connect_error(failed.error, shown) from failed.error
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise _transport_error(error, shown) from error
        except BaseException:  # a soft time limit mid-request, ...: the connection's state is unknown
            connection.close()
            raise
        if reusable:
            pool().give(key, connection)
        else:
            connection.close()
        return answer
    raise AssertionError("unreachable")


def _exchange(connection: Connection, method: str, target: str, lines: list[tuple[Any, Any]], expect: bool,
              body: reader.RangeReader) -> tuple[Answer, bool]:
    """One request and its answer; (answer, whether the connection may carry another)."""
    reused = connection.sock is not None
    if not reused:
        try:
            connection.connect()
        except OSError as error:  # (refused, unreachable, timed out, TLS handshake refused)
            raise _ConnectFailed(error) from error
    try:
        connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in lines:
            connection.putheader(name, value)
        connection.endheaders()
        early = _await_continue(connection) if expect else None
        if early is None:
            body.seek(0)
            _send_body(connection, body)
        connection.response_class = functools.partial(_Response, status=early)
        response = connection.getresponse()
        data = response.read()
    except OSError as error:
        if body.error is not None and error is body.error:
            raise _SourceFailed() from error
        if reused and isinstance(error, (ConnectionError, ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            raise _StaleConnection(error) from error
        raise
    reusable = early is None and connection.sock is not None and not response.will_close
    return Answer(response.status, response.reason, response.headers, data), reusable


def _send_body(connection: Connection, body: reader.RangeReader) -> None:
    sock = connection.sock
    if isinstance(sock, ssl.SSLSocket):
        view = memoryview(bytearray(max(1, min(TLS_BUFFER, len(body)))))
        while count := body.readinto(view):
            sock.sendall(view[:count])
    else:
        body.sendfile(sock)


def _await_continue(connection: Connection) -> tuple[str, int, str] | None:
    """After headers with `Expect: 100-continue`: None to send the body (100 Continue, or no
    answer in time), or the status line of a final answer the server gave instead."""
    sock = connection.sock
    if not _readable(sock, CONTINUE_SECONDS):
        return None
    stream = sock.makefile("rb", buffering=0)  # unbuffered: nothing read beyond the interim answer
    try:
        line = stream.readline(http.client._MAXLINE + 1)  # type: ignore[attr-defined]
        if not line:
            raise http.client.RemoteDisconnected("the server closed the connection without an answer")
        fields = line.split(None, 2)
        if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
            raise http.client.BadStatusLine(repr(line[:80]))
        if fields[1] == b"100":
            while stream.readline(http.client._MAXLINE + 1) not in (b"\r\n", b"\n", b""):  # type: ignore[attr-defined]
                pass
            return None
        reason = fields[2].decode("latin-1").strip() if len(fields) > 2 else ""
        return fields[0].decode("ascii"), int(fields[1]), reason
    finally:
        stream.close()


def _readable(sock: socket.socket, seconds: float) -> bool:
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(seconds * 1000))


class _Response(http.client.HTTPResponse):
    """An answer whose status line may already have been read (instead of 100 Continue)."""

    def __init__(self, sock: socket.socket, *args: Any, status: tuple[str, int, str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self._early = status

    def _read_status(self) -> tuple[str, int, str]:
        if self._early is not None:
            status, self._early = self._early, None
            return status
        return super()._read_status()


class _SourceFailed(Exception):
    """The body failed to read (its error is the reader's `error`)."""


class _StaleConnection(Exception):
    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _ConnectFailed(Exception):
    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _connect_error(error: BaseException, url: str) -> Exception:
    if isinstance(error, ssl.SSLError):
        return botocore.exceptions.SSLError(endpoint_url=url, error=error)
    if isinstance(error, TimeoutError):
        return botocore.exceptions.ConnectTimeoutError(endpoint_url=url, error=error)
    return botocore.exceptions.EndpointConnectionError(endpoint_url=url, error=error)


def _transport_error(error: OSError | http.client.HTTPException, url: str) -> Exception:
    """As botocore's transport (httpsession.URLLib3Session.send) reports it."""
    if isinstance(error, ssl.SSLError) and not isinstance(error, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return botocore.exceptions.SSLError(endpoint_url=url, error=error)
    if isinstance(error, TimeoutError):
        return botocore.exceptions.ReadTimeoutError(endpoint_url=url, error=error)
    return botocore.exceptions.ConnectionClosedError(endpoint_url=url, error=error)


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _host(parts: urllib.parse.SplitResult) -> str:
    """The Host header as botocore signs it (auth._host_from_url): no default port, IPv6 in brackets."""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None and parts.port != {"http": 80, "https": 443}.get(parts.scheme):
        host = f"{host}:{parts.port}"
    return host


class Connection(http.client.HTTPConnection):
    """A kept-alive connection (http.client's, for its request line and answer parsing)."""

    def __init__(self, host: str, port: int, transport: Transport) -> None:
        super().__init__(host, port, timeout=transport.connect_timeout)
        self.transport = transport

    def connect(self) -> None:
        super().connect()
        self._ready()

    def _ready(self) -> None:
        if self.transport.keepalive:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.sock.settimeout(self.transport.read_timeout)

    def dropped(self) -> bool:
        """Closed by the server (or sent something unasked) while idle in the pool."""
        return self.sock is None or _readable(self.sock, 0)


class TLSConnection(Connection, http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, transport: Transport) -> None:
        http.client.HTTPSConnection.__init__(self, host, port, timeout=transport.connect_timeout,
                                             context=_tls_context(transport.cafile))
        self.transport = transport

    def connect(self) -> None:
        http.client.HTTPSConnection.connect(self)
        self._ready()


@functools.lru_cache(maxsize=8)
def _tls_context(cafile: str | None) -> ssl.SSLContext:
    """Certificate and host name checked; trust from `cafile`, else the system's."""
    return ssl.create_default_context(cafile=cafile)


_Key = tuple[str, str, int, Transport]


class Pool:
    """Idle kept-alive connections of this process, by endpoint; thread-safe."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._idle: dict[_Key, list[Connection]] = {}
        self._lock = threading.Lock()

    def take(self, key: _Key) -> Connection:
        while True:
            with self._lock:
                idle = self._idle.get(key)
                connection = idle.pop() if idle else None
            if connection is None:
                scheme, host, port, transport = key
                return (TLSConnection if scheme == "https" else Connection)(host, port, transport)
            if not connection.dropped():
                return connection
            connection.close()

    def give(self, key: _Key, connection: Connection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < MAX_IDLE:
                idle.append(connection)
                return
        connection.close()

    def clear(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()


_current: Pool | None = None
_current_lock = threading.Lock()


def pool() -> Pool:
    """This process's pool (a forked child makes its own; its parent's sockets stay the parent's)."""
    global _current
    with _current_lock:
        if _current is None or _current.pid != os.getpid():
            _current = Pool()
        return _current


def close_idle() -> None:
    """Close this process's idle connections."""
    pool().clear()
