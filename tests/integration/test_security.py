"""The trust boundary (issue 14; docs/security.md): rows and messages are data, not authority.

Each finding replayed against a real `s3ferry worker`, Postgres, Redis and moto: someone who
can write to the database forges an upload row (a file outside the source roots, through a
symlink or `..`, a foreign endpoint, a foreign bucket) and dispatches its parts. The worker
refuses with a one-line message that says nothing about the file, and nothing reaches S3 or
the foreign endpoint.
"""

from __future__ import annotations

import dataclasses
import http.server
import os
import re
import threading
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from models import queries
from models.db import Database
from models.settings import Settings
from models.states import PartStatus, UploadStatus
from models.tables import Upload
from orchestrator import scheduler, submit
from tests.conftest import write_random
from tests.integration.helpers import FINISHED, MiB, run_cli, wait_status
from workers import policy

pytestmark = pytest.mark.integration

#: A file outside the test's source roots (the temp folder) that every machine has.
OUTSIDE = "/etc/passwd"


@pytest.fixture
def settings(service_env) -> Settings:  # type: ignore[no-untyped-def]
    """Rows on a queue of their own (the session worker's recovery pass leaves them alone); their
    parts are dispatched by hand to the session's queue, where the real worker takes them."""
    return dataclasses.replace(Settings.from_env(), queue=f"security-{uuid.uuid4().hex[:6]}")


class Listener:
    """A local HTTP server that records every request it gets (a foreign 'S3 endpoint')."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _record(self) -> None:
                outer.requests.append(f"{self.command} {self.path}")
                self.send_response(200)
                self.send_header("ETag", '"forged"')
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_PUT = do_POST = do_GET = do_HEAD = do_DELETE = _record

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Listener:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _forge(settings: Settings, db: Database, tmp_path: Path, real_bucket: str, **row: object) -> uuid.UUID:
    """A real upload of a harmless file, started in S3, then rewritten as an attacker with
    write access to the database would: `row` replaces its columns."""
    path = tmp_path / f"harmless-{uuid.uuid4().hex[:6]}.bin"
    write_random(path, 6 * MiB)
    up = submit.prepare(settings, db, submit.validate(settings, str(path), f"s3://{real_bucket}/{path.name}", 5 * MiB))
    if row:
        with db.transaction() as session:
            session.execute(sa.update(Upload).where(Upload.id == up.upload_id).values(**row))
    return up.upload_id


def _as_if(target: str) -> dict[str, object]:
    """The row values that make `target` pass the fingerprint check (the attacker read them
    from an earlier failure's message, before this issue)."""
    info = os.stat(target)
    return {"source_uri": Path(target).as_uri() if not target.startswith("file:") else target,
            "source_size": info.st_size, "source_mtime_ns": info.st_mtime_ns, "source_inode": info.st_ino}


def _run(db: Database, upload_id: uuid.UUID) -> str:
    """Dispatch the forged upload's parts to the real worker; its last error once it failed."""
    with db.transaction() as session:
        numbers = [p.part_number for p in queries.parts(session, upload_id)]
    scheduler.dispatch(upload_id, numbers)
    assert wait_status(db, upload_id, FINISHED, timeout=60) == UploadStatus.FAILED
    with db.transaction() as session:
        upload = queries.get_upload(session, upload_id)
        assert all(p.status != PartStatus.DONE for p in queries.parts(session, upload_id))
        return str(upload.last_error)


def _leaks_nothing(error: str, target: str) -> None:
    info = os.stat(target) if os.path.exists(target) else None
    assert "refused" in error and "\n" not in error, error
    for secret in ([str(info.st_size), str(info.st_ino), str(info.st_mtime_ns)] if info else []) + [target]:
        assert secret not in error, (secret, error)


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize("how", ["outside", "symlink", "dotdot", "missing"])
def test_a_forged_source_outside_the_roots_is_refused_and_reveals_nothing(  # type: ignore[no-untyped-def]
        how: str, settings: Settings, db: Database, s3, bucket: str, tmp_path: Path) -> None:
    if how == "outside":
        row = _as_if(OUTSIDE)
    elif how == "symlink":  # a link inside the roots to a file outside them
        link = tmp_path / "innocent.txt"
        link.symlink_to(OUTSIDE)
        row = {**_as_if(OUTSIDE), "source_uri": link.as_uri()}
    elif how == "dotdot":
        inside = os.path.realpath(tmp_path)  # up to / from wherever pytest put it, then down to OUTSIDE
        row = {**_as_if(OUTSIDE), "source_uri": f"file://{inside}{'/..' * inside.count('/')}{OUTSIDE}"}
    else:  # a path that does not exist fails exactly like one that does: its existence is not told
        row = {**_as_if(OUTSIDE), "source_uri": "file:///etc/s3ferry-no-such-file"}
    upload_id = _forge(settings, db, tmp_path, bucket, **row)

    error = _run(db, upload_id)

    _leaks_nothing(error, OUTSIDE)
    assert re.fullmatch(r"part [12]: refused: the source is outside the folders this worker may read "
                        r"\(S3FERRY_SOURCE_ROOTS\)", error), error
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    listed = s3.list_parts(Bucket=bucket, Key=_key(db, upload_id), UploadId=_s3_upload_id(db, upload_id))
    assert listed.get("Parts", []) == []  # not a byte of it in S3


@pytest.mark.usefixtures("worker")
def test_a_forged_endpoint_gets_no_request(settings: Settings, db: Database, bucket: str,  # type: ignore[no-untyped-def]
                                           tmp_path: Path) -> None:
    with Listener() as listener:
        upload_id = _forge(settings, db, tmp_path, bucket, endpoint_url=listener.url)
        error = _run(db, upload_id)
    assert error.startswith("part ") and "refused: the upload's S3 endpoint is not this worker's own" in error
    assert listener.url not in error
    assert listener.requests == []  # no PUT, and no signed request that names our access key


@pytest.mark.usefixtures("worker")
def test_a_forged_bucket_receives_nothing(settings: Settings, db: Database, s3, bucket: str,  # type: ignore[no-untyped-def]
                                          tmp_path: Path) -> None:
    foreign = f"evil-{uuid.uuid4().hex[:10]}"  # exists, and the worker's credentials could write to it
    s3.create_bucket(Bucket=foreign)
    try:
        upload_id = _forge(settings, db, tmp_path, bucket, bucket=foreign)
        error = _run(db, upload_id)
        assert f"refused: bucket '{foreign}' is not one this worker may send to (S3FERRY_BUCKETS)" in error
        assert s3.list_objects_v2(Bucket=foreign).get("KeyCount", 0) == 0
        assert s3.list_multipart_uploads(Bucket=foreign).get("Uploads", []) == []
    finally:
        s3.delete_bucket(Bucket=foreign)


def test_submit_refuses_what_the_workers_would_refuse(service_env: dict[str, str], db: Database,  # type: ignore[no-untyped-def]
                                                      bucket: str, tmp_path: Path) -> None:
    """At once, with a one-line error and exit 2, and nothing recorded."""
    inside = tmp_path / "inside.bin"
    write_random(inside, MiB)
    with db.transaction() as session:
        before = session.scalar(sa.select(sa.func.count()).select_from(Upload))
    cases = [
        ([OUTSIDE, f"s3://{bucket}/x"], service_env, "outside the folders this worker may read"),
        ([str(inside), "s3://evil-bucket-name/x"], service_env, "bucket 'evil-bucket-name' is not one"),
        ([str(inside), f"s3://{bucket}/x"], {**service_env, "S3FERRY_SOURCE_ROOTS": ""}, "no source roots are set"),
        ([str(inside), f"s3://{bucket}/x"], {**service_env, "S3FERRY_BUCKETS": ""}, "no buckets are allowed"),
    ]
    for args, env, message in cases:
        run = run_cli(["upload", *args, "--no-wait"], env)
        assert run.returncode == 2 and message in run.stderr, (args, run.returncode, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    with db.transaction() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Upload)) == before


