"""Operations on uploads: pause, resume, cancel, retry, priority, list. The CLI and the
Python API call these; each is recorded in the events table; an invalid one raises
UserError with a one-line message and changes nothing."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import sqlalchemy as sa

from models import queries, transitions
from models.db import Database
from models.exceptions import InvalidTransition, UserError
from models.settings import Settings
from models.states import UploadStatus
from models.tables import Upload
from orchestrator import progress, reconciler, scheduler, sweeper
from workers import policy


def pause(settings: Settings, db: Database, upload_id: uuid.UUID) -> str:
    _change(db, upload_id, transitions.pause, "paused by request", "paused")
    scheduler.schedule(settings, db)  # its slot is free
    return f"upload {upload_id} paused: no new part starts; parts in flight finish"


def resume(settings: Settings, db: Database, upload_id: uuid.UUID) -> str:
    status = _status(db, upload_id)
    if status == UploadStatus.PAUSED:
        _change(db, upload_id, transitions.requeue, "resumed by request", "resumed")
        started = upload_id in scheduler.schedule(settings, db)
        return f"upload {upload_id} resumed: {'running' if started else 'queued, waiting for a free slot'}"
    if status == UploadStatus.QUEUED:
        started = upload_id in scheduler.schedule(settings, db)
        return f"upload {upload_id} is {'running' if started else 'queued, waiting for a free slot'}"
    if status in (UploadStatus.IN_PROGRESS, UploadStatus.COMPLETING):
        return str(reconciler.reconcile(settings, db, upload_id))
    if status == UploadStatus.FAILED:
        raise UserError(f"upload {upload_id} is failed: `s3ferry retry {upload_id}` resumes it from its done parts")
    raise UserError(f"upload {upload_id} is {status}; it cannot be resumed")


def cancel(settings: Settings, db: Database, upload_id: uuid.UUID) -> str:
    _change(db, upload_id, transitions.cancel, "cancelled by request", "cancelled")
    with db.transaction() as session:
        upload = queries.get_upload(session, upload_id)
    aborted = ""
    if upload.s3_upload_id and upload.s3_aborted_at is None:
        try:
            client = policy.client_for(settings, upload.endpoint_url, upload.bucket)
        except policy.Refused as refused:
            client, aborted = None, f"; its multipart upload was not aborted ({refused})"
        if client is None:
            pass
        elif not sweeper.abort(client, upload.bucket, upload.key, upload.s3_upload_id):
            aborted = "; aborting its multipart upload failed (`s3ferry sweep` will retry)"
        elif _parts_in_flight(db, upload_id):
            # A part still being sent may land after the abort (S3 says so): the sweeper
            # aborts again once those parts settle, so nothing stays billed.
            aborted = "; its multipart upload is aborted in S3 (the sweeper aborts it again after its last parts)"
        else:
            with db.transaction() as session:
                transitions.mark_aborted(session, upload_id, "cancelled")
            aborted = "; its multipart upload is aborted in S3"
    scheduler.schedule(settings, db)
    return f"upload {upload_id} cancelled{aborted}"


def retry(settings: Settings, db: Database, upload_id: uuid.UUID) -> str:
    status = _status(db, upload_id)
    if status in (UploadStatus.PAUSED, UploadStatus.QUEUED, UploadStatus.IN_PROGRESS, UploadStatus.COMPLETING):
        raise UserError(f"upload {upload_id} is {status}, not failed: `s3ferry resume {upload_id}` continues it")
    kept = _change(db, upload_id, transitions.retry_failed, "retried by request", "retried")
    started = upload_id in scheduler.schedule(settings, db)
    parts = "from its done parts" if kept else "from the start (its multipart upload had been swept)"
    return f"upload {upload_id} retried {parts}: {'running' if started else 'queued'}"


def set_priority(db: Database, upload_id: uuid.UUID, priority: int) -> str:
    _change(db, upload_id, lambda session, uid, _: transitions.set_priority(session, uid, priority), "", "reprioritised")
    return f"upload {upload_id} has priority {priority}"


def list_uploads(db: Database, status: str | None = None, limit: int = 50) -> Sequence[Upload]:
    query = sa.select(Upload).order_by(Upload.created_at.desc()).limit(limit)
    if status:
        if status not in {s.value for s in UploadStatus}:
            raise UserError(f"unknown status {status!r}: one of {', '.join(s.value for s in UploadStatus)}")
        query = query.where(Upload.status == status)
    with db.transaction() as session:
        return session.scalars(query).all()


def describe(upload: Upload) -> dict[str, object]:
    """An upload as `s3ferry ls --json` shows it."""
    iso = progress.iso
    return {"id": str(upload.id), "status": str(upload.status), "priority": upload.priority,
            "size": upload.source_size, "parts_total": upload.total_parts, "source": upload.source_uri,
            "destination": f"s3://{upload.bucket}/{upload.key}", "created_at": iso(upload.created_at),
            "started_at": iso(upload.started_at), "finished_at": iso(upload.finished_at),
            "last_error": upload.last_error}


def _parts_in_flight(db: Database, upload_id: uuid.UUID) -> int:
    with db.transaction() as session:
        return queries.part_counts(session, upload_id).in_flight


def _status(db: Database, upload_id: uuid.UUID) -> str:
    with db.transaction() as session:
        return str(queries.get_upload(session, upload_id).status)


def _change(db: Database, upload_id: uuid.UUID, move, reason: str, verb: str):  # type: ignore[no-untyped-def]
    try:
        with db.transaction() as session:
            return move(session, upload_id, reason)
    except InvalidTransition as error:
        raise UserError(f"upload {upload_id} cannot be {verb}: {error}") from None
