"""Part uploads and completion as plain functions, against real Postgres and moto's S3 server.

No Celery here: these drive `workers.parts.send_part` and
`workers.completion.complete` directly, the way the tasks call them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from models import queries
from models.db import Database
from models.settings import Settings
from models.states import PartStatus, UploadStatus
from models.tables import Upload
from orchestrator import submit
from tests import services
from tests.conftest import sha256_of_object, write_random
from tests.integration.helpers import MiB
from workers import completion, parts
from workers.runtime import Runtime

pytestmark = pytest.mark.integration


@pytest.fixture
def rt(service_env: dict[str, str], db: Database) -> Iterator[Runtime]:
    # uploads on a queue of their own: the session worker's recovery pass leaves them to the test
    runtime = Runtime(settings=dataclasses.replace(Settings.from_env(), queue=f"parts-{uuid.uuid4().hex[:6]}"), db=db)
    yield runtime


def prepare(rt: Runtime, path: Path, bucket: str, size: int, max_retries: int | None = None) -> submit.Submitted:
    write_random(path, size)
    request = submit.validate(rt.settings, str(path), f"s3://{bucket}/{path.name}", 5 * MiB)
    return submit.prepare(rt.settings, rt.db, request, max_retries=max_retries)


def snapshot(db: Database, upload_id: uuid.UUID):  # type: ignore[no-untyped-def]
    with db.transaction() as session:
        return queries.get_upload(session, upload_id), queries.parts(session, upload_id), queries.events(
            session, upload_id)


@contextlib.contextmanager
def cut_connections(rt: Runtime, upload_id: uuid.UUID, s3_endpoint: str) -> Iterator[Runtime]:
    """Bind the upload to a proxy that resets every request mid-way (a counted, transient error);
    yields a worker whose configuration allows that endpoint (S3FERRY_ENDPOINTS)."""
    from urllib.parse import urlparse

    from tests.faults import FlakyProxy

    upstream = urlparse(s3_endpoint)
    proxy = FlakyProxy(upstream.hostname, upstream.port)
    proxy.reset_next(1000, mid_request=True)
    try:
        with rt.db.transaction() as session:
            session.execute(sa.update(Upload).where(Upload.id == upload_id).values(endpoint_url=proxy.url))
        yield Runtime(settings=dataclasses.replace(rt.settings, endpoints=proxy.url), db=rt.db)
    finally:
        proxy.close()


def send_all(rt: Runtime, upload_id: uuid.UUID, count: int) -> list[dict[str, object]]:
    return [parts.send_part(rt, upload_id, n).as_dict() for n in range(1, count + 1)]


def test_a_done_part_is_not_sent_again(rt: Runtime, s3, bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    up = prepare(rt, tmp_path / "a.bin", bucket, 6 * MiB)
    first = parts.send_part(rt, up.upload_id, 1)
    _, _, events_before = snapshot(rt.db, up.upload_id)

    again = parts.send_part(rt, up.upload_id, 1)

    assert again == first
    _, rows, events_after = snapshot(rt.db, up.upload_id)
    assert len(events_after) == len(events_before)
    assert rows[0].attempts == 1
    listed = s3.list_parts(Bucket=bucket, Key="a.bin", UploadId=up.s3_upload_id)["Parts"]
    assert [(p["PartNumber"], p["ETag"]) for p in listed] == [(1, first.etag)]


def test_complete_is_harmless_early_and_twice(rt: Runtime, s3, bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "b.bin"
    up = prepare(rt, path, bucket, 11 * MiB)
    collected = [parts.send_part(rt, up.upload_id, 1).as_dict()]

    assert completion.complete(rt, up.upload_id, collected) == UploadStatus.IN_PROGRESS  # part 3 missing
    collected += [parts.send_part(rt, up.upload_id, n).as_dict() for n in (2, 3)]
    assert completion.complete(rt, up.upload_id, collected) == UploadStatus.COMPLETE
    upload, _, events = snapshot(rt.db, up.upload_id)
    assert completion.complete(rt, up.upload_id, collected) == UploadStatus.COMPLETE

    assert len(snapshot(rt.db, up.upload_id)[2]) == len(events)
    assert upload.etag == s3.head_object(Bucket=bucket, Key="b.bin")["ETag"]
    assert upload.etag.endswith('-3"')
    assert sha256_of_object(s3, bucket, "b.bin") == _sha256(path)


def test_a_chord_covering_only_missing_parts_completes_from_postgres(rt: Runtime, s3, bucket: str,  # type: ignore[no-untyped-def]
                                                                     tmp_path: Path) -> None:
    path = tmp_path / "c.bin"
    up = prepare(rt, path, bucket, 11 * MiB)
    parts.send_part(rt, up.upload_id, 1)  # sent by an earlier chord
    late = [parts.send_part(rt, up.upload_id, n).as_dict() for n in (2, 3)]

    assert completion.complete(rt, up.upload_id, late) == UploadStatus.COMPLETE
    assert sha256_of_object(s3, bucket, "c.bin") == _sha256(path)


def test_a_collected_etag_that_disagrees_with_postgres_fails_the_upload(rt: Runtime, bucket: str,  # type: ignore[no-untyped-def]
                                                                        tmp_path: Path) -> None:
    up = prepare(rt, tmp_path / "d.bin", bucket, 6 * MiB)
    collected = send_all(rt, up.upload_id, 2)
    collected[1]["etag"] = '"00000000000000000000000000000000"'

    with pytest.raises(completion.CompletionFailed, match="chord collected ETag"):
        completion.complete(rt, up.upload_id, collected)
    upload, _, _ = snapshot(rt.db, up.upload_id)
    assert upload.status == UploadStatus.FAILED
    assert "Postgres holds" in (upload.last_error or "")


def test_completed_in_s3_but_not_recorded_is_recognised(rt: Runtime, s3, bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The worker died right after CompleteMultipartUpload: NoSuchUpload, then HeadObject proves it."""
    up = prepare(rt, tmp_path / "e.bin", bucket, 6 * MiB)
    collected = send_all(rt, up.upload_id, 2)
    _, rows, _ = snapshot(rt.db, up.upload_id)
    s3.complete_multipart_upload(
        Bucket=bucket, Key="e.bin", UploadId=up.s3_upload_id,
        MultipartUpload={"Parts": [{"PartNumber": p.part_number, "ETag": p.etag, "ChecksumCRC32C": p.checksum}
                                   for p in rows]})

    assert completion.complete(rt, up.upload_id, collected) == UploadStatus.COMPLETE
    upload, _, _ = snapshot(rt.db, up.upload_id)
    assert upload.etag == s3.head_object(Bucket=bucket, Key="e.bin")["ETag"]


