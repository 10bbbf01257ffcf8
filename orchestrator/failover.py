"""The recovery pass every worker runs every few seconds: no singleton on the recovery path.

A dead worker process (SIGKILL, OOM, a drained node) stops beating; once its
liveness record has expired (`liveness_seconds`, by the database's clock),
the first pass to look releases its claims and dispatches exactly those parts
again. The same pass hands on a completion whose worker died, completes an
upload whose parts are all done but whose callback ran early, reconciles
uploads whose dispatch Redis lost, and, every `reconcile_interval`, runs the
reconciler's stall rule. Beat runs the reconciler too, as a second line.

Passes take turns fleet-wide (a PostgreSQL advisory lock, tried, never waited
for); and each change is a guarded statement, so two passes at once would
still dispatch each released part once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import uuid
from collections.abc import Iterable, Iterator

import sqlalchemy as sa
from redis import Redis

from models import clock, liveness, transitions
from models.db import Database, wrap_errors
from models.settings import Settings
from models.states import PartStatus, UploadStatus
from models.tables import Part, Upload, WorkerProcess
from orchestrator import reconciler, scheduler
from workers import held, window

log = logging.getLogger(__name__)

#: Passes that may call S3 take turns on LOCK_KEY + 1; presigned part workers' on LOCK_KEY.
LOCK_KEY = 0x5333_4650  # "S3FP"

#: Liveness records of processes dead this long, holding no claim, are deleted.
FORGET_AFTER_SECONDS = 24 * 3600


@dataclasses.dataclass
class Pass:
    """What one pass did (empty when the fleet is healthy)."""

    ran: bool = False
    redispatched: dict[uuid.UUID, list[int]] = dataclasses.field(default_factory=dict)
    completions: list[uuid.UUID] = dataclasses.field(default_factory=list)
    reconciled: list[str] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.redispatched or self.completions or self.reconciled)


def run(settings: Settings, db: Database, judge: bool, reconcile: bool = True, stall_rule: bool = False,
        redis: Redis | None = None, held_messages: bool = False) -> Pass:
    """One pass, unless another process is running one. `judge`: this process has beaten
    without a break for `liveness_seconds`, so a record that expired meanwhile is a dead
    process, not a database outage that every process lived through. `reconcile`: this
    process may call S3 (ListParts) to reconcile uploads whose dispatch Redis lost, and,
    with `stall_rule`, stalled ones. `redis`: the windows' Redis (a dead worker's slots are freed
    there); `held_messages`: nodes note the part messages they hold there (workers/held.py), as
    they do on a Redis broker."""
    with _turn(db, LOCK_KEY + reconcile) as mine:
        if not mine:
            return Pass()
        done = Pass(ran=True)
        if judge:
            done.redispatched = _hand_on_claims(db, settings.queue, redis)
            if redis is not None and held_messages:
                for upload_id, numbers in _hand_on_held(db, settings.queue, redis, done.redispatched).items():
                    done.redispatched.setdefault(upload_id, []).extend(numbers)
            done.completions = _hand_on_completions(settings, db)
        if reconcile:
            done.reconciled = [str(r) for r in _reconcile(settings, db, stall_rule)]
        with db.transaction() as session:
            liveness.forget(session, FORGET_AFTER_SECONDS)
    return done


def _hand_on_claims(db: Database, queue: str, redis: Redis | None) -> dict[uuid.UUID, list[int]]:
    """Release the claims of dead (or hung) holders on the uploads of `queue`, free their window
    slots, and dispatch those parts again."""
    with db.transaction() as session:
        lapsed = session.execute(
            sa.select(Part.upload_id, Part.part_number, Part.worker, Upload.endpoint_url, Upload.bucket).join(Upload)
            .where(Upload.queue == queue, Part.status == PartStatus.IN_FLIGHT, sa.not_(transitions.live_claim()))
        ).all()
    redispatched = {}
    for upload_id in sorted({row.upload_id for row in lapsed}):
        with db.transaction() as session:
            released = transitions.release_lapsed(session, upload_id)
            status = session.scalar(sa.select(Upload.status).where(Upload.id == upload_id))
        if redis is not None:
            _free_slots(redis, [row for row in lapsed if row.upload_id == upload_id and row.part_number in released])
        if released and status == UploadStatus.IN_PROGRESS:
            scheduler.dispatch(upload_id, released, recovered=True)
            redispatched[upload_id] = released
            log.warning("released %d part(s) of a dead or hung worker and dispatched them again: %s",
                        len(released), released[:10], extra={"upload_id": str(upload_id)})
    return redispatched


def _free_slots(client: Redis, rows: Iterable[sa.Row]) -> None:
    """The released parts' window slots (their holders are gone): free for others now."""
    for row in rows:
        shared = window.Window(client, row.endpoint_url, row.bucket, window.Limits())
        try:
            shared.evict(f"{row.worker}:{row.upload_id}:{row.part_number}:")
        except Exception as error:  # noqa: BLE001 - the slot's lease frees it anyway
            log.warning("could not free a dead worker's window slot: %s", error)


