"""The queue and its operations, through the CLI, a real worker and moto behind a slow link.

These tests get their own database (the scheduler counts every running upload
in it), their own queue and worker, and one slot (S3FERRY_MAX_ACTIVE_UPLOADS=1).
"""

from __future__ import annotations

import functools
import json
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
import sqlalchemy as sa

from models import migrate, queries
from models.db import Database
from models.settings import Settings
from models.states import UploadStatus
from models.tables import Upload
from orchestrator import submit as submit_module
from tests import services
from tests.conftest import drop_database, sha256_of_object, write_random
from tests.faults import FlakyProxy
from tests.services import Server
from tests.integration.helpers import FINISHED, MiB, claims_per_part, run_cli, wait_status, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def queue_stack(postgres_url: str, service_env: dict[str, str], s3_endpoint: str,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], FlakyProxy, Server]]:
    url = sa.make_url(postgres_url).set(database=f"s3ferry_queue_{uuid.uuid4().hex[:8]}")
    rendered = url.render_as_string(hide_password=False)
    migrate.upgrade(rendered)
    upstream = urlparse(s3_endpoint)
    proxy = FlakyProxy(upstream.hostname, upstream.port)
    proxy.limit(6 * MiB)  # an upload of a few MiB takes about a second: long enough to steer
    env = {**service_env, "S3FERRY_DATABASE_URL": rendered, "S3FERRY_QUEUE": f"queue-{uuid.uuid4().hex[:8]}",
           "S3FERRY_MAX_ACTIVE_UPLOADS": "1", "AWS_ENDPOINT_URL": proxy.url}
    worker = services.start_worker(tmp_path_factory.mktemp("queue"), env, "queue", concurrency=2)
    try:
        yield env, proxy, worker
    finally:
        worker.stop()
        proxy.close()
        drop_database(url)


@pytest.fixture(scope="module")
def queue_env(queue_stack: tuple[dict[str, str], FlakyProxy, Server]) -> dict[str, str]:
    return queue_stack[0]


@pytest.fixture
def frozen(queue_stack: tuple[dict[str, str], FlakyProxy, Server]) -> Iterator[Callable[[], None]]:
    """The worker, stopped (SIGSTOP) until the test calls the function it gets: what was
    submitted meanwhile stays as the commands left it (started or queued), however slow the
    machine. Continued at the end whatever happens."""
    worker = queue_stack[2]
    worker.signal(signal.SIGSTOP)
    thaw = functools.partial(worker.signal, signal.SIGCONT)
    try:
        yield thaw
    finally:
        thaw()


@pytest.fixture
def link(queue_stack: tuple[dict[str, str], FlakyProxy, Server]) -> Iterator[FlakyProxy]:
    """The workers' link to S3. link.hold(): what is sent waits (an upload stays active, however
    slow the machine) until link.release(); released at the end whatever happens."""
    proxy = queue_stack[1]
    try:
        yield proxy
    finally:
        proxy.release()


@pytest.fixture
def qdb(queue_env: dict[str, str]) -> Iterator[Database]:
    database = Database(queue_env["S3FERRY_DATABASE_URL"])
    yield database
    database.dispose()


def submit(env: dict[str, str], path: Path, bucket: str, *extra: str) -> uuid.UUID:
    run = run_cli(["upload", str(path), f"s3://{bucket}/{path.name}", "--part-size", "5MiB", "--no-wait", *extra],
                  env)
    assert run.returncode == 0, run.stderr
    return uuid.UUID(run.stdout.split()[0])


def rows(db: Database, ids: list[uuid.UUID]) -> list[Upload]:
    with db.transaction() as session:
        return [queries.get_upload(session, i) for i in ids]


def status(db: Database, upload_id: uuid.UUID) -> str:
    return str(rows(db, [upload_id])[0].status)


