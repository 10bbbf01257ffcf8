"""What a crash costs: bytes re-sent, and seconds until parts land again.

Two scenarios on one 512 MiB upload each (32 MiB parts, 2 workers x concurrency 2,
a bandwidth-capped proxy in front of moto so the upload takes a while):
  kill-all:    SIGKILL every worker at about 50%, start them again;
  redis-flush: FLUSHALL Redis at about 50% (queued parts and chord counters gone).
Reports bytes re-sent (from the proxy's byte count, minus the file size) beside
the bytes of the parts that were in flight at the crash, and the seconds from the
restart (or flush) to the next part landing.

    python bench/recovery.py            # writes bench/results/recovery.json
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import boto3
import redis
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import migrate, queries  # noqa: E402
from models.db import Database  # noqa: E402
from models.settings import MiB  # noqa: E402
from tests import services  # noqa: E402
from tests.conftest import write_random  # noqa: E402
from tests.faults import FlakyProxy  # noqa: E402

SIZE, PART = 512 * MiB, 32 * MiB


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="s3ferry-recovery-"))
    source = work / "source.bin"
    write_random(source, SIZE)
    results = {scenario: run(work, source, scenario) for scenario in ("kill-all", "redis-flush")}
    out = ROOT / "bench" / "results" / "recovery.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


def run(work: Path, source: Path, scenario: str) -> dict[str, object]:
    moto, endpoint = services.start_moto(work)
    redis_server, redis_url = services.start_redis(work)
    upstream = urlparse(endpoint)
    proxy = FlakyProxy(upstream.hostname, upstream.port)
    proxy.limit(20 * MiB)
    db_url = sa.make_url("postgresql+psycopg://postgres@127.0.0.1:5432/postgres").set(
        database=f"s3ferry_recovery_{uuid.uuid4().hex[:8]}").render_as_string(hide_password=False)
    migrate.upgrade(db_url)
    env = {"PATH": "/usr/bin:/bin", "AWS_ENDPOINT_URL": proxy.url, "AWS_ACCESS_KEY_ID": "b",
           "AWS_SECRET_ACCESS_KEY": "b", "AWS_REGION": "us-east-1", "S3FERRY_DATABASE_URL": db_url,
           "S3FERRY_BROKER_URL": f"{redis_url}/0", "S3FERRY_RESULT_BACKEND": f"{redis_url}/1",
           "S3FERRY_LEASE_SECONDS": "6", "S3FERRY_STALL_SECONDS": "8", "S3FERRY_RECONCILE_INTERVAL": "2",
           "S3FERRY_RETRY_BACKOFF_MAX": "2"}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="b",
                 aws_secret_access_key="b").create_bucket(Bucket="bench")
    workers = [services.start_worker(work, env, f"{scenario}-w{i}", concurrency=2) for i in range(2)]
    beat = services.Server(f"{scenario}-beat", [str(services.BIN / "s3ferry"), "beat",
                                                f"--schedule={work / (scenario + '.beat')}"], work, env=env).start()
    db = Database(db_url)
    try:
        import subprocess

        out = subprocess.run([str(services.BIN / "s3ferry"), "upload", str(source), "s3://bench/big.bin",
                              "--no-wait"], env=env, capture_output=True, text=True, check=True)
        upload_id = uuid.UUID(out.stdout.split()[0])
        while counts(db, upload_id).done < 16 // 2:
            time.sleep(0.05)
        in_flight = counts(db, upload_id).in_flight
        done_at_crash = counts(db, upload_id).done
        if scenario == "kill-all":
            for worker in workers:
                worker.kill()
            restarted = time.monotonic()
            for worker in workers:
                worker.start(timeout=60)
        else:
            redis.Redis.from_url(f"{redis_url}/0").flushall()
            restarted = time.monotonic()
        while counts(db, upload_id).done <= done_at_crash:
            time.sleep(0.05)
        to_next_part = time.monotonic() - restarted
        while status(db, upload_id) not in ("complete", "failed"):
            time.sleep(0.2)
        return {"status": status(db, upload_id), "parts_in_flight_at_crash": in_flight,
                "bytes_in_flight_at_crash": in_flight * PART,
                "bytes_resent": max(0, proxy.bytes_up - SIZE),
                "seconds_from_restart_to_next_part": round(to_next_part, 2)}
    finally:
        for server in (*workers, beat):
            server.stop()
        db.dispose()
        proxy.close()
        redis_server.stop()
        moto.stop()


def counts(db: Database, upload_id: uuid.UUID) -> queries.PartCounts:
    with db.transaction() as session:
        return queries.part_counts(session, upload_id)


def status(db: Database, upload_id: uuid.UUID) -> str:
    with db.transaction() as session:
        return str(queries.get_upload(session, upload_id).status)


if __name__ == "__main__":
    sys.exit(main())
