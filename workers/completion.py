"""Completing an upload: CompleteMultipartUpload with the part list from Postgres.

The chord hands over the part results it collected; Postgres holds the whole
list (a chord dispatched after a recovery covers only the parts that were
missing). Each collected ETag must agree with Postgres. Completing twice, or
before every part is done, changes nothing and says so.
"""

from __future__ import annotations

import binascii
import hashlib
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence

import sqlalchemy as sa

from models import transitions
from models.exceptions import DatabaseError, InvalidTransition, S3FerryError
from models.states import PartStatus, UploadStatus
from models.tables import Part, Upload
from workers import retry, s3
from workers.parts import RetryLater
from workers.runtime import Runtime

log = logging.getLogger(__name__)


class CompletionFailed(S3FerryError):
    """The upload could not be completed."""


def complete(rt: Runtime, upload_id: uuid.UUID, collected: Iterable[Mapping[str, object]]) -> str:
    """Complete the upload if every part is done; returns its status afterwards."""
    context = {"upload_id": str(upload_id)}
    try:
        with rt.db.transaction() as session:
            upload = session.get(Upload, upload_id)
            if upload is None:
                raise CompletionFailed(f"no upload with id {upload_id}")
            parts = session.scalars(sa.select(Part).where(Part.upload_id == upload_id)
                                    .order_by(Part.part_number)).all()
    except DatabaseError as error:
        raise RetryLater(str(error), retry.backoff(3, 1, 60)) from error

    if upload.status == UploadStatus.COMPLETE:
        log.info("upload already complete; completion called again, nothing to do", extra=context)
        return upload.status
    if upload.status not in (UploadStatus.IN_PROGRESS, UploadStatus.COMPLETING):
        log.info("upload is %s; not completing it", upload.status, extra=context)
        return upload.status
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
            transitions.begin_completing(session, upload_id, f"all {len(parts)} parts done")
    etag = _complete_in_s3(rt, upload, parts)
    with rt.db.transaction() as session:
        try:
            transitions.mark_complete(session, upload_id, etag, "object verified with HeadObject")
        except InvalidTransition:
            log.info("upload was completed concurrently; nothing to do", extra=context)
    log.info("upload complete", extra={**context, "etag": etag})
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
        if result.get("etag") != part.etag:
            return f"part {number}: the chord collected ETag {result.get('etag')}, Postgres holds {part.etag}"
    return None


def _complete_in_s3(rt: Runtime, upload: Upload, parts: Sequence[Part]) -> str:
    client = rt.s3(upload.endpoint_url)
    expected = expected_etag(parts) if upload.s3_upload_id else parts[0].etag
    if upload.s3_upload_id:
        listing = [{"PartNumber": p.part_number, "ETag": p.etag, "ChecksumCRC32C": p.checksum} for p in parts]
        try:
            client.complete_multipart_upload(Bucket=upload.bucket, Key=upload.key, UploadId=upload.s3_upload_id,
                                             MultipartUpload={"Parts": listing})
        except Exception as error:
            if s3.error_code(error) != "NoSuchUpload":
                _s3_failed(rt, upload, error)
            # Completed before, but the record of it was lost? Then the object is there: HeadObject decides.
            log.warning("NoSuchUpload on completion; checking whether the object is already there",
                        extra={"upload_id": str(upload.id)})
    try:
        head = client.head_object(Bucket=upload.bucket, Key=upload.key)
    except Exception as error:
        _s3_failed(rt, upload, error)
    if head["ContentLength"] != upload.source_size:
        _fail(rt, upload.id, f"the object is {head['ContentLength']} bytes; the source is {upload.source_size}")
    if expected and head["ETag"] != expected:
        _fail(rt, upload.id, f"the object's ETag is {head['ETag']}; its parts give {expected}")
    return head["ETag"]


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


def _s3_failed(rt: Runtime, upload: Upload, error: Exception) -> None:
    classified = s3.classify(error)
    if isinstance(classified, s3.TransientS3Error):
        raise RetryLater(str(classified), retry.backoff(2, 1, 60)) from error
    _fail(rt, upload.id, f"completing failed: {classified}")


def give_up(rt: Runtime, upload_id: uuid.UUID, error: str) -> None:
    """Fail the upload (if it can still fail) and raise CompletionFailed."""
    _fail(rt, upload_id, error)


def _fail(rt: Runtime, upload_id: uuid.UUID, error: str) -> None:
    with rt.db.transaction() as session:
        try:
            transitions.fail_upload(session, upload_id, error)
        except InvalidTransition:
            pass
    log.error("upload failed: %s", error, extra={"upload_id": str(upload_id)})
    raise CompletionFailed(error)