def test_queued_uploads_run_one_at_a_time_by_priority_then_age(queue_env, qdb, s3, bucket, frozen,  # type: ignore[no-untyped-def]
                                                                 tmp_path: Path) -> None:
    files = {name: tmp_path / f"{name}.bin" for name in ("first", "low", "high", "mid", "mid-later")}
    for path in files.values():
        write_random(path, 6 * MiB)
    ids = {"first": submit(queue_env, files["first"], bucket)}  # active, its parts waiting for the worker
    for name, priority in (("low", "1"), ("high", "5"), ("mid", "3"), ("mid-later", "3")):
        ids[name] = submit(queue_env, files[name], bucket, "--priority", priority)
    assert [status(qdb, ids[n]) for n in ("low", "high", "mid", "mid-later")] == ["queued"] * 4
    frozen()

    for upload_id in ids.values():
        assert wait_status(qdb, upload_id, FINISHED) == UploadStatus.COMPLETE
    uploads = sorted(rows(qdb, list(ids.values())), key=lambda u: u.started_at)
    names = {v: k for k, v in ids.items()}
    assert [names[u.id] for u in uploads] == ["first", "high", "mid", "mid-later", "low"]
    for before, after in zip(uploads, uploads[1:], strict=False):
        assert after.started_at >= before.finished_at  # one at a time


def test_with_three_slots_three_uploads_run_together(queue_env, qdb, s3, bucket, frozen,  # type: ignore[no-untyped-def]
                                                     tmp_path: Path) -> None:
    env = {**queue_env, "S3FERRY_MAX_ACTIVE_UPLOADS": "3"}
    paths = [tmp_path / f"together{index}.bin" for index in range(3)]
    for path in paths:
        write_random(path, 11 * MiB)
    ids = [submit(env, path, bucket) for path in paths]  # none finishes while the worker is stopped
    assert all(status(qdb, i) != "queued" for i in ids)  # none waited for a slot
    frozen()
    for upload_id in ids:
        assert wait_status(qdb, upload_id, FINISHED) == UploadStatus.COMPLETE
    uploads = rows(qdb, ids)
    assert max(u.started_at for u in uploads) < min(u.finished_at for u in uploads)  # all ran at once


def test_pause_then_resume_in_the_middle_sends_no_part_twice(queue_env, qdb, s3, bucket, link,  # type: ignore[no-untyped-def]
                                                             tmp_path: Path) -> None:
    path = tmp_path / "paused.bin"
    sha256 = write_random(path, 40 * MiB)
    upload_id = submit(queue_env, path, bucket)
    wait_until(lambda: _counts(qdb, upload_id).done >= 2)
    link.hold()  # the middle: the rest cannot land before the pause

    paused = run_cli(["pause", str(upload_id)], queue_env)

    assert paused.returncode == 0, paused.stderr
    assert status(qdb, upload_id) == "paused"
    link.release()
    wait_until(lambda: _counts(qdb, upload_id).in_flight == 0, timeout=30)  # parts in flight finish
    done = _counts(qdb, upload_id).done
    time.sleep(2)
    assert _counts(qdb, upload_id).done == done < 8  # nothing new starts while paused

    again = run_cli(["upload", str(path), f"s3://{bucket}/paused.bin", "--part-size", "5MiB"], queue_env)
    assert again.returncode == 2  # the same command finds the paused upload instead of starting a second one
    assert f"`s3ferry resume {upload_id}` continues it" in again.stderr.strip().splitlines()[-1]

    resumed = run_cli(["resume", str(upload_id)], queue_env)

    assert resumed.returncode == 0, resumed.stderr
    assert status(qdb, upload_id) == "complete"
    assert sha256_of_object(s3, bucket, "paused.bin") == sha256
    assert claims_per_part(qdb, upload_id) == {n: 1 for n in range(1, 9)}
    with qdb.transaction() as session:
        moves = [(e.from_status, e.to_status) for e in queries.events(session, upload_id) if e.part_number is None]
    assert ("in_progress", "paused") in moves and ("paused", "queued") in moves


