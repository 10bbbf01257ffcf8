"""Models and the transitions module, on PostgreSQL and on SQLite (the same code on both)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from models import clock, migrate, queries, transitions
from models.db import Database
from models.exceptions import InvalidTransition, UploadNotFound
from models.states import PartStatus, UploadStatus
from models.tables import Base, Part, Upload

pytestmark = pytest.mark.integration


@pytest.fixture(params=["postgresql", "sqlite"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
        migrate.upgrade(url)
        return url
    return str(request.getfixturevalue("database_url"))


@pytest.fixture
def state(state_url: str) -> Iterator[Database]:
    database = Database(state_url)
    yield database
    database.dispose()


def test_migrations_match_the_models(state_url: str) -> None:
    """`alembic upgrade head` on an empty database gives exactly the tables the models describe."""
    engine = sa.create_engine(state_url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        assert context.get_current_revision() == migrate.head()
    engine.dispose()


def new_upload(db: Database, parts: int = 3) -> uuid.UUID:
    upload = Upload(source_uri="file:///data/x.bin", source_size=parts * 10, source_mtime_ns=1, source_inode=2,
                    bucket="b-1", key="k", endpoint_url=None, part_size=10, max_retries=3, retry_count=0)
    specs = [transitions.PartSpec(n, (n - 1) * 10, 10) for n in range(1, parts + 1)]
    with db.transaction() as session:
        return transitions.create_upload(session, upload, specs, "test").id


def land(session, upload_id: uuid.UUID, number: int, etag: str) -> None:  # type: ignore[no-untyped-def]
    """Worker w1 claims a part and records it as landed."""
    transitions.claim_part(session, upload_id, number, "w1", 60)
    transitions.finish_part(session, upload_id, number, "w1", etag, "c", "landed")


def status_of(db: Database, upload_id: uuid.UUID) -> tuple[str, int]:
    with db.transaction() as session:
        return str(queries.get_upload(session, upload_id).status), len(queries.events(session, upload_id))


def test_the_happy_path_records_every_change(state: Database) -> None:
    upload_id = new_upload(state, parts=2)
    with state.transaction() as session:
        transitions.start_upload(session, upload_id, "mpu-1", "created")
    for number in (1, 2):
        with state.transaction() as session:
            claim = transitions.claim_part(session, upload_id, number, "w1", 60)
            assert claim.outcome is transitions.ClaimOutcome.CLAIMED
            transitions.finish_part(session, upload_id, number, "w1", f'"etag{number}"', "AAAAAA==", "landed")
    with state.transaction() as session:
        transitions.begin_completing(session, upload_id, "all done")
        transitions.mark_complete(session, upload_id, '"x-2"', "verified")

    with state.transaction() as session:
        upload = queries.get_upload(session, upload_id)
        moves = [(e.part_number, e.from_status, e.to_status) for e in queries.events(session, upload_id)]
        counts = queries.part_counts(session, upload_id)
    assert (upload.status, upload.s3_upload_id, upload.etag) == (UploadStatus.COMPLETE, "mpu-1", '"x-2"')
    assert upload.started_at is not None and upload.finished_at is not None
    assert moves == [(None, None, "queued"), (None, "queued", "in_progress"),
                     (1, "pending", "in_flight"), (1, "in_flight", "done"),
                     (2, "pending", "in_flight"), (2, "in_flight", "done"),
                     (None, "in_progress", "completing"), (None, "completing", "complete")]
    assert (counts.done, counts.bytes_done) == (2, 20)


@pytest.mark.parametrize("move", ["begin_completing", "mark_complete", "start_twice"])
def test_an_illegal_move_raises_and_changes_nothing(state: Database, move: str) -> None:
    upload_id = new_upload(state)
    with state.transaction() as session:
        transitions.start_upload(session, upload_id, "mpu", "created")
        transitions.fail_upload(session, upload_id, "boom")
    before = status_of(state, upload_id)

    with pytest.raises(InvalidTransition, match="is failed; it cannot become"), state.transaction() as session:
        if move == "begin_completing":
            transitions.begin_completing(session, upload_id, "x")
        elif move == "mark_complete":
            transitions.mark_complete(session, upload_id, None, "x")
        else:
            transitions.start_upload(session, upload_id, "mpu-2", "x")

    assert status_of(state, upload_id) == before


def test_an_upload_that_changes_status_wakes_whoever_waits_on_it(database_url: str) -> None:
    from models import notify

    db = Database(database_url)
    upload_id = new_upload(db)
    listener = notify.listen(db.engine)
    assert listener is not None
    try:
        with pytest.raises(InvalidTransition), db.transaction() as session:
            transitions.begin_completing(session, upload_id, "test")  # refused: nothing moved, nothing said
        assert not listener.wait(upload_id, 0.3)
        with db.transaction() as session:
            transitions.fail_upload(session, upload_id, "boom")
        assert listener.wait(upload_id, 10)
    finally:
        listener.close()
        db.dispose()


def test_a_complete_upload_never_leaves_complete(state: Database) -> None:
    upload_id = new_upload(state, parts=1)
    with state.transaction() as session:
        transitions.start_upload(session, upload_id, None, "created")
        transitions.begin_completing(session, upload_id, "x")
        transitions.mark_complete(session, upload_id, '"e"', "x")
    for attempt in (transitions.fail_upload, transitions.begin_completing):
        with pytest.raises(InvalidTransition), state.transaction() as session:
            attempt(session, upload_id, "late")
    assert status_of(state, upload_id)[0] == "complete"


def test_unknown_upload_raises_not_found(state: Database) -> None:
    with pytest.raises(UploadNotFound), state.transaction() as session:
        transitions.fail_upload(session, uuid.uuid4(), "x")


def test_claims_exclude_other_workers_until_the_lease_expires(state: Database) -> None:
    upload_id = new_upload(state, parts=1)
    with state.transaction() as session:
        transitions.start_upload(session, upload_id, "mpu", "created")
        assert transitions.claim_part(session, upload_id, 1, "w1", 60).outcome is transitions.ClaimOutcome.CLAIMED
    with state.transaction() as session:
        held = transitions.claim_part(session, upload_id, 1, "w2", 60)
    assert (held.outcome, held.part.worker) == (transitions.ClaimOutcome.HELD, "w1")

    with state.transaction() as session:  # w1 dies: its lease runs out
        session.execute(sa.update(Part).where(Part.upload_id == upload_id)
                        .values(lease_expires_at=clock.now(-1)))
    with state.transaction() as session:
        taken = transitions.claim_part(session, upload_id, 1, "w2", 60)
    assert (taken.outcome, taken.part.worker, taken.part.attempts) == (transitions.ClaimOutcome.CLAIMED, "w2", 2)

    with state.transaction() as session:
        assert transitions.finish_part(session, upload_id, 1, "w1", '"e0"', None, "late") is None  # not w1's now
        transitions.finish_part(session, upload_id, 1, "w2", '"e1"', None, "landed")
        again = transitions.claim_part(session, upload_id, 1, "w3", 60)
    assert again.outcome is transitions.ClaimOutcome.DONE


def test_parts_of_an_inactive_upload_are_not_claimed(state: Database) -> None:
    upload_id = new_upload(state, parts=1)
    with state.transaction() as session:
        claim = transitions.claim_part(session, upload_id, 1, "w1", 60)  # still queued
    assert claim.outcome is transitions.ClaimOutcome.INACTIVE
    assert claim.part.status == PartStatus.PENDING


def test_finishing_a_part_twice(state: Database) -> None:
    upload_id = new_upload(state, parts=1)
    with state.transaction() as session:
        transitions.start_upload(session, upload_id, "mpu", "created")
        land(session, upload_id, 1, '"e1"')
    before = status_of(state, upload_id)
    with state.transaction() as session:
        transitions.finish_part(session, upload_id, 1, "w1", '"e1"', "c", "landed again")  # same ETag: a no-op
    assert status_of(state, upload_id) == before
    with pytest.raises(InvalidTransition, match="done with ETag"), state.transaction() as session:
        transitions.finish_part(session, upload_id, 1, "w1", '"other"', "c", "landed")


def test_retry_release_counts_on_part_and_upload(state: Database) -> None:
    upload_id = new_upload(state, parts=1)
    with state.transaction() as session:
        transitions.start_upload(session, upload_id, "mpu", "created")
        transitions.claim_part(session, upload_id, 1, "w1", 60)
        assert transitions.release_for_retry(session, upload_id, 1, "someone-else", "x") is None
        part = transitions.release_for_retry(session, upload_id, 1, "w1", "SlowDown: reduce your rate")
        upload = queries.get_upload(session, upload_id)
    assert part is not None
    assert (part.status, part.attempts, part.worker, part.last_error) == (
        PartStatus.PENDING, 1, None, "SlowDown: reduce your rate")
    assert (upload.retry_count, upload.last_error) == (1, "SlowDown: reduce your rate")
    assert upload.last_retry_at is not None


def test_leases_are_renewed_only_by_their_holder(state: Database) -> None:
    upload_id = new_upload(state, parts=1)
    with state.transaction() as session:
        transitions.start_upload(session, upload_id, "mpu", "created")
        first = transitions.claim_part(session, upload_id, 1, "w1", 5).part.lease_expires_at
    with state.transaction() as session:
        assert transitions.renew_lease(session, upload_id, 1, "w1", 600)
        assert not transitions.renew_lease(session, upload_id, 1, "w2", 600)
        renewed = queries.parts(session, upload_id)[0].lease_expires_at
    assert renewed > first


def test_uncounted_release_and_release_on_shutdown(state: Database) -> None:
    upload_id = new_upload(state, parts=3)
    w1, w2 = f"n1-{upload_id}:1", f"n2-{upload_id}:1"  # release_claims spans uploads: names of this test only
    with state.transaction() as session:
        transitions.start_upload(session, upload_id, "mpu", "created")
        for number in (1, 2):
            transitions.claim_part(session, upload_id, number, w1, 60)
        transitions.claim_part(session, upload_id, 3, w2, 60)
        part = transitions.release_for_retry(session, upload_id, 1, w1, "endpoint unreachable", counted=False)
        assert part is not None and part.attempts == 0
    with state.transaction() as session:
        assert transitions.release_claims(session, f"n1-{upload_id}:", "worker shutting down") == 1
        rows = queries.parts(session, upload_id)
        upload = queries.get_upload(session, upload_id)
    assert [(p.status, p.worker, p.attempts) for p in rows] == [
        ("pending", None, 0), ("pending", None, 0), ("in_flight", w2, 1)]
    assert upload.retry_count == 0


def test_failing_a_part_needs_its_claim(state: Database) -> None:
    upload_id = new_upload(state, parts=1)
    with state.transaction() as session:
        transitions.start_upload(session, upload_id, "mpu", "created")
        transitions.claim_part(session, upload_id, 1, "w1", 60)
        assert transitions.fail_part(session, upload_id, 1, "w2", "x") is None
        assert transitions.fail_part(session, upload_id, 1, "w1", "AccessDenied").status == PartStatus.FAILED


def test_concurrent_claims_give_the_part_to_exactly_one_worker(database_url: str) -> None:
    """Many workers race for the same parts while others release theirs: one claim each, no deadlock."""
    import threading

    state = Database(database_url)
    upload_id = new_upload(state, parts=4)
    with state.transaction() as session:
        transitions.start_upload(session, upload_id, "mpu", "created")
    outcomes: list[tuple[int, str, str]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(index: int) -> None:
        try:
            barrier.wait()
            for round_ in range(5):
                for number in range(1, 5):
                    with state.transaction() as session:
                        claim = transitions.claim_part(session, upload_id, number, f"w{index}", 60)
                    outcomes.append((number, f"w{index}", claim.outcome.value))
                    if claim.outcome is transitions.ClaimOutcome.CLAIMED and round_ < 4:
                        with state.transaction() as session:
                            transitions.release_for_retry(session, upload_id, number, f"w{index}", "x")
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    state.dispose()
    assert errors == []
    with Database(database_url).transaction() as session:
        rows = queries.parts(session, upload_id)
        claims = [e for e in queries.events(session, upload_id) if e.to_status == "in_flight"]
    held = [p for p in rows if p.status == PartStatus.IN_FLIGHT]
    assert len(held) == 4  # every part ends held by exactly one worker
    with Database(database_url).transaction() as session:
        for number in range(1, 5):
            moves = [e.to_status for e in queries.events(session, upload_id) if e.part_number == number]
            assert all(a != b for a, b in zip(moves, moves[1:], strict=False)), moves  # never claimed while held
    assert len(claims) == sum(1 for _, _, outcome in outcomes if outcome == "claimed")


def test_a_part_that_landed_after_its_lease_ran_out_is_still_recorded(state: Database) -> None:
    """A database outage outlived the lease: the part went back to pending, but S3's ETag proves it."""
    upload_id = new_upload(state, parts=1)
    with state.transaction() as session:
        transitions.start_upload(session, upload_id, "mpu", "created")
        transitions.claim_part(session, upload_id, 1, "w1", 60)
        session.execute(sa.update(Part).where(Part.upload_id == upload_id)
                        .values(lease_expires_at=clock.now(-1)))
    with state.transaction() as session:
        assert transitions.release_lapsed(session, upload_id) == [1]
        part = transitions.finish_part(session, upload_id, 1, "w1", '"e1"', "c", "landed late")
    assert part is not None and part.status == PartStatus.DONE


