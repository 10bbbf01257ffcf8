"""The byte path (workers/sender.py) against moto's server, the fault proxies and a TLS endpoint.

botocore builds, signs and parses; the sender puts the part's bytes on the wire (os.sendfile
over http, one reused buffer over https) on kept-alive connections. What it must keep: the
bytes exactly, the classification of every failure (a reset, S3's error XML, a source that
shrinks), and connections that the server closed while they waited in the pool.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import ipaddress
import logging
import os
import ssl
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import botocore.config
import botocore.exceptions
import crc32c
import pytest
import sqlalchemy as sa

from models import queries
from models.db import Database
from models.settings import Settings
from models.states import PartStatus, UploadStatus
from models.tables import Upload
from orchestrator import submit
from tests.conftest import sha256_of_object, write_random
from tests.faults import FlakyProxy
from tests.http_faults import FaultProxy
from tests.integration.helpers import MiB
from workers import completion, connections, parts, reader, s3, sender, signer
from workers.s3 import TransientS3Error
from workers.runtime import Runtime

pytestmark = pytest.mark.integration


# --- fixtures and helpers ---------------------------------------------------------------------

@pytest.fixture
def rt(service_env: dict[str, str], db: Database) -> Runtime:
    # a queue of its own: the session worker's recovery pass leaves these uploads to the test
    return Runtime(settings=dataclasses.replace(Settings.from_env(), queue=f"sender-{uuid.uuid4().hex[:6]}"), db=db)


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    """The HTTP fault proxy: keeps client connections alive (moto's server closes each one)."""
    fault_proxy = FaultProxy(s3_endpoint)
    yield fault_proxy
    fault_proxy.close()


@dataclasses.dataclass
class Calls:
    sendfile: int = 0
    readinto: int = 0
    read: int = 0


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    """How part bodies were read: sendfile (the sender, http), readinto (the sender over TLS, and
    the CRC32C pass), read (botocore's own sending)."""
    seen = Calls()
    for name in ("sendfile", "readinto", "read"):
        original = getattr(reader.RangeReader, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):  # type: ignore[no-untyped-def]
            setattr(seen, _name, getattr(seen, _name) + 1)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(reader.RangeReader, name, counted)
    return seen


@pytest.fixture(autouse=True)
def fresh_pool() -> Iterator[None]:
    sender.close_idle()
    yield
    sender.close_idle()


def prepare(rt: Runtime, path: Path, bucket: str, size: int, part_size: int = 5 * MiB,
            max_retries: int | None = None) -> submit.Submitted:
    write_random(path, size)
    request = submit.validate(rt.settings, str(path), f"s3://{bucket}/{path.name}", part_size)
    return submit.prepare(rt.settings, rt.db, request, max_retries=max_retries)


def bind(rt: Runtime, upload_id: uuid.UUID, endpoint: str) -> Runtime:
    """Point the upload at `endpoint`; a worker whose policy allows it (S3FERRY_ENDPOINTS)."""
    with rt.db.transaction() as session:
        session.execute(sa.update(Upload).where(Upload.id == upload_id).values(endpoint_url=endpoint))
    return Runtime(settings=dataclasses.replace(rt.settings, endpoints=endpoint), db=rt.db)


def state(db: Database, upload_id: uuid.UUID):  # type: ignore[no-untyped-def]
    with db.transaction() as session:
        return queries.get_upload(session, upload_id), queries.parts(session, upload_id)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def crc(data: bytes) -> str:
    return base64.b64encode(crc32c.crc32c(data).to_bytes(4, "big")).decode()


def send_every_part(rt: Runtime, upload_id: uuid.UUID) -> list[dict[str, object]]:
    _, rows = state(rt.db, upload_id)
    return [parts.send_part(rt, upload_id, row.part_number).as_dict() for row in rows]


def client(endpoint: str, **config: object):  # type: ignore[no-untyped-def]
    """A worker's client (s3.client_config) for `endpoint`, with the sender attached."""
    made = boto3.session.Session().client("s3", endpoint_url=endpoint,
                                          config=s3.client_config(1).merge(botocore.config.Config(**config)))
    sender.attach(made)
    return made


def put_parts(control, worker, bucket: str, key: str, path: Path, sizes: list[int]) -> None:  # type: ignore[no-untyped-def]
    """UploadPart for each size in turn (from the start of `path`) through `worker`; the upload
    created and completed through `control`."""
    upload_id = control.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    landed, offset = [], 0
    for number, size in enumerate(sizes, 1):
        with reader.RangeReader(path, offset, size) as body:
            answer = worker.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body,
                                        ContentLength=size, ChecksumCRC32C=reader.crc32c_of(body))
        landed.append({"PartNumber": number, "ETag": answer["ETag"]})
        offset += size
    control.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": landed})


