"""Sending a part's bytes without copying them through Python: os.sendfile over plain HTTP,
one reused buffer over TLS, on kept-alive connections (a small pool per process and endpoint).

botocore still builds, signs and parses every request. `attach(client)` hands part bodies
over at the client's `before-send` event, which botocore documents for this: the request
is serialized and signed by then (header SigV4 with UNSIGNED-PAYLOAD, the
x-amz-checksum-crc32c header, Content-Length), and the response the handler returns
"fulfills the request": botocore parses it, so S3's errors are its ClientErrors, the ETag
and ChecksumCRC32C are read as before, and its retry handler sees the same exceptions as
from its own transport (ours raises botocore's: EndpointConnectionError,
ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError, SSLError; s3.classify sorts
them as before). A presigned URL (signer.put) goes through `put_url`: no signing needed.

Why: http.client sends a file-like body in 128 KiB reads, each a new bytes object copied
again into the kernel. With os.sendfile a worker's UploadPart over plain HTTP cost 0.30 s
of client CPU per GiB instead of 0.49 (bench/bytepath.py, bench/results/README.md). Over
TLS the bytes must pass through user space: they are read (os.preadv) into one buffer of
connections.TLS_BUFFER bytes per part in flight and written from it with sendall; that
measured the same as botocore's sending (0.74 s/GiB: encryption and the kernel dominate),
and is kept for one transport for both schemes and for presigned URLs (pooling, 100
Continue, errors as botocore's).

Taken over: requests whose body is a reader.RangeReader, to an http or https URL.
botocore sends the rest as before (each choice is logged once per endpoint and process):
another body, a proxy configured for the endpoint (the client's config or the
environment, as botocore resolves them), a client certificate.

TLS verification follows the AWS configuration as botocore's does: AWS_CA_BUNDLE (or
`ca_bundle` in the config file), else botocore's bundle (certifi) for clients, and the
system's trust store for presigned URLs (urllib3's default, which that path used before).

The connections, their pool and the bytes on the wire: workers/connections.py.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
import os
import threading
import urllib.parse
import weakref
from typing import Any

import botocore.awsrequest
import botocore.httpsession
import botocore.session
import botocore.utils

from workers import connections, reader
from workers.connections import Answer, Transport

log = logging.getLogger(__name__)

#: A presigned PUT of at least this many bytes asks for `100 Continue` (an expired URL is
#: refused before its body is sent).
EXPECT_FROM = 1024 * 1024


class Route(enum.Enum):
    SENDFILE = "os.sendfile"
    BUFFER = f"TLS, through one reused {connections.TLS_BUFFER // 1024} KiB buffer"
    BOTOCORE = "botocore's own sending"


# --- botocore's side ----------------------------------------------------------------------

OPERATIONS = ("UploadPart", "PutObject")
_attached: weakref.WeakKeyDictionary[Any, _ClientPlan] = weakref.WeakKeyDictionary()
_attached_lock = threading.Lock()


def attach(client: Any) -> None:
    """Send this S3 client's part bodies (UploadPart and PutObject with a RangeReader body)
    with this module. Idempotent: one handler per client and operation."""
    with _attached_lock:
        if client in _attached:
            return
        config = client.meta.config
        plan = _ClientPlan(
            Transport(float(config.connect_timeout), float(config.read_timeout), _client_cafile(),
                      bool(config.tcp_keepalive)),
            _proxies(config, client.meta.endpoint_url), bool(config.client_cert))
        for operation in OPERATIONS:
            client.meta.events.register(f"before-send.s3.{operation}", plan.before_send,
                                        unique_id=f"s3ferry-sender-{operation}")
        _attached[client] = plan


@dataclasses.dataclass
class _ClientPlan:
    transport: Transport
    proxies: dict[str, str]
    client_cert: bool

    def route(self, url: str) -> tuple[Route, str]:
        scheme = urllib.parse.urlsplit(url).scheme
        if self.client_cert:
            return Route.BOTOCORE, "a client certificate is configured"
        if self.proxies.get(scheme):
            return Route.BOTOCORE, f"a proxy is configured for {scheme}"
        return _by_scheme(scheme)

    def before_send(self, request: botocore.awsrequest.AWSPreparedRequest, **_: object) -> object:
        """botocore's `before-send`: None (botocore sends it) or the AWSResponse for its request."""
        body = request.body
        if not isinstance(body, reader.RangeReader):
            return None
        route, why = self.route(request.url)
        _announce(request.url, route, why)
        if route is Route.BOTOCORE:
            return None
        answer = connections.send(request.method, request.url, request.headers.items(), body, self.transport, request.url)
        return botocore.awsrequest.AWSResponse(request.url, answer.status, answer.headers, _Raw(answer.data))