def test_a_permanent_s3_error_fails_the_upload_with_the_s3_message(rt: Runtime, s3, bucket: str,  # type: ignore[no-untyped-def]
                                                                   tmp_path: Path) -> None:
    """The bucket vanished mid-upload: NoSuchBucket is permanent, so the upload fails at once.

    (moto answers UploadPart on an aborted upload with a 500 instead of NoSuchUpload, so
    the bucket's removal stands in for S3 losing the upload.)
    """
    up = prepare(rt, tmp_path / "f.bin", bucket, 6 * MiB)
    s3.abort_multipart_upload(Bucket=bucket, Key="f.bin", UploadId=up.s3_upload_id)
    s3.delete_bucket(Bucket=bucket)

    with pytest.raises(parts.PartFailed, match="NoSuchBucket"):
        parts.send_part(rt, up.upload_id, 1)

    upload, rows, _ = snapshot(rt.db, up.upload_id)
    assert upload.status == UploadStatus.FAILED
    assert upload.last_error.startswith("part 1: NoSuchBucket: ")
    assert (rows[0].status, rows[0].attempts, rows[1].status) == (PartStatus.FAILED, 1, PartStatus.PENDING)
    skipped = parts.send_part(rt, up.upload_id, 2)  # the rest of the chord arrives later: not sent
    assert skipped.skipped == "upload is failed"


