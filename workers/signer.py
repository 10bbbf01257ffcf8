"""Presigned mode: part workers without S3 credentials, and the signer that has them.

A part worker (S3FERRY_PRESIGNED=1) asks for a URL when it is about to send a part:
it pushes {request id, upload id, part number, CRC32C, deadline} onto a Redis list and
waits on a reply list of its own. `s3ferry signer` (which holds the credentials) pops the
request, checks the part against the database and the destination against its own policy
(workers/policy.py: S3FERRY_BUCKETS, S3FERRY_ENDPOINTS), signs UploadPart (or PutObject)
for exactly that part, its length and its checksum, valid for
S3FERRY_PRESIGN_EXPIRY_SECONDS, and pushes the URL back. A destination its policy refuses
gets an (authenticated) refusal, which fails the part and its upload with the policy's
message: the signer, not the row, decides where its credentials sign for. The reply list is
consumed by the worker's pop and expires within seconds anyway.

Redis is data, never authority (ARCHITECTURE invariant 8): anyone who can write to it
could pop a request and answer with a URL of their own. So both messages carry an
HMAC-SHA256 under S3FERRY_SIGNER_KEY, which the signer and the workers read from their
own environment (never Redis, never the database):

- a request's MAC covers ("s3ferry.sign-request.v1", the queue, and every field of the
  request): the signer drops (and logs) a request it cannot verify, so Redis alone cannot
  ask for URLs;
- a reply's MAC covers ("s3ferry.sign-reply.v1", the request id, upload id, part number
  and checksum *as the worker sent them*, and every field of the answer: the URL and
  headers, or the refusal, and an expiry on Redis's clock). The worker recomputes it from
  its own request, so a reply to another request (another part, or an earlier request
  for the same part) does not verify. Both compare with hmac.compare_digest.

A verified URL is used only if it is for exactly the part (`mismatch`): its scheme, host
and port are the upload's endpoint (None, AWS: an S3 host under amazonaws.com, https on
the default port), its path is /bucket/key on that host (path-style: what botocore signs
for custom endpoints such as MinIO and moto, and for AWS buckets with dots) or /key on
bucket.host (virtual-hosted: AWS's default), its uploadId and partNumber are the part's
(neither, for a one-part PutObject), and it has no other query parameters than
X-Amz-* (and x-id naming that operation). A verified reply that fails that check was made by a key holder: a counted,
transient error of the part (a signer that signs for a new S3 upload id, or with an
addressing style the check does not know, fails the upload after its retries, visibly).

A reply that does not verify (no MAC, a wrong one, a reply to another request, not even
JSON) is refused and logged without its URL's query string, and does not count: the
worker keeps waiting on the same reply list for the real signer's answer until its usual
deadline (ANSWER_SECONDS), and after each refused reply asks again with the same request
(at most RE_ASKS times), in case the forger also took the request off the list. So one
forged reply cannot make a part fail or wait longer than a missing signer would; a
process that takes every request (or floods the reply lists) only keeps parts waiting,
uncounted, as a Redis outage does: the worker fails closed and never sends a byte to
a URL it has not verified. A forged refusal is ignored the same way.

So a URL exists only in the signer's and the worker's memory and, for an instant, in
Redis (readable there by whoever can read Redis: protect Redis as the broker): never in
task arguments (Flower shows those), in the database or in logs (`hide_urls_in_logs`
scrubs query strings, Authorization headers and X-Amz-Security-Token /
X-Amz-Signature / X-Amz-Credential values from every log record). The signer also runs
the control queue (completion, reconciler, sweeper, scheduler): those need credentials too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
import time
import urllib.parse
import uuid

import botocore.exceptions
import redis
import urllib3

from models.db import Database
from models.exceptions import DatabaseError, S3FerryError
from models.settings import Settings, SettingsError
from models.states import UploadStatus
from models.tables import Part, Upload
from workers import policy, s3

log = logging.getLogger(__name__)

REQUESTS = "s3ferry:sign:{}:requests"
REPLY = "s3ferry:sign:reply:{}"
#: How long a worker waits for the signer before it treats S3 as unreachable (an outage:
#: the part waits, no retry counted).
ANSWER_SECONDS = 15.0
#: A reply nobody popped (the worker gave up) is gone after this; a reply is valid this long.
REPLY_TTL_SECONDS = 30
#: How many times one request is pushed again after a refused (unauthenticated) reply.
RE_ASKS = 3
REQUEST_LABEL, REPLY_LABEL = "s3ferry.sign-request.v1", "s3ferry.sign-reply.v1"


class SignerUnavailable(s3.UnreachableS3Error):
    """No signer answered, or it could not sign for now."""


class Inactive(S3FerryError):
    """The upload is no longer in progress (cancelled, failed): the part is not to be sent."""


class Forged(S3FerryError):
    """A reply that does not verify: refused, not counted; the worker waits on."""


class Mismatch(s3.TransientS3Error):
    """The signer's own (verified) URL is not for the part: not sent; a counted retry."""


