"""The one module that changes a status.

Every change is a guarded statement (`UPDATE ... WHERE status IN (...)
RETURNING`), and the event it writes names the exact status it left: taken
under row locks, or, for the per-part moves of the hot path (claim, record,
step aside), in one statement that needs none (see _guarded_move). A move the
state machine does not allow raises `InvalidTransition` and changes nothing.
Callers pass a session inside a transaction (`Database.transaction()`, or
`Database.statement()` for those one statement long); nothing here commits.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import orm

from models import clock, liveness, notify
from models.exceptions import InvalidTransition, UploadNotFound
from models.states import PART_MOVES, UPLOAD_MOVES, PartStatus, UploadStatus
from models.tables import Base, Part, Upload, UploadEvent

_Entity = TypeVar("_Entity", bound=Base)


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
    notify.notify(session, upload_id)  # a command waiting on it learns at once (failed, cancelled, ...)
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


def claim_part(session: orm.Session, upload_id: uuid.UUID, number: int, worker: str,
               lease_seconds: float, judge: bool = False, holder: str | None = None) -> Claim:
    """Claim a part before reading any byte of it: pending, failed, or in flight with an expired
    lease (or, with `judge`, a dead holder: see live_claim), while its upload is in progress.
    `worker` is the claim's token, `holder` the process whose liveness stands for it (default:
    the token itself). One statement on PostgreSQL (see _guarded_move), which also returns the
    upload; it says why when the part is not claimed."""
    moved = _guarded_move(session, _Kind.CLAIM_JUDGED if judge else _Kind.CLAIM, upload_id, number,
                          token=worker, holder_of=holder or worker, lease_for=float(lease_seconds))
    upload = _loaded(session, Upload, moved.upload)
    if moved.after is not None:
        return Claim(ClaimOutcome.CLAIMED, _loaded(session, Part, moved.after), upload)
    part = _loaded(session, Part, moved.before)
    if part.status == PartStatus.DONE:
        return Claim(ClaimOutcome.DONE, part, upload)
    if upload.status != UploadStatus.IN_PROGRESS:
        return Claim(ClaimOutcome.INACTIVE, part, upload)
    return Claim(ClaimOutcome.HELD, part, upload)  # a live claim of another's (or it kept changing)


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
    recording nothing, when another worker holds a live claim on the part (or it
    failed). One statement on PostgreSQL (see _guarded_move).
    """
    moved = _guarded_move(session, _Kind.RECORD, upload_id, number, token=worker, new_etag=etag,
                          new_checksum=checksum, why=reason[:4000])
    if moved.after is not None:
        return _loaded(session, Part, moved.after)
    part = _loaded(session, Part, moved.before)
    if part.status == PartStatus.DONE:
        if same_etag(part.etag, etag):
            return part
        raise InvalidTransition(f"part {number} of upload {upload_id} is done with ETag {part.etag}, not {etag}")
    return None


