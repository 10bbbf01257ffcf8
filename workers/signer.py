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
import uuid

import botocore.exceptions
import redis
import urllib3

from models.db import Database
from models.exceptions import DatabaseError, S3FerryError
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
    """No signer answered, or it could not sign for now."""


class Inactive(S3FerryError):
    """The upload is no longer in progress (cancelled, failed): the part is not to be sent."""


#: Kinds of refusal in a reply.
INACTIVE, UNAVAILABLE, INVALID = "inactive", "unavailable", "invalid"


@dataclasses.dataclass(frozen=True, repr=False)
class Presigned:
    url: str
    headers: dict[str, str]

    def __repr__(self) -> str:  # never print the URL
        return "Presigned(<url hidden>)"


def scrub(text: str) -> str:
    """Remove query strings (a presigned URL's signature and credential) from a message."""
    return re.sub(r"\?[^\s'\"<>)]*", "?<query hidden>", text)


_SECRET_MARKERS = ("X-Amz-Signature", "X-Amz-Credential", "Signature=", "AWSAccessKeyId=")


def hide_urls_in_logs() -> None:
    """Keep presigned URLs out of every log, whatever the log level: libraries log request URLs
    at DEBUG (urllib3's request lines, botocore's canonical request) and some at WARNING
    (urllib3's "Failed to parse headers (url=...)"). Records that carry one get their query
    strings scrubbed; botocore's signing details are never logged."""
    logging.getLogger("botocore.auth").setLevel(logging.INFO)
    previous = logging.getLogRecordFactory()
    if getattr(previous, "s3ferry_scrubs", False):
        return

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is the logging module's to report
            return record
        if any(marker in text for marker in _SECRET_MARKERS):
            record.msg, record.args = scrub(text), ()
        return record

    factory.s3ferry_scrubs = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


# --- the worker's side ------------------------------------------------------------------

def request(client: redis.Redis, queue: str, upload_id: uuid.UUID, part_number: int, checksum: str,
            wait: float = ANSWER_SECONDS) -> Presigned:
    """Ask the signer for the part's URL; raises SignerUnavailable, or PermanentS3Error if it refused."""
    request_id = secrets.token_hex(16)
    seconds, _ = client.time()  # one clock for the worker and the signer: Redis's
    message = {"id": request_id, "upload_id": str(upload_id), "part": part_number, "checksum": checksum,
               "deadline": seconds + wait}
    client.rpush(REQUESTS.format(queue), json.dumps(message))
    popped = client.blpop([REPLY.format(request_id)], timeout=wait)
    if popped is None:
        raise SignerUnavailable(f"no signer answered within {wait:.0f}s (is `s3ferry signer` running?)")
    reply = json.loads(popped[1])
    kind = reply.get("refused")
    if kind == INACTIVE:
        raise Inactive(f"the signer refused part {part_number}: {reply['error']}")
    if kind == UNAVAILABLE:  # its database or credentials are failing for now: wait, uncounted
        raise SignerUnavailable(f"the signer could not sign part {part_number}: {reply['error']}")
    if kind is not None:
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


def put(presigned: Presigned, body: object) -> dict[str, str]:
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
        etag = response.headers.get("ETag")
        if not etag:
            raise s3.TransientS3Error("S3 answered 200 without an ETag")
        return {"ETag": etag, "ChecksumCRC32C": response.headers.get("x-amz-checksum-crc32c", "")}
    code, message = _error_of(response.data)
    text = scrub(f"{code or response.status}: {message}".strip().rstrip(":"))
    if response.status == 403 and (code in ("AccessDenied", "") or "expired" in message.lower()):
        raise Expired(text)
    raise s3.classify_answer(code, response.status, text)


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
            if popped is None:
                continue
            try:
                self.answer(json.loads(popped[1]))
            except Exception:  # noqa: BLE001 - one bad request or Redis blip must not stop this thread
                log.exception("signer: could not answer a request")

    def answer(self, message: dict[str, object]) -> None:
        now, _ = self.client.time()
        if float(str(message.get("deadline") or 0)) < now:
            log.info("signer: dropped a request its worker stopped waiting for")
            return
        try:
            reply: dict[str, object] = self.sign(uuid.UUID(str(message["upload_id"])), int(str(message["part"])),
                                                 str(message["checksum"]))
        except Refused as refusal:
            reply = {"refused": refusal.kind, "error": str(refusal)}
        except botocore.exceptions.ClientError as error:  # S3 refused us (signing itself needs no S3 call)
            reply = {"refused": INVALID, "error": scrub(s3.describe(error))}
        except (botocore.exceptions.BotoCoreError, DatabaseError) as error:  # credentials, database: for now
            log.warning("signer: could not sign: %s", scrub(str(error)))
            reply = {"refused": UNAVAILABLE, "error": scrub(f"{type(error).__name__}: {error}")}
        except Exception as error:  # noqa: BLE001 - answer, or the worker waits for nothing
            log.exception("signer: could not sign")
            reply = {"refused": UNAVAILABLE, "error": scrub(f"{type(error).__name__}: {error}")}
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
                raise Refused(INVALID, f"no part {number} of upload {upload_id}")
            # a paused upload's parts in flight finish (pausing stops new ones from starting)
            if upload.status not in (UploadStatus.IN_PROGRESS, UploadStatus.PAUSED):
                raise Refused(INACTIVE, f"upload {upload_id} is {upload.status}")
            bucket, key, s3_upload_id, size = upload.bucket, upload.key, upload.s3_upload_id, part.size
            endpoint = upload.endpoint_url
        params: dict[str, object] = {"Bucket": bucket, "Key": key, "ContentLength": size, "ChecksumCRC32C": checksum}
        operation = "put_object"
        if s3_upload_id is not None:
            operation = "upload_part"
            params.update(UploadId=s3_upload_id, PartNumber=number)
        url = self._client(endpoint).generate_presigned_url(operation, Params=params,
                                                            ExpiresIn=self.settings.presign_expiry_seconds)
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

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