#: Kinds of refusal in a reply.
INACTIVE, UNAVAILABLE, INVALID = "inactive", "unavailable", "invalid"


@dataclasses.dataclass(frozen=True, repr=False)
class Presigned:
    url: str
    headers: dict[str, str]

    def __repr__(self) -> str:  # never print the URL
        return "Presigned(<url hidden>)"


#: A query string (a presigned URL's signature, credential and token); at least one character.
_QUERY = re.compile(r"\?[^\s'\"<>)]+")
#: Where a header name starts: after a non-word character, or after an escaped line break (a bytes repr).
_START = r"(?:(?<=\\[rn])|(?<!\w))"
#: The value of an Authorization (or Proxy-Authorization) header, quoted (a repr, JSON) or to the end of its line.
_AUTHORIZATION = re.compile(r"(?i)" + _START + r"""(authorization)(['"]?\s*[:=]\s*)(?:b?(['"])(?:\\.|(?!\3).)*\3"""
                            r"""|[^\r\n\\'"]*)""")
#: The value of a header or query parameter that is a secret, quoted or to the next separator.
_SECRET_VALUE = re.compile(r"(?i)" + _START + r"""(x-amz-security-token|x-amz-signature|x-amz-credential)"""
                           r"""(['"]?\s*[:=]\s*)(?:b?(['"])(?:\\.|(?!\3).)*\3|[^\s&'"\\<>,;)]*)""")


def _hidden(match: re.Match[str]) -> str:
    quote = match[3] or ""
    return f"{match[1]}{match[2]}{quote}<hidden>{quote}"


def scrub(text: str) -> str:
    """Remove query strings (a presigned URL's signature and credential), Authorization header
    values and X-Amz-Security-Token / -Signature / -Credential values from a message."""
    text = _QUERY.sub("?<query hidden>", text)
    text = _AUTHORIZATION.sub(_hidden, text)
    return _SECRET_VALUE.sub(_hidden, text)


_SECRET_MARKERS = ("x-amz-", "authorization", "signature=", "awsaccesskeyid=", "credential=")


def _secret_in(text: str) -> bool:
    lowered = text.lower()
    return any(marker in lowered for marker in _SECRET_MARKERS)


def hide_urls_in_logs() -> None:
    """Keep presigned URLs and request credentials out of every log, whatever the log level:
    libraries log request URLs at DEBUG (urllib3's request lines), request headers with the
    Authorization header and the session token (botocore's "Sending http request") and some
    at WARNING (urllib3's "Failed to parse headers (url=...)"). Records (and their tracebacks)
    that may carry one are scrubbed; botocore's signing details are never logged. Installed
    once per process (workers/app.py, imported by `s3ferry worker` and `s3ferry signer`)."""
    logging.getLogger("botocore.auth").setLevel(logging.INFO)
    previous = logging.getLogRecordFactory()
    if getattr(previous, "s3ferry_scrubs", False):
        return

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            if record.name == "botocore.auth" and record.levelno < logging.INFO:  # a request's signature
                record.msg, record.args = "(signing details hidden)", ()
            text = record.getMessage()
            if _secret_in(text):
                record.msg, record.args = scrub(text), ()
            if record.exc_info and not record.exc_text:
                formatted = logging.Formatter().formatException(record.exc_info)
                if _secret_in(formatted):
                    record.exc_text = scrub(formatted)
            if record.stack_info and _secret_in(record.stack_info):
                record.stack_info = scrub(record.stack_info)
        except Exception:  # noqa: BLE001 - a malformed record is the logging module's to report
            return record
        return record

    factory.s3ferry_scrubs = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def _mac(key: str, *fields: object) -> str:
    """HMAC-SHA256 of the fields' canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key.encode("utf-8"), text.encode("ascii"), hashlib.sha256).hexdigest()


def request_mac(key: str, queue: str, message: dict[str, object]) -> str:
    return _mac(key, REQUEST_LABEL, queue, {k: v for k, v in message.items() if k != "mac"})


def reply_mac(key: str, message: dict[str, object], reply: dict[str, object]) -> str:
    """The MAC of `reply` as the answer to `message` (the request, as its worker sent it)."""
    return _mac(key, REPLY_LABEL, message["id"], message["upload_id"], message["part"], message["checksum"],
                {k: v for k, v in reply.items() if k != "mac"})


def _verified(mac: object, expected: str) -> bool:
    return isinstance(mac, str) and hmac.compare_digest(mac.encode("utf-8"), expected.encode("ascii"))


# --- the worker's side ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Target:
    """The part a URL must be for, as the worker's own row says."""

    upload_id: uuid.UUID
    part_number: int
    endpoint_url: str | None  # None: AWS
    bucket: str
    key: str
    s3_upload_id: str | None  # None: a one-part PutObject

    @classmethod
    def of(cls, upload: Upload, part: Part) -> Target:
        return cls(upload.id, part.part_number, upload.endpoint_url, upload.bucket, upload.key, upload.s3_upload_id)


