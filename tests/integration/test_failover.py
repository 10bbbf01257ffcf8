"""Fleet failover (issue 13): a worker SIGKILLed mid-part costs seconds, with or without beat,
on a Redis broker and on RabbitMQ; one clock (the database's) decides every claim.

Real Postgres, Redis (and RabbitMQ), real `s3ferry worker` processes, moto behind the fault
proxy (which caps the bandwidth so that parts are in flight long enough to kill their holder).
"""

from __future__ import annotations

import dataclasses
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from models import clock, liveness, queries, transitions
from models.db import Database
from models.states import PartStatus, UploadStatus
from models.settings import Settings
from models.tables import Part
from orchestrator import failover, scheduler
from orchestrator import submit as submitting
from tests import services
from tests.conftest import sha256_of_object, write_random
from tests.integration.helpers import FINISHED, MiB, claims_per_part, submit, wait_status, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # workers killed and recovered: 20-40 s each

@pytest.fixture(params=["redis", "amqp"])
def broker_env(request: pytest.FixtureRequest, proxy_and_env, redis_urls: tuple[str, str]) -> Iterator[dict]:  # type: ignore[no-untyped-def]
    """The proxy's environment on a Redis broker, or on RabbitMQ (result backend and window on Redis)."""
    proxy, env = proxy_and_env
    if request.param == "redis":
        yield {**env, "proxy": proxy}
        return
    amqp = request.getfixturevalue("rabbitmq_url")
    yield {**env, "proxy": proxy, "S3FERRY_BROKER_URL": amqp, "S3FERRY_RESULT_BACKEND": redis_urls[1]}
    queue = env["S3FERRY_QUEUE"]
    services.delete_amqp_queues(amqp, queue, f"{queue}.control", f"{queue}.recovered")


@pytest.mark.parametrize("beat", [False, True], ids=["no-beat", "beat"])
def test_a_worker_killed_mid_part_costs_seconds(  # type: ignore[no-untyped-def]
        broker_env: dict, beat: bool, tmp_path: Path, workdir: Path, db: Database, s3, bucket: str) -> None:
    env = dict(broker_env)
    proxy = env.pop("proxy")
    proxy.configure(bytes_per_second=6 * MiB)  # parts of 5 MiB stay in flight for seconds
    source = tmp_path / "failover.bin"
    sha256 = write_random(source, 16 * 5 * MiB)
    token = uuid.uuid4().hex[:8]  # the doomed worker's node token: its claims are `host:token:pid`
    tag = uuid.uuid4().hex[:4]
    started: list[services.Server] = []  # stopped in `finally` as far as they got
    try:
        doomed = services.start_worker(workdir, {**env, "S3FERRY_NODE_TOKEN": token}, f"doomed-{tag}", concurrency=2)
        started.append(doomed)
        for i in range(2):
            started.append(services.start_worker(workdir, env, f"other{i}-{tag}", concurrency=2))
        if beat:
            started.append(services.Server(f"beat-{tag}", [str(services.BIN / "s3ferry"), "beat"], workdir,
                                           env=env).start())
        prefix = f"{socket.gethostname()}:{token}:"
        upload_id = submit(env, source, bucket)
        held = _wait_for_claims(db, upload_id, prefix)
        with db.transaction() as session:
            done_before = {p.part_number for p in queries.parts(session, upload_id) if p.status == PartStatus.DONE}
        doomed.kill()  # the worker and its pool, SIGKILL: no release, no last heartbeat
        killed = time.monotonic()
        wait_until(lambda: _all_done(db, upload_id, held), timeout=60)
        landed_again = time.monotonic() - killed
        assert wait_status(db, upload_id, FINISHED, timeout=120) == UploadStatus.COMPLETE
    finally:
        for server in started:
            server.stop()
    assert sha256_of_object(s3, bucket, source.name) == sha256
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    with db.transaction() as session:
        reasons = [e.reason for e in queries.events(session, upload_id) if e.part_number in held
                   and e.to_status == PartStatus.PENDING]
    # released because the holder was seen dead, not because its 120 s lease ran out
    assert any(r and "is dead" in r for r in reasons), reasons
    claims = claims_per_part(db, upload_id)
    assert all(claims[n] == 1 for n in done_before), (done_before, claims)  # nothing landed was sent again
    # the dead worker's parts: its claim, then one more; a second delivery (RabbitMQ's redelivery
    # beside the recovery pass's dispatch) found the part claimed or done, and sent nothing
    assert max(claims.values()) <= 2, claims
    print(f"parts {sorted(held)} of the killed worker landed again {landed_again:.1f}s after the kill")


