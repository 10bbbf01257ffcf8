"""Sending one part: claim it, stream its byte range to S3 with a CRC32C, record it.

Plain functions, testable without Celery; `workers.tasks` only maps their
outcomes to Celery (a result, or a retry after `RetryLater.seconds`).
"""

from __future__ import annotations

import dataclasses
import logging
import uuid

from celery.exceptions import SoftTimeLimitExceeded

from models import transitions
from models.exceptions import InvalidTransition, S3FerryError
from models.tables import Part, Upload
from orchestrator import scheduler
from workers import reader, retry, s3
from workers.lease import LeaseKeeper
from workers.runtime import Runtime

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

    Database errors propagate (the task retries them without counting: Postgres
    may be restarting); S3 and source errors are handled here.
    """
    context = {"upload_id": str(upload_id), "part": number}
    with rt.db.transaction() as session:
        claim = transitions.claim_part(session, upload_id, number, rt.worker_id, rt.settings.lease_seconds)
    part, upload = claim.part, claim.upload
    if claim.outcome is transitions.ClaimOutcome.DONE:
        log.info("part already done; not sending it again", extra=context)
        return PartResult(number, part.etag, part.checksum)
    if claim.outcome is transitions.ClaimOutcome.INACTIVE:
        log.info("upload is %s; part not sent", upload.status, extra=context)
        return PartResult(number, skipped=f"upload is {upload.status}")
    if claim.outcome is transitions.ClaimOutcome.HELD:
        raise RetryLater(f"part {number} is held by {part.worker}", min(30.0, rt.settings.lease_seconds / 2))

    try:
        with LeaseKeeper(rt, upload_id, number) as lease:
            etag, checksum = transfer(rt, upload, part)
    except SoftTimeLimitExceeded:
        _retry_or_fail(rt, upload, part, "the part ran past the task's soft time limit")
    except s3.UnreachableS3Error as error:
        _wait_for_s3(rt, upload, part, str(error))
    except s3.TransientS3Error as error:
        _retry_or_fail(rt, upload, part, str(error))
    except (reader.SourceChanged, s3.PermanentS3Error) as error:
        _fail(rt, upload, part, str(error))
    except OSError as error:  # reading the source failed (I/O error, file shrank, ...)
        _fail(rt, upload, part, f"reading the source failed: {error}")

    if lease.lost:
        raise RetryLater(f"part {number}: claim lost while sending; not recorded", 1.0)
    with rt.db.transaction() as session:
        recorded = transitions.finish_part(session, upload_id, number, rt.worker_id, etag, checksum,
                                           f"landed ({rt.worker_id})")
    if recorded is None:
        raise RetryLater(f"part {number}: claim taken over while sending; not recorded", 1.0)
    log.info("part done", extra={**context, "etag": etag})
    return PartResult(number, etag, checksum)


def transfer(rt: Runtime, upload: Upload, part: Part) -> tuple[str, str]:
    """Stream the part's byte range to S3 with its CRC32C; returns (ETag, checksum)."""
    path = reader.path_from_uri(upload.source_uri)
    fingerprint = (upload.source_size, upload.source_mtime_ns, upload.source_inode)
    reader.check_unchanged(path, *fingerprint)
    client = rt.s3(upload.endpoint_url)
    with reader.RangeReader(path, part.offset, part.size) as body:
        checksum = reader.crc32c_of(body)
        args = {"Bucket": upload.bucket, "Key": upload.key, "Body": body, "ContentLength": part.size,
                "ChecksumCRC32C": checksum}
        try:
            if upload.s3_upload_id is None:
                response = client.put_object(**args)
            else:
                response = client.upload_part(UploadId=upload.s3_upload_id, PartNumber=part.part_number, **args)
        except SoftTimeLimitExceeded:
            raise
        except Exception as error:
            raise s3.classify(error) from error
    # A file rewritten while it was read is never stitched into the object.
    reader.check_unchanged(path, *fingerprint)
    returned = response.get("ChecksumCRC32C")
    if returned and returned != checksum:
        raise s3.TransientS3Error(f"S3 computed CRC32C {returned}, we sent {checksum}")
    return response["ETag"], checksum


def _retry_or_fail(rt: Runtime, upload: Upload, part: Part, error: str) -> None:
    """After a transient error: release the claim and retry later, unless retries are exhausted."""
    number = part.part_number
    if part.attempts > upload.max_retries:
        _fail(rt, upload, part, f"{error} (gave up after {part.attempts} attempts)")
    if upload.retry_count >= rt.settings.max_upload_retries:
        _fail(rt, upload, part, f"{error} (the upload gave up after {upload.retry_count} retries in all)")
    with rt.db.transaction() as session:
        released = transitions.release_for_retry(session, upload.id, number, rt.worker_id, error)
    if released is None:
        raise RetryLater(f"part {number} was taken over while failing: {error}", _wait(rt, 1))
    seconds = _wait(rt, part.attempts)
    log.warning("part failed (%s); retry %d/%d in %.1fs", error, part.attempts, upload.max_retries, seconds,
                extra={"upload_id": str(upload.id), "part": number})
    raise RetryLater(error, seconds)


def _wait_for_s3(rt: Runtime, upload: Upload, part: Part, error: str) -> None:
    """S3 is unreachable: give the claim back uncounted and retry when the task's backoff says."""
    with rt.db.transaction() as session:
        transitions.release_for_retry(session, upload.id, part.part_number, rt.worker_id, error, counted=False)
    log.warning("S3 unreachable (%s); the part waits for it", error,
                extra={"upload_id": str(upload.id), "part": part.part_number})
    raise RetryLater(error, None)


def _fail(rt: Runtime, upload: Upload, part: Part, error: str) -> None:
    """Fail the part and its upload, and raise PartFailed."""
    number = part.part_number
    message = f"part {number}: {error}"
    with rt.db.transaction() as session:
        if transitions.fail_part(session, upload.id, number, rt.worker_id, error) is None:
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
