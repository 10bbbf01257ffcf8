"""The recovery pass every worker runs every few seconds: no singleton on the recovery path.

A dead worker process (SIGKILL, OOM, a drained node) stops beating; once its
liveness record has expired (`liveness_seconds`, by the database's clock),
the first pass to look dispatches exactly its parts again, on the recovered
queue that workers serve first, then releases its claims and window slots.
The same pass dispatches again the part messages a dead node had received but
not finished (workers/held.py), hands on a completion whose worker died, and
completes an upload whose parts are all done but whose callback ran early.
Nodes with S3 credentials also reconcile uploads whose dispatch Redis lost,
and, every `reconcile_interval`, run the reconciler's stall rule. Beat runs
the reconciler too, as a second line.

Passes take turns fleet-wide: a turn is a row in `recovery_turns` leased on the
database's clock (it works through any connection pooler, and on SQLite), one
for handing on and one for reconciling, per queue. Each change is a guarded
statement and every dispatch is idempotent, so two passes at once would only
send a message twice, never a part.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import uuid
from collections.abc import Iterable, Iterator

import sqlalchemy as sa
from redis import Redis
from sqlalchemy import exc

from models import clock, liveness, transitions
from models.db import Database
from models.settings import Settings
from models.states import PartStatus, UploadStatus
from models.tables import Part, RecoveryTurn, Upload, WorkerProcess
from orchestrator import reconciler, scheduler
from workers import held, window

log = logging.getLogger(__name__)

#: Liveness records of processes dead this long, holding no claim, are deleted.
FORGET_AFTER_SECONDS = 24 * 3600
#: How long a turn lasts unless its holder ends it first (or dies: then any judge takes it).
HAND_ON_TURN_SECONDS = 60.0
RECONCILE_TURN_SECONDS = 600.0


@dataclasses.dataclass
class Pass:
    """What one pass did (empty when the fleet is healthy)."""

    ran: bool = False
    redispatched: dict[uuid.UUID, list[int]] = dataclasses.field(default_factory=dict)
    completions: list[uuid.UUID] = dataclasses.field(default_factory=list)
    reconciled: list[str] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.redispatched or self.completions or self.reconciled)


def run(settings: Settings, db: Database, holder: str, judge: bool, reconcile: bool = True,
        stall_rule: bool = False, redis: Redis | None = None, held_messages: bool = False) -> Pass:
    """One pass by the process `holder`, skipping what another process is doing right now.

    `judge`: this process has beaten without a break for `liveness_seconds`, so a record
    that expired meanwhile is a dead process, not a database outage that every process
    lived through; only a judge hands on. `reconcile`: this process may call S3
    (ListParts) to reconcile uploads whose dispatch Redis lost, and, with `stall_rule`,
    stalled ones. `redis`: the windows' Redis (a dead worker's slots are freed there);
    `held_messages`: nodes note the part messages they hold there, as on a Redis broker.
    """
    done = Pass()
    if judge:
        with _turn(db, f"hand-on:{settings.queue}", holder, HAND_ON_TURN_SECONDS) as mine:
            if mine:
                done.ran = True
                done.redispatched = _hand_on_claims(db, settings.queue, redis)
                if redis is not None and held_messages:
                    for upload_id, numbers in _hand_on_held(db, settings.queue, redis, done.redispatched).items():
                        done.redispatched.setdefault(upload_id, []).extend(numbers)
                done.completions = _hand_on_completions(settings, db)
                with db.transaction() as session:
                    liveness.forget(session, FORGET_AFTER_SECONDS)
    if reconcile:
        with _turn(db, f"reconcile:{settings.queue}", holder, RECONCILE_TURN_SECONDS, judge) as mine:
            if mine:
                done.ran = True
                done.reconciled = [str(r) for r in _reconcile(settings, db, stall_rule)]
    return done


def _hand_on_claims(db: Database, queue: str, redis: Redis | None) -> dict[uuid.UUID, list[int]]:
    """Dispatch again the parts whose holder is dead (or hangs: its lease ran out) on the uploads
    of `queue`, then free their window slots and release their claims. Dispatched first: a
    pass that dies half-way leaves a message too many, never a part without one."""
    with db.transaction() as session:
        lapsed = session.execute(
            sa.select(Part.upload_id, Part.part_number, Part.worker, Part.holder, Upload.endpoint_url,
                      Upload.bucket, Upload.status, liveness.dead(Part.holder).label("holder_dead")).join(Upload)
            .where(Upload.queue == queue, Part.status == PartStatus.IN_FLIGHT,
                   sa.not_(transitions.live_claim(judge=True)))
            .order_by(Part.upload_id, Part.part_number)
        ).all()
    redispatched = {}
    for upload_id in sorted({row.upload_id for row in lapsed}):
        rows = [row for row in lapsed if row.upload_id == upload_id]
        if redis is not None:
            # Only a dead process's slots: a live one whose lease ran out on one part (a hung
            # send) still holds slots for its other parts; its slot's own lease frees that one.
            _free_slots(redis, [row for row in rows if row.holder_dead])
        numbers = [row.part_number for row in rows]
        if rows[0].status == UploadStatus.IN_PROGRESS:
            scheduler.dispatch(upload_id, numbers, recovered=True)
            redispatched[upload_id] = numbers
        with db.transaction() as session:
            transitions.release_lapsed(session, upload_id, judge=True)
        log.warning("dispatched again %d part(s) of a dead or hung worker (%s), and released them: %s",
                    len(numbers), rows[0].holder, numbers[:10], extra={"upload_id": str(upload_id)})
    return redispatched


def _free_slots(client: Redis, rows: Iterable[sa.Row]) -> None:
    """The parts' window slots (their holders are gone): free for others now."""
    for row in rows:
        shared = window.Window(client, row.endpoint_url, row.bucket, window.Limits())
        try:
            shared.evict(f"{row.holder}:{row.upload_id}:{row.part_number}:")
        except Exception as error:  # noqa: BLE001 - the slot's lease frees it anyway
            log.warning("could not free a dead worker's window slot: %s", error)


