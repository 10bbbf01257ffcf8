"""Sending one part: claim it, stream its byte range to S3 with a CRC32C, record it.

Plain functions, testable without Celery; `workers.tasks` only maps their
outcomes to Celery (a result, or a retry after `RetryLater.seconds`).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import secrets
import time
import uuid

import redis
from celery.exceptions import SoftTimeLimitExceeded

from models import transitions
from models.exceptions import DatabaseError, InvalidTransition, S3FerryError
from models.tables import Part, Upload
from orchestrator import scheduler
from workers import policy, reader, retry, s3, sender, signer
from workers.lease import LeaseKeeper
from workers.runtime import Runtime
from workers.window import Signal, Slot, Window

log = logging.getLogger(__name__)


class RetryLater(S3FerryError):
    """Try this part again later."""

    def __init__(self, message: str, seconds: float | None) -> None:
        super().__init__(message)
        #: None: as long as the task's own backoff says (it grows with each try)
        self.seconds = seconds


class PartFailed(S3FerryError):
    """The part failed for good, and its upload with it."""


@dataclasses.dataclass(frozen=True)
class PartResult:
    """What a part task returns to the chord: small, ids and digests only."""

    part: int
    etag: str | None = None
    checksum: str | None = None
    skipped: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def send_part(rt: Runtime, upload_id: uuid.UUID, number: int) -> PartResult:
    """Upload part `number` of `upload_id` unless it is done, held by another worker, or moot.

    The part is claimed first (one statement, which also reads its upload); then it takes a
    slot in its destination's AIMD window (workers/window.py), waiting for one under its claim
    if the window is full; how it ends moves the window. Database errors propagate (the task
    retries them without counting: Postgres may be restarting); S3 and source errors are
    handled here.
    """
    beat = rt.alive()  # every claim names a holder whose liveness the fleet can see
    if not beat.fresh():  # others may already judge this process dead: it claims nothing
        raise RetryLater("this worker's liveness record is not fresh (the database is slow or unreachable)",
                         _wait(rt, 1))
    delivery = _Delivery(f"{rt.worker_id}/{secrets.token_hex(4)}",
                         judge=beat.healthy_for() >= rt.settings.liveness_seconds)
    with rt.db.statement() as session:  # one statement on PostgreSQL
        claim = transitions.claim_part(session, upload_id, number, delivery.token, rt.settings.lease_seconds,
                                       delivery.judge, holder=rt.worker_id)
    if claim.outcome is not transitions.ClaimOutcome.CLAIMED:
        return _not_claimed(rt, claim)
    outcome = _take_slot(rt, claim, delivery)
    try:
        return _send(rt, claim, outcome, delivery)
    finally:
        if outcome is not None:
            try:
                outcome.window.release(outcome.slot, outcome.signal, outcome.reason)
            except redis.RedisError as error:  # its lease frees it
                log.warning("could not release the window slot (%s); its lease frees it", error,
                            extra={"upload_id": str(upload_id), "part": number})


@dataclasses.dataclass(frozen=True)
class _Delivery:
    """This delivery of a part: its claim's own token (the process's worker id, then a suffix of
    its own, so another delivery of the part, even on another thread of this process, never
    passes for its holder), and whether it may take a part whose holder is dead (its own
    heartbeat has gone unbroken long enough to tell a dead process from a database outage)."""

    token: str
    judge: bool


@dataclasses.dataclass
class _Outcome:
    """What the part's send says about the link, for the window."""

    window: Window
    slot: Slot
    signal: Signal = Signal.NONE
    reason: str = "part not sent"


def _not_claimed(rt: Runtime, claim: transitions.Claim) -> PartResult:
    part, upload = claim.part, claim.upload
    context = {"upload_id": str(upload.id), "part": part.part_number}
    if claim.outcome is transitions.ClaimOutcome.DONE:
        log.info("part already done; not sending it again", extra=context)
        return PartResult(part.part_number, part.etag, part.checksum)
    if claim.outcome is transitions.ClaimOutcome.INACTIVE:
        log.info("upload is %s; part not sent", upload.status, extra=context)
        return PartResult(part.part_number, skipped=f"upload is {upload.status}")
    # Held: another delivery of this part (RabbitMQ requeues a dead worker's message at once): look
    # again once the holder, if it died, is known dead; the recovery pass may be first.
    raise RetryLater(f"part {part.part_number} is held by {part.worker}", rt.settings.liveness_seconds)