def request(client: redis.Redis, queue: str, key: str, target: Target, checksum: str,
            wait: float = ANSWER_SECONDS) -> Presigned:
    """Ask the signer for the part's URL and return it once its reply verifies (module docstring).
    Raises SignerUnavailable (no verified answer in time: uncounted), Inactive, Mismatch, or
    PermanentS3Error if the signer refused."""
    if not key:
        raise SignerUnavailable("S3FERRY_SIGNER_KEY is not set on this worker: no signer reply can be authenticated")
    seconds, _ = client.time()  # one clock for the worker and the signer: Redis's
    message: dict[str, object] = {"id": secrets.token_hex(16), "upload_id": str(target.upload_id),
                                  "part": target.part_number, "checksum": checksum, "deadline": int(seconds + wait)}
    encoded = json.dumps({**message, "mac": request_mac(key, queue, message)})
    reply_key, asked, ends = REPLY.format(message["id"]), 0, time.monotonic() + wait
    context = {"upload_id": str(target.upload_id), "part": target.part_number}
    try:
        client.rpush(REQUESTS.format(queue), encoded)
        while (left := ends - time.monotonic()) > 0.01:  # (0 would block for ever)
            popped = client.blpop([reply_key], timeout=left)
            if popped is None:
                break
            try:
                return _accept(client, key, message, target, popped[1])
            except Forged as forged:
                log.warning("refused a reply to the signing request of part %d: %s; waiting for the signer's",
                            target.part_number, forged, extra=context)
            if asked < RE_ASKS:  # the forger may have taken the request off the list too: ask again
                client.rpush(REQUESTS.format(queue), encoded)
                asked += 1
    finally:
        with contextlib.suppress(redis.RedisError):
            client.delete(reply_key)  # a duplicate or refused reply left behind
    raise SignerUnavailable(f"no signer answered within {wait:.0f}s (is `s3ferry signer` running, with the "
                            "same S3FERRY_SIGNER_KEY?)")


def _accept(client: redis.Redis, key: str, message: dict[str, object], target: Target, raw: bytes) -> Presigned:
    """The URL of a reply that verifies as the answer to `message`, for exactly `target`."""
    try:
        reply = json.loads(raw)
    except ValueError:
        raise Forged("it is not JSON") from None
    if not isinstance(reply, dict):
        raise Forged("it is not a JSON object")
    shown = repr(scrub(str(reply.get("url", "")))[:200])
    if not _verified(reply.get("mac"), reply_mac(key, message, reply)):
        raise Forged(f"its MAC does not verify (url {shown})" if "mac" in reply else f"it has no MAC (url {shown})")
    expires, now = reply.get("expires"), client.time()[0]
    if not isinstance(expires, int) or expires < now:
        raise Forged("it has expired")
    kind, number = reply.get("refused"), target.part_number
    if kind == INACTIVE:
        raise Inactive(f"the signer refused part {number}: {reply.get('error')}")
    if kind == UNAVAILABLE:  # its database or credentials are failing for now: wait, uncounted
        raise SignerUnavailable(f"the signer could not sign part {number}: {reply.get('error')}")
    if kind is not None:
        raise s3.PermanentS3Error(f"the signer refused part {number}: {reply.get('error')}")
    url, headers = reply.get("url"), reply.get("headers")
    if not isinstance(url, str) or not isinstance(headers, dict) \
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise Mismatch(f"the signer's reply for part {number} holds no URL and headers")
    problem = mismatch(url, target)
    if problem is not None:
        raise Mismatch(f"the signer's URL for part {number} is not for it: {problem}; not sent")
    return Presigned(url, headers)


