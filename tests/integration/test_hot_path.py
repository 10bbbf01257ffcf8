"""The per-part hot path: a part costs two statements (its claim and its record), each guarded.

The guards of the claim, record and step-aside statements are checked on PostgreSQL and on
SQLite (one statement there is three, in one transaction); the races the row locks they
replace used to settle, on PostgreSQL; and the pool: no ping per checkout, a connection the
server closed replaced as it is taken.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from models import clock, liveness, migrate, queries, transitions
from models.db import Database
from models.exceptions import InvalidTransition, UploadNotFound
from models.settings import Settings
from models.states import PartStatus, UploadStatus
from models.tables import Part, Upload
from orchestrator import submit
from tests.conftest import write_random
from tests.integration.helpers import MiB
from workers import parts, runtime
from workers.runtime import Runtime
from workers.window import Signal

pytestmark = pytest.mark.integration

Outcome = transitions.ClaimOutcome


# --- statements per part -----------------------------------------------------------------------


class Counted:
    """What a Database's engine did while counting: statements by thread name (and those of the
    main thread, with whether they ran in autocommit: no BEGIN or COMMIT sent around them),
    connections made, pings."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.statements: collections.Counter[str] = collections.Counter()
        self.sql: list[tuple[str, bool]] = []
        self.connects = self.pings = 0

    @contextlib.contextmanager
    def counting(self) -> Iterator[Counted]:
        engine, dialect = self.db.engine, self.db.engine.dialect
        ping = dialect.do_ping

        def on_statement(conn, _cursor, statement, *_):  # type: ignore[no-untyped-def]
            name = threading.current_thread().name
            self.statements[name] += 1
            if name == "MainThread":
                self.sql.append((statement, bool(getattr(conn.connection.dbapi_connection, "autocommit", False))))

        def on_connect(*_):  # type: ignore[no-untyped-def]
            self.connects += 1

        def counted_ping(dbapi_connection):  # type: ignore[no-untyped-def]
            self.pings += 1
            return ping(dbapi_connection)

        sa.event.listen(engine, "before_cursor_execute", on_statement)
        sa.event.listen(engine.pool, "connect", on_connect)
        dialect.do_ping = counted_ping  # type: ignore[method-assign]
        try:
            yield self
        finally:
            dialect.do_ping = ping  # type: ignore[method-assign]
            sa.event.remove(engine, "before_cursor_execute", on_statement)
            sa.event.remove(engine.pool, "connect", on_connect)


@pytest.fixture
def rt(service_env: dict[str, str], database_url: str) -> Iterator[Runtime]:
    """A worker's runtime with a database of its own (sized as for 4 task threads), on a queue of
    its own: the session worker's recovery pass leaves its uploads to the test."""
    db = Database(database_url, threads=4 + 2)
    settings = dataclasses.replace(Settings.from_env(), queue=f"hot-{uuid.uuid4().hex[:6]}")
    worker = Runtime(settings=settings, db=db)
    yield worker
    worker.close()  # its heartbeat too


def prepare(rt: Runtime, path: Path, bucket: str, size: int) -> submit.Submitted:
    write_random(path, size)
    request = submit.validate(rt.settings, str(path), f"s3://{bucket}/{path.name}", 5 * MiB)
    return submit.prepare(rt.settings, rt.db, request)


def test_a_part_costs_two_statements(rt: Runtime, bucket: str, tmp_path: Path) -> None:
    """The happy path of send_part on PostgreSQL: the claim (which reads the upload too) and the
    record, one statement each, in autocommit (no BEGIN or COMMIT: two round trips in all), on
    pooled connections that are not pinged; a part that lands quickly renews no lease."""
    up = prepare(rt, tmp_path / "hot.bin", bucket, 3 * 5 * MiB)
    rt.alive()  # the heartbeat's first beat happens here: not the part's
    assert rt.window(up.endpoint_url, bucket) is not None  # the window is on the path too
    parts.send_part(rt, up.upload_id, 1)  # the pool's connection made, the statements compiled

    with Counted(rt.db).counting() as counted:
        results = [parts.send_part(rt, up.upload_id, n) for n in (2, 3)]

    assert all(r.etag for r in results)
    lease_keepers = sum(n for name, n in counted.statements.items() if name.startswith("lease-"))
    assert (counted.statements["MainThread"], lease_keepers) == (4, 0), counted.sql
    claim_sql, record_sql = counted.sql[0][0], counted.sql[1][0]
    for sql in (claim_sql, record_sql):
        assert sql.lstrip().startswith("WITH before AS") and "UPDATE parts" in sql
        assert "INSERT INTO upload_events" in sql and "FOR SHARE" not in sql
    assert "JOIN uploads" in claim_sql and "JOIN uploads" not in record_sql
    assert all(autocommit for _, autocommit in counted.sql)
    assert (counted.connects, counted.pings) == (0, 0)
    with rt.db.transaction() as session:
        rows = queries.parts(session, up.upload_id)
        moves = [(e.part_number, e.from_status, e.to_status) for e in queries.events(session, up.upload_id)
                 if e.part_number == 2]
    assert [(p.status, p.attempts, p.worker) for p in rows] == [(PartStatus.DONE, 1, None)] * 3
    assert moves == [(2, "pending", "in_flight"), (2, "in_flight", "done")]


