"""Helpers of the integration tests."""

from __future__ import annotations

import base64
import contextlib
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import crc32c

from models import queries
from models.db import Database
from models.states import UploadStatus
from tests import services

S3FERRY = str(services.BIN / "s3ferry")
MiB = 1024 * 1024


def run_cli(args: Sequence[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([S3FERRY, *args], env=env, capture_output=True, text=True, timeout=timeout)


def submit(env: dict[str, str], path: Path, bucket: str, part_size: str = "5MiB") -> uuid.UUID:
    """`s3ferry upload --no-wait` to s3://bucket/<file name>; returns the upload's id."""
    run = run_cli(["upload", str(path), f"s3://{bucket}/{path.name}", "--part-size", part_size, "--no-wait"], env)
    assert run.returncode == 0, run.stderr
    return uuid.UUID(run.stdout.split()[0])


def wait_status(db: Database, upload_id: uuid.UUID, statuses: Sequence[str], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with db.transaction() as session:
            status = queries.get_upload(session, upload_id).status
        if status in statuses:
            return str(status)
        time.sleep(0.2)
    with db.transaction() as session:
        parts: dict[str, list[int]] = {}
        for part in queries.parts(session, upload_id):
            parts.setdefault(str(part.status), []).append(part.part_number)
    raise TimeoutError(f"upload {upload_id} still {status} after {timeout}s, waiting for {statuses}; "
                       f"its parts by status: {parts}")


FINISHED = (UploadStatus.COMPLETE, UploadStatus.FAILED, UploadStatus.CANCELLED)


def crc32c_b64(path: Path, offset: int, size: int) -> str:
    with open(path, "rb") as source:
        source.seek(offset)
        value = crc32c.crc32c(source.read(size))
    return base64.b64encode(value.to_bytes(4, "big")).decode()


def claims_per_part(db: Database, upload_id: uuid.UUID) -> dict[int, int]:
    """How many times each part was claimed (a claim precedes every send)."""
    with db.transaction() as session:
        events = queries.events(session, upload_id)
    counts: dict[int, int] = {}
    for event in events:
        if event.to_status == "in_flight":
            counts[event.part_number] = counts.get(event.part_number, 0) + 1
    return counts


def wait_until(check, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    """Poll `check` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@contextlib.contextmanager
def serving(args: Sequence[str], env: dict[str, str], port: int, log: Path) -> Iterator[str]:
    """Run `s3ferry ARGS` (a server on `port`) until the block ends; yields its base URL."""
    with open(log, "wb") as out:
        process = subprocess.Popen([S3FERRY, *args], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        services.wait_for(lambda: services.listening("127.0.0.1", port), 60, args[0], log)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:  # stopped all the same, and the test fails on it
            process.kill()
            process.wait(10)
            raise
