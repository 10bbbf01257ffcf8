"""What a crash costs: bytes re-sent, and seconds until parts land again.

Scenarios on one 512 MiB upload each (a bandwidth-capped proxy in front of moto so
the upload takes a while):
  kill-all:    SIGKILL every worker at about 50%, start them again (32 MiB parts,
               2 workers x concurrency 2, short leases);
  redis-flush: FLUSHALL Redis at about 50% (queued parts and chord counters gone);
  kill-one, kill-one-beat: three `s3ferry worker -c 2` (and `s3ferry beat`), 16 MiB
               parts, default settings; one worker's whole process group SIGKILLed
               while it holds a part in flight, and not restarted.
Reports bytes re-sent (from the proxy's byte count, minus the file size) beside
the bytes of the parts that were in flight at the crash; for kill-all and
redis-flush the seconds from the restart (or flush) to the next part landing; for
kill-one the seconds from the kill until every part the killed worker held has
landed again (median of --runs).

    python bench/recovery.py [--runs 5] [--scenarios kill-one,kill-one-beat]
    # writes bench/results/recovery.json (scenarios not run keep their last result)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
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


SCENARIOS = ("kill-all", "redis-flush", "kill-one", "kill-one-beat")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs of each kill-one scenario (median)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="s3ferry-recovery-"))
    source = work / "source.bin"
    write_random(source, SIZE)
    out = ROOT / "bench" / "results" / "recovery.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    for scenario in args.scenarios.split(","):
        if scenario.startswith("kill-one"):
            results[scenario] = kill_one_runs(work, source, with_beat=scenario.endswith("beat"), runs=args.runs)
        else:
            results[scenario] = run(work, source, scenario)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


@contextlib.contextmanager
def stack(work: Path, **settings: str) -> Iterator[tuple[dict[str, str], FlakyProxy, Database]]:
    """moto behind a 20 MiB/s proxy, a Redis, a fresh database and the bucket `bench`; yields the
    environment of s3ferry commands (with `settings`: S3FERRY_* names without the prefix), the
    proxy and the database. Everything is stopped at the end."""
    with contextlib.ExitStack() as stopping:  # whatever started is stopped, even if a later step fails
        moto, endpoint = services.start_moto(work)
        stopping.callback(moto.stop)
        redis_server, redis_url = services.start_redis(work)
        stopping.callback(redis_server.stop)
        upstream = urlparse(endpoint)
        proxy = FlakyProxy(upstream.hostname, upstream.port)
        stopping.callback(proxy.close)
        proxy.limit(20 * MiB)
        db_url = sa.make_url("postgresql+psycopg://postgres@127.0.0.1:5432/postgres").set(
            database=f"s3ferry_recovery_{uuid.uuid4().hex[:8]}").render_as_string(hide_password=False)
        migrate.upgrade(db_url)
        env = {"PATH": "/usr/bin:/bin", "AWS_ENDPOINT_URL": proxy.url, "AWS_ACCESS_KEY_ID": "b",
               "AWS_SECRET_ACCESS_KEY": "b", "AWS_REGION": "us-east-1", "S3FERRY_DATABASE_URL": db_url,
               "S3FERRY_BROKER_URL": f"{redis_url}/0", "S3FERRY_RESULT_BACKEND": f"{redis_url}/1",
               # what the workers may read and where they may send (a fleet refuses everything without)
               "S3FERRY_SOURCE_ROOTS": os.path.realpath(work), "S3FERRY_BUCKETS": "bench",
               **{f"S3FERRY_{name.upper()}": value for name, value in settings.items()}}
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="b",
                     aws_secret_access_key="b").create_bucket(Bucket="bench")
        db = Database(db_url)
        stopping.callback(db.dispose)
        yield env, proxy, db


def upload(env: dict[str, str], source: Path, *flags: str) -> uuid.UUID:
    out = subprocess.run([str(services.BIN / "s3ferry"), "upload", str(source), "s3://bench/big.bin", "--no-wait",
                          *flags], env=env, capture_output=True, text=True, check=True)
    return uuid.UUID(out.stdout.split()[0])


def beat(work: Path, env: dict[str, str], name: str) -> services.Server:
    return services.Server(name, [str(services.BIN / "s3ferry"), "beat", f"--schedule={work / (name + '.beat')}"],
                           work, env=env).start()


def run(work: Path, source: Path, scenario: str) -> dict[str, object]:
    short = {"lease_seconds": "6", "stall_seconds": "8", "reconcile_interval": "2", "retry_backoff_max": "2"}
    with stack(work, **short) as (env, proxy, db):
        workers = [services.start_worker(work, env, f"{scenario}-w{i}", concurrency=2) for i in range(2)]
        servers = [*workers, beat(work, env, f"{scenario}-beat")]
        try:
            upload_id = upload(env, source)
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
                redis.Redis.from_url(env["S3FERRY_BROKER_URL"]).flushall()
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
            for server in servers:
                server.stop()


def kill_one_runs(work: Path, source: Path, with_beat: bool, runs: int) -> dict[str, object]:
    each = [kill_one(work, source, with_beat, f"{'b' if with_beat else 'n'}{n}") for n in range(runs)]
    seconds = [r["seconds_until_its_parts_landed_again"] for r in each]
    return {"runs": each, "median_seconds_until_its_parts_landed_again": statistics.median(seconds),
            "median_bytes_resent": statistics.median(r["bytes_resent"] for r in each)}


def kill_one(work: Path, source: Path, with_beat: bool, tag: str) -> dict[str, object]:
    """Three workers, one SIGKILLed mid-part and not restarted; default settings."""
    part = 16 * MiB
    with stack(work) as (env, proxy, db):
        token = uuid.uuid4().hex[:8]
        doomed = services.start_worker(work, {**env, "S3FERRY_NODE_TOKEN": token}, f"kill-one-{tag}-doomed", 2)
        servers = [doomed] + [services.start_worker(work, env, f"kill-one-{tag}-w{i}", 2) for i in range(2)]
        if with_beat:
            servers.append(beat(work, env, f"kill-one-{tag}-beat"))
        prefix = f"{socket.gethostname()}:{token}:"
        try:
            upload_id = upload(env, source, "--part-size", "16MiB")
            held: list[int] = []
            while not held:
                held = claimed_by(db, upload_id, prefix)
                time.sleep(0.02)
            doomed.kill()
            killed = time.monotonic()
            while not all_done(db, upload_id, held):
                time.sleep(0.05)
            landed_again = time.monotonic() - killed
            while status(db, upload_id) not in ("complete", "failed"):
                time.sleep(0.2)
            return {"status": status(db, upload_id), "parts_it_held": len(held), "bytes_it_held": len(held) * part,
                    "seconds_until_its_parts_landed_again": round(landed_again, 2),
                    "bytes_resent": max(0, proxy.bytes_up - SIZE)}
        finally:
            for server in servers:
                server.stop()


def claimed_by(db: Database, upload_id: uuid.UUID, prefix: str) -> list[int]:
    with db.transaction() as session:
        return [p.part_number for p in queries.parts(session, upload_id)
                if p.status == "in_flight" and (p.worker or "").startswith(prefix)]


def all_done(db: Database, upload_id: uuid.UUID, numbers: list[int]) -> bool:
    with db.transaction() as session:
        return all(p.status == "done" for p in queries.parts(session, upload_id) if p.part_number in numbers)


def counts(db: Database, upload_id: uuid.UUID) -> queries.PartCounts:
    with db.transaction() as session:
        return queries.part_counts(session, upload_id)


def status(db: Database, upload_id: uuid.UUID) -> str:
    with db.transaction() as session:
        return str(queries.get_upload(session, upload_id).status)


if __name__ == "__main__":
    sys.exit(main())
