"""Wall time of one large upload: `s3ferry upload` (one worker, concurrency 4) vs boto3's upload_file.

Same file, same part size and concurrency, same moto server (restarted before
every run, because it slows down as it fills), the tools alternating.

    python bench/upload_vs_boto3.py --size 1GiB --runs 3

Needs PostgreSQL and Redis (S3FERRY_BENCH_POSTGRES_URL / S3FERRY_BENCH_REDIS_URL,
default the local ones). Writes bench/results/upload_vs_boto3.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import boto3.s3.transfer
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import migrate  # noqa: E402
from models.settings import MiB, parse_size  # noqa: E402
from tests import services  # noqa: E402

BUCKET = "bench"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--part-size", default="32MiB")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "upload_vs_boto3.json"))
    args = parser.parse_args()
    size, part_size = parse_size(args.size), parse_size(args.part_size)

    work = Path(tempfile.mkdtemp(prefix="s3ferry-bench-"))
    source = work / "source.bin"
    sha256 = write_random(source, size)
    port = services.free_port()
    endpoint = f"http://127.0.0.1:{port}"
    pg = os.environ.get("S3FERRY_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    redis_url = os.environ.get("S3FERRY_BENCH_REDIS_URL", "redis://127.0.0.1:6379")
    db_url = sa.make_url(pg).set(database="s3ferry_bench").render_as_string(hide_password=False)
    migrate.upgrade(db_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3FERRY_"))}
    env.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_REGION": "us-east-1", "S3FERRY_DATABASE_URL": db_url,
                "S3FERRY_BROKER_URL": f"{redis_url}/9", "S3FERRY_RESULT_BACKEND": f"{redis_url}/10"})
    worker = services.start_worker(work, env, "bench-worker", concurrency=args.concurrency)
    results: dict[str, list[float]] = {"s3ferry": [], "boto3": []}
    completes: dict[str, list[float]] = {"s3ferry": [], "boto3": []}
    checks: list[str] = []
    try:
        for run in range(args.runs):
            for tool in (("s3ferry", "boto3") if run % 2 == 0 else ("boto3", "s3ferry")):
                moto = services.Server("moto", [str(services.BIN / "moto_server"), "-H", "127.0.0.1", "-p",
                                                str(port)], work, ready=lambda: services.listening("127.0.0.1", port))
                moto.start()
                try:
                    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                          aws_access_key_id="bench", aws_secret_access_key="bench")
                    client.create_bucket(Bucket=BUCKET)
                    key = f"{tool}-{run}.bin"
                    if tool == "s3ferry":
                        seconds = run_s3ferry(source, key, part_size, env)
                        completing = s3ferry_completion_seconds(db_url, key)
                    else:
                        seconds, completing = run_boto3(client, source, key, part_size, args.concurrency)
                    completes[tool].append(completing)
                    head = client.head_object(Bucket=BUCKET, Key=key)
                    assert head["ContentLength"] == size, (tool, head["ContentLength"])
                    if run == 0:
                        got = sha256_of_object(client, key)
                        checks.append(f"{tool}: SHA-256 {'matches' if got == sha256 else 'DIFFERS'}")
                        assert got == sha256, tool
                finally:
                    moto.stop()
                results[tool].append(seconds)
                print(f"run {run + 1} {tool:8s} {seconds:6.2f} s  {size / seconds / 1e6:6.1f} MB/s  "
                      f"(CompleteMultipartUpload {completing:5.2f} s)", flush=True)
    finally:
        worker.stop()
    summary = {tool: {"runs_s": times, "median_s": statistics.median(times),
                      "median_MBps": size / statistics.median(times) / 1e6,
                      "complete_s": completes[tool], "median_without_complete_s": statistics.median(
                          t - c for t, c in zip(times, completes[tool], strict=True))}
               for tool, times in results.items()}
    summary["ratio_s3ferry_to_boto3_throughput"] = summary["boto3"]["median_s"] / summary["s3ferry"]["median_s"]
    summary["params"] = {"size": size, "part_size": part_size, "concurrency": args.concurrency, "runs": args.runs}
    summary["checks"] = checks
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    source.unlink()
    return 0


def run_s3ferry(source: Path, key: str, part_size: int, env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([str(services.BIN / "s3ferry"), "upload", str(source), f"s3://{BUCKET}/{key}",
                           "--part-size", str(part_size)], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"s3ferry failed: {done.stderr}")
    return seconds


def run_boto3(client, source: Path, key: str, part_size: int, concurrency: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Wall time of upload_file, and of its CompleteMultipartUpload call (moto's share)."""
    config = boto3.s3.transfer.TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size,
                                              max_concurrency=concurrency)
    marks: dict[str, float] = {}
    client.meta.events.register("before-call.s3.CompleteMultipartUpload",
                                lambda **_: marks.__setitem__("start", time.perf_counter()))
    client.meta.events.register("after-call.s3.CompleteMultipartUpload",
                                lambda **_: marks.__setitem__("end", time.perf_counter()))
    start = time.perf_counter()
    client.upload_file(str(source), BUCKET, key, Config=config)
    return time.perf_counter() - start, marks["end"] - marks["start"]


def s3ferry_completion_seconds(db_url: str, key: str) -> float:
    """From the last part landing to the upload marked complete (CompleteMultipartUpload + HeadObject)."""
    engine = sa.create_engine(db_url)
    with engine.connect() as connection:
        seconds = connection.execute(sa.text(
            "SELECT extract(epoch FROM u.finished_at - max(p.finished_at)) FROM uploads u "
            "JOIN parts p ON p.upload_id = u.id WHERE u.key = :key GROUP BY u.id ORDER BY u.created_at DESC LIMIT 1"),
            {"key": key}).scalar_one()
    engine.dispose()
    return float(seconds)


def write_random(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for offset in range(0, size, 8 * MiB):
            chunk = os.urandom(min(8 * MiB, size - offset))
            out.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of_object(client, key: str) -> str:  # type: ignore[no-untyped-def]
    digest = hashlib.sha256()
    for chunk in client.get_object(Bucket=BUCKET, Key=key)["Body"].iter_chunks(8 * MiB):
        digest.update(chunk)
    return digest.hexdigest()


if __name__ == "__main__":
    sys.exit(main())
