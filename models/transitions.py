"""The one module that changes a status.

Every change is a guarded statement (`UPDATE ... WHERE status IN (...)
RETURNING`), taken under a row lock so the event it writes names the exact
status it left. A move the state machine does not allow raises
`InvalidTransition` and changes nothing. Callers pass a session inside a
transaction (`Database.transaction()`); nothing here commits.
"""

from __future__ import annotations

import dataclasses
import enum
import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy import orm

from models import clock, liveness
from models.exceptions import InvalidTransition, UploadNotFound
from models.states import PART_MOVES, UPLOAD_MOVES, PartStatus, UploadStatus
from models.tables import Part, Upload, UploadEvent


@dataclasses.dataclass(frozen=True)
class PartSpec:
    """One planned part: its number, and the byte range of the source it covers."""

    number: int
    offset: int
    size: int


def create_upload(session: orm.Session, upload: Upload, parts: Sequence[PartSpec], reason: str) -> Upload:
    """Insert a new upload (queued) and all its parts (pending)."""
    upload.id = upload.id or uuid.uuid4()
    upload.status = UploadStatus.QUEUED
    upload.total_parts = len(parts)
    session.add(upload)
    session.flush()
    if parts:
        session.execute(
            sa.insert(Part),
            [{"upload_id": upload.id, "part_number": p.number, "offset": p.offset, "size": p.size,
              "status": PartStatus.PENDING, "attempts": 0} for p in parts],
        )
    _record(session, upload.id, None, UploadStatus.QUEUED, reason)
    return upload


# --- uploads --------------------------------------------------------------------------


def start_upload(session: orm.Session, upload_id: uuid.UUID, s3_upload_id: str | None, reason: str) -> None:
    """The upload starts: its parts are dispatched right after this commits."""
    _move_upload(session, upload_id, UploadStatus.IN_PROGRESS, reason,
                 s3_upload_id=s3_upload_id, started_at=clock.now(), dispatched_at=clock.now())


def pause(session: orm.Session, upload_id: uuid.UUID, reason: str) -> UploadStatus:
    """No new part starts; parts in flight finish; queued messages are skipped when they arrive."""
    return _move_upload(session, upload_id, UploadStatus.PAUSED, reason)


def requeue(session: orm.Session, upload_id: uuid.UUID, reason: str) -> UploadStatus:
    """A paused upload waits for the scheduler again (with its priority and age)."""
    return _move_upload(session, upload_id, UploadStatus.QUEUED, reason)


def cancel(session: orm.Session, upload_id: uuid.UUID, reason: str) -> UploadStatus:
    return _move_upload(session, upload_id, UploadStatus.CANCELLED, reason, finished_at=clock.now())


def retry_failed(session: orm.Session, upload_id: uuid.UUID, reason: str) -> bool:
    """A failed upload queues again with its retry counters reset. Its done parts are kept,
    unless its multipart upload was swept (aborted) meanwhile: then every part is sent again.
    Returns whether the done parts were kept."""
    upload = _lock_upload(session, upload_id, write=True)
    if upload.status != UploadStatus.FAILED:
        raise InvalidTransition(f"upload {upload_id} is {upload.status}; only a failed upload is retried")
    kept = upload.s3_aborted_at is None
    _move_upload(session, upload_id, UploadStatus.QUEUED, reason, retry_count=0, last_retry_at=None,
                 finished_at=None, **({} if kept else {"s3_upload_id": None, "s3_aborted_at": None}))
    # Parts still being sent keep their live claims: they must not be sent twice at once.
    reset = sa.update(Part).where(Part.upload_id == upload_id, sa.not_(live_claim()))
    if kept:
        reset = reset.where(Part.status != PartStatus.DONE)
    session.execute(reset.values(status=PartStatus.PENDING, attempts=0, worker=None, holder=None,
                                 lease_expires_at=None,
                                 **({} if kept else {"etag": None, "checksum": None, "finished_at": None})))
    return kept


