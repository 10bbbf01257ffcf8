"""End to end: `s3ferry upload` through a real worker, Redis and Postgres into moto's S3 server.

Every case downloads what was uploaded and compares SHA-256, and checks that
Postgres holds the whole story (parts, checksums, status changes).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from models import queries
from models.states import PartStatus, UploadStatus
from tests.conftest import sha256_of_object, write_random
from tests.integration.helpers import MiB, crc32c_b64, run_cli

pytestmark = pytest.mark.integration

CASES = [
    # name, size, --part-size, expected parts
    ("empty", 0, None, 1),
    ("one-byte", 1, None, 1),
    ("just-under-min-part", 5 * MiB - 1, "5MiB", 1),
    ("exactly-one-part", 5 * MiB, "5MiB", 1),
    ("short-last-part", 3 * 5 * MiB + 12345, "5MiB", 4),
    ("about-200MiB", 200 * MiB + 17, None, 7),
]


@pytest.mark.parametrize(("name", "size", "part_size", "expected_parts"), CASES, ids=[c[0] for c in CASES])
def test_upload_round_trip(worker, service_env, s3, bucket, db, tmp_path: Path,  # type: ignore[no-untyped-def]
                           name: str, size: int, part_size: str | None, expected_parts: int) -> None:
    source = tmp_path / f"{name}.bin"
    sha256 = write_random(source, size)
    key = f"in/{name}.bin"
    args = ["upload", str(source), f"s3://{bucket}/{key}"] + (["--part-size", part_size] if part_size else [])

    run = run_cli(args, service_env)

    assert run.returncode == 0, run.stderr
    upload_id = uuid.UUID(run.stdout.strip().splitlines()[0])
    assert "complete:" in run.stderr
    assert sha256_of_object(s3, bucket, key) == sha256
    head = s3.head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == size

    with db.transaction() as session:
        upload = queries.get_upload(session, upload_id)
        parts = queries.parts(session, upload_id)
        events = queries.events(session, upload_id)
    assert upload.status == UploadStatus.COMPLETE
    assert upload.etag == head["ETag"]
    assert (upload.source_size, upload.bucket, upload.key) == (size, bucket, key)
    assert len(parts) == upload.total_parts == expected_parts
    offset = 0
    for number, part in enumerate(parts, start=1):
        assert (part.part_number, part.offset, part.status) == (number, offset, PartStatus.DONE)
        assert part.checksum == crc32c_b64(source, part.offset, part.size)
        assert part.etag and part.attempts == 1
        offset += part.size
    assert offset == size
    upload_moves = [(e.from_status, e.to_status) for e in events if e.part_number is None]
    assert upload_moves == [(None, "queued"), ("queued", "in_progress"), ("in_progress", "completing"),
                            ("completing", "complete")]
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_key_ending_in_slash_takes_the_file_name(worker, service_env, s3, bucket, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "clip.mov"
    sha256 = write_random(source, 1000)
    run = run_cli(["upload", str(source), f"s3://{bucket}/raw/"], service_env)
    assert run.returncode == 0, run.stderr
    assert sha256_of_object(s3, bucket, "raw/clip.mov") == sha256


def test_status_json_reports_the_finished_upload(worker, service_env, bucket, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import json

    source = tmp_path / "small.bin"
    write_random(source, 6 * MiB)
    run = run_cli(["upload", str(source), f"s3://{bucket}/small.bin", "--part-size", "5MiB"], service_env)
    assert run.returncode == 0, run.stderr
    upload_id = run.stdout.strip().splitlines()[0]

    status = run_cli(["status", upload_id, "--json"], service_env)

    assert status.returncode == 0, status.stderr
    fields = json.loads(status.stdout)
    assert fields["id"] == upload_id
    assert fields["status"] == "complete"
    assert (fields["size"], fields["bytes_done"]) == (6 * MiB, 6 * MiB)
    assert (fields["parts_total"], fields["parts_done"], fields["parts_failed"]) == (2, 2, 0)
    assert fields["destination"] == f"s3://{bucket}/small.bin"
