"""The scheduler: which queued upload runs next.

Uploads wait as `queued` in Postgres. The scheduler starts the next one by
priority (highest first), then age (oldest first), while fewer than
`max_active_uploads` are in progress or completing (default 1: one file at a
time, its parts in parallel). It runs on submit, after every completion,
failure, pause or cancellation, and periodically (beat). Several schedulers
may run at once: they take turns on a transaction-scoped lock (an advisory
lock on Postgres; SQLite serializes writers anyway), and the next upload is
picked with two index-backed queries, whatever the length of the queue.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy import orm

from models import queries, transitions
from models.db import Database
from models.exceptions import InvalidTransition
from models.settings import Settings
from models.states import PartStatus, UploadStatus
from models.tables import Part, Upload
from orchestrator import sweeper
from workers import policy, s3

log = logging.getLogger(__name__)

LOCK_KEY = 0x5333_4652  # "S3FR"
RUNNING = (UploadStatus.IN_PROGRESS, UploadStatus.COMPLETING)


def schedule(settings: Settings, db: Database) -> list[uuid.UUID]:
    """Start queued uploads while slots are free; returns the ids started."""
    started = []
    while True:
        with db.transaction() as session:
            _lock(session)
            running = session.scalar(sa.select(sa.func.count()).select_from(Upload)
                                     .where(Upload.status.in_(RUNNING), Upload.queue == settings.queue)) or 0
            if running >= settings.max_active_uploads:
                break
            upload = next_queued(session, settings.queue)
            if upload is None:
                break
            transitions.start_upload(session, upload.id, upload.s3_upload_id,
                                     f"scheduled ({running + 1} of at most {settings.max_active_uploads} running)")
        if not start(settings, db, upload.id):
            break  # S3 refused or failed: leave the rest of the queue for the next run
        started.append(upload.id)
    return started


def next_queued(session: orm.Session, queue: str) -> Upload | None:
    """The queued upload of `queue` of highest priority, oldest first, locked for the caller
    (each fleet starts the uploads submitted to its own queue).

    Schedulers take turns (the advisory lock), so the row lock only waits out a
    claim or an operation touching that upload for a moment; it never skips it.
    """
    queued = sa.and_(Upload.status == UploadStatus.QUEUED, Upload.queue == queue)
    top = session.scalar(sa.select(sa.func.max(Upload.priority)).where(queued))
    if top is None:
        return None
    return session.scalars(
        sa.select(Upload).where(queued, Upload.priority == top)
        .order_by(Upload.created_at).limit(1).with_for_update()).first()


def start(settings: Settings, db: Database, upload_id: uuid.UUID, dispatch: bool = True) -> bool:
    """An upload just moved to in_progress: make sure S3 has its multipart upload, then send its parts.
    False if it could not start (it failed, or waits for the reconciler to try again)."""
    if dispatch:  # from now on the upload's parts count as dispatched (no reconciler steps in meanwhile)
        from workers import backend, broker

        backend.mark_dispatched(broker.app, str(upload_id), broker.RESULT_EXPIRES)
    if not ensure_multipart(settings, db, upload_id):
        if dispatch:
            backend.forget_dispatch(broker.app, str(upload_id))  # nothing was sent: the reconciler may retry
        return False
    if dispatch:
        dispatch_missing(db, upload_id)
    return True


def ensure_multipart(settings: Settings, db: Database, upload_id: uuid.UUID) -> bool:
    """Create the upload's multipart upload in S3 if it needs one and has none.

    False if it could not: a permanent refusal fails the upload; a transient
    error leaves it in progress with nothing dispatched, which the reconciler
    sees as a lost dispatch and tries again.
    """
    with db.transaction() as session:
        upload = queries.get_upload(session, upload_id)
    if upload.s3_upload_id:
        return True
    # One part too is a multipart upload (of one part): a late send, by a worker whose claim ran
    # out, then finds the multipart upload completed (NoSuchUpload) instead of overwriting a newer
    # object at the key, which a PutObject would.
    context = {"upload_id": str(upload_id)}
    try:
        client = policy.client_for(settings, upload.endpoint_url, upload.bucket)
    except policy.Refused as refused:  # the row asks for a destination this process may not send to
        log.error("not started: %s", refused, extra=context)
        with db.transaction() as session:
            with contextlib.suppress(InvalidTransition):
                transitions.fail_upload(session, upload_id, str(refused))
        return False
    try:
        created = client.create_multipart_upload(Bucket=upload.bucket, Key=upload.key, ChecksumAlgorithm="CRC32C")
    except Exception as error:
        problem = s3.classify(error)
        log.error("CreateMultipartUpload failed: %s", problem, extra=context)
        if isinstance(problem, s3.PermanentS3Error):
            with db.transaction() as session:
                try:
                    transitions.fail_upload(session, upload_id, f"CreateMultipartUpload failed: {problem}")
                except InvalidTransition:
                    pass
        return False
    with db.transaction() as session:
        recorded = transitions.set_multipart(session, upload_id, created["UploadId"])
    if not recorded:  # another scheduler or reconciler created one first, or it was paused or cancelled
        sweeper.abort(client, upload.bucket, upload.key, created["UploadId"])
        with db.transaction() as session:
            current = queries.get_upload(session, upload_id)
        return current.status == UploadStatus.IN_PROGRESS and current.s3_upload_id is not None
    return True


def dispatch(upload_id: uuid.UUID, part_numbers: Iterable[int], recovered: bool = False) -> None:
    """One chord: a task per part, then the completion callback. Ids only in the messages.
    `recovered`: parts handed on from a dead worker, sent ahead of the parts still waiting.

    Only a dispatch of the upload's missing parts marks it dispatched: a recovered one (a few
    parts handed on) leaves the mark alone, so that it cannot hide that Redis lost the rest."""
    from workers import backend, broker  # the Celery app is configured from the environment on import

    if recovered:
        broker.dispatch_chord(str(upload_id), list(part_numbers), recovered)
        return
    backend.mark_dispatched(broker.app, str(upload_id), broker.RESULT_EXPIRES)
    try:
        broker.dispatch_chord(str(upload_id), list(part_numbers), recovered)
    except Exception:
        backend.forget_dispatch(broker.app, str(upload_id))
        raise


def dispatch_missing(db: Database, upload_id: uuid.UUID) -> tuple[list[int], list[int]]:
    """Dispatch a chord of the parts neither done nor held by a live claim, or the completion
    if there is none; returns (dispatched, held)."""
    from workers import backend, broker

    with db.transaction() as session:
        rows = session.execute(sa.select(Part.part_number, Part.status, transitions.live_claim())
                               .where(Part.upload_id == upload_id).order_by(Part.part_number)).all()
    held = [number for number, _, live in rows if live]
    missing = [number for number, status, live in rows if status != PartStatus.DONE and not live]
    if missing:
        dispatch(upload_id, missing)
    elif not held:
        backend.mark_dispatched(broker.app, str(upload_id), broker.RESULT_EXPIRES)
        broker.send("s3ferry.complete_upload", [], str(upload_id))
    return missing, held


def _lock(session: orm.Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})


def request_schedule() -> None:
    """Ask a worker to run the scheduler (after a completion, failure, pause or cancel)."""
    try:
        from workers import broker

        broker.send("s3ferry.schedule")
    except Exception as error:  # beat runs it periodically anyway
        log.warning("could not ask for the scheduler: %s", error)