def set_priority(session: orm.Session, upload_id: uuid.UUID, priority: int) -> None:
    upload = _lock_upload(session, upload_id, write=True)
    if upload.status in (UploadStatus.COMPLETE, UploadStatus.CANCELLED):
        raise InvalidTransition(f"upload {upload_id} is {upload.status}: its priority no longer matters")
    session.execute(sa.update(Upload).where(Upload.id == upload_id)
                    .values(priority=priority, updated_at=clock.now()))
    _record(session, upload_id, upload.status, upload.status, f"priority {upload.priority} -> {priority}")


def set_multipart(session: orm.Session, upload_id: uuid.UUID, s3_upload_id: str) -> bool:
    """Record the upload's multipart upload id, unless one is recorded already (False then)."""
    recorded = session.execute(
        sa.update(Upload).where(Upload.id == upload_id, Upload.s3_upload_id.is_(None),
                                Upload.status == UploadStatus.IN_PROGRESS)
        .values(s3_upload_id=s3_upload_id, s3_aborted_at=None, updated_at=clock.now()).returning(Upload.id)
    ).first()
    return recorded is not None


def touch(session: orm.Session, upload_id: uuid.UUID, completer: str | None = None) -> None:
    """Something happened to the upload (a completion attempt, by `completer`): it is not stalled."""
    values: dict[str, object] = {"updated_at": clock.now()}
    if completer is not None:
        values["completer"] = completer
    session.execute(sa.update(Upload).where(Upload.id == upload_id).values(**values))


def begin_completing(session: orm.Session, upload_id: uuid.UUID, reason: str, completer: str | None = None) -> None:
    """The upload is being completed in S3 by the worker process `completer` (if it dies, the
    recovery pass dispatches the completion again)."""
    _move_upload(session, upload_id, UploadStatus.COMPLETING, reason, completer=completer)


def mark_complete(session: orm.Session, upload_id: uuid.UUID, etag: str | None, reason: str,
                  checksum: str | None = None) -> None:
    """Complete, with the object's ETag and its CRC32C as computed from what was read."""
    _move_upload(session, upload_id, UploadStatus.COMPLETE, reason, etag=etag, checksum=checksum,
                 finished_at=clock.now())


def fail_upload(session: orm.Session, upload_id: uuid.UUID, error: str) -> None:
    _move_upload(session, upload_id, UploadStatus.FAILED, error, last_error=error, finished_at=clock.now())


def _move_upload(session: orm.Session, upload_id: uuid.UUID, to: UploadStatus, reason: str,
                 **values: object) -> UploadStatus:
    current = _lock_upload(session, upload_id, write=True).status
    allowed = UPLOAD_MOVES[to]
    if current not in allowed:
        raise InvalidTransition(f"upload {upload_id} is {current}; it cannot become {to}")
    moved = session.execute(
        sa.update(Upload)
        .where(Upload.id == upload_id, Upload.status.in_(allowed))
        .values(status=to, updated_at=clock.now(), **values)
        .returning(Upload.id)
    ).first()
    if moved is None:  # pragma: no cover - the row lock makes this unreachable
        raise InvalidTransition(f"upload {upload_id} changed while becoming {to}")
    _record(session, upload_id, current, to, reason)
    return UploadStatus(current)


# --- parts ----------------------------------------------------------------------------


class ClaimOutcome(enum.Enum):
    CLAIMED = "claimed"  # the caller holds the part until its lease expires
    DONE = "done"  # the part already landed: nothing to send
    HELD = "held"  # another worker holds a live lease on it
    INACTIVE = "inactive"  # the upload is not in progress (failed, paused, cancelled, ...)


@dataclasses.dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    part: Part
    upload: Upload


def would_claim(session: orm.Session, upload_id: uuid.UUID, number: int, worker: str,
                judge: bool = False) -> tuple[bool, Upload]:
    """Whether claim_part would claim the part now (read-only, no locks: a hint that may be stale
    by the time of the claim), and the upload."""
    row = session.execute(sa.select(Upload, Part.status, Part.worker, live_claim(judge).label("live"))
                          .join(Part, Part.upload_id == Upload.id)
                          .where(Upload.id == upload_id, Part.part_number == number)).first()
    if row is None:
        raise InvalidTransition(f"no part {number} of upload {upload_id}")
    upload, status, holder, live = row
    held = bool(live) and holder != worker
    return (status != PartStatus.DONE and upload.status == UploadStatus.IN_PROGRESS and not held), upload


