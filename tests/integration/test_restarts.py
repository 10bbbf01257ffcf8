"""Restarts a user or an orchestrator makes: the CLI killed and run again, a worker stopped with SIGTERM."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest
import sqlalchemy as sa

from models import queries
from models.db import Database
from models.states import PartStatus, UploadStatus
from models.tables import Upload
from tests import services
from tests.conftest import sha256_of_object, write_random
from tests.faults import FlakyProxy
from tests.integration.helpers import FINISHED, S3FERRY, MiB, claims_per_part, run_cli, wait_status, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def slow_s3(s3_endpoint: str):  # type: ignore[no-untyped-def]
    upstream = urlparse(s3_endpoint)
    proxy = FlakyProxy(upstream.hostname, upstream.port)
    proxy.limit(4 * MiB)
    yield proxy
    proxy.close()


def parts_done(db: Database, upload_id: uuid.UUID) -> int:
    with db.transaction() as session:
        return queries.part_counts(session, upload_id).done


def test_the_same_upload_command_after_a_sigkill_attaches_to_the_same_upload(  # type: ignore[no-untyped-def]
        service_env, s3, bucket, db, slow_s3, tmp_path: Path) -> None:
    # the command and a worker of its own use the slow endpoint (a worker sends only to its own)
    env = {**service_env, "AWS_ENDPOINT_URL": slow_s3.url, "S3FERRY_QUEUE": f"resume-{uuid.uuid4().hex[:8]}"}
    source = tmp_path / "resume-me.bin"
    sha256 = write_random(source, 40 * MiB)
    command = [S3FERRY, "upload", str(source), f"s3://{bucket}/resume-me.bin", "--part-size", "5MiB"]
    with services.running(services.start_worker(tmp_path, env, "resumer", concurrency=2)):
        _kill_and_run_again(env, command, db, bucket, s3, sha256)


def _kill_and_run_again(env: dict[str, str], command: list[str], db: Database, bucket: str, s3,  # type: ignore[no-untyped-def]
                        sha256: str) -> None:
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert first.stdout is not None
    upload_id = uuid.UUID(first.stdout.readline().strip())
    wait_until(lambda: parts_done(db, upload_id) >= 1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = parts_done(db, upload_id)

    again = run_cli(command[1:], env)

    assert again.returncode == 0, again.stderr
    assert uuid.UUID(again.stdout.strip().splitlines()[0]) == upload_id
    assert f"resuming upload {upload_id}" in again.stderr
    assert f"{done_before} of 8 parts already done" in again.stderr or done_before < parts_done(db, upload_id)
    assert sha256_of_object(s3, bucket, "resume-me.bin") == sha256
    assert claims_per_part(db, upload_id) == {n: 1 for n in range(1, 9)}  # no part sent twice
    with db.transaction() as session:  # one upload, not a second one started from zero
        assert session.scalar(sa.select(sa.func.count()).select_from(Upload).where(Upload.bucket == bucket)) == 1


@pytest.mark.slow
def test_sigterm_lets_parts_in_flight_finish_and_wastes_nothing(  # type: ignore[no-untyped-def]
        service_env, s3, bucket, db, slow_s3, tmp_path: Path) -> None:
    queue = f"sigterm-{uuid.uuid4().hex[:8]}"
    env = {**service_env, "AWS_ENDPOINT_URL": slow_s3.url, "S3FERRY_QUEUE": queue, "S3FERRY_SOFT_SHUTDOWN_SECONDS": "8"}
    source = tmp_path / "rolling.bin"
    sha256 = write_random(source, 30 * MiB)
    first = services.start_worker(tmp_path, env, "rolling1", concurrency=2)
    try:
        run = run_cli(["upload", str(source), f"s3://{bucket}/rolling.bin", "--part-size", "5MiB", "--no-wait"],
                      env)
        assert run.returncode == 0, run.stderr
        upload_id = uuid.UUID(run.stdout.strip().splitlines()[0])
        wait_until(lambda: _in_flight(db, upload_id) == 2)

        assert first.process is not None
        os.kill(first.process.pid, signal.SIGTERM)  # what Kubernetes and docker stop send to the main process
        stopping = time.monotonic()
        first.process.wait(90)
        print(f"worker stopped {time.monotonic() - stopping:.1f}s after SIGTERM")
        assert first.process.returncode == 0
        with db.transaction() as session:
            rows = queries.parts(session, upload_id)
        assert [p for p in rows if p.status == PartStatus.IN_FLIGHT] == []  # nothing left claimed
        assert sum(p.status == PartStatus.DONE for p in rows) >= 2  # the parts in flight finished
    finally:
        first.stop()

    second = services.start_worker(tmp_path, env, "rolling2", concurrency=2)
    try:
        assert wait_status(db, upload_id, FINISHED) == UploadStatus.COMPLETE
    finally:
        second.stop()
    assert sha256_of_object(s3, bucket, "rolling.bin") == sha256
    assert claims_per_part(db, upload_id) == {n: 1 for n in range(1, 7)}  # nothing sent twice


def _in_flight(db: Database, upload_id: uuid.UUID) -> int:
    with db.transaction() as session:
        return queries.part_counts(session, upload_id).in_flight


def test_resume_by_id_dispatches_what_is_missing_and_refuses_a_failed_upload(  # type: ignore[no-untyped-def]
        worker, service_env, s3, bucket, db, tmp_path: Path) -> None:
    from models import transitions
    from models.settings import Settings
    from orchestrator import submit

    # recorded, never dispatched, on a queue no worker consumes: the workers' recovery pass would
    # find the lost dispatch of an upload of their own queue within seconds, before `resume`
    settings = dataclasses.replace(Settings.from_env(), queue=f"elsewhere-{uuid.uuid4().hex[:6]}")
    source = tmp_path / "later.bin"
    sha256 = write_random(source, 11 * MiB)
    prepared = submit.prepare(settings, db, submit.validate(settings, str(source), f"s3://{bucket}/later.bin",
                                                            5 * MiB))

    run = run_cli(["resume", str(prepared.upload_id)], service_env)

    assert run.returncode == 0, run.stderr
    assert "missing parts dispatched again; dispatched 3 part(s)" in run.stderr
    assert sha256_of_object(s3, bucket, "later.bin") == sha256
    assert run_cli(["resume", str(prepared.upload_id)], service_env).returncode == 0  # complete: nothing to do

    failed = submit.prepare(settings, db, submit.validate(settings, str(source), f"s3://{bucket}/failed.bin",
                                                          5 * MiB))
    with db.transaction() as session:
        transitions.fail_upload(session, failed.upload_id, "test")
    refused = run_cli(["resume", str(failed.upload_id)], service_env)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (f"s3ferry: error: upload {failed.upload_id} is failed: "
                                      f"`s3ferry retry {failed.upload_id}` resumes it from its done parts")


def test_parts_that_outlive_the_soft_shutdown_are_released_at_once(  # type: ignore[no-untyped-def]
        service_env, s3, bucket, db, s3_endpoint: str, tmp_path: Path) -> None:
    upstream = urlparse(s3_endpoint)
    crawl = FlakyProxy(upstream.hostname, upstream.port)
    crawl.limit(1 * MiB)  # a part takes seconds: it cannot finish within the 1 s soft shutdown
    queue = f"sigterm-{uuid.uuid4().hex[:8]}"
    env = {**service_env, "AWS_ENDPOINT_URL": crawl.url, "S3FERRY_QUEUE": queue, "S3FERRY_SOFT_SHUTDOWN_SECONDS": "1"}
    source = tmp_path / "long.bin"
    sha256 = write_random(source, 15 * MiB)
    first = services.start_worker(tmp_path, env, "impatient", concurrency=2)
    try:
        run = run_cli(["upload", str(source), f"s3://{bucket}/long.bin", "--part-size", "5MiB", "--no-wait"], env)
        assert run.returncode == 0, run.stderr
        upload_id = uuid.UUID(run.stdout.strip().splitlines()[0])
        wait_until(lambda: _in_flight(db, upload_id) == 2)
        assert first.process is not None
        os.kill(first.process.pid, signal.SIGTERM)
        first.process.wait(60)
        assert _in_flight(db, upload_id) == 0  # released at shutdown, not 120 s later by lease expiry
        # by the node as it exits, or by its own recovery pass once its pool processes retired
        assert re.search(r"released 2 part claim\(s\) at shutdown|dispatched again 2 part\(s\) of a dead or hung worker",
                         first.output()), first.output()[-3000:]
    finally:
        first.stop()
    crawl.limit(None)
    second = services.start_worker(tmp_path, env, "patient", concurrency=2)
    try:
        assert wait_status(db, upload_id, FINISHED, timeout=60) == UploadStatus.COMPLETE
    finally:
        second.stop()
        crawl.close()
    assert sha256_of_object(s3, bucket, "long.bin") == sha256
