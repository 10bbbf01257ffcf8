"""The chord through a real worker: failures, and what the task messages carry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from celery import signals

from models.settings import Settings
from models.states import UploadStatus
from orchestrator import cli, submit
from tests.conftest import write_random
from tests.integration.helpers import FINISHED, MiB, wait_status

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
        submit.dispatch(prepared.upload_id, [1, 2, 3])
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