def claim_part(session: orm.Session, upload_id: uuid.UUID, number: int, worker: str,
               lease_seconds: float, judge: bool = False, holder: str | None = None) -> Claim:
    """Claim a part before reading any byte of it: pending, failed, or in flight with an expired
    lease (or, with `judge`, a dead holder: see live_claim). `worker` is the claim's token,
    `holder` the process whose liveness stands for it (default: the token itself)."""
    upload = _lock_upload(session, upload_id, write=False)
    part, lapse = _lock_part_and_claim(session, upload_id, number, judge)
    if part.status == PartStatus.DONE:
        return Claim(ClaimOutcome.DONE, part, upload)
    if upload.status != UploadStatus.IN_PROGRESS:
        return Claim(ClaimOutcome.INACTIVE, part, upload)
    if lapse is None and part.worker != worker:
        return Claim(ClaimOutcome.HELD, part, upload)
    reason = "claimed" if part.status != PartStatus.IN_FLIGHT else f"{lapse}; reclaimed"
    claimed = _move_part(session, part, PartStatus.IN_FLIGHT, f"{reason} by {worker}",
                         worker=worker, holder=holder or worker, lease_expires_at=clock.now(lease_seconds),
                         started_at=clock.now(), attempts=Part.attempts + 1)
    return Claim(ClaimOutcome.CLAIMED, claimed, upload)


def renew_lease(session: orm.Session, upload_id: uuid.UUID, number: int, worker: str,
                lease_seconds: float) -> bool:
    """Extend the caller's claim; False if it no longer holds the part."""
    renewed = session.execute(
        sa.update(Part)
        .where(Part.upload_id == upload_id, Part.part_number == number, Part.status == PartStatus.IN_FLIGHT,
               Part.worker == worker)
        .values(lease_expires_at=clock.now(lease_seconds))
        .returning(Part.part_number)
    ).first()
    return renewed is not None


def finish_part(session: orm.Session, upload_id: uuid.UUID, number: int, worker: str, etag: str,
                checksum: str | None, reason: str) -> Part | None:
    """Record a part that the caller sent to S3 (the ETag S3 returned proves it landed).

    Accepted when the caller holds the claim, and also when nobody holds a live
    claim (the caller's lease ran out during a database outage and the part went
    back to pending). Recording the same ETag again is a no-op. Returns None,
    recording nothing, when another worker holds a live claim on the part.
    """
    _lock_upload(session, upload_id, write=False)
    part, lapse = _lock_part_and_claim(session, upload_id, number)
    if part.status == PartStatus.DONE:
        if same_etag(part.etag, etag):
            return part
        raise InvalidTransition(f"part {number} of upload {upload_id} is done with ETag {part.etag}, not {etag}")
    held_by_other = part.status == PartStatus.IN_FLIGHT and part.worker != worker and lapse is None
    if held_by_other or part.status == PartStatus.FAILED:
        return None
    return _move_part(session, part, PartStatus.DONE, reason, etag=etag, checksum=checksum,
                      worker=None, holder=None, lease_expires_at=None, finished_at=clock.now(), last_error=None)


def same_etag(a: str | None, b: str | None) -> bool:
    """ETags compare without their quotes (stores differ in quoting them)."""
    return (a or "").strip('"') == (b or "").strip('"')


def release_for_retry(session: orm.Session, upload_id: uuid.UUID, number: int, worker: str,
                      error: str, counted: bool = True) -> Part | None:
    """Give back a claim after an error worth retrying.

    `counted` retries add to the part's attempts and the upload's retry count;
    uncounted ones (the send never started: an outage, a shutdown) give the
    attempt back. Returns None when the caller no longer held the part.
    """
    _lock_upload(session, upload_id, write=True)
    part = _lock_part(session, upload_id, number)
    if part.status != PartStatus.IN_FLIGHT or part.worker != worker:
        return None
    values: dict[str, object] = {"last_error": error, "updated_at": clock.now()}
    if counted:
        values.update(retry_count=Upload.retry_count + 1, last_retry_at=clock.now())
    session.execute(sa.update(Upload).where(Upload.id == upload_id).values(**values))
    return _move_part(session, part, PartStatus.PENDING, f"{'retry' if counted else 'released'}: {error}",
                      worker=None, holder=None, lease_expires_at=None, last_error=error,
                      attempts=Part.attempts if counted else Part.attempts - 1)