def test_cancel_in_the_middle_leaves_nothing_billed(queue_env, qdb, s3, bucket, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "cancelled.bin"
    write_random(path, 40 * MiB)
    upload_id = submit(queue_env, path, bucket)
    wait_until(lambda: _counts(qdb, upload_id).done >= 1)

    cancelled = run_cli(["cancel", str(upload_id)], queue_env)  # (it aborts in S3 through the same link)

    assert cancelled.returncode == 0, cancelled.stderr
    assert "multipart upload is aborted in S3" in cancelled.stdout
    assert status(qdb, upload_id) == "cancelled"
    wait_until(lambda: _counts(qdb, upload_id).in_flight == 0, timeout=30)
    time.sleep(1)
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
    if rows(qdb, [upload_id])[0].s3_aborted_at is None:  # parts were in flight at the abort: the sweep confirms
        swept = run_cli(["sweep"], queue_env)
        assert swept.returncode == 0 and "aborted s3://" in swept.stdout
    assert rows(qdb, [upload_id])[0].s3_aborted_at is not None


def test_a_failing_upload_moves_the_queue_on_and_can_be_retried(queue_env, qdb, s3, bucket, link,  # type: ignore[no-untyped-def]
                                                                frozen, tmp_path: Path) -> None:
    (tmp_path / "mount").mkdir()
    doomed, after = tmp_path / "mount" / "doomed.bin", tmp_path / "after.bin"
    sha256 = write_random(doomed, 40 * MiB)
    write_random(after, 6 * MiB)
    doomed_id = submit(queue_env, doomed, bucket)
    after_id = submit(queue_env, after, bucket)
    assert status(qdb, after_id) == "queued"
    frozen()
    wait_until(lambda: _counts(qdb, doomed_id).done >= 1)
    link.hold()  # the middle: the rest cannot land before its folder goes
    (tmp_path / "mount").rename(tmp_path / "unmounted")  # its folder goes away (the file itself is untouched)
    link.release()

    assert wait_status(qdb, doomed_id, FINISHED) == UploadStatus.FAILED
    assert wait_status(qdb, after_id, FINISHED) == UploadStatus.COMPLETE  # the queue moved on
    shown = json.loads(run_cli(["status", str(doomed_id), "--json"], queue_env).stdout)
    assert "no longer exists" in shown["last_error"]
    done_before = _counts(qdb, doomed_id).done

    (tmp_path / "unmounted").rename(tmp_path / "mount")  # back: the same file, fingerprint and all
    retried = run_cli(["retry", str(doomed_id)], queue_env)

    assert retried.returncode == 0, retried.stderr
    assert "from its done parts" in retried.stdout
    assert wait_status(qdb, doomed_id, FINISHED) == UploadStatus.COMPLETE
    assert sha256_of_object(s3, bucket, "doomed.bin") == sha256
    claims = claims_per_part(qdb, doomed_id)
    assert sum(1 for n, count in claims.items() if count == 1) >= done_before  # done parts not sent again
    assert rows(qdb, [doomed_id])[0].retry_count == 0


@pytest.mark.parametrize(("command", "code", "message"), [
    (["cancel", "{complete}"], 2, "cannot be cancelled: upload {complete} is complete"),
    (["pause", "{complete}"], 2, "cannot be paused: upload {complete} is complete"),
    (["retry", "{complete}"], 2, "cannot be retried: upload {complete} is complete"),
    (["retry", "{cancelled}"], 2, "cannot be retried: upload {cancelled} is cancelled"),
    (["resume", "{cancelled}"], 2, "upload {cancelled} is cancelled; it cannot be resumed"),
    (["cancel", "00000000-0000-0000-0000-000000000009"], 2, "no upload with id 00000000-0000-0000-0000-000000000009"),
    (["pause", "nope"], 2, "'nope' is not a valid upload id"),
    (["priority", "{complete}", "3"], 2, "its priority no longer matters"),
    (["ls", "--status", "bogus"], 2, "unknown status 'bogus'"),
    (["ls", "--limit", "-1"], 2, "invalid number '-1'"),
    (["priority", "{complete}", "99999999999"], 2, "invalid priority '99999999999'"),
])
def test_invalid_operations_change_nothing(queue_env, qdb, finished: dict[str, uuid.UUID],  # type: ignore[no-untyped-def]
                                           command: list[str], code: int, message: str) -> None:
    before = _events(qdb)

    run = run_cli([part.format(**finished) for part in command], queue_env)

    assert run.returncode == code
    last = run.stderr.strip().splitlines()[-1]
    assert message.format(**finished) in last
    assert last.startswith(("s3ferry: error:", "s3ferry pause: error:", "s3ferry ls: error:",
                            "s3ferry priority: error:"))
    assert _events(qdb) == before


@pytest.fixture(scope="module")
def finished(queue_env, s3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, uuid.UUID]]:  # type: ignore[no-untyped-def]
    """A complete upload and a cancelled one."""
    folder = tmp_path_factory.mktemp("finished")
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    db = Database(queue_env["S3FERRY_DATABASE_URL"])
    complete_path, cancelled_path = folder / "ok.bin", folder / "gone.bin"
    write_random(complete_path, 1000)
    write_random(cancelled_path, 40 * MiB)
    complete = submit(queue_env, complete_path, bucket)
    assert wait_status(db, complete, FINISHED) == UploadStatus.COMPLETE
    cancelled = submit(queue_env, cancelled_path, bucket)
    assert run_cli(["cancel", str(cancelled)], queue_env).returncode == 0
    wait_until(lambda: _counts(db, cancelled).in_flight == 0, timeout=30)  # its last parts are settled
    time.sleep(1)
    db.dispose()
    yield {"complete": complete, "cancelled": cancelled}
    for obj in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        s3.delete_object(Bucket=bucket, Key=obj["Key"])
    s3.delete_bucket(Bucket=bucket)