def test_a_claim_waits_for_its_slot_without_lapsing_and_steps_aside_uncounted(  # type: ignore[no-untyped-def]
        rt: Runtime, bucket: str, tmp_path: Path) -> None:
    """The claim comes first, then the window slot. Waiting for a slot longer than the lease, the
    claim is kept alive (nobody else may take the part meanwhile); no slot at all: the claim goes
    back uncounted, and the upload is left alone."""
    short = Runtime(settings=dataclasses.replace(rt.settings, lease_seconds=1, window_initial=1, window_min=1,
                                                 window_max=1, window_wait_seconds=0.3), db=rt.db)
    up = prepare(rt, tmp_path / "slot.bin", bucket, 2 * 5 * MiB)
    shared = short.window(up.endpoint_url, bucket)
    assert shared is not None
    blocker = shared.acquire("test-blocker", 0)
    assert blocker is not None

    with pytest.raises(parts.RetryLater, match="no slot free"):
        parts.send_part(short, up.upload_id, 1)
    with rt.db.transaction() as session:
        part = queries.parts(session, up.upload_id)[0]
        upload = queries.get_upload(session, up.upload_id)
        moves = [(e.from_status, e.to_status, e.reason) for e in queries.events(session, up.upload_id)
                 if e.part_number == 1]
    assert (part.status, part.attempts, part.worker, part.last_error) == (PartStatus.PENDING, 0, None, None)
    assert (upload.status, upload.retry_count, upload.last_error) == (UploadStatus.IN_PROGRESS, 0, None)
    assert [m[:2] for m in moves] == [("pending", "in_flight"), ("in_flight", "pending")]
    assert moves[1][2].startswith("stepped aside: no slot free")

    patient = Runtime(settings=dataclasses.replace(short.settings, window_wait_seconds=6), db=rt.db)
    sent: list[parts.PartResult] = []
    worker = threading.Thread(target=lambda: sent.append(parts.send_part(patient, up.upload_id, 2)))
    worker.start()
    time.sleep(2.5)  # 2.5 leases: without renewals the claim would have lapsed
    with rt.db.transaction() as session:
        other = transitions.claim_part(session, up.upload_id, 2, "another:1:1/x", 1)
    assert other.outcome is Outcome.HELD, other.part.lease_expires_at
    shared.release(blocker, Signal.NONE, "test over")
    worker.join(30)
    assert sent and sent[0].etag
    with rt.db.transaction() as session:
        part = queries.parts(session, up.upload_id)[1]
    assert (part.status, part.attempts) == (PartStatus.DONE, 1)


# --- the guards, on PostgreSQL and SQLite ----------------------------------------------------