def _hand_on_held(db: Database, queue: str, client: Redis,
                  redispatched_now: dict[uuid.UUID, list[int]]) -> dict[uuid.UUID, list[int]]:
    """Dispatch again the part messages that dead nodes held (received, not acknowledged), where
    the part is still neither done nor claimed nor just dispatched by this pass: Redis would
    return them only hours later."""
    noted = held.nodes(client, queue)
    if not noted:
        return {}
    with db.transaction() as session:
        dead = list(session.scalars(sa.select(WorkerProcess.id).where(
            WorkerProcess.id.in_(noted), WorkerProcess.expires_at <= clock.now())))
    wanted: dict[uuid.UUID, set[int]] = {}
    for node in dead:
        for upload_id, number in held.take(client, queue, node):
            with contextlib.suppress(ValueError):
                wanted.setdefault(uuid.UUID(upload_id), set()).add(number)
    redispatched = {}
    for upload_id, numbers in wanted.items():
        missing = _unclaimed(db, upload_id, numbers - set(redispatched_now.get(upload_id, ())), queue)
        if missing:
            scheduler.dispatch(upload_id, missing, recovered=True)
            redispatched[upload_id] = missing
            log.warning("dispatched again %d part message(s) that a dead worker held: %s", len(missing),
                        missing[:10], extra={"upload_id": str(upload_id)})
    return redispatched


def _unclaimed(db: Database, upload_id: uuid.UUID, numbers: Iterable[int], queue: str) -> list[int]:
    """Of these parts of an upload in progress (of `queue`), those neither done nor claimed."""
    numbers = sorted(numbers)
    if not numbers:
        return []
    with db.transaction() as session:
        return list(session.scalars(
            sa.select(Part.part_number).join(Upload)
            .where(Part.upload_id == upload_id, Part.part_number.in_(numbers), Upload.queue == queue,
                   Upload.status == UploadStatus.IN_PROGRESS, Part.status != PartStatus.DONE,
                   sa.not_(transitions.live_claim()))
            .order_by(Part.part_number)))


def _hand_on_completions(settings: Settings, db: Database) -> list[uuid.UUID]:
    """Dispatch the completion again where its worker died mid-way, or where every part is done
    but no completion came (the chord's callback ran before the last part was sent again)."""
    quiet = settings.liveness_seconds
    not_done = sa.select(Part.upload_id).where(Part.upload_id == Upload.id, Part.status != PartStatus.DONE)
    recent = sa.select(Part.upload_id).where(Part.upload_id == Upload.id, Part.finished_at > clock.now(-quiet))
    with db.transaction() as session:
        orphaned = list(session.scalars(sa.select(Upload.id).where(
            Upload.queue == settings.queue, sa.or_(sa.and_(Upload.status == UploadStatus.COMPLETING, liveness.dead(Upload.completer)),
                   sa.and_(Upload.status == UploadStatus.IN_PROGRESS, ~sa.exists(not_done), ~sa.exists(recent),
                           Upload.updated_at < clock.now(-quiet))))))
    dispatched = []
    for upload_id in orphaned:
        with db.transaction() as session:
            if not transitions.take_dispatch_ticket(session, upload_id, unless_within=quiet):
                continue
        reconciler.dispatch_completion(upload_id)
        dispatched.append(upload_id)
        log.warning("completion dispatched again (its worker died, or it never came)",
                    extra={"upload_id": str(upload_id)})
    return dispatched


def _reconcile(settings: Settings, db: Database, stall_rule: bool) -> list[reconciler.Report]:
    """Uploads whose dispatch Redis lost, every pass; the stall rule when asked."""
    if stall_rule:
        return reconciler.reconcile_stalled(settings, db)
    return [reconciler.reconcile(settings, db, upload_id) for upload_id in reconciler.lost(db, settings.queue)]


@contextlib.contextmanager
def _turn(db: Database, key: int) -> Iterator[bool]:
    """True if this process may run the pass now (one at a time fleet-wide). PostgreSQL: a
    session advisory lock, freed by unlocking or by the connection dying with its process.
    SQLite (one machine): every pass runs; SQLite serializes their writes."""
    if db.url.get_backend_name() != "postgresql":
        yield True
        return
    with wrap_errors(db.url), db.engine.connect() as connection:
        mine = bool(connection.scalar(sa.select(sa.func.pg_try_advisory_lock(key))))
        connection.commit()
        try:
            yield mine
        finally:
            if mine:
                connection.scalar(sa.select(sa.func.pg_advisory_unlock(key)))
                connection.commit()
