"""Orchestration overhead and scale, against the discard endpoint (bench/discard_s3.py).

overhead: 1,000 parts of 5 MiB through `s3ferry upload` (one worker process, threads,
          concurrency 4), in parts per second, beside a no-op Celery chord of 1,000 tasks
          on the same broker, with the same kind of worker, in the same run.
scale:    one upload of 10,000 parts of 5 MiB (a sparse 48.8 GiB file) planned, recorded,
          dispatched and completed; the times of each phase, from the database.

    python bench/scale.py [--parts 1000] [--scale-parts 10000] [--skip scale]

Needs PostgreSQL and Redis (S3FERRY_BENCH_POSTGRES_URL / S3FERRY_BENCH_REDIS_URL).
Writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.peers import RESULTS, Discard, bench_env, start  # noqa: E402
from models.settings import MiB  # noqa: E402
from tests import services  # noqa: E402

NOOP_APP = """
import os, sys
from celery import Celery, chord
app = Celery("noop", broker=os.environ["NOOP_BROKER"], backend=os.environ["NOOP_BACKEND"])
app.conf.update(task_acks_late=True, worker_prefetch_multiplier=1, task_default_queue="noop-bench")

@app.task(name="noop")
def noop(n):
    return n

@app.task(name="done")
def done(results):
    import redis
    redis.Redis.from_url(os.environ["NOOP_BACKEND"]).set("noop-bench-done", len(results))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, default=1000)
    parser.add_argument("--scale-parts", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--skip", default="")
    parser.add_argument("--out", default=str(RESULTS / "scale.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="s3ferry-bench-"))
    port = services.free_port()
    env = bench_env(f"http://127.0.0.1:{port}")
    result: dict[str, object] = {"params": {"part_size": 5 * MiB, "concurrency": args.concurrency,
                                            "server": "bench/discard_s3.py (accepts and discards, computing MD5)",
                                            "cpus": os.cpu_count()}}
    try:
        with Discard(work, port):
            if "overhead" not in args.skip:
                s3ferry = upload(work, env, args.parts, args.concurrency, "overhead")
                noop = noop_chord(work, env, args.parts, args.concurrency)
                result["overhead"] = {"parts": args.parts, "s3ferry": s3ferry, "noop_chord": noop,
                                      "ratio_end_to_end": s3ferry["parts_per_s"] / noop["parts_per_s"],
                                      "ratio_part_phase": s3ferry["part_phase_parts_per_s"] / noop["parts_per_s"]}
                print(json.dumps(result["overhead"], indent=2), flush=True)
            if "scale" not in args.skip:
                result["scale"] = upload(work, env, args.scale_parts, args.concurrency, "scale")
                print(json.dumps(result["scale"], indent=2), flush=True)
    finally:
        for leftover in work.glob("*.bin"):
            leftover.unlink()
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def upload(work: Path, env: dict[str, str], parts: int, concurrency: int, name: str) -> dict[str, float]:
    """`s3ferry upload` of a sparse file of `parts` 5 MiB parts; wall time and phases."""
    source = work / f"{name}.bin"
    with open(source, "wb") as out:
        out.truncate(parts * 5 * MiB)
    worker = start(work, env, [str(services.BIN / "s3ferry"), "worker", "--pool=threads",
                               f"--concurrency={concurrency}", "--loglevel=INFO"], "worker")
    key = f"{name}-{uuid.uuid4().hex[:8]}"
    try:
        started = time.perf_counter()
        done = subprocess.run([str(services.BIN / "s3ferry"), "upload", str(source), f"s3://bench/{key}",
                               "--part-size", "5MiB"], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
    finally:
        stop(worker)
    engine = sa.create_engine(env["S3FERRY_DATABASE_URL"])
    with engine.connect() as connection:
        row = connection.execute(sa.text(
            "SELECT u.created_at, u.dispatched_at, min(p.started_at), max(p.finished_at), u.finished_at, "
            "count(*) FILTER (WHERE p.status = 'done') FROM uploads u JOIN parts p ON p.upload_id = u.id "
            "WHERE u.key = :key GROUP BY u.id"), {"key": key}).one()
    engine.dispose()
    created, dispatched, first, last, finished, done_parts = row
    assert done_parts == parts, (done_parts, parts)
    part_phase = (last - first).total_seconds()
    return {"parts": parts, "wall_s": seconds, "parts_per_s": parts / seconds,
            "record_s": (dispatched - created).total_seconds(),
            "dispatch_to_first_part_s": (first - dispatched).total_seconds(),
            "part_phase_s": part_phase, "part_phase_parts_per_s": parts / part_phase,
            "completion_s": (finished - last).total_seconds(),
            "MBps_part_phase": parts * 5 * MiB / part_phase / 1e6}


def noop_chord(work: Path, env: dict[str, str], parts: int, concurrency: int,
               dbs: tuple[int, int] = (11, 12)) -> dict[str, float]:
    """A chord of `parts` no-op tasks and a callback, on the same Redis (broker and backend in
    `dbs`, emptied afterwards), timed from dispatch to callback."""
    (work / "noop_app.py").write_text(NOOP_APP)
    redis_base = env["S3FERRY_BROKER_URL"].rsplit("/", 1)[0]
    noop_env = dict(env, NOOP_BROKER=f"{redis_base}/{dbs[0]}", NOOP_BACKEND=f"{redis_base}/{dbs[1]}",
                    PYTHONPATH=str(work))
    client = redis.Redis.from_url(noop_env["NOOP_BACKEND"])
    client.delete("noop-bench-done")
    worker = start(work, noop_env, [sys.executable, "-m", "celery", "-A", "noop_app", "worker", "--pool=threads",
                                    f"--concurrency={concurrency}", "-Q", "noop-bench", "--loglevel=INFO"],
                   "noop-worker")
    try:
        script = ("import sys, time; from celery import chord; import noop_app as a; "
                  f"t = time.perf_counter(); chord([a.noop.si(i) for i in range({parts})])(a.done.s()); "
                  "print(time.perf_counter() - t)")
        started = time.perf_counter()
        sent = subprocess.run([sys.executable, "-c", script], env=noop_env, capture_output=True, text=True,
                              check=True)
        services.wait_for(lambda: client.get("noop-bench-done") is not None, 600, "the no-op chord")
        seconds = time.perf_counter() - started
    finally:
        stop(worker)
        client.flushdb()
        redis.Redis.from_url(noop_env["NOOP_BROKER"]).flushdb()
    return {"parts": parts, "wall_s": seconds, "publish_s": float(sent.stdout.strip()),
            "parts_per_s": parts / seconds}


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


if __name__ == "__main__":
    sys.exit(main())
