"""A minimal S3-compatible endpoint that accepts and discards bytes while computing their MD5
(and CRC32C), for benchmarks where the server must not be the bottleneck or fill up: the
10,000-part scale run and the orchestration overhead run.

It speaks just enough S3 for s3ferry, boto3, the AWS CLI, rclone, s5cmd and the AWS CRT
client: HeadBucket, CreateMultipartUpload, UploadPart, ListParts, CompleteMultipartUpload (the
multipart ETag computed from the parts' MD5s), AbortMultipartUpload, ListMultipartUploads,
PutObject, HeadObject. Bodies sent with `Content-Encoding: aws-chunked` (botocore over https,
the CRT client: checksums in a trailer) or `Transfer-Encoding: chunked` are decoded. It counts
requests by operation (GET /_stats).

--no-hash: no MD5 or CRC32C of the bytes (a stand-in for S3 whose own CPU is the socket
reads): each part's ETag is the MD5 of its upload id and number, and the CRC32C a client sent
is echoed back. --certfile/--keyfile: https.

    python bench/discard_s3.py --port 9100 [--no-hash] [--certfile cert.pem --keyfile key.pem]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import ssl
import threading
import urllib.parse
import uuid
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import crc32c

CHUNK = 1024 * 1024


class State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.uploads: dict[str, dict[int, tuple[str, int]]] = {}  # upload id -> part -> (md5 hex, size)
        self.objects: dict[tuple[str, str], tuple[str, int]] = {}  # (bucket, key) -> (etag, size)
        self.requests: dict[str, int] = {}
        self.bytes = 0

    def count(self, operation: str, size: int = 0) -> None:
        with self.lock:
            self.requests[operation] = self.requests.get(operation, 0) + 1
            self.bytes += size


STATE = State()
HASH = True  # --no-hash sets it False


class _Sink:
    """Where a body's bytes go: MD5 and CRC32C (or nothing), counted."""

    def __init__(self, hashing: bool) -> None:
        self.hashing = hashing
        self.md5, self.crc, self.size = hashlib.md5(), 0, 0
        self.buffer = memoryview(bytearray(CHUNK))
        self.trailers: dict[str, str] = {}

    def copy(self, source, left: int | None) -> None:  # type: ignore[no-untyped-def]
        """`left` bytes from `source` (None: to its end)."""
        while left is None or left:
            got = source.readinto(self.buffer[:CHUNK if left is None else min(CHUNK, left)])
            if not got:
                if left is None:
                    return
                raise ConnectionError("the body ended early")
            if self.hashing:
                chunk = self.buffer[:got]
                self.md5.update(chunk)
                self.crc = crc32c.crc32c(chunk, self.crc)
            self.size += got
            if left is not None:
                left -= got


class _Dechunked:
    """A `Transfer-Encoding: chunked` body, read as the bytes it carries (readinto, readline)."""

    def __init__(self, raw) -> None:  # type: ignore[no-untyped-def]
        self.raw, self.left, self.done = raw, 0, False

    def _next(self) -> bool:
        """Make sure the current chunk has bytes left; False at the end of the body."""
        while not self.done and self.left == 0:
            line = self.raw.readline(4096)
            self.left = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if self.left == 0:
                self.done = True
                while self.raw.readline(4096).strip():  # trailers, to the empty line
                    pass
        return not self.done

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        if not self._next():
            return 0
        got = self.raw.readinto(buffer[:min(len(buffer), self.left)])
        if not got:
            raise ConnectionError("the body ended early")
        self.left -= got
        if self.left == 0:
            self.raw.readline(8)  # the CRLF after the chunk's data
        return got

    def readline(self, limit: int) -> bytes:
        line = b""
        while len(line) < limit and not line.endswith(b"\n") and self._next():
            part = self.raw.readline(min(limit - len(line), self.left))
            if not part:
                raise ConnectionError("the body ended early")
            self.left -= len(part)
            if self.left == 0:
                self.raw.readline(8)
            line += part
        return line


