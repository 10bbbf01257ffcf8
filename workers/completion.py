"""Completing an upload: CompleteMultipartUpload with the part list from Postgres.

The chord hands over the part results it collected; Postgres holds the whole
list (a chord dispatched after a recovery covers only the parts that were
missing). Each collected ETag must agree with Postgres. Completing twice, or
before every part is done, changes nothing and says so.

The object is then checked against what was read, not against S3 itself: its
size, its ETag, and the CRC32C S3 reports for it (HeadObject, ChecksumMode
ENABLED), which must equal the one computed from the parts' CRC32Cs as the
workers read them from the source (S3's COMPOSITE form for a multipart upload).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence

import crc32c
import sqlalchemy as sa

from models import notify, queries, transitions
from models.exceptions import InvalidTransition, S3FerryError
from models.states import PartStatus, UploadStatus
from models.tables import Part, Upload
from orchestrator import progress, scheduler
from workers import policy, retry, s3
from workers.parts import RetryLater
from workers.runtime import Runtime

log = logging.getLogger(__name__)

CLOCK_SKEW = dt.timedelta(minutes=5)


class CompletionFailed(S3FerryError):
    """The upload could not be completed."""


def complete(rt: Runtime, upload_id: uuid.UUID, collected: Iterable[Mapping[str, object]],
             attempt: int = 0) -> str:
    """Complete the upload if every part is done; returns its status afterwards.

    `attempt` counts earlier tries of this completion: transient S3 errors retry
    with backoff up to the upload's max_retries, then fail it.
    """
    context = {"upload_id": str(upload_id)}
    with rt.db.transaction() as session:
        upload = session.get(Upload, upload_id)
        if upload is None:
            raise CompletionFailed(f"no upload with id {upload_id}")
        parts = session.scalars(sa.select(Part).where(Part.upload_id == upload_id)
                                .order_by(Part.part_number)).all()

    if upload.status == UploadStatus.COMPLETE:
        log.info("upload already complete; completion called again, nothing to do", extra=context)
        return upload.status
    if upload.status not in (UploadStatus.IN_PROGRESS, UploadStatus.COMPLETING):
        log.info("upload is %s; not completing it", upload.status, extra=context)
        return upload.status
    rt.alive()  # the completer names itself: if it dies, the recovery pass completes the upload
    completing = rt.worker_id if upload.status == UploadStatus.COMPLETING else None
    with rt.db.transaction() as session:
        transitions.touch(session, upload_id, completing)  # a completion that is retrying is not a stalled one
    missing = [p.part_number for p in parts if p.status != PartStatus.DONE]
    if missing:
        log.warning("completion called before every part is done (%d missing, first %s); nothing changed",
                    len(missing), missing[:5], extra=context)
        return upload.status
    mismatch = _check_collected(parts, collected)
    if mismatch:
        _fail(rt, upload_id, mismatch)

    if upload.status == UploadStatus.IN_PROGRESS:
        with rt.db.transaction() as session:
            try:
                transitions.begin_completing(session, upload_id, f"all {len(parts)} parts done", rt.worker_id)
            except InvalidTransition:
                status = queries.get_upload(session, upload_id).status
                if status != UploadStatus.COMPLETING:  # another callback finished it, or it failed
                    log.info("upload became %s meanwhile; not completing it", status, extra=context)
                    return status
    etag, checksum, verified = _complete_in_s3(rt, upload, parts, attempt)
    with rt.db.transaction() as session:
        try:
            transitions.mark_complete(session, upload_id, etag, f"object verified with HeadObject: {verified}",
                                      checksum=checksum)
            notify.notify(session, upload_id)
        except InvalidTransition:
            status = queries.get_upload(session, upload_id).status
            log.info("upload became %s meanwhile", status, extra=context)
            return status
    _announce(rt, upload_id)
    log.info("upload complete", extra={**context, "etag": etag, "checksum": checksum})
    scheduler.request_schedule()  # a slot is free: the next queued upload may start
    return UploadStatus.COMPLETE


def _check_collected(parts: Sequence[Part], collected: Iterable[Mapping[str, object]]) -> str | None:
    """The chord's results must agree with Postgres; a disagreement is an error, not a choice."""
    by_number = {p.part_number: p for p in parts}
    for result in collected or ():
        if not isinstance(result, Mapping) or result.get("skipped"):
            continue
        number = result.get("part")
        part = by_number.get(number)  # type: ignore[arg-type]
        if part is None:
            return f"the chord returned part {number}, which this upload does not have"
        if not transitions.same_etag(str(result.get("etag") or ""), part.etag):
            return f"part {number}: the chord collected ETag {result.get('etag')}, Postgres holds {part.etag}"
    return None