def test_pause_requeue_cancel_retry_and_priority(state: Database) -> None:
    upload_id = new_upload(state, parts=2)
    with state.transaction() as session:
        transitions.start_upload(session, upload_id, "mpu", "created")
        land(session, upload_id, 1, '"e1"')
        transitions.claim_part(session, upload_id, 2, "w1", 60)
        transitions.fail_part(session, upload_id, 2, "w1", "AccessDenied")
        transitions.fail_upload(session, upload_id, "part 2: AccessDenied")
    with state.transaction() as session:
        assert transitions.retry_failed(session, upload_id, "retried") is True
        rows = queries.parts(session, upload_id)
        upload = queries.get_upload(session, upload_id)
    assert [(p.status, p.attempts) for p in rows] == [("done", 1), ("pending", 0)]
    assert (upload.status, upload.retry_count, upload.s3_upload_id) == ("queued", 0, "mpu")
    with state.transaction() as session:
        transitions.set_priority(session, upload_id, 7)
        transitions.pause(session, upload_id, "paused")
        transitions.requeue(session, upload_id, "resumed")
        transitions.cancel(session, upload_id, "cancelled")
        transitions.mark_aborted(session, upload_id, "cancelled")
    with state.transaction() as session:
        upload = queries.get_upload(session, upload_id)
    assert (upload.status, upload.priority) == ("cancelled", 7) and upload.s3_aborted_at is not None
    for move in (transitions.requeue, transitions.pause, transitions.cancel):
        with pytest.raises(InvalidTransition), state.transaction() as session:
            move(session, upload_id, "again")


def test_retrying_an_upload_whose_multipart_upload_was_swept_starts_over(state: Database) -> None:
    upload_id = new_upload(state, parts=2)
    with state.transaction() as session:
        transitions.start_upload(session, upload_id, "mpu", "created")
        land(session, upload_id, 1, '"e1"')
        transitions.fail_upload(session, upload_id, "boom")
        transitions.mark_aborted(session, upload_id, "swept")
    with state.transaction() as session:
        assert transitions.retry_failed(session, upload_id, "retried") is False
        rows = queries.parts(session, upload_id)
        upload = queries.get_upload(session, upload_id)
    assert [p.status for p in rows] == ["pending", "pending"] and rows[0].etag is None
    assert upload.s3_upload_id is None and upload.s3_aborted_at is None