class _Raw:
    """The raw response botocore reads a non-streaming answer from."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: object):  # type: ignore[no-untyped-def]
        yield self._data


def _proxies(config: Any, endpoint_url: str) -> dict[str, str]:
    """The proxies botocore's endpoint uses: the client's config, else the environment's for it."""
    if config.proxies is not None:
        return dict(config.proxies)
    return dict(botocore.utils.get_environ_proxies(endpoint_url))


def _client_cafile() -> str:
    """The CA bundle a client made by s3.make_client verifies with (botocore: `ca_bundle`, else its own)."""
    return botocore.httpsession.get_cert_path(_configured_ca_bundle() or True)


def _configured_ca_bundle() -> str | None:
    """AWS_CA_BUNDLE, or `ca_bundle` of the AWS config file's profile (read once per setting:
    a botocore session costs milliseconds)."""
    return _ca_bundle_for(*(os.environ.get(name) for name in _CA_SETTINGS))


#: What decides the CA bundle botocore uses.
_CA_SETTINGS = ("AWS_CA_BUNDLE", "AWS_CONFIG_FILE", "AWS_PROFILE", "AWS_DEFAULT_PROFILE")


@functools.lru_cache(maxsize=8)
def _ca_bundle_for(*_: str | None) -> str | None:
    bundle = botocore.session.get_session().get_config_variable("ca_bundle")
    return str(bundle) if bundle else None


def _by_scheme(scheme: str) -> tuple[Route, str]:
    if scheme == "http":
        return Route.SENDFILE, "plain HTTP"
    if scheme == "https":
        return Route.BUFFER, "TLS: os.sendfile cannot encrypt"
    return Route.BOTOCORE, f"scheme {scheme!r}"


_announced: set[tuple[int, str, Route]] = set()
_announced_lock = threading.Lock()


def _announce(url: str, route: Route, why: str) -> None:
    """Log once per process and endpoint how part bodies go out to it."""
    parts = urllib.parse.urlsplit(url)
    endpoint = f"{parts.scheme}://{parts.netloc}"
    key = (os.getpid(), endpoint, route)
    with _announced_lock:
        if key in _announced:
            return
        _announced.add(key)
    log.info("part bodies to %s go out with %s (%s)", endpoint, route.value, why)


# --- presigned URLs -------------------------------------------------------------------------

def takes(body: object) -> bool:
    """Whether `put_url` can send this body."""
    return isinstance(body, reader.RangeReader)


def put_url(url: str, headers: dict[str, str], body: reader.RangeReader) -> Answer:
    """PUT the body to a presigned URL with the signer's headers. Transport errors are botocore's
    exceptions, naming the URL without its query (the signature)."""
    parts = urllib.parse.urlsplit(url)
    route, why = _by_scheme(parts.scheme)
    _announce(url, route, f"presigned; {why}")
    if route is Route.BOTOCORE:
        raise ValueError(f"cannot send to a {parts.scheme!r} URL")
    sent = dict(headers)
    if len(body) >= EXPECT_FROM and not any(name.lower() == "expect" for name in sent):
        sent["Expect"] = "100-continue"
    shown = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    return connections.send("PUT", url, sent.items(), body, _presigned_transport(), shown)


def _presigned_transport() -> Transport:
    return _transport_for(_configured_ca_bundle())


@functools.lru_cache(maxsize=8)
def _transport_for(cafile: str | None) -> Transport:
    return Transport(cafile=cafile)


def close_idle() -> None:
    """Close this process's idle connections."""
    connections.close_idle()
