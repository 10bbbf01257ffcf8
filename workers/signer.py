"""Presigned mode: part workers without S3 credentials, and the signer that has them.

A part worker (S3FERRY_PRESIGNED=1) asks for a URL when it is about to send a part:
it pushes {request id, upload id, part number, CRC32C} onto a Redis list and waits on
a reply list of its own. `s3ferry signer` (which holds the credentials) pops the
request, checks the part against the database, signs UploadPart (or PutObject) for
exactly that part, its length and its checksum, valid for S3FERRY_PRESIGN_EXPIRY_SECONDS,
and pushes the URL back. The reply list is consumed by the worker's pop and expires
within seconds anyway.

So a URL exists only in the signer's and the worker's memory and, for an instant, in
Redis: never in task arguments (Flower shows those), in the database or in logs
(errors that could quote a URL are scrubbed with `scrub`). The signer also runs the
control queue (completion, reconciler, sweeper, scheduler): those need credentials too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import secrets
import threading
import time
import uuid

import botocore.exceptions
import redis
import urllib3

from models.db import Database
from models.settings import Settings
from models.states import UploadStatus
from models.tables import Part, Upload
from workers import s3

log = logging.getLogger(__name__)

REQUESTS = "s3ferry:sign:{}:requests"
REPLY = "s3ferry:sign:reply:{}"
#: How long a worker waits for the signer before it treats S3 as unreachable (an outage:
#: the part waits, no retry counted).
ANSWER_SECONDS = 15.0
#: A reply nobody popped (the worker gave up) is gone after this.
REPLY_TTL_SECONDS = 30


class SignerUnavailable(s3.UnreachableS3Error):
    """No signer answered."""


@dataclasses.dataclass(frozen=True, repr=False)
class Presigned:
    url: str
    headers: dict[str, str]

    def __repr__(self) -> str:  # never print the URL
        return "Presigned(<url hidden>)"


def scrub(text: str) -> str:
    """Remove query strings (a presigned URL's signature and credential) from a message."""
    return re.sub(r"\?[^\s'\"<>)]*", "?<query hidden>", text)


# --- the worker's side ------------------------------------------------------------------

def request(client: redis.Redis, queue: str, upload_id: uuid.UUID, part_number: int, checksum: str,
            wait: float = ANSWER_SECONDS) -> Presigned:
    """Ask the signer for the part's URL; raises SignerUnavailable, or PermanentS3Error if it refused."""
    request_id = secrets.token_hex(16)
    message = {"id": request_id, "upload_id": str(upload_id), "part": part_number, "checksum": checksum,
               "deadline": time.time() + wait}
    client.rpush(REQUESTS.format(queue), json.dumps(message))
    popped = client.blpop([REPLY.format(request_id)], timeout=wait)
    if popped is None:
        raise SignerUnavailable(f"no signer answered within {wait:.0f}s (is `s3ferry signer` running?)")
    reply = json.loads(popped[1])
    if "error" in reply:
        raise s3.PermanentS3Error(f"the signer refused part {part_number}: {reply['error']}")
    return Presigned(reply["url"], reply["headers"])


_pool: urllib3.PoolManager | None = None
_pool_lock = threading.Lock()


def _http() -> urllib3.PoolManager:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = urllib3.PoolManager(maxsize=32, retries=False,
                                        timeout=urllib3.Timeout(connect=10, read=120))
        return _pool


class Expired(s3.TransientS3Error):
    """The URL was refused as expired (or denied): ask for a new one; not a failure."""


def put(presigned: Presigned, body: object, size: int) -> dict[str, str]:
    """PUT the body to the URL; returns {'ETag': ..., 'ChecksumCRC32C': ...}. Raises an S3Error
    (Expired for 403 AccessDenied / expired) whose message never holds the URL."""
    try:
        response = _http().request("PUT", presigned.url, body=body, headers=presigned.headers,
                                   preload_content=True, chunked=False)
    except urllib3.exceptions.NewConnectionError as error:
        raise s3.UnreachableS3Error(scrub(f"could not connect: {error}"), congestion=True) from None
    except urllib3.exceptions.ConnectTimeoutError as error:
        raise s3.UnreachableS3Error(scrub(f"connect timeout: {error}"), congestion=True) from None
    except (urllib3.exceptions.HTTPError, OSError) as error:
        raise s3.TransientS3Error(scrub(f"{type(error).__name__}: {error}"), congestion=True) from None
    if response.status == 200:
        return {"ETag": response.headers.get("ETag", ""),
                "ChecksumCRC32C": response.headers.get("x-amz-checksum-crc32c", "")}
    code, message = _error_of(response.data)
    text = scrub(f"{code or response.status}: {message}".strip().rstrip(":"))
    if response.status == 403:
        raise Expired(text)
    congestion = code in s3.THROTTLE_CODES or response.status in (429, 503)
    if code in s3.PERMANENT_CODES:
        raise s3.PermanentS3Error(text)
    if code in s3.TRANSIENT_CODES or response.status >= 500 or response.status == 429:
        raise s3.TransientS3Error(text, congestion=congestion)
    raise s3.PermanentS3Error(text)


def _error_of(body: bytes) -> tuple[str, str]:
    text = body.decode("utf-8", "replace")
    code = re.search(r"<Code>(.*?)</Code>", text)
    message = re.search(r"<Message>(.*?)</Message>", text)
    return (code.group(1) if code else "", message.group(1) if message else "")


# --- the signer's side ------------------------------------------------------------------

class Signer:
    """Answers signing requests from the Redis list, with `threads` threads, until stopped."""

    def __init__(self, settings: Settings, client: redis.Redis, db: Database) -> None:
        self.settings, self.client, self.db = settings, client, db
        self.stop = threading.Event()
        self.signed = 0
        self._clients: dict[str | None, object] = {}
        self._lock = threading.Lock()

    def start(self, threads: int = 4) -> list[threading.Thread]:
        started = [threading.Thread(target=self._run, name=f"signer-{i}", daemon=True) for i in range(threads)]
        for thread in started:
            thread.start()
        log.info("signer: signing part URLs for queue %s (%d threads, valid %ds)", self.settings.queue, threads,
                 self.settings.presign_expiry_seconds)
        return started

    def _run(self) -> None:
        key = REQUESTS.format(self.settings.queue)
        while not self.stop.is_set():
            try:
                popped = self.client.blpop([key], timeout=1)
            except redis.RedisError as error:
                log.warning("signer: Redis unavailable (%s); trying again", error)
                self.stop.wait(1)
                continue
            if popped is not None:
                self.answer(json.loads(popped[1]))

    def answer(self, message: dict[str, object]) -> None:
        if float(message.get("deadline") or 0) < time.time():
            return  # the worker gave up on it
        try:
            reply: dict[str, object] = self.sign(uuid.UUID(str(message["upload_id"])), int(str(message["part"])),
                                                 str(message["checksum"]))
        except Refused as refusal:
            reply = {"error": str(refusal)}
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
            reply = {"error": scrub(s3.describe(error))}
        except Exception as error:  # noqa: BLE001 - answer, or the worker waits for nothing
            log.exception("signer: could not sign")
            reply = {"error": scrub(f"{type(error).__name__}: {error}")}
        reply_key = REPLY.format(message["id"])
        pipe = self.client.pipeline()
        pipe.rpush(reply_key, json.dumps(reply))
        pipe.expire(reply_key, REPLY_TTL_SECONDS)
        pipe.execute()

    def sign(self, upload_id: uuid.UUID, number: int, checksum: str) -> dict[str, object]:
        with self.db.transaction() as session:
            upload = session.get(Upload, upload_id)
            part = session.get(Part, (upload_id, number))
            if upload is None or part is None:
                raise Refused(f"no part {number} of upload {upload_id}")
            if upload.status != UploadStatus.IN_PROGRESS:
                raise Refused(f"upload {upload_id} is {upload.status}")
            bucket, key, s3_upload_id, size = upload.bucket, upload.key, upload.s3_upload_id, part.size
            endpoint = upload.endpoint_url
        params: dict[str, object] = {"Bucket": bucket, "Key": key, "ContentLength": size, "ChecksumCRC32C": checksum}
        operation = "put_object"
        if s3_upload_id is not None:
            operation = "upload_part"
            params.update(UploadId=s3_upload_id, PartNumber=number)
        url = self._client(endpoint).generate_presigned_url(operation, Params=params,
                                                            ExpiresIn=self.settings.presign_expiry_seconds)
        self.signed += 1
        log.info("signer: signed part %d", number, extra={"upload_id": str(upload_id), "part": number})
        return {"url": url, "headers": {"Content-Length": str(size), "x-amz-checksum-crc32c": checksum}}

    def _client(self, endpoint: str | None):  # type: ignore[no-untyped-def]
        with self._lock:
            client = self._clients.get(endpoint)
            if client is None:
                client = self._clients[endpoint] = s3.make_client(endpoint, retries=3)
            return client


class Refused(Exception):
    """The request names no part that may be sent now."""