def test_retry_of_a_paused_upload_says_resume_and_changes_nothing(queue_env, qdb, bucket,  # type: ignore[no-untyped-def]
                                                                 tmp_path: Path) -> None:
    path = tmp_path / "held.bin"
    write_random(path, 1000)
    settings = Settings.from_env(queue_env)  # recorded, not started (nothing of it in flight), then paused
    paused = submit_module.record(settings, qdb, submit_module.validate(settings, str(path),
                                                                        f"s3://{bucket}/held.bin")).upload_id
    try:
        assert run_cli(["pause", str(paused)], queue_env).returncode == 0
        before = _events(qdb)

        run = run_cli(["retry", str(paused)], queue_env)

        assert run.returncode == 2
        assert run.stderr.strip() == (f"s3ferry: error: upload {paused} is paused, not failed: "
                                      f"`s3ferry resume {paused}` continues it")
        assert _events(qdb) == before
    finally:  # nothing of it left for the tests that watch every active upload
        assert run_cli(["cancel", str(paused)], queue_env).returncode == 0


def _events(db: Database) -> int:
    with db.transaction() as session:
        return session.scalar(sa.select(sa.func.count()).select_from(sa.table("upload_events"))) or 0


def _counts(db: Database, upload_id: uuid.UUID) -> queries.PartCounts:
    with db.transaction() as session:
        return queries.part_counts(session, upload_id)


def test_watch_ls_and_status_show_progress_from_the_database(queue_env, qdb, s3, bucket, link,  # type: ignore[no-untyped-def]
                                                             tmp_path: Path) -> None:
    path = tmp_path / "watched.bin"
    write_random(path, 30 * MiB)
    upload_id = submit(queue_env, path, bucket)
    wait_until(lambda: _counts(qdb, upload_id).done >= 2)
    link.hold()  # in progress while it is looked at, however slow the machine
    live = json.loads(run_cli(["status", str(upload_id), "--json"], queue_env).stdout)
    assert live["status"] == "in_progress" and live["rate"] > 0 and live["eta_seconds"] is not None
    assert live["bytes_done"] >= 10 * MiB
    link.release()

    watched = run_cli(["watch", str(upload_id)], queue_env, timeout=120)  # returns when it finishes

    assert watched.returncode == 0, watched.stderr
    assert watched.stdout == ""  # progress goes to stderr
    last = watched.stderr.strip().splitlines()[-1]
    assert last.startswith(str(upload_id)[:8]) and "complete" in last and "100%" in last and "parts 6/6" in last
    listed = run_cli(["ls", "--status", "complete"], queue_env)
    assert str(upload_id) in listed.stdout and f"s3://{bucket}/watched.bin" in listed.stdout
    assert run_cli(["watch"], queue_env).stderr.strip() == "no active or queued upload"