def _take_slot(rt: Runtime, claim: transitions.Claim, delivery: _Delivery) -> _Outcome | None:
    """A slot in the window of the claimed part's destination (None: no shared window).

    A full window is waited for (up to window_wait_seconds) with the claim kept alive, as while
    sending: the wait may outlast the lease. No slot (or no Redis, or the wait interrupted): the
    claim goes back uncounted and the part steps aside (requeued, no retry counted), so that
    other work can run.
    """
    upload, number = claim.upload, claim.part.part_number
    shared = rt.window(upload.endpoint_url, upload.bucket)
    if shared is None:
        return None
    # a token of its own per try: two deliveries of one part never share a slot
    token = f"{rt.worker_id}:{upload.id}:{number}:{secrets.token_hex(4)}"
    try:
        slot = shared.try_acquire(token)
        if slot is None:
            with LeaseKeeper(rt, upload.id, number, delivery.token) as lease:
                slot = shared.acquire(token, rt.settings.window_wait_seconds)
            if lease.lost:  # taken over meanwhile (this process was judged dead): not ours to send
                if slot is not None:
                    shared.release(slot, Signal.NONE, "claim lost while waiting")
                raise RetryLater(f"part {number}: claim lost while waiting for a window slot", 1.0)
    except redis.RedisError as error:
        _step_aside(rt, claim, delivery, f"the window's Redis is unavailable ({error})")
        raise RetryLater(f"the window's Redis is unavailable ({error})", _wait(rt, 3)) from error
    except RetryLater:
        raise
    except BaseException:  # the task's time limit, a shutdown: nothing was sent
        _step_aside(rt, claim, delivery, "interrupted while waiting for a window slot")
        raise
    if slot is None:  # still full: step aside so other work can run
        _step_aside(rt, claim, delivery, f"no slot free in the window of {shared.name}")
        raise RetryLater(f"part {number}: no slot free in the window of {shared.name}", 0.5 + random.random())
    return _Outcome(shared, slot)


def _step_aside(rt: Runtime, claim: transitions.Claim, delivery: _Delivery, reason: str) -> None:
    """Give the claim back uncounted; if the database cannot be reached, its lease runs out."""
    context = {"upload_id": str(claim.upload.id), "part": claim.part.part_number}
    try:
        with rt.db.statement() as session:
            transitions.step_aside(session, claim.upload.id, claim.part.part_number, delivery.token, reason)
    except DatabaseError as error:
        log.warning("could not give the claim back (%s); its lease runs out", error, extra=context)