#: An AWS S3 host: s3[-fips|-accelerate][.dualstack][.region | -region].amazonaws.com[.cn]
AWS_HOST = re.compile(r"s3(?:-fips|-accelerate)?(?:\.dualstack)?(?:[.-][a-z]{2}(?:-[a-z]+)+-\d{1,2})?"
                      r"\.amazonaws\.com(?:\.cn)?")
_PORTS = {"http": 80, "https": 443}


def mismatch(url: str, target: Target) -> str | None:
    """None if `url` is for exactly the target part; else what differs (never quoting the URL)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return "it is not a URL"
    host = parts.hostname or ""
    if parts.scheme not in _PORTS or not host or parts.username is not None or parts.password is not None \
            or parts.fragment:
        return "it is not a plain http(s) URL"
    port_text = "" if port in (None, _PORTS[parts.scheme]) else f":{port}"
    styles = [(host, f"/{target.bucket}/{target.key}")]  # path-style: the bucket in the path
    if host.startswith(target.bucket + "."):
        styles.append((host[len(target.bucket) + 1:], f"/{target.key}"))  # virtual-hosted
    paths = [path for service, path in styles if _is_endpoint(parts.scheme, service, port_text, target.endpoint_url)]
    if not paths:
        return "its host is not the upload's S3 endpoint"
    if urllib.parse.unquote(parts.path) not in paths:
        return "its bucket or key is not the upload's"
    return _query_mismatch(parts.query, target)


def _is_endpoint(scheme: str, host: str, port_text: str, endpoint: str | None) -> bool:
    if endpoint is None:  # AWS: the bucket's regional (or global, dualstack, FIPS, accelerate) host
        return scheme == "https" and not port_text and AWS_HOST.fullmatch(host) is not None
    shown = f"[{host}]" if ":" in host else host
    return policy.normalize_endpoint(f"{scheme}://{shown}{port_text}") == policy.normalize_endpoint(endpoint)


def _query_mismatch(query: str, target: Target) -> str | None:
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        return "it repeats a query parameter"
    expected = {"x-id": "PutObject"} if target.s3_upload_id is None else \
        {"uploadId": target.s3_upload_id, "partNumber": str(target.part_number), "x-id": "UploadPart"}
    values = dict(pairs)
    for name in names:
        if name not in expected and not name.lower().startswith("x-amz-"):
            return f"it has an unexpected query parameter ({name[:40]!r})"
    for name, value in expected.items():
        if values.get(name, value if name == "x-id" else None) != value:
            return f"its {name} is not the part's"
    return None


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
    (Expired for 403 AccessDenied / expired) whose message never holds the URL.

    A part's reader goes out through workers/sender.py (os.sendfile over http, one reused
    buffer over https, kept-alive connections); any other body through urllib3."""
    from workers import sender  # (here: this function is the module's only user)

    if sender.takes(body):
        try:
            answer = sender.put_url(presigned.url, presigned.headers, body)  # type: ignore[arg-type]
        except botocore.exceptions.BotoCoreError as error:  # the transport's, as botocore names them
            failed = s3.classify(error)
            raise type(failed)(scrub(str(failed)), congestion=failed.congestion) from None
        status, headers, data = answer.status, answer.headers, answer.data
    else:
        try:
            response = _http().request("PUT", presigned.url, body=body, headers=presigned.headers,
                                       preload_content=True, chunked=False)
        except urllib3.exceptions.NewConnectionError as error:
            raise s3.UnreachableS3Error(scrub(f"could not connect: {error}"), congestion=True) from None
        except urllib3.exceptions.ConnectTimeoutError as error:
            raise s3.UnreachableS3Error(scrub(f"connect timeout: {error}"), congestion=True) from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise s3.TransientS3Error(scrub(f"{type(error).__name__}: {error}"), congestion=True) from None
        status, headers, data = response.status, response.headers, response.data
    if status == 200:
        etag = headers.get("ETag")
        if not etag:
            raise s3.TransientS3Error("S3 answered 200 without an ETag")
        return {"ETag": etag, "ChecksumCRC32C": headers.get("x-amz-checksum-crc32c", "")}
    code, message = _error_of(data)
    text = scrub(f"{code or status}: {message}".strip().rstrip(":"))
    if status == 403 and (code in ("AccessDenied", "") or "expired" in message.lower()):
        raise Expired(text)
    raise s3.classify_answer(code, status, text)


