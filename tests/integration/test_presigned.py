"""Presigned mode: part workers without S3 credentials send through URLs that `s3ferry signer`
signs on demand; URLs that expire are replaced without counting a failure, and never show."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from models.db import Database
from models.states import UploadStatus
from models.tables import Part, UploadEvent, Upload
from tests import services
from tests.conftest import sha256_of_object, write_random
from tests.integration.helpers import FINISHED, MiB, S3FERRY, run_cli, submit, wait_status

pytestmark = pytest.mark.integration

#: what a presigned URL carries that must never leak
SECRETS = ("X-Amz-Signature", "X-Amz-Credential")
#: the key that authenticates the signer's replies: the signer and the workers get it from their env
SIGNER_KEY = "test-signer-key-" + "0123456789abcdef" * 2


def without_credentials(env: dict[str, str]) -> dict[str, str]:
    """A part worker's environment: no AWS keys, profiles or config files to find any in; the S3
    endpoint it may send to (it has no AWS_ENDPOINT_URL of its own) and the signer's key."""
    clean = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    return {**clean, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_EC2_METADATA_DISABLED": "true", "S3FERRY_PRESIGNED": "1", "S3FERRY_SIGNER_KEY": SIGNER_KEY,
            "S3FERRY_ENDPOINTS": env["AWS_ENDPOINT_URL"]}


def start_signer(workdir: Path, env: dict[str, str], *args: str) -> services.Server:
    server = services.Server(f"signer-{uuid.uuid4().hex[:4]}", [S3FERRY, "signer", "--concurrency=2", *args],
                             workdir, env={"S3FERRY_SIGNER_KEY": SIGNER_KEY, **env})
    server.ready = lambda: "ready." in server.output()  # type: ignore[method-assign]
    return server.start(timeout=60)


def test_an_upload_through_presigned_urls_that_expire_during_it_completes(  # type: ignore[no-untyped-def]
        proxy_and_env, tmp_path: Path, workdir: Path, db: Database, s3, bucket: str) -> None:
    proxy, env = proxy_and_env
    # ~1.2 s per 5 MiB part on this link: the 12 parts take far longer than a URL's 2 s, and
    # 30% of the URLs are refused as expired (as a URL that waited in a queue would be)
    proxy.configure(bytes_per_second=8 * MiB, expire_share=0.3)
    env = {**env, "S3FERRY_PRESIGN_EXPIRY_SECONDS": "2", "S3FERRY_WINDOW_INITIAL": "2"}
    source = tmp_path / "presigned.bin"
    sha256 = write_random(source, 12 * 5 * MiB - 123)
    signer = start_signer(workdir, env)
    worker = services.start_worker(workdir, without_credentials(env), f"nocreds-{uuid.uuid4().hex[:4]}",
                                   concurrency=3)
    small = tmp_path / "small.bin"
    small_sha256 = write_random(small, 1 * MiB + 7)  # one part: a presigned PutObject
    try:
        upload_id = submit(env, source, bucket)
        assert wait_status(db, upload_id, FINISHED, timeout=180) == UploadStatus.COMPLETE
        small_id = submit(env, small, bucket)
        assert wait_status(db, small_id, FINISHED, timeout=60) == UploadStatus.COMPLETE
        logs = worker.output() + signer.output()
    finally:
        worker.stop()
        signer.stop()
    assert sha256_of_object(s3, bucket, "presigned.bin") == sha256
    assert sha256_of_object(s3, bucket, "small.bin") == small_sha256
    assert proxy.counts.expired >= 2, proxy.counts  # re-signing happened
    assert "asking for a new one" in worker.output()
    assert signer.output().count("signer: signed part") >= 12 + proxy.counts.expired
    with db.transaction() as session:
        upload = session.get(Upload, upload_id)
        parts = session.scalars(sa.select(Part).where(Part.upload_id == upload_id)).all()
        texts = [str(value) for row in session.execute(sa.select(UploadEvent).where(UploadEvent.upload_id == upload_id))
                 .scalars() for value in vars(row).values()]
        assert upload is not None
        assert upload.retry_count == 0  # an expired URL is not a failure
        assert all(p.attempts == 1 for p in parts), [p.attempts for p in parts]
        texts += [str(value) for row in [upload, *parts] for value in vars(row).values()]
    for secret in SECRETS:
        assert secret not in logs
        assert not any(secret in text for text in texts)


@pytest.mark.slow
def test_a_presigned_worker_waits_for_a_signer_without_failing(  # type: ignore[no-untyped-def]
        proxy_and_env, tmp_path: Path, workdir: Path, db: Database, s3, bucket: str) -> None:
    proxy, env = proxy_and_env
    source = tmp_path / "later.bin"
    sha256 = write_random(source, 2 * 5 * MiB)
    worker = services.start_worker(workdir, without_credentials(env), f"nocreds-{uuid.uuid4().hex[:4]}",
                                   concurrency=2)
    try:
        upload_id = submit(env, source, bucket)
        services.wait_for(lambda: "no signer answered" in worker.output(), 60, "a signer timeout", worker.log)
        with db.transaction() as session:
            upload = session.get(Upload, upload_id)
            assert upload is not None and upload.status == UploadStatus.IN_PROGRESS and upload.retry_count == 0
        signer = start_signer(workdir, env)
        try:
            assert wait_status(db, upload_id, FINISHED, timeout=120) == UploadStatus.COMPLETE
        finally:
            signer.stop()
    finally:
        worker.stop()
    assert sha256_of_object(s3, bucket, "later.bin") == sha256


def test_presigned_mode_on_one_machine_is_a_clear_error(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "S3FERRY_HOME": str(tmp_path / "home"),
           "S3FERRY_PRESIGNED": "1"}
    run = run_cli(["ls"], env)
    assert run.returncode != 0 and "S3FERRY_PRESIGNED needs a fleet" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
