"""Bad input: a clear one-line error, a non-zero exit, and nothing written to the database or S3."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from models.db import Database
from models.exceptions import UserError
from models.settings import Settings
from models.tables import Upload
from orchestrator import submit
from tests import services
from tests.integration.helpers import run_cli

pytestmark = pytest.mark.integration


@pytest.fixture
def small_file(tmp_path: Path) -> Path:
    path = tmp_path / "small.bin"
    path.write_bytes(os.urandom(1000))
    return path


@pytest.fixture
def unchanged(db: Database, s3, bucket: str) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Assert the test recorded no upload, and left no object or multipart upload in S3."""
    since = dt.datetime.now(dt.UTC)
    yield
    with db.transaction() as session:  # no upload was recorded (events belong to uploads)
        assert session.scalar(sa.select(sa.func.count()).select_from(Upload).where(Upload.created_at >= since)) == 0
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
    assert not s3.list_objects_v2(Bucket=bucket).get("Contents")


def assert_one_line_error(run, exit_code: int, *fragments: str) -> None:  # type: ignore[no-untyped-def]
    assert run.returncode == exit_code, (run.returncode, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("s3ferry: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert run.stdout == ""


@pytest.mark.parametrize(("source", "destination", "extra", "message"), [
    ("missing.bin", "s3://{bucket}/k", [], "does not exist"),
    (".", "s3://{bucket}/k", [], "is a directory, not a file"),
    ("small.bin", "{bucket}/k", [], "is not of the form s3://bucket/key"),
    ("small.bin", "https://{bucket}/k", [], "is not of the form s3://bucket/key"),
    ("small.bin", "s3:///k", [], "has no bucket"),
    ("small.bin", "s3://Bad_Bucket/k", [], "invalid bucket name 'Bad_Bucket'"),
    ("small.bin", "s3://ab/k", [], "3 to 63 characters"),
    ("small.bin", "s3://192.168.1.1/k", [], "must not look like an IP address"),
    ("small.bin", "s3://{bucket}/" + "k" * 1025, [], "key is 1025 bytes long"),
    ("small.bin", "s3://{bucket}/" + "é" * 513, [], "key is 1026 bytes long"),
    ("small.bin", "s3://{bucket}/k", ["--part-size", "4MiB"], "under S3's minimum of 5 MiB"),
    ("small.bin", "s3://{bucket}/k", ["--part-size", "6GiB"], "over S3's maximum of 5 GiB"),
    ("small.bin", "s3://no-such-bucket-here/k", [], "bucket 'no-such-bucket-here' does not exist"),
], ids=["missing", "directory", "no-scheme", "wrong-scheme", "no-bucket", "bad-bucket", "short-bucket",
        "ip-bucket", "long-key", "long-utf8-key", "part-too-small", "part-too-big", "no-such-bucket"])
def test_bad_upload_input(service_env, bucket: str, small_file: Path, unchanged: None,  # type: ignore[no-untyped-def]
                          source: str, destination: str, extra: list[str], message: str) -> None:
    source_path = small_file.parent / source
    run = run_cli(["upload", str(source_path), destination.format(bucket=bucket), *extra], service_env)
    assert_one_line_error(run, 2, message)


def test_a_file_over_5_tib(service_env, bucket: str, tmp_path: Path, unchanged: None) -> None:  # type: ignore[no-untyped-def]
    huge = tmp_path / "huge.bin"
    with open(huge, "wb") as sparse:
        sparse.truncate(5 * 1024**4 + 1)
    run = run_cli(["upload", str(huge), f"s3://{bucket}/huge.bin"], service_env)
    assert_one_line_error(run, 2, "over S3's maximum object size of 5 TiB")


def test_an_unreadable_file(service_env, bucket: str, unchanged: None) -> None:  # type: ignore[no-untyped-def]
    folder = Path(tempfile.mkdtemp(prefix="s3ferry-unreadable-"))
    try:
        folder.chmod(0o755)
        secret = folder / "secret.bin"
        secret.write_bytes(b"x" * 100)
        secret.chmod(0o000)
        if os.geteuid() == 0:
            message = _as_nobody(lambda: submit.validate(Settings(), str(secret), f"s3://{bucket}/secret.bin"))
            assert message == f"source {str(secret)!r} cannot be read: Permission denied"
        else:
            run = run_cli(["upload", str(secret), f"s3://{bucket}/secret.bin"], service_env)
            assert_one_line_error(run, 2, "cannot be read: Permission denied")
    finally:
        shutil.rmtree(folder)


def _as_nobody(call) -> str:  # type: ignore[no-untyped-def]
    """Root reads any file: run `call` in a forked child that dropped to `nobody`; return its UserError."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgid(65534)
            os.setuid(65534)
            call()
            os.write(write_end, b"no error")
        except UserError as error:
            os.write(write_end, str(error).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        return pipe.read().decode()


def test_an_unreachable_database_is_named_without_its_password(service_env, bucket: str, small_file: Path,  # type: ignore[no-untyped-def]
                                                               unchanged: None) -> None:
    port = services.free_port()
    env = {**service_env,
           "S3FERRY_DATABASE_URL": f"postgresql+psycopg://ferry:Sup3rS3cret@127.0.0.1:{port}/s3ferry"}
    run = run_cli(["upload", str(small_file), f"s3://{bucket}/k"], env)
    assert_one_line_error(run, 1, f"cannot reach the database (postgresql at 127.0.0.1:{port}/s3ferry)")
    assert "Sup3rS3cret" not in run.stderr


def test_an_unreachable_broker(service_env, bucket: str, small_file: Path, unchanged: None) -> None:  # type: ignore[no-untyped-def]
    port = services.free_port()
    env = {**service_env, "S3FERRY_BROKER_URL": f"redis://:Sup3rS3cret@127.0.0.1:{port}/0"}
    run = run_cli(["upload", str(small_file), f"s3://{bucket}/k"], env)
    assert_one_line_error(run, 1, f"cannot reach the broker at redis://:**@127.0.0.1:{port}/0")
    assert "Sup3rS3cret" not in run.stderr


def test_an_invalid_part_size_text(service_env, small_file: Path, bucket: str) -> None:  # type: ignore[no-untyped-def]
    run = run_cli(["upload", str(small_file), f"s3://{bucket}/k", "--part-size", "lots"], service_env)
    assert run.returncode == 2
    assert "invalid size 'lots'" in run.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(("upload_id", "code", "message"), [
    ("not-a-uuid", 2, "'not-a-uuid' is not a valid upload id"),
    (str(uuid.UUID(int=7)), 2, "no upload with id 00000000-0000-0000-0000-000000000007"),
])
def test_status_of_a_bad_id(service_env, upload_id: str, code: int, message: str) -> None:  # type: ignore[no-untyped-def]
    run = run_cli(["status", upload_id], service_env)
    assert run.returncode == code
    assert message in run.stderr.strip().splitlines()[-1]
