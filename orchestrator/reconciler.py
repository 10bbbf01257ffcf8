"""The reconciler: finds stalled uploads and gets them moving again, from Postgres and S3.

An upload is stalled when nothing happened to it for `stall_seconds`: its
chord was lost with Redis, its worker died with its parts claimed, or the
orchestrator died before dispatching. The reconciler releases expired claims,
asks S3 which parts landed (ListParts) and accepts those whose size, ETag
(MD5) and CRC32C match our own digest of that byte range, then dispatches a
new chord for the parts still missing, or the completion if none is.
Redis's visibility timeout is never waited for.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid

import sqlalchemy as sa
from sqlalchemy import orm

from models import clock, queries, transitions
from models.db import Database
from models.exceptions import InvalidTransition
from models.settings import Settings
from models.states import PartStatus, UploadStatus
from models.tables import Part, Upload
from orchestrator import scheduler
from workers import policy, reader, recovery, s3

log = logging.getLogger(__name__)

ACTIVE = (UploadStatus.IN_PROGRESS, UploadStatus.COMPLETING)


@dataclasses.dataclass
class Report:
    upload_id: uuid.UUID
    action: str
    released: list[int] = dataclasses.field(default_factory=list)
    adopted: list[int] = dataclasses.field(default_factory=list)
    dispatched: list[int] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        text = f"{self.upload_id}: {self.action}"
        for name in ("released", "adopted", "dispatched"):
            numbers = getattr(self, name)
            if numbers:
                text += f"; {name} {len(numbers)} part(s)"
        return text


def stalled(db: Database, stall_seconds: float, queue: str | None = None) -> list[uuid.UUID]:
    """Uploads in progress or completing that need the reconciler.

    Either Redis lost their last dispatch (its sentinel key is gone: the messages
    and the chord with it), or nothing happened to them for `stall_seconds` while
    the whole fleet was idle too. A busy fleet means their parts are only waiting
    in the queue, behind other uploads' parts: not stalled.
    """
    from workers import backend, broker

    since = clock.now(-stall_seconds)
    recent = sa.or_(Part.started_at >= since, Part.finished_at >= since, transitions.live_claim())
    with db.transaction() as session:
        active = _active(session, queue)
        quiet = set(str(u) for u in session.scalars(sa.select(Upload.id).where(
            Upload.status.in_(ACTIVE), Upload.updated_at < since,
            sa.or_(Upload.dispatched_at.is_(None), Upload.dispatched_at < since),
            Upload.id.not_in(sa.select(Part.upload_id).where(recent)))))
        fleet_idle = session.scalar(sa.select(sa.func.count()).select_from(Part).where(recent)) == 0
    lost = backend.lost_dispatches(broker.app, active)
    return [uuid.UUID(u) for u in active if u in lost or (u in quiet and fleet_idle)]


def lost(db: Database, queue: str, grace_seconds: float) -> list[uuid.UUID]:
    """Uploads of `queue`, in progress or completing, whose last dispatch Redis no longer knows,
    and that were not dispatched in the last `grace_seconds` (a dispatcher may be between
    recording the start and marking the dispatch)."""
    from workers import backend, broker

    with db.transaction() as session:
        active = _active(session, queue, dispatched_before=clock.now(-grace_seconds))
    gone = backend.lost_dispatches(broker.app, active)
    return [uuid.UUID(u) for u in active if u in gone]


def _active(session: orm.Session, queue: str | None,
            dispatched_before: sa.ColumnElement[object] | None = None) -> list[str]:
    """Uploads in progress or completing (of `queue`: the fleet that consumes it recovers them)."""
    query = sa.select(Upload.id).where(Upload.status.in_(ACTIVE))
    if queue is not None:
        query = query.where(Upload.queue == queue)
    if dispatched_before is not None:
        query = query.where(sa.or_(Upload.dispatched_at.is_(None), Upload.dispatched_at < dispatched_before))
    return [str(u) for u in session.scalars(query.order_by(Upload.priority.desc(), Upload.created_at))]


def reconcile_stalled(settings: Settings, db: Database) -> list[Report]:
    reports = []
    for upload_id in stalled(db, settings.stall_seconds, settings.queue):
        try:
            reports.append(reconcile(settings, db, upload_id))
        except Exception as error:  # one upload's trouble must not stop the others
            log.exception("reconciling failed: %s", error, extra={"upload_id": str(upload_id)})
            reports.append(Report(upload_id, f"reconciling failed: {error}"))
    return reports


def reconcile(settings: Settings, db: Database, upload_id: uuid.UUID, force: bool = False) -> Report:
    """Get one upload moving again if it is stalled (see stalled()); with `force`, whatever its state.

    Running it while the upload is healthy changes nothing; running it twice at
    once dispatches once (the dispatch ticket).
    """
    from workers import backend, broker

    with db.transaction() as session:
        upload = queries.get_upload(session, upload_id)
    if upload.status not in ACTIVE:
        return Report(upload_id, f"nothing to do: the upload is {upload.status}")
    observed = time.monotonic()
    if not force and upload_id not in stalled(db, settings.stall_seconds):
        return Report(upload_id, "not stalled: its parts are on their way")
    lost = bool(backend.lost_dispatches(broker.app, [str(upload_id)]))
    # a lost dispatch: unless someone dispatched it since we saw it lost; stalled: within the stall time
    within = None if force else time.monotonic() - observed if lost else settings.stall_seconds
    with db.transaction() as session:
        if not transitions.take_dispatch_ticket(session, upload_id, within):
            return Report(upload_id, "another reconciler just dispatched it")
    context = {"upload_id": str(upload_id)}
    if upload.status == UploadStatus.COMPLETING:
        backend.mark_dispatched(broker.app, str(upload_id), broker.RESULT_EXPIRES)
        dispatch_completion(upload_id)
        log.warning("reconciler: completion dispatched again", extra=context)
        return Report(upload_id, "completion dispatched again")

    report = Report(upload_id, "")
    with db.transaction() as session:
        report.released = transitions.release_lapsed(session, upload_id)
    try:
        report.adopted = _adopt_listed(settings, db, upload)
    except reader.SourceChanged as error:
        with db.transaction() as session:
            try:
                transitions.fail_upload(session, upload_id, str(error))
            except InvalidTransition:
                pass
        report.action = f"failed: {error}"
        scheduler.request_schedule()
        return report
    if not scheduler.ensure_multipart(settings, db, upload_id):  # it started, then died before creating it
        report.action = "CreateMultipartUpload failed"
        scheduler.request_schedule()
        return report
    report.dispatched, held = scheduler.dispatch_missing(db, upload_id)
    if report.dispatched:
        report.action = "missing parts dispatched again"
    elif held:
        report.action = f"{len(held)} part(s) in flight; nothing to dispatch"
    else:
        report.action = "all parts done; completion dispatched"
    log.warning("reconciler: %s", report, extra=context)
    return report


def dispatch_completion(upload_id: uuid.UUID) -> None:
    from workers import broker

    broker.send("s3ferry.complete_upload", [], str(upload_id))


def _adopt_listed(settings: Settings, db: Database, upload: Upload) -> list[int]:
    """Record the parts S3 holds that Postgres does not, when our bytes prove them."""
    if not upload.s3_upload_id:
        return []
    with db.transaction() as session:
        unrecorded = {p.part_number: p for p in queries.parts(session, upload.id) if p.status != PartStatus.DONE}
    if not unrecorded:
        return []
    try:
        client = policy.client_for(settings, upload.endpoint_url, upload.bucket)
        policy.source_path(settings, upload.source_uri)
    except policy.Refused as refused:  # the workers refuse it too, and fail the upload
        log.warning("not listing its parts: %s", refused, extra={"upload_id": str(upload.id)})
        return []
    adopted = []
    try:
        listing = list(recovery.listed_parts(client, upload))
    except Exception as error:
        log.warning("ListParts failed (%s); dispatching without it", s3.describe(error),
                    extra={"upload_id": str(upload.id)})
        return []
    for listed in listing:
        part = unrecorded.get(int(listed["PartNumber"]))
        if part is None:
            continue
        try:
            checksum = recovery.verify(settings, upload, part, listed)
        except reader.SourceUnavailable as error:  # not readable from here: let the workers decide
            log.warning("cannot check listed parts here (%s); dispatching without them", error,
                        extra={"upload_id": str(upload.id)})
            return adopted
        if checksum is None:
            continue
        with db.transaction() as session:
            if transitions.adopt_part(session, upload.id, part.part_number, str(listed["ETag"]), checksum,
                                      "found in S3 by ListParts; size, MD5 and CRC32C match the source"):
                adopted.append(part.part_number)
    return adopted
