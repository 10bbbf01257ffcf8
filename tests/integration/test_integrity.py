"""Integrity from file to object, against real Postgres, Redis, a real worker and moto's S3 server.

- A source rewritten in place between parts, same size, mtime put back (`touch -r`):
  the ctime gives it away; the upload fails with one line and no object is completed.
- A normal upload records the object's CRC32C computed from what was read (S3's
  COMPOSITE form) and checks it against the one S3 reports.
- Migration 0004 on a database at 0003, on PostgreSQL and SQLite.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import crc32c
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from models import clock, migrate, queries
from models.db import Database
from models.settings import Settings
from models.states import PartStatus, UploadStatus
from models.tables import Base, Part, Upload
from orchestrator import submit
from tests import services
from tests.conftest import drop_database, sha256_of_object, write_random
from tests.integration import helpers
from tests.integration.helpers import FINISHED, MiB, run_cli, wait_status, wait_until
from workers import completion, parts
from workers.runtime import Runtime

pytestmark = pytest.mark.integration


@pytest.fixture
def rt(service_env: dict[str, str], db: Database) -> Iterator[Runtime]:
    # uploads on a queue of their own: the session worker's recovery pass leaves them to the test
    yield Runtime(settings=dataclasses.replace(Settings.from_env(), queue=f"integrity-{uuid.uuid4().hex[:6]}"), db=db)


def prepare(rt: Runtime, path: Path, bucket: str, size: int) -> submit.Submitted:
    write_random(path, size)
    request = submit.validate(rt.settings, str(path), f"s3://{bucket}/{path.name}", 5 * MiB)
    return submit.prepare(rt.settings, rt.db, request)


def snapshot(db: Database, upload_id: uuid.UUID) -> tuple[Upload, list[Part], list[str]]:
    with db.transaction() as session:
        return (queries.get_upload(session, upload_id), list(queries.parts(session, upload_id)),
                [e.reason or "" for e in queries.events(session, upload_id)])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def crc32c_b64(data: bytes) -> str:
    return base64.b64encode(crc32c.crc32c(data).to_bytes(4, "big")).decode()


def composite_of_file(path: Path, part_size: int) -> str:
    """S3's COMPOSITE CRC32C of the file's bytes cut in parts, computed here from the file alone."""
    data = path.read_bytes()
    raw = b"".join(crc32c.crc32c(data[o:o + part_size]).to_bytes(4, "big") for o in range(0, len(data), part_size))
    return f"{crc32c_b64(raw)}-{-(-len(data) // part_size)}"


def rewrite_keeping_size_and_mtime(path: Path) -> os.stat_result:
    """Rewrite the file in place with other bytes of the same size, then put its times back as
    `touch -r` would. Returns its stat from before."""
    before = os.stat(path)
    with open(path, "r+b") as out:
        for _ in range(0, before.st_size, MiB):
            out.write(os.urandom(min(MiB, before.st_size - out.tell())))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    assert after.st_ctime_ns != before.st_ctime_ns  # the one thing left that tells
    return before


def assert_no_object(s3, bucket: str, key: str) -> None:  # type: ignore[no-untyped-def]
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    with pytest.raises(s3.exceptions.ClientError, match="404"):
        s3.head_object(Bucket=bucket, Key=key)


# --- the torn source -------------------------------------------------------------------------


def test_a_source_rewritten_between_parts_with_its_mtime_put_back_fails_closed(  # type: ignore[no-untyped-def]
        rt: Runtime, s3, bucket: str, tmp_path: Path) -> None:
    """Part 1 sent; the file rewritten in place, same size, mtime restored; then parts 2 and 3."""
    path = tmp_path / "torn.bin"
    up = prepare(rt, path, bucket, 11 * MiB)
    collected = [parts.send_part(rt, up.upload_id, 1).as_dict()]
    rewrite_keeping_size_and_mtime(path)

    with pytest.raises(parts.PartFailed, match="changed since submit"):
        parts.send_part(rt, up.upload_id, 2)
    assert parts.send_part(rt, up.upload_id, 3).skipped == "upload is failed"
    assert completion.complete(rt, up.upload_id, collected) == UploadStatus.FAILED

    upload, rows, _ = snapshot(rt.db, up.upload_id)
    assert upload.status == UploadStatus.FAILED
    error = upload.last_error or ""
    assert "\n" not in error and error.startswith(f"part 2: source {path} changed since submit (ctime_ns ")
    assert [p.status for p in rows] == [PartStatus.DONE, PartStatus.FAILED, PartStatus.PENDING]
    assert upload.etag is None and upload.checksum is None  # nothing marked verified
    assert_no_object(s3, bucket, "torn.bin")
    listed = s3.list_parts(Bucket=bucket, Key="torn.bin", UploadId=up.s3_upload_id).get("Parts", [])
    assert [p["PartNumber"] for p in listed] == [1]  # only the old version's part, never completed


def test_a_worker_fails_a_source_rewritten_while_it_uploads(  # type: ignore[no-untyped-def]
        proxy_and_env, workdir: Path, db: Database, s3, bucket: str, tmp_path: Path) -> None:
    """The same replay through a real worker: one part at a time through a capped link, so that
    when part 1 has landed the others are still to be read or sent."""
    proxy, env = proxy_and_env
    proxy.configure(bytes_per_second=2 * MiB)  # a 5 MiB part: about 2.5 s
    path = tmp_path / "torn-live.bin"
    write_random(path, 15 * MiB)
    worker = services.start_worker(workdir, env, f"torn-{uuid.uuid4().hex[:4]}", concurrency=1)
    try:
        upload_id = helpers.submit(env, path, bucket)
        wait_until(lambda: PartStatus.DONE in [p.status for p in snapshot(db, upload_id)[1]], timeout=60)
        _, rows, _ = snapshot(db, upload_id)
        assert sum(p.status == PartStatus.DONE for p in rows) < 3, "every part landed before the rewrite"
        rewrite_keeping_size_and_mtime(path)
        assert wait_status(db, upload_id, FINISHED, timeout=60) == UploadStatus.FAILED
    finally:
        worker.stop()
    upload, _, _ = snapshot(db, upload_id)
    error = upload.last_error or ""
    # (the worker may look between the rewrite and the restored mtime: then both changed)
    assert "\n" not in error and f"source {path} changed since submit (" in error and "ctime_ns " in error
    assert upload.etag is None and upload.checksum is None
    assert_no_object(s3, bucket, "torn-live.bin")


def test_a_rewritten_source_is_not_attached_to_its_unfinished_upload(rt: Runtime, bucket: str,
                                                                      tmp_path: Path) -> None:
    path = tmp_path / "again.bin"
    up = prepare(rt, path, bucket, 6 * MiB)
    request = submit.validate(rt.settings, str(path), f"s3://{bucket}/again.bin", 5 * MiB)
    found = submit.find_resumable(rt.db, request)
    assert found is not None and found.upload_id == up.upload_id

    rewrite_keeping_size_and_mtime(path)
    request = submit.validate(rt.settings, str(path), f"s3://{bucket}/again.bin", 5 * MiB)
    assert submit.find_resumable(rt.db, request) is None


def test_an_upload_recorded_before_the_ctime_was_taken_still_uploads(  # type: ignore[no-untyped-def]
        rt: Runtime, s3, bucket: str, tmp_path: Path) -> None:
    path = tmp_path / "legacy.bin"
    up = prepare(rt, path, bucket, 11 * MiB)
    with rt.db.transaction() as session:  # as migration 0004 leaves the rows of older uploads
        session.execute(sa.update(Upload).where(Upload.id == up.upload_id).values(source_ctime_ns=None))
    collected = [parts.send_part(rt, up.upload_id, n).as_dict() for n in (1, 2, 3)]

    assert completion.complete(rt, up.upload_id, collected) == UploadStatus.COMPLETE
    assert sha256_of_object(s3, bucket, "legacy.bin") == sha256(path)


# --- the object's checksum -------------------------------------------------------------------


def test_an_upload_records_and_verifies_the_composite_checksum(  # type: ignore[no-untyped-def]
        worker, service_env: dict[str, str], db: Database, s3, bucket: str, tmp_path: Path) -> None:
    path = tmp_path / "whole.bin"
    write_random(path, 11 * MiB)
    upload_id = helpers.submit(service_env, path, bucket)
    assert wait_status(db, upload_id, FINISHED) == UploadStatus.COMPLETE

    upload, rows, reasons = snapshot(db, upload_id)
    expected = composite_of_file(path, 5 * MiB)
    assert expected.endswith("-3") and upload.checksum == expected
    assert [p.checksum for p in rows] == [crc32c_b64(path.read_bytes()[o:o + 5 * MiB]) for o in (0, 5 * MiB, 10 * MiB)]
    reported = s3.head_object(Bucket=bucket, Key="whole.bin", ChecksumMode="ENABLED")["ChecksumCRC32C"]
    assert completion.same_checksum(reported, expected)
    attributes = s3.get_object_attributes(Bucket=bucket, Key="whole.bin", ObjectAttributes=["Checksum"])["Checksum"]
    assert attributes["ChecksumType"] == "COMPOSITE"
    assert completion.same_checksum(attributes["ChecksumCRC32C"], expected)
    assert reasons[-1] == f"object verified with HeadObject: size, ETag and CRC32C {expected}"
    assert sha256_of_object(s3, bucket, "whole.bin") == sha256(path)


def test_a_single_part_upload_is_a_multipart_upload_of_one_part_with_its_composite(  # type: ignore[no-untyped-def]
        worker, service_env: dict[str, str], db: Database, s3, bucket: str, tmp_path: Path) -> None:
    """One part goes through a multipart upload too (a late send cannot overwrite the object):
    its checksum is the composite of one part, verified like any other."""
    path = tmp_path / "small.bin"
    write_random(path, 1 * MiB)
    upload_id = helpers.submit(service_env, path, bucket)
    assert wait_status(db, upload_id, FINISHED) == UploadStatus.COMPLETE

    upload, rows, reasons = snapshot(db, upload_id)
    expected = composite_of_file(path, 5 * MiB)
    assert upload.s3_upload_id and len(rows) == 1 and expected.endswith("-1") and upload.checksum == expected
    assert rows[0].checksum == crc32c_b64(path.read_bytes())
    reported = s3.head_object(Bucket=bucket, Key="small.bin", ChecksumMode="ENABLED")["ChecksumCRC32C"]
    assert completion.same_checksum(reported, expected)
    assert reasons[-1] == f"object verified with HeadObject: size, ETag and CRC32C {expected}"
    assert sha256_of_object(s3, bucket, "small.bin") == sha256(path)


def test_an_object_whose_checksum_differs_from_what_was_read_fails_verification(  # type: ignore[no-untyped-def]
        rt: Runtime, s3, bucket: str, tmp_path: Path) -> None:
    """The object at the key is made of parts other than the ones recorded as read (their ETags
    agree, their CRC32Cs do not): the upload fails, and says which checksum is which."""
    path = tmp_path / "other.bin"
    up = prepare(rt, path, bucket, 11 * MiB)
    collected = [parts.send_part(rt, up.upload_id, n).as_dict() for n in (1, 2, 3)]
    _, rows, _ = snapshot(rt.db, up.upload_id)
    s3.complete_multipart_upload(  # completed before, its record lost: NoSuchUpload, then HeadObject decides
        Bucket=bucket, Key="other.bin", UploadId=up.s3_upload_id,
        MultipartUpload={"Parts": [{"PartNumber": p.part_number, "ETag": p.etag, "ChecksumCRC32C": p.checksum}
                                   for p in rows]})
    wrong = crc32c_b64(b"not what was sent")
    with rt.db.transaction() as session:
        session.execute(sa.update(Part).where(Part.upload_id == up.upload_id, Part.part_number == 2)
                        .values(checksum=wrong))
    expected = completion.composite_crc32c([rows[0].checksum, wrong, rows[2].checksum])

    with pytest.raises(completion.CompletionFailed, match="CRC32C"):
        completion.complete(rt, up.upload_id, collected)
    upload, _, _ = snapshot(rt.db, up.upload_id)
    assert upload.status == UploadStatus.FAILED and upload.checksum is None
    reported = s3.head_object(Bucket=bucket, Key="other.bin", ChecksumMode="ENABLED")["ChecksumCRC32C"]
    assert upload.last_error == f"the object's CRC32C is {reported}; the parts as read from the source give {expected}"


# --- migration 0004 --------------------------------------------------------------------------


def upgrade_to(url: str, revision: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        config = migrate.alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    engine.dispose()


def downgrade_to(url: str, revision: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        config = migrate.alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, revision)
    engine.dispose()


def insert_0003_upload(url: str) -> uuid.UUID:
    """An upload row as s3ferry wrote it at schema 0003 (no ctime, no object checksum)."""
    upload_id = uuid.uuid4()
    uploads = sa.table("uploads", *(sa.column(name) for name in (
        "source_uri", "source_size", "source_mtime_ns", "source_inode", "bucket", "key", "part_size",
        "total_parts", "status", "priority", "max_retries", "retry_count", "queue")),
        sa.column("id", sa.Uuid), sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("updated_at", sa.DateTime(timezone=True)))
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.insert(uploads).values(
            id=upload_id, source_uri="file:///data/old.bin", source_size=10, source_mtime_ns=1, source_inode=2,
            bucket="test-old", key="old.bin", part_size=10, total_parts=1, status="in_progress", priority=0,
            max_retries=3, retry_count=0, queue="s3ferry", created_at=clock.now(), updated_at=clock.now()))
    engine.dispose()
    return upload_id


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
        return
    url = sa.make_url(request.getfixturevalue("postgres_url")).set(database=f"s3ferry_0004_{uuid.uuid4().hex[:8]}")
    migrate.ensure_database(url)
    yield url.render_as_string(hide_password=False)
    drop_database(url)


def test_migration_0004_upgrades_a_database_at_0003(empty_url: str) -> None:
    upgrade_to(empty_url, "0003")
    old = insert_0003_upload(empty_url)

    assert migrate.upgrade(empty_url) == migrate.head() == "0004"
    state = Database(empty_url)
    try:
        with state.transaction() as session:
            upload = queries.get_upload(session, old)
            assert (upload.source_ctime_ns, upload.checksum, upload.status) == (None, None, "in_progress")
    finally:
        state.dispose()
    engine = sa.create_engine(empty_url)
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}),
                                Base.metadata) == []
    engine.dispose()

    downgrade_to(empty_url, "0003")  # and back, keeping the row
    assert migrate.current(empty_url) == "0003"
    assert migrate.upgrade(empty_url) == "0004"


def test_db_check_and_db_upgrade_from_0003(postgres_url: str, service_env: dict[str, str]) -> None:
    url = sa.make_url(postgres_url).set(database=f"s3ferry_0004_{uuid.uuid4().hex[:8]}")
    migrate.ensure_database(url)
    rendered = url.render_as_string(hide_password=False)
    env = {**service_env, "S3FERRY_DATABASE_URL": rendered}
    try:
        upgrade_to(rendered, "0003")
        behind = run_cli(["db", "check"], env)
        assert behind.returncode == 3 and "at revision 0003, not 0004: run `s3ferry db upgrade`" in behind.stderr
        assert run_cli(["db", "upgrade"], env).returncode == 0
        ready = run_cli(["db", "check"], env)
        assert ready.returncode == 0 and "0004: up to date" in ready.stdout
    finally:
        drop_database(url)
