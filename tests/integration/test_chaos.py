"""Chaos: killed workers, an emptied Redis and a restarted Postgres never cost a finished part.

Three `s3ferry worker` processes and `s3ferry beat` upload a 512 MiB file in
32 MiB parts through a bandwidth-capped proxy to moto's S3 server, against a
Redis and a Postgres this test starts itself on free ports. Meanwhile it
SIGKILLs a random worker (and restarts it) at random moments, at least five
times; kills Redis and starts it again empty; restarts Postgres once; and makes
the S3 endpoint unreachable for a while.
The upload must complete by itself, the object must have the file's SHA-256,
and parts may only be sent again when a kill or an outage interrupted them.

Run it alone with:  pytest -m chaos -s
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import sqlalchemy as sa

from models import migrate, queries
from models.db import Database
from models.states import PartStatus, UploadStatus
from tests import services
from tests.conftest import sha256_of_object, write_random
from tests.faults import FlakyProxy
from tests.integration.helpers import MiB, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.slow]

SIZE = 512 * MiB
PARTS = 16
WORKERS = 3
CONCURRENCY = 2


def test_an_upload_survives_killed_workers_redis_loss_and_a_postgres_restart(  # type: ignore[no-untyped-def]
        tmp_path: Path, workdir: Path, s3, s3_endpoint: str, bucket: str, service_env: dict[str, str]) -> None:
    seed = int(os.environ.get("S3FERRY_CHAOS_SEED", time.time()))
    chaos = random.Random(seed)
    print(f"chaos seed {seed} (S3FERRY_CHAOS_SEED={seed} replays it)")
    work = tmp_path / "chaos"
    work.mkdir()
    (work / "pg").mkdir()
    postgres = redis_server = proxy = beat = db = None  # stopped in `finally` as far as they got
    workers: list[services.Server] = []
    try:
        postgres, postgres_url = services.start_postgres(work / "pg")  # (a folder in /tmp when run as root)
        redis_server, redis_url = services.start_redis(work)
        upstream = urlparse(s3_endpoint)
        proxy = FlakyProxy(upstream.hostname, upstream.port)
        proxy.limit(10 * 1024 * 1024)  # ~50 s for the file: time for the chaos to happen
        database_url = sa.make_url(postgres_url).set(database="s3ferry").render_as_string(hide_password=False)
        migrate.upgrade(database_url)
        env = {**service_env, "AWS_ENDPOINT_URL": proxy.url, "S3FERRY_DATABASE_URL": database_url,
               "S3FERRY_BROKER_URL": f"{redis_url}/0", "S3FERRY_RESULT_BACKEND": f"{redis_url}/1",
               "S3FERRY_QUEUE": "chaos", "S3FERRY_LEASE_SECONDS": "6", "S3FERRY_STALL_SECONDS": "8",
               "S3FERRY_RECONCILE_INTERVAL": "3"}
        source = work / "big.bin"
        sha256 = write_random(source, SIZE)
        for i in range(WORKERS):
            workers.append(services.start_worker(work, env, f"chaos{i}", concurrency=CONCURRENCY))
        beat = services.Server("beat", [str(services.BIN / "s3ferry"), "beat", f"--schedule={work / 'beat.db'}"],
                               work, env=env).start()
        db = Database(database_url)
        kills = 0
        run = run_cli(["upload", str(source), f"s3://{bucket}/chaos.bin", "--no-wait"], env)
        assert run.returncode == 0, run.stderr
        upload_id = run.stdout.strip().splitlines()[0]
        events = ["redis", "postgres", "s3"] + ["kill"] * 6
        chaos.shuffle(events)
        for event in events:
            time.sleep(chaos.uniform(1.5, 3.5))
            if _status(db, upload_id) == UploadStatus.COMPLETE:
                break
            if event == "kill":
                victim = chaos.choice(workers)
                print(f"SIGKILL {victim.name}")
                victim.kill()
                kills += 1
                time.sleep(chaos.uniform(0.5, 2.0))
                victim.start(timeout=60)
            elif event == "s3":
                print("S3 unreachable for 8 s")
                proxy.down()
                time.sleep(8.0)
                proxy.up()
            elif event == "redis":
                print("Redis killed; restarting it empty")
                redis_server.kill()
                time.sleep(1.0)
                redis_server.start()
            else:
                print("Postgres restarting")
                postgres.signal(signal.SIGINT)  # fast shutdown: connections are cut
                assert postgres.process is not None
                postgres.process.wait(30)
                time.sleep(1.0)
                postgres.start()
        assert kills >= 5, f"the upload finished after {kills} kills: slow the proxy down"
        deadline = time.monotonic() + 300
        while _status(db, upload_id) not in (UploadStatus.COMPLETE, UploadStatus.FAILED):
            assert time.monotonic() < deadline, "the upload did not finish within 5 minutes of the chaos"
            time.sleep(1)
        with db.transaction() as session:
            upload = queries.get_upload(session, sa_uuid(upload_id))
            parts = queries.parts(session, sa_uuid(upload_id))
        assert upload.status == UploadStatus.COMPLETE, upload.last_error
    finally:
        for server in (*workers, *([beat] if beat else [])):
            server.stop()
        if proxy:
            proxy.close()
        if db:
            db.dispose()
        if redis_server:
            redis_server.stop()
        if postgres:
            postgres.signal(signal.SIGINT)
            if postgres.process:
                postgres.process.wait(30)
            if postgres.workdir.name.startswith("s3ferry-pg-"):
                shutil.rmtree(postgres.workdir, ignore_errors=True)

    assert sha256_of_object(s3, bucket, "chaos.bin") == sha256
    assert len(parts) == PARTS and all(p.status == PartStatus.DONE for p in parts)
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")  # nothing left behind
    print(f"bytes sent / file size: {proxy.bytes_up / SIZE:.3f} (requests and headers included)")
    sends = _part_sends((workdir / "moto.log").read_text(errors="replace"), upload.s3_upload_id)
    assert sorted(sends) == list(range(1, PARTS + 1))
    resent = sum(sends.values()) - PARTS
    print(f"{kills} worker kills; {sum(p.attempts for p in parts)} claims of {PARTS} parts; "
          f"{upload.retry_count} counted retries; {resent} part(s) landed twice")
    # Only interrupted sends are repeated: at most the parts in flight in a killed worker,
    # and those interrupted by the Postgres restart (one per worker process).
    assert resent <= kills * CONCURRENCY + WORKERS * CONCURRENCY


def sa_uuid(text: str):  # type: ignore[no-untyped-def]
    import uuid

    return uuid.UUID(text)


def _status(db: Database, upload_id: str) -> str | None:
    try:
        with db.transaction() as session:
            return str(queries.get_upload(session, sa_uuid(upload_id)).status)
    except Exception:  # noqa: BLE001 - Postgres may be restarting right now
        return None


def _part_sends(log: str, s3_upload_id: str) -> dict[int, int]:
    sends: dict[int, int] = {}
    for match in re.finditer(r'"PUT [^"]*\?([^" ]*) HTTP/1\.1" 200', log):
        query = match.group(1)
        if f"uploadId={s3_upload_id}" not in query:
            continue
        number = int(re.search(r"partNumber=(\d+)", query).group(1))  # type: ignore[union-attr]
        sends[number] = sends.get(number, 0) + 1
    return sends