def release_claims(session: orm.Session, worker_prefix: str, reason: str) -> int:
    """Give back, uncounted, every claim held by workers whose id starts with `worker_prefix`
    (a worker node shutting down, its pool processes gone); returns how many."""
    held = session.execute(
        sa.select(Part.upload_id, Part.part_number, Part.worker)
        .where(Part.status == PartStatus.IN_FLIGHT, Part.worker.startswith(worker_prefix, autoescape=True))
        .order_by(Part.upload_id, Part.part_number)
    ).all()
    return sum(release_for_retry(session, upload_id, number, worker, reason, counted=False) is not None
               for upload_id, number, worker in held)


def fail_part(session: orm.Session, upload_id: uuid.UUID, number: int, worker: str, error: str) -> Part | None:
    """Fail a part the caller holds (for good: its upload fails with it); None if it no longer holds it."""
    _lock_upload(session, upload_id, write=True)
    part = _lock_part(session, upload_id, number)
    if part.status != PartStatus.IN_FLIGHT or part.worker != worker:
        return None
    return _move_part(session, part, PartStatus.FAILED, error, worker=None, holder=None, lease_expires_at=None,
                      last_error=error, finished_at=clock.now())


def release_lapsed(session: orm.Session, upload_id: uuid.UUID, judge: bool = False) -> list[int]:
    """Parts in flight whose lease ran out (their holder hangs) or, with `judge`, whose holder is
    dead (its liveness record expired) go back to pending; returns their numbers."""
    _lock_upload(session, upload_id, write=True)
    lapsed = session.execute(
        sa.select(Part, _lapse(judge)).where(Part.upload_id == upload_id, Part.status == PartStatus.IN_FLIGHT,
                                             sa.not_(live_claim(judge)))
        .order_by(Part.part_number).with_for_update(of=Part).execution_options(populate_existing=True)
    ).all()
    for part, lapse in lapsed:
        _move_part(session, part, PartStatus.PENDING, lapse or "claim lapsed", worker=None, holder=None,
                   lease_expires_at=None)
    return [part.part_number for part, _ in lapsed]


def adopt_part(session: orm.Session, upload_id: uuid.UUID, number: int, etag: str, checksum: str | None,
               reason: str) -> Part | None:
    """Record a part that S3 lists and whose bytes we verified, though no worker recorded it
    (it landed, then the database write was lost). None if a worker holds a live claim on it."""
    _lock_upload(session, upload_id, write=False)
    part, lapse = _lock_part_and_claim(session, upload_id, number)
    if part.status == PartStatus.DONE:
        return part
    if part.status == PartStatus.IN_FLIGHT and lapse is None:
        return None
    return _move_part(session, part, PartStatus.DONE, reason, etag=etag, checksum=checksum, worker=None,
                      holder=None, lease_expires_at=None, finished_at=clock.now(), last_error=None)


def take_dispatch_ticket(session: orm.Session, upload_id: uuid.UUID, unless_within: float | None) -> bool:
    """Stamp the upload as dispatched now, unless it was dispatched in the last `unless_within`
    seconds (by the database's clock).

    One reconciler wins the ticket for a stalled upload; the others leave it alone.
    """
    condition = [Upload.id == upload_id]
    if unless_within is not None:
        condition.append(sa.or_(Upload.dispatched_at.is_(None), Upload.dispatched_at < clock.now(-unless_within)))
    stamped = session.execute(
        sa.update(Upload).where(*condition).values(dispatched_at=clock.now()).returning(Upload.id)
    ).first()
    return stamped is not None