# --- the bytes land exactly --------------------------------------------------------------------

@pytest.mark.parametrize(("size", "part_size"), [(0, 5 * MiB), (1, 5 * MiB), (2 * (5 * MiB + 1) + 1, 5 * MiB + 1),
                                                 (12 * MiB + 3, 5 * MiB)],
                         ids=["empty", "one byte", "5MiB+1 twice then 1 byte", "5MiB 5MiB 2MiB+3"])
def test_parts_of_several_sizes_land_exactly(rt: Runtime, s3, bucket: str, tmp_path: Path, calls: Calls,  # type: ignore[no-untyped-def]
                                             size: int, part_size: int) -> None:
    path = tmp_path / "exact.bin"
    up = prepare(rt, path, bucket, size, part_size)
    collected = send_every_part(rt, up.upload_id)

    assert completion.complete(rt, up.upload_id, collected) == UploadStatus.COMPLETE
    assert sha256_of_object(s3, bucket, path.name) == sha256(path)
    assert calls.sendfile == len(collected) and calls.read == 0  # the sender's path, not botocore's


def test_presigned_urls_go_through_the_sender(s3, bucket: str, tmp_path: Path, calls: Calls) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "presigned.bin"
    write_random(path, 5 * MiB + 2)
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key="p")["UploadId"]
    landed, offset = [], 0
    for number, size in enumerate([5 * MiB + 1, 1], 1):
        with reader.RangeReader(path, offset, size) as body:
            checksum = reader.crc32c_of(body)
            url = s3.generate_presigned_url("upload_part", Params={
                "Bucket": bucket, "Key": "p", "UploadId": upload_id, "PartNumber": number, "ContentLength": size,
                "ChecksumCRC32C": checksum}, ExpiresIn=60)
            answer = signer.put(signer.Presigned(url, {"Content-Length": str(size),
                                                       "x-amz-checksum-crc32c": checksum}), body)
        landed.append({"PartNumber": number, "ETag": answer["ETag"]})
        offset += size
    s3.complete_multipart_upload(Bucket=bucket, Key="p", UploadId=upload_id, MultipartUpload={"Parts": landed})

    assert sha256_of_object(s3, bucket, "p") == sha256(path)
    assert calls.sendfile == 2 and calls.read == 0


# --- failures are classified as before -----------------------------------------------------------

def test_a_reset_mid_body_is_a_counted_transient_error(rt: Runtime, proxy: FaultProxy, bucket: str,
                                                       tmp_path: Path) -> None:
    up = prepare(rt, tmp_path / "reset.bin", bucket, 6 * MiB, max_retries=3)
    flaky = bind(rt, up.upload_id, proxy.url)
    proxy.configure(reset_share=1.0)

    with pytest.raises(parts.RetryLater) as later:
        parts.send_part(flaky, up.upload_id, 1)

    assert later.value.seconds and proxy.counts.resets >= 1
    upload, rows = state(rt.db, up.upload_id)
    assert (rows[0].status, rows[0].attempts, upload.retry_count) == (PartStatus.PENDING, 1, 1)
    assert upload.last_error.startswith("ConnectionClosedError: Connection was closed before we received")
    proxy.configure()
    assert parts.send_part(flaky, up.upload_id, 1).etag  # and then it lands


def test_slowdown_is_a_counted_transient_error_refused_before_the_body(  # type: ignore[no-untyped-def]
        rt: Runtime, proxy: FaultProxy, bucket: str, tmp_path: Path) -> None:
    up = prepare(rt, tmp_path / "slow.bin", bucket, 6 * MiB, max_retries=3)
    throttled = bind(rt, up.upload_id, proxy.url)
    proxy.configure(slowdown_share=1.0)

    with pytest.raises(parts.RetryLater):
        parts.send_part(throttled, up.upload_id, 1)

    upload, rows = state(rt.db, up.upload_id)
    assert (rows[0].status, rows[0].attempts) == (PartStatus.PENDING, 1)
    assert upload.last_error == "SlowDown: Please reduce your request rate."
    assert proxy.counts.slowdowns == 1 and proxy.counts.body_bytes == 0  # Expect: 100-continue, honoured