def _error_of(body: bytes) -> tuple[str, str]:
    text = body.decode("utf-8", "replace")
    code = re.search(r"<Code>(.*?)</Code>", text)
    message = re.search(r"<Message>(.*?)</Message>", text)
    return (code.group(1) if code else "", message.group(1) if message else "")


# --- the signer's side ------------------------------------------------------------------

class Signer:
    """Answers signing requests from the Redis list, with `threads` threads, until stopped."""

    def __init__(self, settings: Settings, client: redis.Redis, db: Database) -> None:
        if not settings.signer_key:
            raise SettingsError("s3ferry signer needs S3FERRY_SIGNER_KEY: workers accept only the replies it "
                                "authenticates (set the same key on the signer and every presigned worker)")
        hide_urls_in_logs()  # (workers/app.py installs it too: this process signs URLs whatever imported it)
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
                self.answer(popped[1])
            except Exception:  # noqa: BLE001 - one bad request or Redis blip must not stop this thread
                log.exception("signer: could not answer a request")

    def answer(self, raw: bytes | str) -> None:
        """Answer one request, if it is authenticated and its worker still waits; the reply is
        authenticated for exactly that request (module docstring)."""
        message = self._authentic(raw)
        if message is None:
            return
        now, _ = self.client.time()
        if float(str(message.get("deadline") or 0)) < now:
            log.info("signer: dropped a request its worker stopped waiting for")
            return
        try:
            reply: dict[str, object] = self.sign(uuid.UUID(str(message["upload_id"])), int(str(message["part"])),
                                                 str(message["checksum"]))
        except Refused as refusal:
            log.log(logging.INFO if refusal.kind == INACTIVE else logging.WARNING, "signer: refused part %s: %s",
                    message["part"], refusal, extra={"upload_id": str(message["upload_id"]), "part": message["part"]})
            reply = {"refused": refusal.kind, "error": str(refusal)}
        except botocore.exceptions.ClientError as error:  # S3 refused us (signing itself needs no S3 call)
            reply = {"refused": INVALID, "error": scrub(s3.describe(error))}
        except (botocore.exceptions.BotoCoreError, DatabaseError) as error:  # credentials, database: for now
            log.warning("signer: could not sign: %s", scrub(str(error)))
            reply = {"refused": UNAVAILABLE, "error": scrub(f"{type(error).__name__}: {error}")}
        except Exception as error:  # noqa: BLE001 - answer, or the worker waits for nothing
            log.exception("signer: could not sign")
            reply = {"refused": UNAVAILABLE, "error": scrub(f"{type(error).__name__}: {error}")}
        reply["expires"] = int(now) + REPLY_TTL_SECONDS
        reply["mac"] = reply_mac(self.settings.signer_key, message, reply)
        reply_key = REPLY.format(message["id"])
        pipe = self.client.pipeline()
        pipe.rpush(reply_key, json.dumps(reply))
        pipe.expire(reply_key, REPLY_TTL_SECONDS)
        pipe.execute()

    def _authentic(self, raw: bytes | str) -> dict[str, object] | None:
        """The request if its MAC verifies and its fields are well-formed; None (logged) otherwise."""
        try:
            message = json.loads(raw)
        except ValueError:
            message = None
        if isinstance(message, dict) \
                and _verified(message.get("mac"), request_mac(self.settings.signer_key, self.settings.queue, message)) \
                and isinstance(message.get("id"), str) and re.fullmatch(r"[0-9a-f]{32}", message["id"]) \
                and isinstance(message.get("part"), int) and isinstance(message.get("checksum"), str) \
                and isinstance(message.get("upload_id"), str):
            return message
        log.warning("signer: dropped a signing request that is not authenticated (forged, or S3FERRY_SIGNER_KEY "
                    "differs from the worker's)")
        return None

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
        try:  # the row is data: this process's own policy says where it signs for
            policy.check_destination(self.settings, endpoint, bucket)
        except policy.Refused as refusal:
            raise Refused(INVALID, str(refusal)) from None
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