def _send(rt: Runtime, claim: transitions.Claim, outcome: _Outcome | None, delivery: _Delivery) -> PartResult:
    part, upload = claim.part, claim.upload
    upload_id, number = upload.id, part.part_number
    context = {"upload_id": str(upload_id), "part": number}
    renew_slot = (lambda: outcome.window.renew(outcome.slot)) if outcome is not None else None
    started = time.monotonic()
    try:
        with LeaseKeeper(rt, upload_id, number, delivery.token, also=renew_slot) as lease:
            etag, checksum = transfer(rt, upload, part)
    except SoftTimeLimitExceeded:
        _retry_or_fail(rt, upload, part, "the part ran past the task's soft time limit")
    except s3.S3Error as error:
        if outcome is not None and error.congestion:
            outcome.signal, outcome.reason = Signal.SHRINK, str(error)
        if isinstance(error, s3.UnreachableS3Error):
            _wait_for_s3(rt, upload, part, str(error))
        elif isinstance(error, s3.TransientS3Error):
            # Throttled while an adaptive window paces the fleet: the halved window is the backoff
            # that matters (the retry waits for a slot in it); the part's own starts shorter.
            paced = outcome is not None and outcome.window.limits.low < outcome.window.limits.high
            _retry_or_fail(rt, upload, part, str(error),
                           scale=CONGESTION_BACKOFF if paced and error.congestion else 1.0)
        _fail(rt, upload, part, str(error))
    except signer.Inactive as error:  # cancelled or failed while this part waited for its URL
        with rt.db.transaction() as session:
            transitions.release_for_retry(session, upload.id, number, delivery.token, str(error), counted=False)
        log.info("part not sent: %s", error, extra=context)
        return PartResult(number, skipped=str(error))
    except (reader.SourceChanged, policy.Refused) as error:
        _fail(rt, upload, part, str(error))
    except OSError as error:  # reading the source failed (I/O error, file shrank, ...)
        _fail(rt, upload, part, f"reading the source failed: {error}")
    elapsed = time.monotonic() - started
    if outcome is not None and elapsed <= outcome.window.limits.target_for(part.size):
        outcome.signal, outcome.reason = Signal.GROW, f"part landed in {elapsed:.1f}s"

    if lease.lost:
        raise RetryLater(f"part {number}: claim lost while sending; not recorded", 1.0)
    with rt.db.statement() as session:  # one statement on PostgreSQL
        recorded = transitions.finish_part(session, upload_id, number, delivery.token, etag, checksum,
                                           f"landed ({rt.worker_id})")
    if recorded is None:
        raise RetryLater(f"part {number}: claim taken over while sending; not recorded", 1.0)
    log.info("part done", extra={**context, "etag": etag})
    return PartResult(number, etag, checksum)


#: How many fresh URLs one attempt asks for when S3 refuses them (expired, denied) before
#: it counts a failure: a URL that is refused as soon as it is signed is not an expiry.
RESIGNS = 3


def transfer(rt: Runtime, upload: Upload, part: Part) -> tuple[str, str]:
    """Stream the part's byte range to S3 with its CRC32C; returns (ETag, checksum). The row's
    source and destination are checked against this worker's own policy first."""
    path = policy.source_path(rt.settings, upload.source_uri)
    policy.check_destination(rt.settings, upload.endpoint_url, upload.bucket)
    if upload.source_size == 0 and reader.has_content(path):  # a pseudo-file: its size says nothing
        raise reader.SourceChanged("the source reports a size of 0 but has content: refused")
    fingerprint = (upload.source_size, upload.source_mtime_ns, upload.source_inode, upload.source_ctime_ns)
    reader.check_unchanged(path, *fingerprint)
    with reader.RangeReader(path, part.offset, part.size) as body:
        checksum = reader.crc32c_of(body)
        if rt.settings.presigned:
            response = _put_presigned(rt, upload, part, body, checksum)
        else:
            response = _put_with_credentials(rt, upload, part, body, checksum)
    # A file rewritten while it was read is never stitched into the object.
    reader.check_unchanged(path, *fingerprint)
    returned = response.get("ChecksumCRC32C")
    if returned and returned != checksum:
        raise s3.TransientS3Error(f"S3 computed CRC32C {returned}, we sent {checksum}")
    return response["ETag"], checksum


def _put_with_credentials(rt: Runtime, upload: Upload, part: Part, body: reader.RangeReader,
                          checksum: str) -> dict[str, str]:
    client = rt.s3(upload.endpoint_url)
    sender.attach(client)  # botocore builds, signs and parses; the bytes go out with workers/sender.py
    args = {"Bucket": upload.bucket, "Key": upload.key, "Body": body, "ContentLength": part.size,
            "ChecksumCRC32C": checksum}
    try:
        if upload.s3_upload_id is None:
            return client.put_object(**args)
        return client.upload_part(UploadId=upload.s3_upload_id, PartNumber=part.part_number, **args)
    except SoftTimeLimitExceeded:
        raise
    except Exception as error:
        if body.error is not None:  # the source failed to read, whatever the HTTP library made of it
            raise body.error from error
        raise s3.classify(error) from error