def _wait_for_claims(db: Database, upload_id: uuid.UUID, prefix: str) -> set[int]:
    """The parts the worker with this prefix holds, once it holds at least one."""
    found: set[int] = set()

    def holding() -> bool:
        with db.transaction() as session:
            found.update(session.scalars(sa.select(Part.part_number).where(
                Part.upload_id == upload_id, Part.status == PartStatus.IN_FLIGHT, Part.worker.startswith(prefix))))
        return bool(found)

    wait_until(holding, timeout=60)
    return found


def _all_done(db: Database, upload_id: uuid.UUID, numbers: set[int]) -> bool:
    with db.transaction() as session:
        return all(p.status == PartStatus.DONE for p in queries.parts(session, upload_id) if p.part_number in numbers)


def test_a_callback_that_ran_early_after_a_broker_flush_and_a_kill_completes_without_beat(  # type: ignore[no-untyped-def]
        proxy_and_env, redis_urls: tuple[str, str], tmp_path: Path, workdir: Path, db: Database, s3,
        bucket: str) -> None:
    """The broker loses every message while a worker is killed mid-part: no beat runs, and the
    surviving workers alone get the upload complete."""
    import redis

    proxy, env = proxy_and_env
    proxy.configure(bytes_per_second=6 * MiB)
    source = tmp_path / "flush.bin"
    sha256 = write_random(source, 12 * 5 * MiB)
    token, tag = uuid.uuid4().hex[:8], uuid.uuid4().hex[:4]
    doomed = services.start_worker(workdir, {**env, "S3FERRY_NODE_TOKEN": token}, f"flushed-{tag}", concurrency=2)
    other = services.start_worker(workdir, env, f"survivor-{tag}", concurrency=2)
    try:
        upload_id = submit(env, source, bucket)
        _wait_for_claims(db, upload_id, f"{socket.gethostname()}:{token}:")
        doomed.kill()
        # Redis loses what it held of this upload: the queued and unacknowledged messages, and the
        # dispatch's sentinel beside the chord's counters (a FLUSHALL, limited to this test's keys)
        broker, backend = redis.Redis.from_url(redis_urls[0]), redis.Redis.from_url(redis_urls[1])
        try:
            queue = env["S3FERRY_QUEUE"]
            broker.delete(queue, f"{queue}.control", f"{queue}.recovered", "unacked", "unacked_index")
            backend.delete(f"s3ferry:dispatched:{upload_id}")
        finally:
            broker.close()
            backend.close()
        assert wait_status(db, upload_id, FINISHED, timeout=120) == UploadStatus.COMPLETE
    finally:
        doomed.stop()
        other.stop()
    assert sha256_of_object(s3, bucket, source.name) == sha256
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_a_worker_killed_while_completing_hands_the_completion_on(  # type: ignore[no-untyped-def]
        proxy_and_env, tmp_path: Path, workdir: Path, db: Database, s3, bucket: str) -> None:
    """CompleteMultipartUpload takes seconds (the proxy delays POSTs); the worker running it is
    SIGKILLed: the survivor's recovery pass sees the completer dead and completes the upload,
    with no beat and long before Redis would return the message."""
    proxy, env = proxy_and_env
    proxy.configure(latency=4, latency_methods=("POST",))
    source = tmp_path / "completing.bin"
    sha256 = write_random(source, 3 * 5 * MiB)
    tag = uuid.uuid4().hex[:4]
    tokens = [uuid.uuid4().hex[:8] for _ in range(2)]
    workers = {token: services.start_worker(workdir, {**env, "S3FERRY_NODE_TOKEN": token}, f"{n}-{tag}", 2)
               for n, token in zip(("first", "second"), tokens, strict=True)}
    try:
        upload_id = submit(env, source, bucket)
        completer: list[str] = []

        def completing() -> bool:
            with db.transaction() as session:
                upload = queries.get_upload(session, upload_id)
            if upload.status == UploadStatus.COMPLETING and upload.completer:
                completer.append(upload.completer)
            return bool(completer)

        wait_until(completing, timeout=120)
        doomed = next(token for token in tokens if completer[0].startswith(f"{socket.gethostname()}:{token}:"))
        workers[doomed].kill()  # mid-CompleteMultipartUpload
        assert wait_status(db, upload_id, FINISHED, timeout=90) == UploadStatus.COMPLETE
        survivor = next(w for token, w in workers.items() if token != doomed)
        assert "completion dispatched again" in survivor.output()
    finally:
        for worker in workers.values():
            worker.stop()
    assert sha256_of_object(s3, bucket, source.name) == sha256


