"""submit(): validate, fingerprint, record, CreateMultipartUpload, dispatch the chord.

Everything that can be checked is checked before anything is written: bad
input, an unreachable database or broker, or a missing bucket changes nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import urllib.parse
import uuid
from collections.abc import Iterable

import botocore.exceptions
import sqlalchemy as sa
from celery import chord

from models import transitions
from models.db import Database
from models.exceptions import S3FerryError, UserError
from models.settings import Settings
from models.states import UploadStatus
from models.tables import Upload
from orchestrator import destination, plan, source
from workers import s3

log = logging.getLogger(__name__)

#: statuses in which running the same upload command again attaches to the upload
RESUMABLE = (UploadStatus.QUEUED, UploadStatus.IN_PROGRESS, UploadStatus.COMPLETING)


class BrokerUnavailable(S3FerryError):
    """The Celery broker cannot be reached."""


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked request: the source exists and is readable, the destination and plan are valid."""

    source: source.Source
    destination: destination.Destination
    plan: plan.Plan


@dataclasses.dataclass(frozen=True)
class Submitted:
    upload_id: uuid.UUID
    destination: destination.Destination
    plan: plan.Plan
    size: int
    s3_upload_id: str | None
    endpoint_url: str | None
    #: an unfinished upload of the same file to the same place, attached to instead of starting anew
    resumed: bool = False


def submit(settings: Settings, db: Database, source_path: str, destination_uri: str, *,
           part_size: int | None = None, max_retries: int | None = None, priority: int = 0) -> Submitted:
    """Check everything, record the upload, create it in S3 and dispatch its chord."""
    request = validate(settings, source_path, destination_uri, part_size)
    check_broker(settings)
    existing = find_resumable(db, request)
    if existing is not None:
        return existing
    prepared = prepare(settings, db, request, max_retries=max_retries, priority=priority)
    try:
        dispatch(prepared.upload_id, [p.number for p in prepared.plan.parts])
    except Exception as error:
        _abandon(db, prepared, error)
        raise
    log.info("submitted", extra={"upload_id": str(prepared.upload_id), "parts": len(prepared.plan.parts)})
    return prepared


def find_resumable(db: Database, request: Request) -> Submitted | None:
    """An unfinished upload of this very file (same fingerprint) to the same destination."""
    src, dest = request.source, request.destination
    db.check()
    with db.transaction() as session:
        upload = session.scalars(sa.select(Upload).where(
            Upload.source_uri == src.uri, Upload.source_size == src.size, Upload.source_mtime_ns == src.mtime_ns,
            Upload.source_inode == src.inode, Upload.bucket == dest.bucket, Upload.key == dest.key,
            Upload.status.in_(RESUMABLE)).order_by(Upload.created_at.desc()).limit(1)).first()
    if upload is None:
        return None
    return Submitted(upload.id, dest, dataclasses.replace(request.plan, part_size=upload.part_size),
                     upload.source_size, upload.s3_upload_id, upload.endpoint_url, resumed=True)


def validate(settings: Settings, source_path: str, destination_uri: str, part_size: int | None = None) -> Request:
    """Every check that needs no service: raises UserError, touches nothing."""
    src = source.open_source(source_path)
    dest = destination.parse(destination_uri, src.path.name)
    return Request(src, dest, plan.plan_parts(src.size, part_size or settings.part_size))


def prepare(settings: Settings, db: Database, request: Request, *, max_retries: int | None = None,
            priority: int = 0) -> Submitted:
    """Everything but the dispatch: the upload is in progress in Postgres and in S3, no part sent yet.

    The multipart upload is created before any row is written, so an S3 refusal
    writes nothing; if the rows cannot be written, it is aborted again.
    """
    src, dest, the_plan = request.source, request.destination, request.plan
    db.check()
    client = s3.make_client(retries=3)
    check_bucket(client, dest.bucket)
    s3_upload_id = _create_multipart(client, dest, len(the_plan.parts))
    upload = Upload(source_uri=src.uri, source_size=src.size, source_mtime_ns=src.mtime_ns,
                    source_inode=src.inode, bucket=dest.bucket, key=dest.key,
                    endpoint_url=recorded_endpoint(client), part_size=the_plan.part_size, priority=priority,
                    max_retries=settings.max_retries if max_retries is None else max_retries,
                    retry_count=0)
    try:
        with db.transaction() as session:
            upload = transitions.create_upload(session, upload, the_plan.parts, f"submitted {src.path} -> {dest}")
            transitions.start_upload(session, upload.id, s3_upload_id, "multipart upload created")
    except Exception:
        _abort(client, dest, s3_upload_id, None)
        raise
    return Submitted(upload.id, dest, the_plan, src.size, s3_upload_id, upload.endpoint_url)