def _hand_on_held(db: Database, queue: str, client: Redis,
                  redispatched_now: dict[uuid.UUID, list[int]]) -> dict[uuid.UUID, list[int]]:
    """Dispatch again the part messages that dead nodes held (received, not acknowledged), where
    the part is still neither done nor claimed nor just dispatched by this pass: Redis would
    return them only hours later. A node's notes are dropped once its parts are dispatched."""
    noted = held.nodes(client, queue)
    if not noted:
        return {}
    with db.transaction() as session:
        dead = list(session.scalars(sa.select(WorkerProcess.id).where(
            WorkerProcess.id.in_(noted), WorkerProcess.expires_at <= clock.now())))
    redispatched: dict[uuid.UUID, list[int]] = {}
    for node in dead:
        wanted: dict[uuid.UUID, set[int]] = {}
        for upload_id, number in held.peek(client, node):
            with contextlib.suppress(ValueError):
                wanted.setdefault(uuid.UUID(upload_id), set()).add(number)
        for upload_id, numbers in wanted.items():
            numbers -= set(redispatched_now.get(upload_id, ())) | set(redispatched.get(upload_id, ()))
            missing = _unclaimed(db, upload_id, numbers, queue)
            if missing:
                scheduler.dispatch(upload_id, missing, recovered=True)
                redispatched.setdefault(upload_id, []).extend(missing)
                log.warning("dispatched again %d part message(s) that a dead worker held: %s", len(missing),
                            missing[:10], extra={"upload_id": str(upload_id)})
        held.drop(client, queue, node)
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
                   sa.not_(transitions.live_claim(judge=True)))
            .order_by(Part.part_number)))


def _hand_on_completions(settings: Settings, db: Database) -> list[uuid.UUID]:
    """Dispatch the completion again where its worker died mid-way, or where every part is done
    but no completion came (the chord's callback ran before the last part was sent again)."""
    quiet = settings.liveness_seconds
    not_done = sa.select(Part.upload_id).where(Part.upload_id == Upload.id, Part.status != PartStatus.DONE)
    recent = sa.select(Part.upload_id).where(Part.upload_id == Upload.id, Part.finished_at > clock.now(-quiet))
    with db.transaction() as session:
        orphaned = list(session.scalars(sa.select(Upload.id).where(
            Upload.queue == settings.queue, sa.or_(
                sa.and_(Upload.status == UploadStatus.COMPLETING, liveness.dead(Upload.completer)),
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
    lost = reconciler.lost(db, settings.queue, grace_seconds=settings.liveness_seconds)
    return [reconciler.reconcile(settings, db, upload_id) for upload_id in lost]


@contextlib.contextmanager
def _turn(db: Database, name: str, holder: str, seconds: float, judge: bool = True) -> Iterator[bool]:
    """True if `holder` may run this part of the pass now: its turn row is free (ended, run
    out, or, for a judge, held by a dead process), or already its own. Ended on the way out."""
    mine = _take_turn(db, name, holder, seconds, judge)
    try:
        yield mine
    finally:
        if mine:
            with db.transaction() as session:
                session.execute(sa.update(RecoveryTurn).where(RecoveryTurn.name == name,
                                                              RecoveryTurn.holder == holder)
                                .values(until=clock.now()))


def _take_turn(db: Database, name: str, holder: str, seconds: float, judge: bool) -> bool:
    free = [RecoveryTurn.until <= clock.now(), RecoveryTurn.holder == holder]
    if judge:
        free.append(liveness.dead(RecoveryTurn.holder))
    with db.transaction() as session:
        taken = session.execute(
            sa.update(RecoveryTurn).where(RecoveryTurn.name == name, sa.or_(*free))
            .values(holder=holder, until=clock.now(seconds)).returning(RecoveryTurn.name)).first()
        if taken is not None:
            return True
        if session.get(RecoveryTurn, name) is not None:
            return False  # another process's turn
        try:
            with session.begin_nested():
                session.add(RecoveryTurn(name=name, holder=holder, until=clock.now(seconds)))
        except exc.IntegrityError:
            return False  # another process made it first
    return True