def _started(db: Database, tmp_path: Path, bucket: str, parts: int) -> tuple[Settings, uuid.UUID]:
    """An upload in progress on a queue of its own (no worker of the session takes it), never sent."""
    settings = dataclasses.replace(Settings.from_env(), queue=f"failover-{uuid.uuid4().hex[:6]}")
    source = tmp_path / "unsent.bin"
    write_random(source, parts * 5 * MiB)
    request = submitting.validate(settings, str(source), f"s3://{bucket}/unsent.bin", 5 * MiB)
    upload_id = submitting.record(settings, db, request).upload_id
    with db.transaction() as session:
        transitions.start_upload(session, upload_id, None, "test")
    return settings, upload_id


def test_a_skewed_worker_clock_cannot_take_a_live_claim(db: Database, service_env: dict, tmp_path: Path,
                                                        bucket: str) -> None:
    """Claims are judged by the database's clock: a worker whose clock runs 3 minutes ahead (or
    behind) neither takes a claim that is live nor keeps its own past its lease."""
    import time_machine

    _, upload_id = _started(db, tmp_path, bucket, parts=2)
    with db.transaction() as session:
        claim = transitions.claim_part(session, upload_id, 1, "honest:1:1", 30)
        assert claim.outcome is transitions.ClaimOutcome.CLAIMED
        liveness.beat(session, "honest:1:1", 30)
    for offset in (180, -180):
        with time_machine.travel(time.time() + offset, tick=True):
            with db.transaction() as session:
                stolen = transitions.claim_part(session, upload_id, 1, f"skewed:{offset}:1", 30)
                assert stolen.outcome is transitions.ClaimOutcome.HELD  # live by the database's clock
                mine = transitions.claim_part(session, upload_id, 2, f"skewed:{offset}:1", 5)
                assert mine.outcome is transitions.ClaimOutcome.CLAIMED
                lease_left = (mine.part.lease_expires_at - clock.read(session)).total_seconds()
                assert 4 < lease_left <= 5, lease_left  # its own lease: 5 s of the database's clock
                transitions.release_for_retry(session, upload_id, 2, f"skewed:{offset}:1", "test", counted=False)
    with db.transaction() as session:
        assert queries.parts(session, upload_id)[0].worker == "honest:1:1"
        transitions.fail_upload(session, upload_id, "test over")