def dispatch(upload_id: uuid.UUID, part_numbers: Iterable[int]) -> None:
    """One chord: a task per part, then the completion callback. Ids only in the messages."""
    from workers import app, backend, tasks  # the Celery app is configured from the environment on import

    backend.mark_dispatched(tasks.app, str(upload_id), app.RESULT_EXPIRES)
    header = [tasks.upload_part.si(str(upload_id), n) for n in part_numbers]
    chord(header)(tasks.complete_upload.s(str(upload_id)))


def recorded_endpoint(client: object) -> str | None:
    """The endpoint the upload is bound to: a custom one (MinIO, R2, ...), or None for AWS
    itself, so that each worker resolves the bucket's regional endpoint on its own."""
    url = str(client.meta.endpoint_url)  # type: ignore[attr-defined]
    host = urllib.parse.urlsplit(url).hostname or ""
    return None if host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn") else url


def check_broker(settings: Settings) -> None:
    from workers.app import app

    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=5)
    except Exception as error:
        where = app.connection_for_write().as_uri()  # kombu masks the password
        raise BrokerUnavailable(f"cannot reach the broker at {where}: {error}") from None


def check_bucket(client: object, bucket: str) -> None:
    try:
        client.head_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    except botocore.exceptions.ClientError as error:
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 404 or s3.error_code(error) in ("404", "NoSuchBucket"):
            raise UserError(f"bucket {bucket!r} does not exist") from None
        if status == 403:
            log.warning("cannot check bucket %s (403); going on: uploads need only PutObject rights", bucket)
            return
        raise UserError(f"checking bucket {bucket!r} failed: {s3.describe(error)}") from None
    except (botocore.exceptions.BotoCoreError, ValueError) as error:
        raise UserError(f"cannot reach S3 to check bucket {bucket!r}: {s3.describe(error)}") from None


def _create_multipart(client: object, dest: destination.Destination, parts: int) -> str | None:
    if parts == 1:
        return None  # one part (a 0-byte file included) is one PutObject: no multipart upload to create
    try:
        response = client.create_multipart_upload(  # type: ignore[attr-defined]
            Bucket=dest.bucket, Key=dest.key, ChecksumAlgorithm="CRC32C")
    except Exception as error:
        raise type(s3.classify(error))(f"CreateMultipartUpload failed: {s3.describe(error)}") from None
    return str(response["UploadId"])


def _abort(client: object, dest: destination.Destination, s3_upload_id: str | None, upload_id: uuid.UUID | None
           ) -> None:
    if not s3_upload_id:
        return
    try:
        client.abort_multipart_upload(  # type: ignore[attr-defined]
            Bucket=dest.bucket, Key=dest.key, UploadId=s3_upload_id)
    except Exception as error:  # the sweeper will find it
        log.error("could not abort the multipart upload: %s", s3.describe(error),
                  extra={"upload_id": str(upload_id)})


def _abandon(db: Database, prepared: Submitted, error: Exception) -> None:
    """Dispatch failed after the upload was created: abort it in S3 so nothing is left billed."""
    log.error("dispatch failed (%s); aborting the upload", error, extra={"upload_id": str(prepared.upload_id)})
    _abort(s3.make_client(prepared.endpoint_url, retries=3), prepared.destination, prepared.s3_upload_id,
           prepared.upload_id)
    try:
        with db.transaction() as session:
            transitions.fail_upload(session, prepared.upload_id, f"dispatch failed: {error}")
    except S3FerryError as db_error:
        log.error("could not record the failure: %s", db_error, extra={"upload_id": str(prepared.upload_id)})