def test_pseudo_files_are_never_sources(tmp_path: Path) -> None:
    """Even with every folder a root (single-machine mode's default)."""
    everything = Settings.from_env({"S3FERRY_HOME": str(tmp_path / "home")})
    assert everything.source_root_list == ["/"]
    for path in ("/proc/self/environ", "/sys/kernel/notes", "/dev/zero"):
        with pytest.raises(policy.Refused, match="/proc, /sys and /dev are never read"):
            policy.check_path(everything, path)


def _key(db: Database, upload_id: uuid.UUID) -> str:
    with db.transaction() as session:
        return queries.get_upload(session, upload_id).key


def _s3_upload_id(db: Database, upload_id: uuid.UUID) -> str:
    with db.transaction() as session:
        return str(queries.get_upload(session, upload_id).s3_upload_id)


@pytest.mark.usefixtures("worker")
def test_a_late_send_of_a_one_part_upload_cannot_overwrite_the_object(  # type: ignore[no-untyped-def]
        service_env: dict[str, str], db: Database, s3, bucket: str, tmp_path: Path) -> None:
    """One part is a multipart upload of one part: a worker whose claim ran out while it sent
    (hung, then woke after the upload completed and someone wrote a newer object) gets
    NoSuchUpload, and the newer object stays."""
    from tests.integration.helpers import submit as submit_cli
    from workers import parts, s3 as s3_errors
    from workers.runtime import Runtime

    source = tmp_path / "one.bin"
    write_random(source, MiB)
    upload_id = submit_cli(service_env, source, bucket)
    assert wait_status(db, upload_id, FINISHED) == UploadStatus.COMPLETE
    with db.transaction() as session:
        upload = queries.get_upload(session, upload_id)
        part = queries.parts(session, upload_id)[0]
    assert upload.total_parts == 1 and upload.s3_upload_id
    s3.put_object(Bucket=bucket, Key=upload.key, Body=b"newer")  # a newer version, written after

    late = Runtime(settings=Settings.from_env(), db=db)
    with pytest.raises(s3_errors.S3Error):  # S3 answers NoSuchUpload; moto, a 500
        parts.transfer(late, upload, part)
    assert s3.get_object(Bucket=bucket, Key=upload.key)["Body"].read() == b"newer"


@pytest.mark.usefixtures("worker")
def test_a_completion_sent_elsewhere_is_refused(settings: Settings, db: Database, s3, bucket: str,  # type: ignore[no-untyped-def]
                                                tmp_path: Path) -> None:
    """Every part landed; then the row is pointed at a foreign endpoint before the completion:
    CompleteMultipartUpload (a signed request naming our access key) is not sent there."""
    from workers import broker

    with Listener() as listener:
        forged = _forge(settings, db, tmp_path, bucket)
        with db.transaction() as session:  # its parts "landed"; then the row is pointed elsewhere
            for part in queries.parts(session, forged):
                part.status, part.etag, part.checksum = PartStatus.DONE, '"x"', "AAAAAA=="
            session.execute(sa.update(Upload).where(Upload.id == forged).values(endpoint_url=listener.url))
        broker.send("s3ferry.complete_upload", [], str(forged))
        assert wait_status(db, forged, FINISHED, timeout=60) == UploadStatus.FAILED
    with db.transaction() as session:
        assert "refused: the upload's S3 endpoint" in str(queries.get_upload(session, forged).last_error)
    assert listener.requests == []