def _put_presigned(rt: Runtime, upload: Upload, part: Part, body: reader.RangeReader,
                   checksum: str) -> dict[str, str]:
    """Send through URLs from the signer; a URL refused as expired is replaced, uncounted. Only a
    URL whose reply is authenticated and that is for exactly this part is used (workers/signer.py)."""
    client = rt.redis
    if client is None:
        raise s3.PermanentS3Error("presigned mode needs Redis (the signer answers through it)")
    target = signer.Target.of(upload, part)
    for resign in range(RESIGNS + 1):
        try:
            url = signer.request(client, rt.settings.queue, rt.settings.signer_key, target, checksum)
        except redis.RedisError as error:
            raise s3.UnreachableS3Error(f"could not reach the signer through Redis: {error}") from None
        body.seek(0)
        try:
            return signer.put(url, body)
        except signer.Expired as refused:
            if resign == RESIGNS:
                raise s3.PermanentS3Error(f"{refused} (refused {RESIGNS + 1} fresh presigned URLs)") from None
            log.info("presigned URL refused (%s); asking for a new one", refused,
                     extra={"upload_id": str(upload.id), "part": part.part_number})
        except s3.S3Error:
            if body.error is not None:  # the source failed to read: not the link's fault
                raise body.error from None
            raise
    raise AssertionError("unreachable")


#: The backoff of a part throttled under a window, relative to the usual one.
CONGESTION_BACKOFF = 0.2


def _retry_or_fail(rt: Runtime, upload: Upload, part: Part, error: str, scale: float = 1.0) -> None:
    """After a transient error: release the claim and retry later, unless retries are exhausted."""
    number = part.part_number
    if part.attempts > upload.max_retries:
        _fail(rt, upload, part, f"{error} (gave up after {part.attempts} attempts)")
    if upload.retry_count >= rt.settings.max_upload_retries:
        _fail(rt, upload, part, f"{error} (the upload gave up after {upload.retry_count} retries in all)")
    with rt.db.transaction() as session:
        released = transitions.release_for_retry(session, upload.id, number, str(part.worker), error)
    if released is None:
        raise RetryLater(f"part {number} was taken over while failing: {error}", _wait(rt, 1))
    seconds = _wait(rt, part.attempts) * scale
    log.warning("part failed (%s); retry %d/%d in %.1fs", error, part.attempts, upload.max_retries, seconds,
                extra={"upload_id": str(upload.id), "part": number})
    raise RetryLater(error, seconds)


def _wait_for_s3(rt: Runtime, upload: Upload, part: Part, error: str) -> None:
    """S3 is unreachable: give the claim back uncounted and retry when the task's backoff says."""
    with rt.db.transaction() as session:
        transitions.release_for_retry(session, upload.id, part.part_number, str(part.worker), error, counted=False)
    log.warning("S3 unreachable (%s); the part waits for it", error,
                extra={"upload_id": str(upload.id), "part": part.part_number})
    raise RetryLater(error, None)


def _fail(rt: Runtime, upload: Upload, part: Part, error: str) -> None:
    """Fail the part and its upload, and raise PartFailed."""
    number = part.part_number
    message = f"part {number}: {error}"
    with rt.db.transaction() as session:
        if transitions.fail_part(session, upload.id, number, str(part.worker), error) is None:
            raise RetryLater(f"part {number} was taken over while failing: {error}", _wait(rt, 1))
        try:
            transitions.fail_upload(session, upload.id, message)
            if error.startswith("NoSuchUpload"):  # S3 dropped it (a lifecycle rule, an abort): a retry starts over
                transitions.mark_aborted(session, upload.id, "S3 answered NoSuchUpload")
        except InvalidTransition:
            pass  # another part failed it first
    log.error("upload failed: %s", message, extra={"upload_id": str(upload.id), "part": number})
    scheduler.request_schedule()  # the queue moves on
    raise PartFailed(message)


def _wait(rt: Runtime, attempt: int) -> float:
    return retry.backoff(attempt, rt.settings.retry_backoff_base, rt.settings.retry_backoff_max)
