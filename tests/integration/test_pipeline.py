"""The chord through a real worker: failures, and what the task messages carry."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from celery import signals

from models.settings import Settings
from models.states import UploadStatus
from orchestrator import cli, scheduler, submit
from tests import services
from tests.conftest import write_random
from tests.integration.helpers import FINISHED, MiB, wait_status
from tests.integration.helpers import submit as submit_cli

pytestmark = pytest.mark.integration


def test_a_permanent_part_error_fails_the_upload_and_messages_carry_ids_only(  # type: ignore[no-untyped-def]
        worker, service_env, s3, bucket, db, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings.from_env()
    path = tmp_path / "doomed.bin"
    write_random(path, 11 * MiB)
    request = submit.validate(settings, str(path), f"s3://{bucket}/doomed.bin", 5 * MiB)
    prepared = submit.prepare(settings, db, request)
    s3.abort_multipart_upload(Bucket=bucket, Key="doomed.bin", UploadId=prepared.s3_upload_id)
    s3.delete_bucket(Bucket=bucket)

    published: list[tuple[dict, object]] = []

    def capture(body: object, headers: dict, **_: object) -> None:
        published.append((headers, body))

    signals.before_task_publish.connect(capture, weak=False)
    try:
        scheduler.dispatch(prepared.upload_id, [1, 2, 3])
    finally:
        signals.before_task_publish.disconnect(capture)

    assert wait_status(db, prepared.upload_id, FINISHED) == UploadStatus.FAILED
    assert cli.wait(db, prepared.upload_id) == cli.EXIT_FAILED
    assert "NoSuchBucket" in capsys.readouterr().err

    assert [headers["task"] for headers, _ in published] == ["s3ferry.upload_part"] * 3
    upload_id = str(prepared.upload_id)
    assert [list(body[0]) for _, body in published] == [[upload_id, 1], [upload_id, 2], [upload_id, 3]]
    callback = published[0][1][2]["chord"]
    assert (callback["task"], list(callback["args"])) == ("s3ferry.complete_upload", [upload_id])
    everything = json.dumps([headers for headers, _ in published], default=str) + json.dumps(
        [body for _, body in published], default=str)
    for secret in ("testing", service_env["AWS_ENDPOINT_URL"], str(path), "X-Amz-Signature"):
        assert secret not in everything


def test_transient_errors_are_retried_by_the_worker_and_counted(  # type: ignore[no-untyped-def]
        workdir, service_env, s3, s3_endpoint, bucket, db, tmp_path: Path) -> None:
    """Connections reset on the way to S3: parts retry with backoff (Celery retry), the upload completes.

    A reset during the send is a counted retry; one while connecting looks like an
    unreachable endpoint, which waits without using up retries."""
    from urllib.parse import urlparse

    from models import queries
    from tests.conftest import sha256_of_object
    from tests.faults import FlakyProxy

    upstream = urlparse(s3_endpoint)
    proxy = FlakyProxy(upstream.hostname, upstream.port)
    # the worker and the upload command both use the proxy's endpoint, on a queue of their own
    env = {**service_env, "AWS_ENDPOINT_URL": proxy.url, "S3FERRY_QUEUE": f"flaky-{uuid.uuid4().hex[:8]}"}
    own = None
    try:
        path = tmp_path / "flaky.bin"
        sha256 = write_random(path, 16 * MiB)
        upload_id = submit_cli(env, path, bucket)  # its parts wait in the queue for the worker
        proxy.reset_next(3)
        own = services.start_worker(workdir, env, f"flaky-{uuid.uuid4().hex[:4]}", concurrency=2)

        assert wait_status(db, upload_id, FINISHED) == UploadStatus.COMPLETE
    finally:
        if own is not None:
            own.stop()
        proxy.close()
        services.purge_queue(env["S3FERRY_BROKER_URL"], env["S3FERRY_QUEUE"])
    assert proxy.resets_done == 3
    assert sha256_of_object(s3, bucket, "flaky.bin") == sha256
    with db.transaction() as session:
        upload = queries.get_upload(session, upload_id)
        rows = queries.parts(session, upload_id)
        events = queries.events(session, upload_id)
    counted = [e for e in events if (e.reason or "").startswith("retry:")]
    waited = [e for e in events if (e.reason or "").startswith("released:")]  # reset while connecting: an outage
    assert len(counted) + len(waited) == 3  # every reset led to one retry
    assert upload.retry_count == len(counted)
    assert sum(p.attempts for p in rows) == len(rows) + len(counted)
    assert upload.last_error
    assert all(p.status == "done" and p.last_error is None for p in rows)