def step_aside(session: orm.Session, upload_id: uuid.UUID, number: int, worker: str, reason: str) -> Part | None:
    """Give back, uncounted, a claim the caller took and did not use (its destination's window
    had no slot free): the part is pending again with its attempt given back, and the upload is
    left alone (no error, no retry counted). None if the caller no longer held the part."""
    moved = _guarded_move(session, _Kind.STEP_ASIDE, upload_id, number, token=worker,
                          why=f"stepped aside: {reason}"[:4000])
    return None if moved.after is None else _loaded(session, Part, moved.after)


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
    """Every transition locks the upload row first, then part rows: one lock order, no deadlocks.
    A writer takes FOR NO KEY UPDATE (what an UPDATE of the row takes), which excludes other
    writers and FOR SHARE, but not the FOR KEY SHARE that an event's foreign key takes: claims
    and records lock a part, then that (see _guarded_move)."""
    upload = session.execute(
        sa.select(Upload).where(Upload.id == upload_id).with_for_update(read=not write, key_share=write)
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


# --- the guarded moves of the hot path ---------------------------------------------------
#
# A part's claim and its record run once per part, many at a time, so each is ONE statement
# on PostgreSQL: a snapshot of the part (and of its upload, for a claim) in a CTE; the guarded
# UPDATE of the part, in a CTE that applies only to the version of the row that snapshot saw;
# the event, inserted from the update's RETURNING; and the snapshot beside the moved row, so
# that a part that did not move says why (done, upload not in progress, held) at no second
# round trip. No lock on the upload's row (many workers claim parts of one upload at once) but
# the FOR KEY SHARE that the event's foreign key takes, as every event's insert does. Each kind
# of statement is built once, with bind parameters (_statements): building and compiling them
# per part costs more CPU than the round trips they save.
#
# Why that is as safe as the locks it replaces (SELECT ... FOR SHARE on the upload, FOR UPDATE
# on the part, under READ COMMITTED):
#
# - The guard is evaluated on one snapshot, the statement's: the part's row and the upload's
#   status as committed when the statement started. The UPDATE then applies only if the part's
#   row is still that version (`parts.ctid = before.row_version`). If another transaction
#   changed the row meanwhile (it commits while this UPDATE waits for its row lock), READ
#   COMMITTED re-checks the WHERE clause against the newest version (EvalPlanQual), where the
#   ctid differs: nothing moves, and the statement runs again on a fresh snapshot. Without that
#   check the re-check would see the part's new row beside the upload's OLD status (a plain
#   `EXISTS (SELECT 1 FROM uploads WHERE status = 'in_progress')` is not re-evaluated on a fresh
#   snapshot): a part failed together with its upload would be claimed.
# - A change of the upload's status that commits after the statement's snapshot without
#   touching this part (pause, cancel, another part failing the upload) orders after the claim,
#   exactly as when the claim's FOR SHARE made it wait: the part was claimed while the upload
#   was in progress, and in-flight parts finish (pause) or are refused by S3 (cancel, abort).
#   A change that touches the part (fail_part, release_lapsed, retry_failed) makes the claim
#   look again, as above.
# - Locks: the UPDATE locks the part's row; the event's foreign key then takes FOR KEY SHARE on
#   the upload's row, at the end of the statement. Transitions that lock the upload first and
#   then a part (release_for_retry, fail_part, ...) take FOR NO KEY UPDATE (_lock_upload), which
#   does not conflict with FOR KEY SHARE, so the two lock orders never wait on each other in a
#   cycle.
#
# SQLite runs no data-modifying CTEs: there the same three pieces are three statements in one
# transaction, which holds the database's write lock from its BEGIN IMMEDIATE (models/db.py), so
# nothing changes between them.

#: Times a guarded move is tried when the part's row kept changing under it (each time, another
#: transaction changed that very row and committed): then it gives up as if held.
_TRIES = 5

_PARTS, _UPLOADS, _EVENTS = Part.__table__, Upload.__table__, UploadEvent.__table__


class _Kind(enum.Enum):
    CLAIM = "claim"
    CLAIM_JUDGED = "claim, judging holders"
    RECORD = "record"
    STEP_ASIDE = "step aside"


@dataclasses.dataclass(frozen=True)
class _Moved:
    """A guarded move: the part as the statement's snapshot saw it (`before`), after the move
    (`after`, None if it did not move), and its upload (for a claim)."""

    before: dict[str, object]
    after: dict[str, object] | None
    upload: dict[str, object]


@dataclasses.dataclass(frozen=True)
class _Statements:
    """The statements of one kind of move, built once with bind parameters (so SQLAlchemy builds,
    keys and compiles each once, not per part): the one statement of PostgreSQL, the three of SQLite."""

    postgresql: sa.Select
    before: sa.Select
    update: sa.Update
    event: sa.Insert
    with_upload: bool


def _param(name: str, type_: sa.types.TypeEngine[Any] | None = None) -> sa.BindParameter[Any]:
    return sa.bindparam(name, type_=type_ or sa.String())


@functools.cache
def _statements(kind: _Kind) -> _Statements:
    """The guard, the new values and the event's reason of each kind of move."""
    token = _param("token")
    if kind in (_Kind.CLAIM, _Kind.CLAIM_JUDGED):
        judge = kind is _Kind.CLAIM_JUDGED
        in_progress = (sa.select(1).where(Upload.id == Part.upload_id, Upload.status == UploadStatus.IN_PROGRESS)
                       .correlate_except(_UPLOADS).exists())
        return _build(PartStatus.IN_FLIGHT, sa.and_(in_progress, _not_held(token, judge)),
                      {"worker": token, "holder": _param("holder_of"), "started_at": clock.now(),
                       "lease_expires_at": clock.now(_param("lease_for", sa.Float())), "attempts": Part.attempts + 1},
                      lambda status, lapse: sa.case(
                          (status == PartStatus.IN_FLIGHT.value,
                           sa.func.coalesce(lapse, "its own claim") + "; reclaimed by " + token),
                          else_=sa.literal("claimed by ") + token),
                      judge=judge, with_upload=True)
    if kind is _Kind.RECORD:
        return _build(PartStatus.DONE,
                      sa.and_(Part.status.in_((PartStatus.PENDING, PartStatus.IN_FLIGHT)), _not_held(token)),
                      {"etag": _param("new_etag"), "checksum": _param("new_checksum"), "worker": None, "holder": None,
                       "lease_expires_at": None, "finished_at": clock.now(), "last_error": None},
                      lambda status, lapse: _param("why"))
    return _build(PartStatus.PENDING, sa.and_(Part.status == PartStatus.IN_FLIGHT, Part.worker == token),
                  {"worker": None, "holder": None, "lease_expires_at": None, "attempts": Part.attempts - 1},
                  lambda status, lapse: _param("why"))


def _not_held(token: sa.ColumnElement[str], judge: bool = False) -> sa.ColumnElement[bool]:
    """SQL: no live claim of another's on the part (see live_claim)."""
    return sa.not_(sa.and_(live_claim(judge), Part.worker.is_distinct_from(token)))


Reason = Callable[[sa.ColumnElement[str], sa.ColumnElement[str | None]], sa.ColumnElement[str]]


def _build(to: PartStatus, guard: sa.ColumnElement[bool], values: dict[str, object], reason: Reason,
           judge: bool = False, with_upload: bool = False) -> _Statements:
    """A move to `to` where `guard` (and PART_MOVES) allow it, recording the event with the reason
    `reason(status before, lapse)` builds in SQL; see the comment above."""
    movable = sa.and_(Part.status.in_(sorted(PART_MOVES[to])), guard)
    before = (sa.select(*_PARTS.c, _lapse(judge).label("lapse"), movable.label("movable"),
                        *([c.label(f"u_{c.key}") for c in _UPLOADS.c] if with_upload else []))
              .select_from(_PARTS.join(_UPLOADS, Upload.id == Part.upload_id) if with_upload else _PARTS)
              .where(Part.upload_id == _param("the_upload", sa.Uuid()), Part.part_number == _param("the_part",
                                                                                                   sa.Integer())))
    # PostgreSQL: the snapshot, the guarded UPDATE of that very row version, the event, in one statement.
    version = sa.literal_column(f"{_PARTS.name}.ctid")
    seen = before.add_columns(version.label("row_version")).cte("before")
    # The row version says "the row the guard saw"; its columns say it again, because PostgreSQL
    # re-checks a concurrently updated row against the WHERE clause, and some versions (TidRecheck,
    # before the 2025 fix) skip the ctid condition when the plan is a TID scan: the columns every
    # move and lease renewal changes are compared as ordinary conditions, which are re-checked.
    unchanged = sa.and_(Part.status == seen.c.status, Part.attempts == seen.c.attempts,
                        *(getattr(Part, name).is_not_distinct_from(getattr(seen.c, name))
                          for name in ("worker", "holder", "lease_expires_at", "etag")))
    moved = (sa.update(_PARTS)
             .where(Part.upload_id == seen.c.upload_id, Part.part_number == seen.c.part_number,
                    version == seen.c.row_version, unchanged, seen.c.movable)
             .values(status=to, **values).returning(*_PARTS.c).cte("moved"))
    columns = ["upload_id", "part_number", "from_status", "to_status", "reason", "at"]
    event = sa.insert(_EVENTS).from_select(columns, sa.select(
        moved.c.upload_id, moved.c.part_number, seen.c.status, sa.literal(to.value),
        reason(seen.c.status, seen.c.lapse), clock.now()).select_from(moved.join(seen, sa.true()))).cte("event")
    one = (sa.select(seen, *[c.label(f"new_{c.key}") for c in moved.c])
           .select_from(seen.outerjoin(moved, sa.true())).add_cte(event))
    # SQLite: the same three pieces, as three statements, under the transaction's write lock.
    was, lapse = _param("was"), _param("lapse_was")
    update = (sa.update(_PARTS)
              .where(Part.upload_id == _param("the_upload", sa.Uuid()), Part.part_number == _param("the_part",
                                                                                                   sa.Integer()),
                     movable)
              .values(status=to, **values).returning(*_PARTS.c))
    insert = sa.insert(_EVENTS).values(
        upload_id=_param("the_upload", sa.Uuid()), part_number=_param("the_part", sa.Integer()), from_status=was,
        to_status=to.value, reason=reason(was, lapse), at=clock.now())
    return _Statements(one, before, update, insert, with_upload)


def _guarded_move(session: orm.Session, kind: _Kind, upload_id: uuid.UUID, number: int,
                  **params: object) -> _Moved:
    """Run a guarded move of the part (see the comment above) with its parameters."""
    statements = _statements(kind)
    session.flush()  # what the session holds goes first (its events, in their order)
    connection = session.connection()
    run = _move_sqlite if connection.dialect.name == "sqlite" else _move_postgresql
    params.update(the_upload=upload_id, the_part=number)
    for _ in range(_TRIES):
        row, after = run(connection, statements, params)
        if row is None:
            raise UploadNotFound(f"upload {upload_id} has no part {number}")
        if after is not None or not row["movable"]:
            break
    parts = {c.key: row[c.key] for c in _PARTS.c}
    upload = {c.key: row[f"u_{c.key}"] for c in _UPLOADS.c} if statements.with_upload else {}
    return _Moved(parts, None if after is None else {c.key: after[c.key] for c in _PARTS.c}, upload)


def _move_postgresql(connection: sa.Connection, statements: _Statements, params: dict[str, object]) -> tuple[Any, Any]:
    row = connection.execute(statements.postgresql, params).mappings().first()
    if row is None or row["new_upload_id"] is None:
        return row, None
    return row, {c.key: row[f"new_{c.key}"] for c in _PARTS.c}


def _move_sqlite(connection: sa.Connection, statements: _Statements, params: dict[str, object]) -> tuple[Any, Any]:
    row = connection.execute(statements.before, params).mappings().first()
    if row is None or not row["movable"]:
        return row, None
    after = connection.execute(statements.update, params).mappings().first()
    if after is not None:
        connection.execute(statements.event, {**params, "was": str(row["status"]), "lapse_was": row["lapse"]})
    return row, after


def _loaded(session: orm.Session, entity: type[_Entity], values: dict[str, object]) -> _Entity:
    """A row read by a Core statement as an instance of `entity`: the session's own instance of
    that row, refreshed (what populate_existing does for an ORM query), else a new, detached one."""
    mapper = sa.inspect(entity)
    instance = session.identity_map.get(
        mapper.identity_key_from_primary_key([values[column.key] for column in mapper.primary_key]))
    if instance is None:
        return entity(**values)
    for key, value in values.items():
        orm.attributes.set_committed_value(instance, key, value)
    return instance  # type: ignore[return-value]


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