def _complete_in_s3(rt: Runtime, upload: Upload, parts: Sequence[Part],
                    attempt: int) -> tuple[str, str | None, str]:
    """Complete in S3 and check the object; returns (ETag, checksum, what was verified)."""
    try:
        policy.check_destination(rt.settings, upload.endpoint_url, upload.bucket)
    except policy.Refused as refused:  # a row pointed elsewhere after its parts were sent
        _fail(rt, upload.id, str(refused))
    client = rt.s3(upload.endpoint_url)
    expected = expected_etag(parts) if upload.s3_upload_id else parts[0].etag
    maybe_done_before = False
    if upload.s3_upload_id:
        listing = [{"PartNumber": p.part_number, "ETag": p.etag,
                    **({"ChecksumCRC32C": p.checksum} if p.checksum else {})} for p in parts]
        try:
            client.complete_multipart_upload(Bucket=upload.bucket, Key=upload.key, UploadId=upload.s3_upload_id,
                                             MultipartUpload={"Parts": listing})
        except Exception as error:
            if s3.error_code(error) != "NoSuchUpload":
                _s3_failed(rt, upload, error, attempt)
            # Completed before, but the record of it was lost? Then the object is there: HeadObject decides.
            log.warning("NoSuchUpload on completion; checking whether the object is already there",
                        extra={"upload_id": str(upload.id)})
            maybe_done_before = True
    try:
        head = client.head_object(Bucket=upload.bucket, Key=upload.key, ChecksumMode="ENABLED")
    except Exception as error:
        if maybe_done_before and s3.error_code(error) in ("404", "NoSuchKey") and attempt < upload.max_retries:
            # Another completion of this upload may be finishing right now: look again shortly.
            raise RetryLater("NoSuchUpload, and no object yet", retry.backoff(attempt + 1, 1.0, 30.0)) from error
        _s3_failed(rt, upload, error, attempt)
    if head["ContentLength"] != upload.source_size:
        _fail(rt, upload.id, f"the object is {head['ContentLength']} bytes; the source is {upload.source_size}")
    if expected and head["ETag"] != expected:
        _fail(rt, upload.id, f"the object's ETag is {head['ETag']}; its parts give {expected}")
    if maybe_done_before and not expected and _older_than_upload(head["LastModified"], upload.started_at):
        _fail(rt, upload.id, "the multipart upload is gone and the object at the key is older than this upload")
    checksum, verified = _check_checksum(rt, upload, parts, head)
    return head["ETag"], checksum, verified


def _check_checksum(rt: Runtime, upload: Upload, parts: Sequence[Part],
                    head: Mapping[str, object]) -> tuple[str | None, str]:
    """The object's CRC32C as S3 reports it must be the one the parts give as they were read.

    Returns (the expected checksum, what was verified). A store that reports none (some
    S3-compatibles, or a checksum of another kind than the one asked for) leaves the
    size and ETag checks alone, and says so.
    """
    context = {"upload_id": str(upload.id)}
    expected = expected_checksum(parts, multipart=bool(upload.s3_upload_id))
    reported = head.get("ChecksumCRC32C")
    kind = head.get("ChecksumType")
    if expected is None:
        log.warning("a part has no CRC32C recorded: the object's checksum was not checked", extra=context)
        return None, "size and ETag (a part has no checksum recorded)"
    if not reported:
        log.warning("the store reported no CRC32C for the object: its checksum was not available; "
                    "verified by size and ETag only", extra=context)
        return expected, "size and ETag (the store reported no object checksum)"
    if upload.s3_upload_id and kind == "FULL_OBJECT":  # not what CreateMultipartUpload asked for
        log.warning("the store reported a full-object CRC32C, not the composite one asked for: not comparable; "
                    "verified by size and ETag only", extra=context)
        return expected, "size and ETag (the store reported a full-object checksum, not a composite one)"
    if not same_checksum(str(reported), expected):
        _fail(rt, upload.id, f"the object's CRC32C is {reported}; the parts as read from the source give {expected}")
    return expected, f"size, ETag and CRC32C {expected}"