def test_slowdown_through_a_presigned_url_is_congestion(proxy: FaultProxy, s3, bucket: str,  # type: ignore[no-untyped-def]
                                                        tmp_path: Path) -> None:
    path = tmp_path / "slow-presigned.bin"
    write_random(path, 2 * MiB)
    via_proxy = presigned_put(s3, bucket, "k", proxy.url)
    proxy.configure(slowdown_share=1.0)
    with reader.RangeReader(path, 0, 2 * MiB) as body, pytest.raises(TransientS3Error) as raised:
        signer.put(signer.Presigned(via_proxy, {"Content-Length": str(2 * MiB)}), body)
    assert raised.value.congestion and str(raised.value) == "SlowDown: Please reduce your request rate."
    assert proxy.counts.body_bytes == 0


NO_SUCH_UPLOAD = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NoSuchUpload</Code><Message>The specified '
                  b"upload does not exist.</Message><UploadId>x</UploadId></Error>")


@pytest.fixture
def no_such_upload() -> Iterator[tuple[str, list[dict[str, object]]]]:
    """An endpoint that answers every PUT 404 NoSuchUpload after reading its body; what it received."""
    received: list[dict[str, object]] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_PUT(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"headers": dict(self.headers.items()), "body": body, "path": self.path})
            self.send_response(404)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(NO_SUCH_UPLOAD)))
            self.end_headers()
            self.wfile.write(NO_SUCH_UPLOAD)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()


def test_no_such_upload_fails_the_upload_with_s3s_message(rt: Runtime, bucket: str, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                           no_such_upload) -> None:
    endpoint, received = no_such_upload
    path = tmp_path / "gone.bin"
    up = prepare(rt, path, bucket, 6 * MiB)
    gone = bind(rt, up.upload_id, endpoint)

    with pytest.raises(parts.PartFailed, match="NoSuchUpload"):
        parts.send_part(gone, up.upload_id, 1)

    upload, rows = state(rt.db, up.upload_id)
    assert upload.status == UploadStatus.FAILED and rows[0].status == PartStatus.FAILED
    assert upload.last_error == "part 1: NoSuchUpload: The specified upload does not exist."
    # built and signed by botocore: header SigV4 over an unsigned payload, our CRC32C; the bytes exact
    [request] = received
    headers = {name.lower(): value for name, value in request["headers"].items()}  # type: ignore[union-attr]
    data = path.read_bytes()[:5 * MiB]
    assert headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=testing/")
    assert headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    assert headers["x-amz-checksum-crc32c"] == crc(data)
    assert headers["content-length"] == str(5 * MiB) and headers["host"] == urllib.parse.urlsplit(endpoint).netloc
    assert request["body"] == data
    assert f"uploadId={up.s3_upload_id}" in str(request["path"]) and "partNumber=1" in str(request["path"])


def test_a_source_that_shrinks_mid_send_is_a_read_error(rt: Runtime, proxy: FaultProxy, bucket: str,  # type: ignore[no-untyped-def]
                                                        tmp_path: Path) -> None:
    """Cut while its bytes are on their way: the source's error, not the link's (no congestion, no retry)."""
    path = tmp_path / "shrinks.bin"
    up = prepare(rt, path, bucket, 48 * MiB, part_size=48 * MiB)
    slow = bind(rt, up.upload_id, proxy.url)
    proxy.configure(bytes_per_second=8 * MiB)  # about 6 s for the part: it is cut half a second in
    cutter = threading.Timer(0.5, lambda: os.truncate(path, 1 * MiB))
    cutter.start()
    try:
        with pytest.raises(parts.PartFailed, match="reading the source failed: source ended early"):
            parts.send_part(slow, up.upload_id, 1)
    finally:
        cutter.cancel()
    upload, rows = state(rt.db, up.upload_id)
    assert (upload.status, rows[0].status, upload.retry_count) == (UploadStatus.FAILED, PartStatus.FAILED, 0)
    assert 0 < proxy.counts.body_bytes < 48 * MiB


# --- kept-alive connections ------------------------------------------------------------------------

@pytest.fixture
def chain(proxy: FaultProxy) -> Iterator[FlakyProxy]:
    """A TCP proxy in front of the keep-alive fault proxy: it can cut the connections it carries."""
    upstream = urllib.parse.urlsplit(proxy.url)
    tcp = FlakyProxy(upstream.hostname or "127.0.0.1", upstream.port or 80)
    yield tcp
    tcp.close()


