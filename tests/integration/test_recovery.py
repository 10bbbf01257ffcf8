"""Recovery through a real worker: lost chords, parts that landed unrecorded, expired claims,
stalled completions, and the sweeper. The reconciler is driven directly."""

from __future__ import annotations

import base64
import dataclasses
import uuid
import datetime as dt
from pathlib import Path

import crc32c
import pytest
import sqlalchemy as sa

from models import clock, queries, transitions
from models.exceptions import UserError
from models.settings import Settings
from models.states import UploadStatus
from models.tables import Part
from orchestrator import reconciler, submit, sweeper
from tests.conftest import sha256_of_object, write_random
from tests.integration.helpers import FINISHED, MiB, claims_per_part, wait_status

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(service_env) -> Settings:  # type: ignore[no-untyped-def]
    """Uploads recorded on a queue of their own: the session worker's recovery pass (which finds a
    lost dispatch of its own queue's uploads within seconds) leaves them to the test's reconciler;
    the parts the test dispatches go to the session's queue, where the worker sends them."""
    return dataclasses.replace(Settings.from_env(), queue=f"recovery-{uuid.uuid4().hex[:6]}")


def prepare(settings: Settings, db, path: Path, bucket: str, size: int) -> tuple[submit.Submitted, str]:  # type: ignore[no-untyped-def]
    sha256 = write_random(path, size)
    request = submit.validate(settings, str(path), f"s3://{bucket}/{path.name}", 5 * MiB)
    return submit.prepare(settings, db, request), sha256


def test_an_upload_whose_chord_was_lost_is_dispatched_again(worker, settings, db, s3, bucket,  # type: ignore[no-untyped-def]
                                                          tmp_path: Path) -> None:
    """Prepared but never dispatched (the orchestrator died, or Redis lost the chord)."""
    up, sha256 = prepare(settings, db, tmp_path / "lost.bin", bucket, 11 * MiB)
    assert up.upload_id in reconciler.stalled(db, 0)

    report = reconciler.reconcile(settings, db, up.upload_id)

    assert report.dispatched == [1, 2, 3] and report.action == "missing parts dispatched again"
    assert wait_status(db, up.upload_id, FINISHED) == UploadStatus.COMPLETE
    assert sha256_of_object(s3, bucket, "lost.bin") == sha256
    again = reconciler.reconcile(settings, db, up.upload_id)
    assert again.action == "nothing to do: the upload is complete"


def test_parts_that_landed_unrecorded_are_adopted_after_checking_their_bytes(  # type: ignore[no-untyped-def]
        worker, settings, db, s3, bucket, tmp_path: Path) -> None:
    path = tmp_path / "landed.bin"
    up, sha256 = prepare(settings, db, path, bucket, 11 * MiB)
    data = path.read_bytes()
    # part 1 landed but its database write was lost; part 2 in S3 holds other bytes
    for number, body in ((1, data[:5 * MiB]), (2, b"x" * (5 * MiB))):
        s3.upload_part(Bucket=bucket, Key="landed.bin", UploadId=up.s3_upload_id, PartNumber=number, Body=body,
                       ChecksumCRC32C=base64.b64encode(crc32c.crc32c(body).to_bytes(4, "big")).decode())

    report = reconciler.reconcile(settings, db, up.upload_id)

    assert (report.adopted, report.dispatched) == ([1], [2, 3])
    assert wait_status(db, up.upload_id, FINISHED) == UploadStatus.COMPLETE
    assert sha256_of_object(s3, bucket, "landed.bin") == sha256
    assert claims_per_part(db, up.upload_id) == {2: 1, 3: 1}  # part 1 was never sent again


