"""submit(): validate, fingerprint, record, CreateMultipartUpload, dispatch the chord.

Everything that can be checked is checked before anything is written: bad
input, an unreachable database or broker, or a missing bucket changes nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid

import botocore.exceptions
import sqlalchemy as sa

from models import queries, transitions
from models.db import Database
from models.exceptions import S3FerryError, UserError
from models.settings import Settings
from models.states import UploadStatus
from models.tables import Upload
from orchestrator import destination, plan, scheduler, source
from workers import policy, reader, s3

log = logging.getLogger(__name__)

#: statuses in which running the same upload command again attaches to the upload
RESUMABLE = (UploadStatus.QUEUED, UploadStatus.IN_PROGRESS, UploadStatus.COMPLETING)
#: ... and those in which it finds the upload rather than starting a second one
ATTACHABLE = (*RESUMABLE, UploadStatus.PAUSED)


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
    """Check everything, record the upload as queued, and let the scheduler start it if a slot is free.

    The same file (same fingerprint) to the same destination, still unfinished,
    is attached to instead of uploaded anew.
    """
    request = validate(settings, source_path, destination_uri, part_size)
    check_broker(settings)
    existing = find_resumable(db, request)
    if existing is not None:
        return existing
    recorded = record(settings, db, request, max_retries=max_retries, priority=priority)
    scheduler.schedule(settings, db)
    log.info("submitted", extra={"upload_id": str(recorded.upload_id), "parts": len(recorded.plan.parts)})
    return recorded


def find_resumable(db: Database, request: Request) -> Submitted | None:
    """An unfinished upload of this very file (same fingerprint) to the same destination."""
    src, dest = request.source, request.destination
    db.check()
    with db.transaction() as session:
        upload = session.scalars(sa.select(Upload).where(
            Upload.source_uri == src.uri, Upload.source_size == src.size, Upload.source_mtime_ns == src.mtime_ns,
            Upload.source_inode == src.inode,
            sa.or_(Upload.source_ctime_ns == src.ctime_ns, Upload.source_ctime_ns.is_(None)),  # NULL: from before 0004
            Upload.bucket == dest.bucket, Upload.key == dest.key,
            Upload.status.in_(ATTACHABLE)).order_by(Upload.created_at.desc()).limit(1)).first()
    if upload is None:
        return None
    return Submitted(upload.id, dest, dataclasses.replace(request.plan, part_size=upload.part_size),
                     upload.source_size, upload.s3_upload_id, upload.endpoint_url, resumed=True)


def validate(settings: Settings, source_path: str, destination_uri: str, part_size: int | None = None) -> Request:
    """Every check that needs no service: raises UserError, touches nothing. The workers' policy
    (source roots, buckets) is applied here too, so that a refusal shows at once."""
    policy.check_path(settings, os.path.abspath(os.path.expanduser(source_path)))
    src = source.open_source(source_path)
    if src.size == 0 and reader.has_content(str(src.path)):
        raise UserError(f"source {source_path!r} reports a size of 0 but has content (a pseudo-file?): refused")
    dest = destination.parse(destination_uri, src.path.name)
    policy.check_destination(settings, policy.own_endpoint(), dest.bucket)
    return Request(src, dest, plan.plan_parts(src.size, part_size or settings.part_size))


def record(settings: Settings, db: Database, request: Request, *, max_retries: int | None = None,
           priority: int = 0) -> Submitted:
    """Check the database and the bucket, then write the upload and its parts, queued."""
    src, dest, the_plan = request.source, request.destination, request.plan
    db.check()
    client = s3.make_client(retries=3)
    check_bucket(client, dest.bucket)
    upload = Upload(source_uri=src.uri, source_size=src.size, source_mtime_ns=src.mtime_ns,
                    source_inode=src.inode, source_ctime_ns=src.ctime_ns, bucket=dest.bucket, key=dest.key,
                    endpoint_url=s3.recorded_endpoint(client), part_size=the_plan.part_size, priority=priority,
                    max_retries=settings.max_retries if max_retries is None else max_retries,
                    retry_count=0, queue=settings.queue)
    with db.transaction() as session:
        upload = transitions.create_upload(session, upload, the_plan.parts, f"submitted {src.path} -> {dest}")
    return Submitted(upload.id, dest, the_plan, src.size, None, upload.endpoint_url)


def prepare(settings: Settings, db: Database, request: Request, *, max_retries: int | None = None,
            priority: int = 0) -> Submitted:
    """Record the upload and start it now, past the scheduler, without dispatching its parts:
    in progress in Postgres and in S3, no part sent yet (for tests and tools)."""
    recorded = record(settings, db, request, max_retries=max_retries, priority=priority)
    with db.transaction() as session:
        transitions.start_upload(session, recorded.upload_id, None, "started directly")
    scheduler.start(settings, db, recorded.upload_id, dispatch=False)
    with db.transaction() as session:
        s3_upload_id = queries.get_upload(session, recorded.upload_id).s3_upload_id
    return dataclasses.replace(recorded, s3_upload_id=s3_upload_id)


def check_broker(settings: Settings) -> None:
    from workers.broker import app

    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=5)
    except Exception as error:
        where = app.connection_for_write().as_uri()  # kombu masks the password
        raise BrokerUnavailable(f"cannot reach the broker at {where}: {error}") from None


#: S3's answers to credentials it does not accept (as opposed to rights they lack: AccessDenied)
CREDENTIALS_REFUSED = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                                 "TokenRefreshRequired", "AuthorizationHeaderMalformed"})


def check_bucket(client: object, bucket: str) -> None:
    """The bucket exists and the credentials are accepted: else UserError, before anything is written.
    Credentials that S3 accepts but that may not list the bucket are let through (uploading needs
    only PutObject rights)."""
    try:
        client.head_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    except botocore.exceptions.ClientError as error:
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 404 or s3.error_code(error) in ("404", "NoSuchBucket"):
            raise UserError(f"bucket {bucket!r} does not exist") from None
        if status == 403:
            _check_credentials(client, bucket)
            log.info("cannot check bucket %s (403, access denied); going on: uploads need only PutObject rights",
                     bucket)
            return
        raise UserError(f"checking bucket {bucket!r} failed: {s3.describe(error)}") from None
    except botocore.exceptions.NoCredentialsError:
        raise UserError("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
                        ) from None
    except (botocore.exceptions.BotoCoreError, ValueError) as error:
        raise UserError(f"cannot reach S3 to check bucket {bucket!r}: {s3.describe(error)}") from None


def _check_credentials(client: object, bucket: str) -> None:
    """After a 403 to HeadBucket (whose answer has no body, so no reason): a request whose error
    says why. UserError if the credentials themselves are refused."""
    try:
        client.get_bucket_location(Bucket=bucket)  # type: ignore[attr-defined]
    except botocore.exceptions.ClientError as error:
        code = s3.error_code(error)
        if code in CREDENTIALS_REFUSED:
            raise UserError(f"S3 refused the credentials for bucket {bucket!r}: {s3.describe(error)}") from None
    except (botocore.exceptions.BotoCoreError, ValueError):
        pass  # HeadBucket got through: the upload's own requests say more