def _aws_chunked(stream, sink: _Sink, encoded: int | None) -> None:  # type: ignore[no-untyped-def]
    """aws-chunked: `SIZE[;chunk-signature=…]` CRLF data CRLF …, `0` CRLF, then trailer lines
    (x-amz-checksum-…) and an empty line; `encoded`: the body's length if known."""
    read = 0
    while True:
        line = stream.readline(4096)
        read += len(line)
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            break
        sink.copy(stream, size)
        read += size + len(stream.readline(8))  # the CRLF after the data
    while encoded is None or read < encoded:  # trailers, to the empty line
        line = stream.readline(4096)
        read += len(line)
        if not line.strip():
            break
        name, _, value = line.decode("latin-1").partition(":")
        sink.trailers[name.strip().lower()] = value.strip()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *_: object) -> None:  # quiet
        pass

    def _split(self) -> tuple[str, str, dict[str, list[str]]]:
        parsed = urllib.parse.urlsplit(self.path)
        parts = parsed.path.lstrip("/").split("/", 1)
        bucket = urllib.parse.unquote(parts[0])
        key = urllib.parse.unquote(parts[1]) if len(parts) > 1 else ""
        return bucket, key, urllib.parse.parse_qs(parsed.query, keep_blank_values=True)

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        if body:
            self.send_header("Content-Type", "application/xml")
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _drain(self) -> tuple[str, str, int]:
        """Read the body: (MD5 hex, CRC32C base64, size of the decoded bytes)."""
        sink = _Sink(HASH)
        stream, length = self.rfile, int(self.headers.get("Content-Length", "0"))
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            stream, length = _Dechunked(self.rfile), None  # type: ignore[assignment]
        if "aws-chunked" in self.headers.get("Content-Encoding", "") or \
                self.headers.get("x-amz-content-sha256", "").startswith("STREAMING-"):
            _aws_chunked(stream, sink, length)
        else:
            sink.copy(stream, length)
        if HASH:
            return sink.md5.hexdigest(), base64.b64encode(sink.crc.to_bytes(4, "big")).decode(), sink.size
        return "", self.headers.get("x-amz-checksum-crc32c") or sink.trailers.get("x-amz-checksum-crc32c", ""), \
            sink.size

    def do_GET(self) -> None:  # noqa: N802
        bucket, key, query = self._split()
        if bucket == "_stats":
            with STATE.lock:
                body = json.dumps({"requests": STATE.requests, "bytes": STATE.bytes}).encode()
            return self._reply(200, body)
        if not key and "uploads" in query:
            STATE.count("ListMultipartUploads")
            return self._reply(200, f"<ListMultipartUploadsResult><Bucket>{bucket}</Bucket><IsTruncated>false"
                                    "</IsTruncated></ListMultipartUploadsResult>".encode())
        if "uploadId" in query:
            STATE.count("ListParts")
            with STATE.lock:
                parts = dict(STATE.uploads.get(query["uploadId"][0], {}))
            items = "".join(f"<Part><PartNumber>{n}</PartNumber><ETag>\"{md5}\"</ETag><Size>{size}</Size></Part>"
                            for n, (md5, size) in sorted(parts.items()))
            return self._reply(200, f"<ListPartsResult><Bucket>{bucket}</Bucket><Key>{key}</Key>"
                                    f"<IsTruncated>false</IsTruncated>{items}</ListPartsResult>".encode())
        STATE.count("GetObject")
        self._reply(404, b"<Error><Code>NoSuchKey</Code></Error>")

    def do_HEAD(self) -> None:  # noqa: N802
        bucket, key, _ = self._split()
        if not key:
            STATE.count("HeadBucket")
            return self._reply(200)
        STATE.count("HeadObject")
        with STATE.lock:
            found = STATE.objects.get((bucket, key))
        if found is None:
            return self._reply(404)
        etag, size = found
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", formatdate(usegmt=True))
        self.end_headers()

    def do_PUT(self) -> None:  # noqa: N802
        bucket, key, query = self._split()
        md5, crc, size = self._drain()
        if not md5:  # --no-hash
            md5 = hashlib.md5(f"{query.get('uploadId', [key])[0]}/{query.get('partNumber', [0])[0]}".encode()).hexdigest()
        headers = {"ETag": f'"{md5}"', **({"x-amz-checksum-crc32c": crc} if crc else {})}
        if "partNumber" in query:
            STATE.count("UploadPart", size)
            with STATE.lock:
                STATE.uploads.setdefault(query["uploadId"][0], {})[int(query["partNumber"][0])] = (md5, size)
            return self._reply(200, headers=headers)
        if not key:
            STATE.count("CreateBucket")
            return self._reply(200)
        STATE.count("PutObject", size)
        with STATE.lock:
            STATE.objects[(bucket, key)] = (f'"{md5}"', size)
        self._reply(200, headers=headers)

    def do_POST(self) -> None:  # noqa: N802
        bucket, key, query = self._split()
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if "uploads" in query:
            STATE.count("CreateMultipartUpload")
            upload_id = uuid.uuid4().hex
            with STATE.lock:
                STATE.uploads[upload_id] = {}
            return self._reply(200, f"<InitiateMultipartUploadResult><Bucket>{bucket}</Bucket><Key>{key}</Key>"
                                    f"<UploadId>{upload_id}</UploadId></InitiateMultipartUploadResult>".encode())
        STATE.count("CompleteMultipartUpload")
        upload_id = query["uploadId"][0]
        with STATE.lock:
            parts = STATE.uploads.pop(upload_id, None)
        if parts is None:
            return self._reply(404, b"<Error><Code>NoSuchUpload</Code></Error>")
        numbers = [int(n) for n in re.findall(rb"<PartNumber>(\d+)</PartNumber>", body)]
        digest = hashlib.md5(b"".join(bytes.fromhex(parts[n][0]) for n in numbers)).hexdigest()
        etag = f'"{digest}-{len(numbers)}"'
        with STATE.lock:
            STATE.objects[(bucket, key)] = (etag, sum(parts[n][1] for n in numbers))
        self._reply(200, f"<CompleteMultipartUploadResult><Bucket>{bucket}</Bucket><Key>{key}</Key>"
                         f"<ETag>{etag}</ETag></CompleteMultipartUploadResult>".encode())

    def do_DELETE(self) -> None:  # noqa: N802
        _, _, query = self._split()
        STATE.count("AbortMultipartUpload" if "uploadId" in query else "DeleteObject")
        with STATE.lock:
            STATE.uploads.pop(query.get("uploadId", [""])[0], None)
        self._reply(204)


def main() -> None:
    global HASH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--no-hash", action="store_true", help="no MD5 or CRC32C of the bytes")
    parser.add_argument("--certfile", help="https: the server's certificate chain (PEM)")
    parser.add_argument("--keyfile", help="https: its private key (PEM)")
    args = parser.parse_args()
    HASH = not args.no_hash
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    if args.certfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.certfile, args.keyfile)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