def test_a_kept_alive_connection_is_reused_and_reopened_after_the_server_closed_it(  # type: ignore[no-untyped-def]
        chain: FlakyProxy, s3, bucket: str, tmp_path: Path) -> None:
    path = tmp_path / "alive.bin"
    write_random(path, 20 * MiB)
    worker = client(chain.url)
    put_parts(s3, worker, bucket, "alive", path, [5 * MiB, 5 * MiB, 1])
    assert chain.connections == 1  # three parts, one connection

    chain.down()  # the server side closes every open connection between parts
    chain.up()
    put_parts(s3, worker, bucket, "alive2", path, [5 * MiB, 7])
    assert chain.connections == 2  # noticed while idle, reopened once

    assert sha256_of_object(s3, bucket, "alive2") == hashlib.sha256(path.read_bytes()[:5 * MiB + 7]).hexdigest()


def test_a_connection_closed_just_as_it_is_reused_is_sent_again_on_a_new_one(  # type: ignore[no-untyped-def]
        chain: FlakyProxy, s3, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "race.bin"
    write_random(path, 6 * MiB)
    with reader.RangeReader(path, 0, 6 * MiB) as body:
        checksum = reader.crc32c_of(body)
        sender.put_url(presigned_put(s3, bucket, "first", chain.url), {"Content-Length": str(6 * MiB)}, body)
        assert chain.connections == 1
        chain.down()
        chain.up()
        monkeypatch.setattr(connections.Connection, "dropped", lambda self: False)  # the close is not seen in time
        answer = sender.put_url(presigned_put(s3, bucket, "second", chain.url),
                                {"Content-Length": str(6 * MiB), "x-amz-checksum-crc32c": checksum}, body)
    assert answer.status == 200 and chain.connections == 2
    assert sha256_of_object(s3, bucket, "second") == sha256(path)


def presigned_put(s3, bucket: str, key: str, endpoint: str) -> str:  # type: ignore[no-untyped-def]
    """A presigned PutObject URL, sent to `endpoint` instead of moto's (moto does not check signatures)."""
    url = urllib.parse.urlsplit(s3.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": key},
                                                          ExpiresIn=60))
    target = urllib.parse.urlsplit(endpoint)
    return urllib.parse.urlunsplit(url._replace(scheme=target.scheme, netloc=target.netloc))


