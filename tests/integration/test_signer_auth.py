"""Presigned mode's trust boundary with real components: a process with only Redis access that
answers the sign requests is refused, the signer signs only for its own allowed destinations,
and neither the signer nor a presigned worker starts without S3FERRY_SIGNER_KEY."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from models.db import Database
from models.states import UploadStatus
from models.tables import Part, Upload
from tests import services
from tests.conftest import sha256_of_object, write_random
from tests.integration import forger
from tests.integration.helpers import (
    FINISHED,
    S3FERRY,
    MiB,
    crc32c_b64,
    run_cli,
    submit,
    wait_status,
)
from tests.integration.test_presigned import (
    SIGNER_KEY,
    start_signer,
    without_credentials,
)
from workers import signer as signing

pytestmark = pytest.mark.integration

#: what no log may hold, even at DEBUG: a signature, the test credentials' key id, a session token
LEAKS = (re.compile(r"Signature=[0-9a-f]{16}"), re.compile(r"Credential=testing"),
         re.compile(r"X-Amz-(Signature|Credential|Security-Token)=(?!<hidden>)[^\s&'\"<]"))


@contextlib.contextmanager
def listener() -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server that accepts anything (200 with an ETag) and records each request line."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            seen.append(f"{self.command} {self.path}")
            self.send_response(200)
            self.send_header("ETag", '"forged"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def capture_genuine_replies(client: redis.Redis, queue: str, upload_id: uuid.UUID, source: Path,
                            part_size: int, parts: int) -> list[dict[str, object]]:
    """Ask the real signer for each part's URL with requests of our own (we hold the key): what a
    process that reads Redis could capture, to replay later."""
    captured = []
    for number in range(1, parts + 1):
        size = min(part_size, source.stat().st_size - (number - 1) * part_size)
        message: dict[str, object] = {"id": uuid.uuid4().hex, "upload_id": str(upload_id), "part": number,
                                      "checksum": crc32c_b64(source, (number - 1) * part_size, size),
                                      "deadline": int(client.time()[0]) + 30}
        message["mac"] = signing.request_mac(SIGNER_KEY, queue, message)
        client.rpush(signing.REQUESTS.format(queue), json.dumps(message))
        popped = client.blpop([signing.REPLY.format(message["id"])], timeout=30)
        assert popped is not None, "the signer did not answer"
        assert "url" in json.loads(popped[1]), popped[1]
        captured.append({"part": number, "reply": popped[1].decode()})
    return captured


def start_worker(workdir: Path, env: dict[str, str], loglevel: str = "INFO") -> services.Server:
    name = f"nocreds-{uuid.uuid4().hex[:4]}"
    server = services.Server(name, [S3FERRY, "worker", "--concurrency=2", f"--hostname={name}@%h",
                                    f"--loglevel={loglevel}"], workdir, env=without_credentials(env))
    server.ready = lambda: "ready." in server.output()  # type: ignore[method-assign]
    return server.start(timeout=60)


@pytest.mark.slow
def test_forged_and_replayed_signer_replies_are_refused_uncounted(  # type: ignore[no-untyped-def]
        proxy_and_env, redis_urls: tuple[str, str], tmp_path: Path, workdir: Path, db: Database, s3,
        bucket: str) -> None:
    _, env = proxy_and_env
    env = {**env, "S3FERRY_WINDOW_INITIAL": "2"}  # both parts ask at once
    queue = env["S3FERRY_QUEUE"]
    source = tmp_path / "forged.bin"
    sha256 = write_random(source, 2 * 5 * MiB - 123)
    client = redis.Redis.from_url(redis_urls[1], socket_timeout=60)
    processes: list[services.Server] = []
    stolen: subprocess.Popen[str] | None = None
    try:
        with listener() as (forged_url, received):
            # The real signer signs a URL for each part for us, as it would for any request.
            genuine = start_signer(workdir, env)
            processes.append(genuine)
            upload_id = submit(env, source, bucket)  # no worker yet: the parts wait in the queue
            wait_status(db, upload_id, [UploadStatus.IN_PROGRESS], timeout=30)
            captured = tmp_path / "captured.json"
            captured.write_text(json.dumps(capture_genuine_replies(client, queue, upload_id, source, 5 * MiB, 2)))
            genuine.stop()

            # Now only the forger answers: it takes the worker's requests off the list.
            stolen = subprocess.Popen([sys.executable, "-m", "tests.integration.forger", redis_urls[1], queue,
                                       forged_url, str(captured), *forger.RECIPES], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).parents[2])
            worker = start_worker(workdir, env, loglevel="DEBUG")
            processes.append(worker)
            out, _ = stolen.communicate(timeout=90)  # it exits after one answer per recipe
            assert stolen.returncode == 0, out
            answered = [json.loads(line) for line in out.splitlines()]
            assert [a["recipe"] for a in answered] == list(forger.RECIPES)
            services.wait_for(lambda: worker.output().count("refused a reply to the signing request") == len(answered),
                              30, "the worker's refusals", worker.log)

            signer = start_signer(workdir, env, "--loglevel=DEBUG")  # the real one, back
            processes.append(signer)
            assert wait_status(db, upload_id, FINISHED, timeout=120) == UploadStatus.COMPLETE
            assert received == []  # not a byte went to the forged URLs
            logs = worker.output() + genuine.output() + signer.output()
    finally:
        if stolen is not None and stolen.poll() is None:
            stolen.kill()
            stolen.wait(10)
        for process in processes:
            process.stop()
        client.close()

    assert sha256_of_object(s3, bucket, "forged.bin") == sha256
    with db.transaction() as session:
        upload = session.get(Upload, upload_id)
        parts = session.scalars(sa.select(Part).where(Part.upload_id == upload_id)).all()
        assert upload is not None and upload.retry_count == 0, upload.last_error
        assert [p.attempts for p in parts] == [1, 1]  # a forged reply is not a try
    refusals = [line for line in logs.splitlines() if "refused a reply to the signing request" in line]
    for reason in ("it has no MAC", "its MAC does not verify", "it is not JSON"):
        assert any(reason in line for line in refusals), refusals
    assert any("/forged/" in line and "?<query hidden>" in line for line in refusals), refusals
    assert forger.FORGED_SECRET not in logs
    assert "forged refusal" not in logs  # never believed, so never shown as the signer's
    for leak in LEAKS:
        assert not leak.search(logs), leak.search(logs)


def test_the_signer_signs_only_for_its_own_allowed_buckets(  # type: ignore[no-untyped-def]
        proxy_and_env, tmp_path: Path, workdir: Path, db: Database, s3, bucket: str) -> None:
    _, env = proxy_and_env
    source = tmp_path / "elsewhere.bin"
    write_random(source, 1 * MiB + 1)
    processes: list[services.Server] = []
    try:
        # the row names a bucket the submitting CLI and the worker allow (test-*), the signer does not
        processes.append(start_signer(workdir, {**env, "S3FERRY_BUCKETS": "test-other-*"}))
        processes.append(start_worker(workdir, env))
        upload_id = submit(env, source, bucket)
        assert wait_status(db, upload_id, FINISHED, timeout=60) == UploadStatus.FAILED
        signer_log = processes[0].output()
    finally:
        for process in processes:
            process.stop()
    with db.transaction() as session:
        upload = session.get(Upload, upload_id)
        assert upload is not None
        assert "the signer refused part 1" in str(upload.last_error) and "S3FERRY_BUCKETS" in str(upload.last_error)
    assert "signer: refused part 1" in signer_log and "signer: signed part" not in signer_log
    assert not s3.list_objects_v2(Bucket=bucket).get("Contents")


@pytest.mark.parametrize(("command", "extra"), [
    (["signer"], {}),
    (["worker"], {"S3FERRY_PRESIGNED": "1"}),
])
def test_the_signer_and_presigned_workers_need_the_signer_key(service_env: dict[str, str], command: list[str],
                                                              extra: dict[str, str]) -> None:
    env = {k: v for k, v in service_env.items() if k != "S3FERRY_SIGNER_KEY"}
    run = run_cli(command, {**env, **extra}, timeout=60)
    assert run.returncode == 2, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "S3FERRY_SIGNER_KEY" in run.stderr, run.stderr
    short = run_cli(command, {**env, **extra, "S3FERRY_SIGNER_KEY": "too-short"}, timeout=60)
    assert short.returncode == 2 and "at least 32 characters" in short.stderr, short.stderr