def test_claims_of_a_dead_worker_are_released_and_their_parts_sent(worker, settings, db, s3, bucket,  # type: ignore[no-untyped-def]
                                                                    tmp_path: Path) -> None:
    up, sha256 = prepare(settings, db, tmp_path / "dead.bin", bucket, 6 * MiB)
    with db.transaction() as session:
        transitions.claim_part(session, up.upload_id, 1, "dead-host:1:x", 60)
        session.execute(sa.update(Part).where(Part.upload_id == up.upload_id)
                        .values(lease_expires_at=clock.now(-1),
                                started_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)))

    report = reconciler.reconcile(settings, db, up.upload_id)

    assert report.released == [1] and report.dispatched == [1, 2]
    assert wait_status(db, up.upload_id, FINISHED) == UploadStatus.COMPLETE
    assert sha256_of_object(s3, bucket, "dead.bin") == sha256


def test_a_part_with_a_live_claim_is_not_dispatched(settings, db, bucket, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    up, _ = prepare(settings, db, tmp_path / "live.bin", bucket, 6 * MiB)
    with db.transaction() as session:
        transitions.claim_part(session, up.upload_id, 1, "busy-host:1:x", 600)
        transitions.claim_part(session, up.upload_id, 2, "busy-host:1:x", 600)

    report = reconciler.reconcile(settings, db, up.upload_id, force=True)

    assert (report.released, report.dispatched) == ([], [])
    assert report.action == "2 part(s) in flight; nothing to dispatch"
    with db.transaction() as session:  # clean up: no worker will ever finish these
        transitions.fail_upload(session, up.upload_id, "test over")


def test_a_stalled_completion_is_dispatched_again(worker, settings, db, s3, bucket, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from workers import parts
    from workers.runtime import Runtime

    up, sha256 = prepare(settings, db, tmp_path / "stuck.bin", bucket, 6 * MiB)
    rt = Runtime(settings=settings, db=db)
    for number in (1, 2):
        parts.send_part(rt, up.upload_id, number)
    with db.transaction() as session:  # the completing worker died before CompleteMultipartUpload
        transitions.begin_completing(session, up.upload_id, "test")

    report = reconciler.reconcile(settings, db, up.upload_id)

    assert report.action == "completion dispatched again"
    assert wait_status(db, up.upload_id, FINISHED) == UploadStatus.COMPLETE
    assert sha256_of_object(s3, bucket, "stuck.bin") == sha256


def test_the_sweeper_aborts_failed_uploads_past_their_ttl_and_unknown_ones(settings, db, s3, bucket,  # type: ignore[no-untyped-def]
                                                                            tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(UserError, match="at least 1:00:00"):
        sweeper.sweep(settings, db, dt.timedelta(minutes=5), unknown_in=f"s3://{bucket}/tmp/")
    monkeypatch.setattr(sweeper, "MIN_UNKNOWN_AGE", dt.timedelta(0))  # moto's uploads are all brand new
    failed, _ = prepare(settings, db, tmp_path / "failed.bin", bucket, 6 * MiB)
    live, _ = prepare(settings, db, tmp_path / "live.bin", bucket, 6 * MiB)
    with db.transaction() as session:
        transitions.fail_upload(session, failed.upload_id, "test")
    stranger = s3.create_multipart_upload(Bucket=bucket, Key="tmp/stranger.bin")["UploadId"]
    outside = s3.create_multipart_upload(Bucket=bucket, Key="other/kept.bin")["UploadId"]

    def mine(swept: list[sweeper.Swept]) -> list[sweeper.Swept]:  # other tests' failed uploads are swept too
        return [s for s in swept if s.bucket == bucket]

    assert mine(sweeper.sweep(settings, db, dt.timedelta(hours=1))) == []  # the failed one is still young
    preview = mine(sweeper.sweep(settings, db, dt.timedelta(0), dry_run=True, unknown_in=f"s3://{bucket}/tmp/"))
    assert sorted((s.key, s.aborted) for s in preview) == [("failed.bin", False), ("tmp/stranger.bin", False)]

    swept = mine(sweeper.sweep(settings, db, dt.timedelta(0), unknown_in=f"s3://{bucket}/tmp/"))

    assert sorted((s.s3_upload_id, s.aborted) for s in swept) == sorted(
        [(failed.s3_upload_id, True), (stranger, True)])
    left = {u["UploadId"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}
    assert left == {live.s3_upload_id, outside}
    with db.transaction() as session:
        assert queries.get_upload(session, failed.upload_id).s3_aborted_at is not None
    assert mine(sweeper.sweep(settings, db, dt.timedelta(0))) == []  # nothing twice
    with db.transaction() as session:
        transitions.fail_upload(session, live.upload_id, "test over")


def test_a_healthy_upload_waiting_in_the_queue_is_not_stalled(settings, db, bucket, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Parts queued behind other uploads' parts look quiet; only a lost dispatch or an idle fleet is a stall."""
    from workers import app, backend

    up, _ = prepare(settings, db, tmp_path / "waiting.bin", bucket, 6 * MiB)
    backend.mark_dispatched(app.app, str(up.upload_id), 60)  # its messages are in Redis
    other, _ = prepare(settings, db, tmp_path / "busy.bin", bucket, 6 * MiB)
    with db.transaction() as session:  # the fleet is busy with another upload's part
        transitions.claim_part(session, other.upload_id, 1, "busy-host:1:1", 600)
    try:
        assert up.upload_id not in reconciler.stalled(db, 0)
        report = reconciler.reconcile(settings, db, up.upload_id)
        assert report.action == "not stalled: its parts are on their way" and report.dispatched == []

        app.app.backend.client.delete(backend.SENTINEL.format(up.upload_id))  # Redis lost the dispatch
        assert up.upload_id in reconciler.stalled(db, 0)
    finally:
        with db.transaction() as session:
            for upload_id in (up.upload_id, other.upload_id):
                transitions.fail_upload(session, upload_id, "test over")


def test_two_reconcilers_dispatch_a_lost_upload_once(settings, db, bucket, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    up, _ = prepare(settings, db, tmp_path / "twice.bin", bucket, 6 * MiB)
    with db.transaction() as session:  # keep the worker from finishing it between the two calls
        transitions.claim_part(session, up.upload_id, 1, "busy-host:1:1", 600)
    first = reconciler.reconcile(settings, db, up.upload_id)
    second = reconciler.reconcile(settings, db, up.upload_id)
    assert first.dispatched == [2]
    assert second.dispatched == [] and second.action in (
        "not stalled: its parts are on their way", "another reconciler just dispatched it")
    with db.transaction() as session:
        transitions.fail_upload(session, up.upload_id, "test over")


def test_parts_handed_on_do_not_hide_that_redis_lost_the_dispatch(  # type: ignore[no-untyped-def]
        settings, db, bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis lost an upload's dispatch; then a recovery pass hands on a dead worker's part of it
    (a chord of that part alone): the upload's other parts are still known lost."""
    from orchestrator import scheduler
    from workers import app, backend, broker

    sent: list[tuple[str, list[int], bool]] = []
    monkeypatch.setattr(broker, "dispatch_chord", lambda *args: sent.append(args))
    up, _ = prepare(settings, db, tmp_path / "handed.bin", bucket, 11 * MiB)
    try:
        scheduler.dispatch(up.upload_id, [1, 2, 3])
        assert reconciler.lost(db, settings.queue, grace_seconds=0) == []
        app.app.backend.client.delete(backend.SENTINEL.format(up.upload_id))  # Redis lost it
        scheduler.dispatch(up.upload_id, [2], recovered=True)
        assert sent == [(str(up.upload_id), [1, 2, 3], False), (str(up.upload_id), [2], True)]
        assert reconciler.lost(db, settings.queue, grace_seconds=0) == [up.upload_id]
    finally:
        with db.transaction() as session:
            transitions.fail_upload(session, up.upload_id, "test over")