def test_threads_share_the_pool(proxy: FaultProxy, s3, bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "threads.bin"
    write_random(path, 6 * 5 * MiB)
    worker = client(proxy.url)
    upload_id = worker.create_multipart_upload(Bucket=bucket, Key="t")["UploadId"]
    etags: dict[int, str] = {}

    def one(number: int) -> None:
        with reader.RangeReader(path, (number - 1) * 5 * MiB, 5 * MiB) as body:
            etags[number] = worker.upload_part(Bucket=bucket, Key="t", UploadId=upload_id, PartNumber=number,
                                               Body=body, ContentLength=5 * MiB)["ETag"]

    for _ in range(2):  # twice: the second round on the connections the first left in the pool
        threads = [threading.Thread(target=one, args=(n,)) for n in range(1, 7)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    worker.complete_multipart_upload(Bucket=bucket, Key="t", UploadId=upload_id, MultipartUpload={
        "Parts": [{"PartNumber": n, "ETag": etags[n]} for n in range(1, 7)]})
    assert sha256_of_object(s3, bucket, "t") == sha256(path)
    assert proxy.counts.requests == 14


def test_a_forked_child_opens_connections_of_its_own(proxy: FaultProxy, s3, bucket: str,  # type: ignore[no-untyped-def]
                                                     tmp_path: Path) -> None:
    path = tmp_path / "fork.bin"
    write_random(path, 1000)
    with reader.RangeReader(path, 0, 1000) as body:
        sender.put_url(presigned_put(s3, bucket, "parent", proxy.url), {"Content-Length": "1000"}, body)
    url = presigned_put(s3, bucket, "child", proxy.url)
    inherited = [c for idle in connections.pool()._idle.values() for c in idle]
    assert len(inherited) == 1
    pid = os.fork()
    if pid == 0:  # the child: none of its parent's connections; it sends on one of its own
        status = 1
        try:
            fresh = [c for idle in connections.pool()._idle.values() for c in idle]
            with reader.RangeReader(path, 0, 1000) as body:
                answer = sender.put_url(url, {"Content-Length": "1000"}, body)
            status = 0 if not fresh and answer.status == 200 else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with reader.RangeReader(path, 0, 1000) as body:  # the parent's connection is still its own
        assert sender.put_url(presigned_put(s3, bucket, "again", proxy.url), {"Content-Length": "1000"},
                              body).status == 200
    assert [c for idle in connections.pool()._idle.values() for c in idle] == inherited


# --- the fallback: what the sender does not take over ----------------------------------------------

def test_a_configured_proxy_leaves_sending_to_botocore_and_says_so(  # type: ignore[no-untyped-def]
        proxy: FaultProxy, s3_endpoint: str, s3, bucket: str, tmp_path: Path, calls: Calls,
        caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "proxied.bin"
    write_random(path, 1000)
    worker = client(s3_endpoint, proxies={"http": proxy.url})
    with caplog.at_level(logging.INFO, logger="workers.sender"), reader.RangeReader(path, 0, 1000) as body:
        for _ in range(2):
            body.seek(0)  # (botocore sends from where the body stands)
            worker.put_object(Bucket=bucket, Key="proxied", Body=body, ContentLength=1000)
    assert proxy.counts.requests == 2 and calls.sendfile == 0 and calls.read > 0
    said = [r.getMessage() for r in caplog.records if "go out with" in r.getMessage()]
    assert said == [f"part bodies to {s3_endpoint} go out with botocore's own sending (a proxy is configured for "
                    "http)"]  # once
    assert sha256_of_object(s3, bucket, "proxied") == sha256(path)


def test_another_body_is_sent_by_botocore(s3_endpoint: str, s3, bucket: str) -> None:  # type: ignore[no-untyped-def]
    client(s3_endpoint).put_object(Bucket=bucket, Key="bytes", Body=b"plain bytes")
    assert s3.get_object(Bucket=bucket, Key="bytes")["Body"].read() == b"plain bytes"


# --- TLS ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and localhost: (certificate file, key file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "s3ferry test")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


@pytest.fixture
def tls(s3_endpoint: str, certificate: tuple[str, str]) -> Iterator[tuple[FaultProxy, str]]:
    """The fault proxy in front of moto, serving https with the test's certificate: (proxy, its URL)."""
    fault_proxy = FaultProxy(s3_endpoint)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    fault_proxy.server.socket = context.wrap_socket(fault_proxy.server.socket, server_side=True)
    yield fault_proxy, f"https://127.0.0.1:{fault_proxy.server.server_address[1]}"
    fault_proxy.close()


def test_an_upload_over_tls_lands_exactly(rt: Runtime, tls: tuple[FaultProxy, str], s3, bucket: str,  # type: ignore[no-untyped-def]
                                          tmp_path: Path, calls: Calls, certificate: tuple[str, str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_CA_BUNDLE", certificate[0])
    proxy, url = tls
    path = tmp_path / "tls.bin"
    up = prepare(rt, path, bucket, 2 * (5 * MiB + 1) + 1, part_size=5 * MiB + 1)
    secure = bind(rt, up.upload_id, url)

    collected = send_every_part(secure, up.upload_id)
    assert proxy.counts.body_bytes == path.stat().st_size
    assert completion.complete(secure, up.upload_id, collected) == UploadStatus.COMPLETE  # (botocore, over TLS)

    assert sha256_of_object(s3, bucket, path.name) == sha256(path)
    assert calls.sendfile == 0 and calls.read == 0  # the reused buffer (readinto), not botocore's reads


def test_tls_is_verified(tls: tuple[FaultProxy, str], s3, bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Without the certificate in AWS_CA_BUNDLE the endpoint is not trusted (botocore's SSLError)."""
    proxy, url = tls
    path = tmp_path / "untrusted.bin"
    write_random(path, 10)
    with reader.RangeReader(path, 0, 10) as body, pytest.raises(TransientS3Error,
                                                                  match="SSL validation failed"):
        signer.put(signer.Presigned(presigned_put(s3, bucket, "k", url), {"Content-Length": "10"}), body)
    assert proxy.counts.requests == 0


def test_a_source_that_shrinks_mid_send_over_tls_is_a_read_error(  # type: ignore[no-untyped-def]
        rt: Runtime, tls: tuple[FaultProxy, str], bucket: str, tmp_path: Path, certificate: tuple[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_CA_BUNDLE", certificate[0])
    proxy, url = tls
    path = tmp_path / "shrinks-tls.bin"
    up = prepare(rt, path, bucket, 48 * MiB, part_size=48 * MiB)
    slow = bind(rt, up.upload_id, url)
    proxy.configure(bytes_per_second=8 * MiB)
    cutter = threading.Timer(0.5, lambda: os.truncate(path, 1 * MiB))
    cutter.start()
    try:
        with pytest.raises(parts.PartFailed, match="reading the source failed: source ended early"):
            parts.send_part(slow, up.upload_id, 1)
    finally:
        cutter.cancel()
    upload, _ = state(rt.db, up.upload_id)
    assert upload.status == UploadStatus.FAILED and upload.retry_count == 0