def mark_aborted(session: orm.Session, upload_id: uuid.UUID, reason: str) -> None:
    """The upload's multipart upload was aborted in S3 (nothing of it is billed any more)."""
    upload = _lock_upload(session, upload_id, write=True)
    if upload.status not in (UploadStatus.FAILED, UploadStatus.CANCELLED):
        raise InvalidTransition(f"upload {upload_id} is {upload.status}: its multipart upload must not be aborted")
    session.execute(sa.update(Upload).where(Upload.id == upload_id).values(s3_aborted_at=clock.now()))
    _record(session, upload_id, upload.status, upload.status, f"multipart upload aborted in S3: {reason}")


def _lock_upload(session: orm.Session, upload_id: uuid.UUID, write: bool) -> Upload:
    """Every transition locks the upload row first, then part rows: one lock order, no deadlocks."""
    upload = session.execute(
        sa.select(Upload).where(Upload.id == upload_id).with_for_update(read=not write)
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if upload is None:
        raise UploadNotFound(f"no upload with id {upload_id}")
    return upload


def _lock_part(session: orm.Session, upload_id: uuid.UUID, number: int) -> Part:
    part = session.execute(
        sa.select(Part).where(Part.upload_id == upload_id, Part.part_number == number)
        .with_for_update().execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if part is None:
        raise UploadNotFound(f"upload {upload_id} has no part {number}")
    return part


def _lock_part_and_claim(session: orm.Session, upload_id: uuid.UUID, number: int,
                         judge: bool = False) -> tuple[Part, str | None]:
    """The part, locked, and why its claim has lapsed (None while a live claim holds it)."""
    row = session.execute(
        sa.select(Part, _lapse(judge)).where(Part.upload_id == upload_id, Part.part_number == number)
        .with_for_update(of=Part).execution_options(populate_existing=True)
    ).first()
    if row is None:
        raise UploadNotFound(f"upload {upload_id} has no part {number}")
    part, lapse = row
    if part.status != PartStatus.IN_FLIGHT:
        return part, "no claim"
    return part, lapse


def _move_part(session: orm.Session, part: Part, to: PartStatus, reason: str, **values: object) -> Part:
    current = PartStatus(part.status)
    allowed = PART_MOVES[to]
    if current not in allowed:
        raise InvalidTransition(
            f"part {part.part_number} of upload {part.upload_id} is {current}; it cannot become {to}")
    moved = session.execute(
        sa.update(Part)
        .where(Part.upload_id == part.upload_id, Part.part_number == part.part_number,
               Part.status.in_(allowed))
        .values(status=to, **values)
        .returning(Part)
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if moved is None:  # pragma: no cover - the row lock makes this unreachable
        raise InvalidTransition(f"part {part.part_number} of upload {part.upload_id} changed meanwhile")
    _record(session, part.upload_id, current, to, reason, part=part.part_number)
    return moved


def live_claim(judge: bool = False) -> sa.ColumnElement[bool]:
    """SQL: a worker holds a live claim on the part: in flight and its lease not run out (by the
    database's clock: no worker's own clock decides); with `judge`, also its holder not known
    dead. Only a caller whose own heartbeat has gone unbroken for the liveness time judges: after
    a database outage every record has expired, the live holders' with the rest, until they beat."""
    live = sa.and_(Part.status == PartStatus.IN_FLIGHT, Part.lease_expires_at.is_not(None),
                   Part.lease_expires_at > clock.now())
    return sa.and_(live, sa.not_(liveness.dead(Part.holder))) if judge else live


def _lapse(judge: bool = False) -> sa.ColumnElement[str | None]:
    """SQL: why an in-flight part's claim has lapsed, or NULL while it is live (see live_claim)."""
    dead = ((liveness.dead(Part.holder), sa.literal("holder ") + sa.func.coalesce(Part.holder, "") + " is dead"),)
    return sa.case(
        (Part.status != PartStatus.IN_FLIGHT, sa.null()),
        *(dead if judge else ()),
        (sa.or_(Part.lease_expires_at.is_(None), Part.lease_expires_at <= clock.now()),
         sa.literal("lease of ") + sa.func.coalesce(Part.worker, "") + " expired"),
        else_=sa.null())


def _record(session: orm.Session, upload_id: uuid.UUID, frm: str | None, to: str, reason: str,
            part: int | None = None) -> None:
    session.add(UploadEvent(upload_id=upload_id, part_number=part, from_status=frm, to_status=to,
                            reason=reason[:4000]))