@pytest.fixture(params=["postgresql", "sqlite"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
        migrate.upgrade(url)
    else:
        url = str(request.getfixturevalue("database_url"))
    database = Database(url)
    yield database
    database.dispose()


def new_upload(db: Database, parts: int = 1, start: bool = True) -> uuid.UUID:
    upload = Upload(source_uri="file:///data/x.bin", source_size=parts * 10, source_mtime_ns=1, source_inode=2,
                    bucket="b-1", key="k", endpoint_url="http://s3.test", part_size=10, max_retries=3,
                    retry_count=0)
    specs = [transitions.PartSpec(n, (n - 1) * 10, 10) for n in range(1, parts + 1)]
    with db.transaction() as session:
        upload_id = transitions.create_upload(session, upload, specs, "test").id
        if start:
            transitions.start_upload(session, upload_id, "mpu-1", "started")
    return upload_id


def set_part(db: Database, upload_id: uuid.UUID, **values: object) -> None:
    with db.transaction() as session:
        session.execute(sa.update(Part).where(Part.upload_id == upload_id).values(**values))


def part_and_events(db: Database, upload_id: uuid.UUID) -> tuple[Part, list[tuple[str | None, str, str]]]:
    with db.transaction() as session:
        events = [(e.from_status, e.to_status, str(e.reason)) for e in queries.events(session, upload_id)
                  if e.part_number is not None]
        return queries.parts(session, upload_id)[0], events


def state_of(db: Database, upload_id: uuid.UUID) -> tuple[dict[str, object], list[tuple[str | None, str, str]]]:
    """The part's columns and its events: to tell that nothing changed."""
    part, events = part_and_events(db, upload_id)
    return {c.key: getattr(part, c.key) for c in Part.__table__.c}, events


def claim(db: Database, upload_id: uuid.UUID, worker: str = "w2", judge: bool = False) -> transitions.Claim:
    with db.transaction() as session:
        return transitions.claim_part(session, upload_id, 1, worker, 60, judge, holder="h2")


def test_a_claim_takes_a_pending_part_and_returns_its_upload(state: Database) -> None:
    upload_id = new_upload(state)
    got = claim(state, upload_id)
    part, events = part_and_events(state, upload_id)
    assert got.outcome is Outcome.CLAIMED
    assert (got.part.status, got.part.worker, got.part.holder, got.part.attempts) == (
        PartStatus.IN_FLIGHT, "w2", "h2", 1)
    assert got.part.lease_expires_at is not None and got.part.started_at is not None
    assert (got.upload.id, got.upload.status, got.upload.s3_upload_id, got.upload.bucket, got.upload.key,
            got.upload.endpoint_url, got.upload.max_retries, got.upload.source_uri) == (
        upload_id, UploadStatus.IN_PROGRESS, "mpu-1", "b-1", "k", "http://s3.test", 3, "file:///data/x.bin")
    assert (part.status, part.worker, part.attempts) == (PartStatus.IN_FLIGHT, "w2", 1)
    assert events == [("pending", "in_flight", "claimed by w2")]


def test_a_claim_retakes_a_failed_part(state: Database) -> None:
    upload_id = new_upload(state)
    set_part(state, upload_id, status=PartStatus.FAILED, attempts=2)
    got = claim(state, upload_id)
    assert (got.outcome, got.part.attempts) == (Outcome.CLAIMED, 3)
    assert part_and_events(state, upload_id)[1] == [("failed", "in_flight", "claimed by w2")]


def test_a_claim_takes_over_a_lapsed_lease_and_not_a_live_one(state: Database) -> None:
    upload_id = new_upload(state)
    claim(state, upload_id, "w1")
    before = state_of(state, upload_id)
    held = claim(state, upload_id, "w2")
    assert (held.outcome, held.part.worker) == (Outcome.HELD, "w1")
    assert state_of(state, upload_id) == before

    set_part(state, upload_id, lease_expires_at=clock.now(-1))
    taken = claim(state, upload_id, "w2")
    part, events = part_and_events(state, upload_id)
    assert (taken.outcome, part.worker, part.attempts) == (Outcome.CLAIMED, "w2", 2)
    assert events[-1] == ("in_flight", "in_flight", "lease of w1 expired; reclaimed by w2")


def test_a_claim_by_its_own_holder_is_taken_again(state: Database) -> None:
    upload_id = new_upload(state)
    claim(state, upload_id, "w1")
    again = claim(state, upload_id, "w1")
    assert (again.outcome, again.part.attempts) == (Outcome.CLAIMED, 2)
    assert part_and_events(state, upload_id)[1][-1] == ("in_flight", "in_flight", "its own claim; reclaimed by w1")


def test_a_judge_takes_a_dead_holders_part_and_only_a_judge(state: Database) -> None:
    upload_id = new_upload(state)
    with state.transaction() as session:
        transitions.claim_part(session, upload_id, 1, "dead:1:1/a", 600, holder="dead:1:1")
        liveness.beat(session, "dead:1:1", -1)  # its record expired a second ago
    assert claim(state, upload_id, judge=False).outcome is Outcome.HELD  # its lease is live
    judged = claim(state, upload_id, judge=True)
    assert (judged.outcome, judged.part.worker) == (Outcome.CLAIMED, "w2")
    assert part_and_events(state, upload_id)[1][-1] == (
        "in_flight", "in_flight", "holder dead:1:1 is dead; reclaimed by w2")


def test_a_claim_of_a_done_part_changes_nothing(state: Database) -> None:
    upload_id = new_upload(state)
    claim(state, upload_id, "w1")
    with state.transaction() as session:
        transitions.finish_part(session, upload_id, 1, "w1", '"e1"', "c1", "landed")
    before = state_of(state, upload_id)
    done = claim(state, upload_id)
    assert (done.outcome, done.part.etag, done.part.checksum, done.upload.id) == (Outcome.DONE, '"e1"', "c1", upload_id)
    assert state_of(state, upload_id) == before


@pytest.mark.parametrize("status", ["queued", "paused", "failed", "cancelled", "completing"])
def test_no_claim_while_the_upload_is_not_in_progress(state: Database, status: str) -> None:
    upload_id = new_upload(state, start=status != "queued")
    with state.transaction() as session:
        {"queued": lambda *a: None, "paused": transitions.pause, "failed": transitions.fail_upload,
         "cancelled": transitions.cancel, "completing": transitions.begin_completing}[status](
            session, upload_id, "test")
    got = claim(state, upload_id)
    part, events = part_and_events(state, upload_id)
    assert (got.outcome, got.upload.status, got.part.status) == (Outcome.INACTIVE, status, PartStatus.PENDING)
    assert (part.status, part.attempts, events) == (PartStatus.PENDING, 0, [])


def test_no_claim_of_a_part_that_does_not_exist(state: Database) -> None:
    upload_id = new_upload(state)
    for missing in ((upload_id, 2), (uuid.uuid4(), 1)):
        with pytest.raises(UploadNotFound), state.transaction() as session:
            transitions.claim_part(session, *missing, "w1", 60)
        with pytest.raises(UploadNotFound), state.transaction() as session:
            transitions.finish_part(session, *missing, "w1", '"e"', None, "landed")


def finish(db: Database, upload_id: uuid.UUID, worker: str = "w1", etag: str = '"e1"') -> Part | None:
    with db.transaction() as session:
        return transitions.finish_part(session, upload_id, 1, worker, etag, "c1", "landed")


def test_a_record_by_the_holder_lands_the_part(state: Database) -> None:
    upload_id = new_upload(state)
    claim(state, upload_id, "w1")
    recorded = finish(state, upload_id)
    part, events = part_and_events(state, upload_id)
    assert recorded is not None and (recorded.status, recorded.etag, recorded.checksum) == (
        PartStatus.DONE, '"e1"', "c1")
    assert (part.status, part.worker, part.holder, part.lease_expires_at, part.finished_at is not None) == (
        PartStatus.DONE, None, None, None, True)
    assert events[-1] == ("in_flight", "done", "landed")


@pytest.mark.parametrize("how", ["released", "lapsed"])
def test_a_record_after_the_claim_ran_out_is_kept(state: Database, how: str) -> None:
    """The ETag proves the part landed: recorded when nobody holds a live claim."""
    upload_id = new_upload(state)
    claim(state, upload_id, "w1")
    set_part(state, upload_id, lease_expires_at=clock.now(-1))
    if how == "released":
        with state.transaction() as session:
            assert transitions.release_lapsed(session, upload_id) == [1]
    recorded = finish(state, upload_id)
    assert recorded is not None and recorded.status == PartStatus.DONE
    assert part_and_events(state, upload_id)[1][-1][:2] == ("pending" if how == "released" else "in_flight", "done")


def test_no_record_over_a_live_claim_of_another_or_a_failed_part(state: Database) -> None:
    upload_id = new_upload(state)
    claim(state, upload_id, "w2")
    before = state_of(state, upload_id)
    assert finish(state, upload_id, "w1") is None
    assert state_of(state, upload_id) == before
    with state.transaction() as session:
        transitions.fail_part(session, upload_id, 1, "w2", "AccessDenied")
    assert finish(state, upload_id, "w2") is None
    assert part_and_events(state, upload_id)[0].status == PartStatus.FAILED


def test_a_record_again_is_a_no_op_and_another_etag_is_refused(state: Database) -> None:
    upload_id = new_upload(state)
    claim(state, upload_id, "w1")
    finish(state, upload_id)
    before = state_of(state, upload_id)
    again = finish(state, upload_id, "w9", '"e1"')  # the same ETag, quoted or not: a no-op
    assert again is not None and again.etag == '"e1"' and finish(state, upload_id, "w9", "e1") is not None
    with pytest.raises(InvalidTransition, match="done with ETag"):
        finish(state, upload_id, "w1", '"other"')
    assert state_of(state, upload_id) == before


def test_a_record_does_not_depend_on_the_uploads_status(state: Database) -> None:
    """A part that landed while its upload was paused (or failed) is recorded: S3 has it."""
    upload_id = new_upload(state)
    claim(state, upload_id, "w1")
    with state.transaction() as session:
        transitions.pause(session, upload_id, "test")
    recorded = finish(state, upload_id)
    assert recorded is not None and recorded.status == PartStatus.DONE


def test_stepping_aside_gives_the_claim_back_uncounted(state: Database) -> None:
    upload_id = new_upload(state)
    claim(state, upload_id, "w1")
    with state.transaction() as session:
        assert transitions.step_aside(session, upload_id, 1, "w2", "no slot") is None  # not w2's
        back = transitions.step_aside(session, upload_id, 1, "w1", "no slot")
        upload = queries.get_upload(session, upload_id)
    part, events = part_and_events(state, upload_id)
    assert back is not None and (back.status, back.attempts, back.worker) == (PartStatus.PENDING, 0, None)
    assert (part.status, part.attempts, part.worker, part.holder, part.lease_expires_at, part.last_error) == (
        PartStatus.PENDING, 0, None, None, None, None)
    assert (upload.retry_count, upload.last_error) == (0, None)
    assert events[-1] == ("in_flight", "pending", "stepped aside: no slot")


def test_moves_refresh_the_sessions_own_instance_of_the_part(state: Database) -> None:
    """A part the session loaded before a claim or record shows the move (as populate_existing would)."""
    upload_id = new_upload(state)
    with state.transaction() as session:
        loaded = queries.parts(session, upload_id)[0]
        got = transitions.claim_part(session, upload_id, 1, "w1", 60)
        assert got.part is loaded and loaded.status == PartStatus.IN_FLIGHT
        transitions.finish_part(session, upload_id, 1, "w1", '"e1"', None, "landed")
        assert (queries.parts(session, upload_id)[0].status, loaded.etag) == (PartStatus.DONE, '"e1"')


def test_a_move_comes_after_what_the_session_holds(state: Database) -> None:
    """Events the session holds (not yet flushed) go to the database before the move's own."""
    upload_id = new_upload(state, start=False)
    with state.transaction() as session:
        transitions.start_upload(session, upload_id, "mpu-1", "started")
        assert transitions.claim_part(session, upload_id, 1, "w1", 60).outcome is Outcome.CLAIMED
    with state.transaction() as session:
        moves = [(e.part_number, e.from_status, e.to_status) for e in queries.events(session, upload_id)]
    assert moves == [(None, None, "queued"), (None, "queued", "in_progress"), (1, "pending", "in_flight")]


# --- races the row locks used to settle (PostgreSQL) --------------------------------------------


def in_transaction_then(db: Database, work, hold: float) -> tuple[threading.Thread, threading.Event]:  # type: ignore[no-untyped-def]
    """Run `work(session)` in a transaction on a thread and hold it open `hold` seconds before
    committing; returns the thread and an event set once `work` ran (its locks taken)."""
    ready = threading.Event()

    def run() -> None:
        with db.transaction() as session:
            work(session)
            ready.set()
            time.sleep(hold)

    thread = threading.Thread(target=run)
    thread.start()
    assert ready.wait(10)
    return thread, ready


def test_a_part_failed_with_its_upload_meanwhile_is_not_claimed(database_url: str) -> None:
    """The claim's snapshot sees the part claimable (its holder's lease ran out) while that holder
    fails it, and its upload, in a transaction not yet committed. The claim waits for the part's
    row, then sees a newer version than its snapshot's: it looks again, and finds the upload
    failed. (A guard that only re-checked the part's row would have claimed it: the upload's
    status in that re-check is the snapshot's.)"""
    db = Database(database_url)
    upload_id = new_upload(db)
    claim(db, upload_id, "w1")
    set_part(db, upload_id, lease_expires_at=clock.now(-1))

    def fail(session):  # type: ignore[no-untyped-def]
        assert transitions.fail_part(session, upload_id, 1, "w1", "AccessDenied") is not None
        transitions.fail_upload(session, upload_id, "part 1: AccessDenied")

    failing, _ = in_transaction_then(db, fail, hold=1.0)
    started = time.monotonic()
    got = claim(db, upload_id, "w2")
    waited = time.monotonic() - started
    failing.join()
    part, events = part_and_events(db, upload_id)
    db.dispose()
    assert waited > 0.5  # it did wait for the failing transaction
    assert (got.outcome, got.upload.status) == (Outcome.INACTIVE, UploadStatus.FAILED)
    assert (part.status, events[-1][:2]) == (PartStatus.FAILED, ("in_flight", "failed"))


def test_a_part_released_meanwhile_is_claimed_after_all(database_url: str) -> None:
    """The other way round: a part that changes under the claim into one it may take is taken."""
    db = Database(database_url)
    upload_id = new_upload(db)
    claim(db, upload_id, "w1")
    set_part(db, upload_id, lease_expires_at=clock.now(-1))
    releasing, _ = in_transaction_then(db, lambda s: transitions.release_lapsed(s, upload_id), hold=1.0)
    got = claim(db, upload_id, "w2")
    releasing.join()
    part, events = part_and_events(db, upload_id)
    db.dispose()
    assert (got.outcome, part.worker) == (Outcome.CLAIMED, "w2")
    assert [e[:2] for e in events[-2:]] == [("in_flight", "pending"), ("pending", "in_flight")]


def test_claims_and_records_do_not_wait_for_a_transition_holding_the_upload(database_url: str) -> None:
    """A transition holding the upload's row (to change it, and then maybe a part) holds up no part
    being claimed or recorded, so the two lock orders never deadlock: the event that a claim or a
    record inserts takes only FOR KEY SHARE on the upload (its foreign key), which the
    transition's FOR NO KEY UPDATE allows."""
    db = Database(database_url)
    upload_id = new_upload(db, parts=2)
    claim(db, upload_id, "w1")  # part 1

    holding, _ = in_transaction_then(db, lambda s: transitions._lock_upload(s, upload_id, write=True), hold=3.0)
    started = time.monotonic()
    with db.transaction() as session:
        assert transitions.claim_part(session, upload_id, 2, "w2", 60).outcome is Outcome.CLAIMED
    with db.transaction() as session:
        assert transitions.finish_part(session, upload_id, 1, "w1", '"e1"', None, "landed") is not None
    elapsed = time.monotonic() - started
    holding.join()
    db.dispose()
    assert elapsed < 2.0, elapsed


# --- the pool ------------------------------------------------------------------------------------


def test_a_connection_the_server_closed_is_replaced_as_it_is_taken(database_url: str) -> None:
    """No ping on a healthy checkout; a pooled connection the server terminated is noticed (it has
    something to read), pinged and replaced, and the transaction runs on a new one."""
    db = Database(database_url, threads=1)
    with Counted(db).counting() as counted:
        for _ in range(5):
            db.check()
        assert (counted.pings, counted.connects) == (0, 1)
        with db.transaction() as session:
            pid = session.scalar(sa.text("SELECT pg_backend_pid()"))
        admin = sa.create_engine(database_url)
        with admin.connect() as connection:
            assert connection.scalar(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        admin.dispose()
        time.sleep(0.2)
        with db.transaction() as session:
            assert session.scalar(sa.text("SELECT pg_backend_pid()")) != pid
    db.dispose()
    assert (counted.pings, counted.connects) == (1, 2)


def test_the_pool_is_sized_to_the_workers_threads(database_url: str) -> None:
    from celery.concurrency import get_implementation

    assert runtime.tasks_at_once(get_implementation("threads"), 8) == 8
    assert runtime.tasks_at_once("threads", 3) == 3
    assert runtime.tasks_at_once(get_implementation("prefork"), 8) == 1  # one task per pool process
    assert runtime.tasks_at_once(get_implementation("solo"), 1) == 1
    db = Database(database_url, threads=6)
    assert db.engine.pool.size() == 6  # type: ignore[attr-defined]
    db.dispose()