def test_a_changed_source_fails_the_upload(rt: Runtime, bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "g.bin"
    up = prepare(rt, path, bucket, 6 * MiB)
    parts.send_part(rt, up.upload_id, 1)
    with open(path, "ab") as source:
        source.write(b"appended later")

    with pytest.raises(parts.PartFailed, match="changed since submit"):
        parts.send_part(rt, up.upload_id, 2)
    upload, _, _ = snapshot(rt.db, up.upload_id)
    assert upload.status == UploadStatus.FAILED
    assert "size 6291456 -> 6291470" in upload.last_error


def test_an_unreachable_endpoint_does_not_use_up_retries(rt: Runtime, bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Connection refused is an outage, not a failed attempt: the part waits, uncounted, for S3."""
    up = prepare(rt, tmp_path / "h.bin", bucket, 6 * MiB, max_retries=1)
    dead = f"http://127.0.0.1:{services.free_port()}"
    rt = Runtime(settings=dataclasses.replace(rt.settings, endpoints=dead), db=rt.db)  # a worker told to use it
    with rt.db.transaction() as session:
        session.execute(sa.update(Upload).where(Upload.id == up.upload_id).values(endpoint_url=dead))

    for _ in range(3):
        with pytest.raises(parts.RetryLater, match="Could not connect") as later:
            parts.send_part(rt, up.upload_id, 1)
        assert later.value.seconds is None  # the task's growing backoff decides
    upload, rows, _ = snapshot(rt.db, up.upload_id)
    assert (upload.status, rows[0].status, rows[0].attempts, upload.retry_count) == (
        UploadStatus.IN_PROGRESS, PartStatus.PENDING, 0, 0)
    assert "Could not connect" in upload.last_error


def test_transient_errors_are_counted_then_fail_the_upload(rt: Runtime, s3_endpoint: str, bucket: str,  # type: ignore[no-untyped-def]
                                                           tmp_path: Path) -> None:
    """Connections reset mid-request: each is a counted retry; past max_retries the upload fails."""
    up = prepare(rt, tmp_path / "h2.bin", bucket, 6 * MiB, max_retries=2)
    with cut_connections(rt, up.upload_id, s3_endpoint) as flaky:
        for attempt in (1, 2):
            with pytest.raises(parts.RetryLater) as later:
                parts.send_part(flaky, up.upload_id, 1)
            assert 0 < later.value.seconds <= rt.settings.retry_backoff_max
            upload, rows, _ = snapshot(rt.db, up.upload_id)
            assert (rows[0].status, rows[0].attempts, upload.retry_count) == (PartStatus.PENDING, attempt, attempt)
            assert upload.last_retry_at is not None and upload.last_error
        with pytest.raises(parts.PartFailed, match="gave up after 3 attempts"):
            parts.send_part(flaky, up.upload_id, 1)
    upload, rows, _ = snapshot(rt.db, up.upload_id)
    assert (upload.status, rows[0].status) == (UploadStatus.FAILED, PartStatus.FAILED)


def test_a_part_held_by_another_worker_is_retried_later(rt: Runtime, bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from models import transitions

    up = prepare(rt, tmp_path / "i.bin", bucket, 6 * MiB)
    with rt.db.transaction() as session:
        transitions.claim_part(session, up.upload_id, 1, "other-host:1", 600)

    with pytest.raises(parts.RetryLater, match="held by other-host:1"):
        parts.send_part(rt, up.upload_id, 1)
    _, rows, _ = snapshot(rt.db, up.upload_id)
    assert (rows[0].status, rows[0].worker) == (PartStatus.IN_FLIGHT, "other-host:1")


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_the_lease_is_renewed_while_sending_and_loss_is_noticed(rt: Runtime, bucket: str,  # type: ignore[no-untyped-def]
                                                               tmp_path: Path) -> None:
    import dataclasses
    import time

    from models import transitions
    from workers.lease import LeaseKeeper

    fast = Runtime(settings=dataclasses.replace(rt.settings, lease_seconds=3), db=rt.db)
    up = prepare(rt, tmp_path / "j.bin", bucket, 6 * MiB)
    with rt.db.transaction() as session:
        first = transitions.claim_part(session, up.upload_id, 1, fast.worker_id, 3).part.lease_expires_at
    with LeaseKeeper(fast, up.upload_id, 1, fast.worker_id) as lease:
        time.sleep(2.5)
        _, rows, _ = snapshot(rt.db, up.upload_id)
        assert rows[0].lease_expires_at > first and not lease.lost
        with rt.db.transaction() as session:  # another worker takes the part over
            session.execute(sa.text("UPDATE parts SET worker = 'thief' WHERE upload_id = :u AND part_number = 1"),
                            {"u": up.upload_id.hex if rt.db.url.get_backend_name() == "sqlite" else up.upload_id})
        time.sleep(1.5)
        assert lease.lost


def test_an_upload_gives_up_after_its_total_retry_budget(rt: Runtime, s3_endpoint: str, bucket: str,  # type: ignore[no-untyped-def]
                                                          tmp_path: Path) -> None:

    up = prepare(rt, tmp_path / "budget.bin", bucket, 16 * MiB, max_retries=50)
    with cut_connections(rt, up.upload_id, s3_endpoint) as flaky:
        stingy = Runtime(settings=dataclasses.replace(flaky.settings, max_upload_retries=2), db=rt.db)
        for number in (1, 2):  # two parts, one retry each: the upload's budget of 2 is spent
            with pytest.raises(parts.RetryLater):
                parts.send_part(stingy, up.upload_id, number)
        with pytest.raises(parts.PartFailed, match="the upload gave up after 2 retries in all"):
            parts.send_part(stingy, up.upload_id, 3)
    upload, _, _ = snapshot(rt.db, up.upload_id)
    assert upload.status == UploadStatus.FAILED


def test_a_source_that_fails_while_sent_is_a_read_error_not_a_link_error(  # type: ignore[no-untyped-def]
        rt: Runtime, bucket: str, tmp_path: Path) -> None:
    """A file cut short while its part is sent: botocore reports a broken connection, but the
    error is the source's, so it must not count as congestion (which would halve the window)."""
    from workers import reader

    path = tmp_path / "cut.bin"
    up = prepare(rt, path, bucket, 12 * MiB)
    with rt.db.transaction() as session:
        upload = session.get(Upload, up.upload_id)
        part = queries.parts(session, up.upload_id)[0]
        session.expunge_all()
    with reader.RangeReader(path, part.offset, part.size) as body:
        checksum = reader.crc32c_of(body)
        with open(path, "r+b") as source:
            source.truncate(1 * MiB)  # the part's range now ends early
        with pytest.raises(OSError, match="source ended early") as raised:
            parts._put_with_credentials(rt, upload, part, body, checksum)
    assert not isinstance(raised.value, parts.s3.S3Error)