def _older_than_upload(modified: dt.datetime, started: dt.datetime | None) -> bool:
    """With no ETag to compare, an object older than the upload (minus clock skew) is not ours."""
    if started is None:
        return False
    started = started if started.tzinfo else started.replace(tzinfo=dt.UTC)
    return modified < started - CLOCK_SKEW


def expected_etag(parts: Sequence[Part]) -> str | None:
    """S3's multipart ETag: MD5 of the parts' binary MD5s, then '-N'. None if a part ETag isn't an MD5."""
    digests = []
    for part in parts:
        try:
            digests.append(binascii.unhexlify((part.etag or "").strip('"')))
        except binascii.Error:
            return None
        if len(digests[-1]) != 16:
            return None
    return f'"{hashlib.md5(b"".join(digests)).hexdigest()}-{len(parts)}"'  # noqa: S324 - S3's format


def expected_checksum(parts: Sequence[Part], multipart: bool) -> str | None:
    """The object's CRC32C as S3 reports it, from the parts' CRC32Cs (computed from the bytes read).

    One part (PutObject): its own CRC32C. A multipart upload: S3's COMPOSITE checksum. None if
    a part has no checksum recorded.
    """
    checksums = [part.checksum for part in parts]
    if not checksums or not all(checksums):
        return None
    if not multipart:
        return checksums[0]
    return composite_crc32c(checksums)  # type: ignore[arg-type]


def composite_crc32c(checksums: Sequence[str]) -> str | None:
    """S3's COMPOSITE CRC32C of a multipart object: base64 of the CRC32C of the parts' raw 4-byte
    CRC32Cs, concatenated in part order, then '-N'. None if a part's checksum is not a CRC32C."""
    raw = []
    for checksum in checksums:
        try:
            raw.append(base64.b64decode(checksum, validate=True))
        except binascii.Error:
            return None
        if len(raw[-1]) != 4:
            return None
    value = crc32c.crc32c(b"".join(raw))
    return f"{base64.b64encode(value.to_bytes(4, 'big')).decode('ascii')}-{len(checksums)}"


def same_checksum(reported: str, expected: str) -> bool:
    """Whether S3's report is the expected checksum. A composite one is reported with its '-N'
    (S3's HeadObject and GetObject) or without it (GetObjectAttributes; moto's HeadObject)."""
    value, _, count = expected.partition("-")
    return reported == expected or (bool(count) and reported == value)


def _s3_failed(rt: Runtime, upload: Upload, error: Exception, attempt: int) -> None:
    classified = s3.classify(error)
    if isinstance(classified, s3.TransientS3Error) and attempt < upload.max_retries:
        seconds = retry.backoff(attempt + 1, rt.settings.retry_backoff_base, rt.settings.retry_backoff_max)
        log.warning("completing failed (%s); retry %d/%d in %.1fs", classified, attempt + 1, upload.max_retries,
                    seconds, extra={"upload_id": str(upload.id)})
        raise RetryLater(str(classified), seconds) from error
    _fail(rt, upload.id, f"completing failed: {classified}")


def _fail(rt: Runtime, upload_id: uuid.UUID, error: str) -> None:
    with rt.db.transaction() as session:
        try:
            transitions.fail_upload(session, upload_id, error)
            notify.notify(session, upload_id)
        except InvalidTransition:
            pass
    _announce(rt, upload_id)
    log.error("upload failed: %s", error, extra={"upload_id": str(upload_id)})
    scheduler.request_schedule()
    raise CompletionFailed(error)


def _announce(rt: Runtime, upload_id: uuid.UUID) -> None:
    """The upload has finished: a command waiting on it hears so now, whatever the database (on
    PostgreSQL it also gets the NOTIFY sent at commit)."""
    try:
        client = rt.redis
        if client is not None:
            progress.announce_finished(client, upload_id)
    except Exception as error:  # noqa: BLE001 - the waiting command looks again within a second anyway
        log.info("could not announce the upload's end (%s)", error, extra={"upload_id": str(upload_id)})