def test_a_dead_holder_is_released_at_once_and_a_live_one_never(  # type: ignore[no-untyped-def]
        db: Database, service_env: dict, tmp_path: Path, bucket: str, monkeypatch) -> None:
    """The recovery pass releases the claims of a process whose liveness record expired, keeps
    those of live (or unknown) holders, and judges no one while its own heartbeat is young."""
    settings, upload_id = _started(db, tmp_path, bucket, parts=3)
    with db.transaction() as session:
        for number, holder in ((1, "dead:1:1"), (2, "alive:1:1"), (3, "unknown:1:1")):
            transitions.claim_part(session, upload_id, number, holder, 120)
        liveness.beat(session, "dead:1:1", -1)  # its record expired a second ago
        liveness.beat(session, "alive:1:1", 60)
    # what the pass dispatches, kept here: no worker of this test's queue would run it
    dispatched: list[tuple[uuid.UUID, list[int]]] = []
    monkeypatch.setattr(scheduler, "dispatch", lambda u, parts, recovered: dispatched.append((u, list(parts))))
    assert not failover.run(settings, db, "judge:1:1", judge=False, reconcile=False)  # a young judge judges no one
    done = failover.run(settings, db, "judge:1:1", judge=True, reconcile=False)
    assert done.redispatched == {upload_id: [1]} and dispatched == [(upload_id, [1])]
    with db.transaction() as session:
        parts = {p.part_number: p for p in queries.parts(session, upload_id)}
        assert parts[1].status == PartStatus.PENDING
        assert parts[2].worker == "alive:1:1" and parts[3].worker == "unknown:1:1"
        transitions.fail_upload(session, upload_id, "test over")


def test_the_pass_frees_a_dead_processs_window_slots_and_not_a_live_ones(  # type: ignore[no-untyped-def]
        db: Database, service_env: dict, tmp_path: Path, bucket: str, monkeypatch) -> None:
    """A dead holder's slots go back to the window at once; a live process whose lease ran out on
    one part (a hung send) keeps the slots of its other parts: the window never holds more than
    its size."""
    from workers import window

    settings, upload_id = _started(db, tmp_path, bucket, parts=2)
    with db.transaction() as session:
        transitions.claim_part(session, upload_id, 1, "dead:1:1", 120)
        transitions.claim_part(session, upload_id, 2, "alive:1:1", 120)
        session.execute(sa.update(Part).where(Part.upload_id == upload_id, Part.part_number == 2)
                        .values(lease_expires_at=clock.now(-1)))  # its lease ran out; its process lives
        liveness.beat(session, "dead:1:1", -1)
        liveness.beat(session, "alive:1:1", 60)
        endpoint = queries.get_upload(session, upload_id).endpoint_url
    client = window.client_from_url(settings.result_backend)
    shared = window.Window(client, endpoint, bucket, window.Limits(initial=4, low=1, high=4))
    try:
        assert all(shared.try_acquire(t) for t in ("dead:1:1:slot:a", "alive:1:1:slot:b", "alive:1:1:slot:c"))
        monkeypatch.setattr(scheduler, "dispatch", lambda u, parts, recovered: None)
        done = failover.run(settings, db, "judge:1:1", judge=True, reconcile=False, redis=client)
        assert done.redispatched == {upload_id: [1, 2]}
        assert shared.state().in_flight == 2  # the live process's two slots
    finally:
        with db.transaction() as session:
            transitions.fail_upload(session, upload_id, "test over")
        client.delete(*shared.keys)
        client.close()


def test_two_workers_on_one_host_with_rabbitmq(rabbitmq_env: dict[str, str], tmp_path: Path) -> None:
    """Each `s3ferry worker` is a Celery node of its own (not both `celery@HOST`, whose pidbox queue
    RabbitMQ gives to the first alone: the second used to die at start with ResourceLocked)."""
    workers = [services.Server(f"worker-{n}", [str(services.BIN / "s3ferry"), "worker", "--concurrency=1"], tmp_path, env=rabbitmq_env)
               for n in (1, 2)]
    for worker in workers:
        worker.ready = lambda worker=worker: " ready." in worker.output()  # type: ignore[misc]
    try:
        for worker in workers:
            worker.start(timeout=120)  # polls its log; fails at once if it exits
        names = [re.search(r"(\S+@\S+) ready\.", worker.output()).group(1) for worker in workers]  # type: ignore[union-attr]
        assert names[0] != names[1] and all(name.startswith("s3ferry-") for name in names), names
        assert all(worker.process is not None and worker.process.poll() is None for worker in workers)
        assert not any("ResourceLocked" in worker.output() for worker in workers)
    finally:
        for worker in workers:
            worker.stop()
