"""Throughput and memory against the tools users would pick instead.

Throughput: the same random file (1 GiB by default) to moto's S3 server, restarted before
every run (it slows as it fills), uploaded by s3ferry (one worker process: `s3ferry worker
--pool threads --concurrency 4`, Postgres + Redis), boto3's `upload_file`, `aws s3 cp`
and rclone, all with 32 MiB parts and 4 at a time, alternating tools, --runs each. For
each: median MB/s and its ratio to boto3, client CPU seconds per GiB (every s3ferry
process counted: the command and the worker), peak RSS (s3ferry: the worker's), S3
requests per GiB (from moto's request log). Every object's size is checked, and the
first run's SHA-256.

Memory: the client's peak RSS with 4 parts in flight at 32, 64 and 128 MiB parts,
against the discard endpoint (bench/discard_s3.py), for s3ferry's worker, boto3 and
rclone.

    python bench/peers.py --size 1GiB --runs 3

Needs PostgreSQL and Redis (S3FERRY_BENCH_POSTGRES_URL / S3FERRY_BENCH_REDIS_URL, default
the local ones); the AWS CLI is installed into bench/.tools on first use; rclone from the
system (Debian: apt-get install rclone), skipped with a note when missing. Writes
bench/results/peers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import boto3
import psutil
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import migrate  # noqa: E402
from models.settings import GiB, MiB, parse_size  # noqa: E402
from orchestrator.demo import sha256_of_object, write_random  # noqa: E402
from tests import services  # noqa: E402

BUCKET = "bench"
TOOLS_DIR = ROOT / "bench" / ".tools"
RESULTS = ROOT / "bench" / "results"
REQUEST_LINE = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) ')

BOTO3_SCRIPT = """
import sys, boto3, boto3.s3.transfer as t
part, concurrency = int(sys.argv[3]), int(sys.argv[4])
boto3.client("s3").upload_file(sys.argv[1], "bench", sys.argv[2], Config=t.TransferConfig(
    multipart_threshold=part, multipart_chunksize=part, max_concurrency=concurrency))
"""


class Measured:
    """One tool run: wall seconds, client CPU seconds, peak RSS bytes."""

    def __init__(self, seconds: float, cpu: float, rss: int, split: dict[str, float] | None = None) -> None:
        self.seconds, self.cpu, self.rss, self.split = seconds, cpu, rss, split or {}


def timed(argv: list[str], env: dict[str, str]) -> Measured:
    """Run a command; its wall time and, from wait4, its CPU and peak RSS."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({process.returncode}): {process.stderr.read().decode()[-2000:]}")
    return Measured(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024)


class S3ferry:
    """A fresh worker per run (started before the clock), then `s3ferry upload`."""

    def __init__(self, work: Path, env: dict[str, str], concurrency: int) -> None:
        self.work, self.env, self.concurrency = work, env, concurrency

    def __call__(self, source: Path, key: str, part_size: int) -> Measured:
        worker = start(self.work, self.env, [str(services.BIN / "s3ferry"), "worker", "--pool=threads",
                                             f"--concurrency={self.concurrency}", "--loglevel=INFO"], "worker")
        cpu_at_ready = sum(psutil.Process(worker.pid).cpu_times()[:2])
        command = timed([str(services.BIN / "s3ferry"), "upload", str(source), f"s3://{BUCKET}/{key}",
                         "--part-size", str(part_size)], self.env)
        worker.send_signal(signal.SIGTERM)
        _, _, usage = os.wait4(worker.pid, 0)
        worker.returncode = 0
        worker_cpu = usage.ru_utime + usage.ru_stime - cpu_at_ready
        return Measured(command.seconds, command.cpu + worker_cpu, usage.ru_maxrss * 1024,
                        {"command_cpu_s": command.cpu, "worker_cpu_s": worker_cpu})


def start(work: Path, env: dict[str, str], argv: list[str], name: str) -> subprocess.Popen[bytes]:
    """A Celery worker (or any process that logs "ready."), its log in work/NAME.log; once ready."""
    path = work / f"{name}.log"
    log = open(path, "wb")
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=log, cwd=work)
    services.wait_for(lambda: "ready." in path.read_text(errors="replace"), 60, name, path)
    return process


def boto3_tool(env: dict[str, str], concurrency: int) -> Callable[[Path, str, int], Measured]:
    def run(source: Path, key: str, part_size: int) -> Measured:
        return timed([sys.executable, "-c", BOTO3_SCRIPT, str(source), key, str(part_size), str(concurrency)], env)
    return run


def aws_cli() -> Path:
    """The AWS CLI (v1, from PyPI) in a virtualenv of its own: it pins botocore."""
    aws = TOOLS_DIR / "aws" / "bin" / "aws"
    if not aws.exists():
        print("installing the AWS CLI into bench/.tools/aws", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(TOOLS_DIR / "aws")], check=True)
        subprocess.run([str(TOOLS_DIR / "aws" / "bin" / "pip"), "install", "-q", "awscli"], check=True)
    return aws


def aws_tool(env: dict[str, str], work: Path, concurrency: int) -> Callable[[Path, str, int], Measured]:
    aws = aws_cli()

    def run(source: Path, key: str, part_size: int) -> Measured:
        config = work / "aws-config"
        config.write_text(f"[default]\nregion = us-east-1\ns3 =\n  multipart_threshold = {part_size}\n"
                          f"  multipart_chunksize = {part_size}\n  max_concurrent_requests = {concurrency}\n")
        return timed([str(aws), "s3", "cp", "--only-show-errors", str(source), f"s3://{BUCKET}/{key}",
                      "--endpoint-url", env["AWS_ENDPOINT_URL"]], dict(env, AWS_CONFIG_FILE=str(config)))
    return run


def rclone_tool(env: dict[str, str], concurrency: int) -> Callable[[Path, str, int], Measured] | None:
    rclone = shutil.which("rclone")
    if rclone is None:
        return None
    # Debian's rclone 1.60 against moto: no AWS_CA_BUNDLE, and --s3-no-head (../shared/FACTS.md)
    renv = {k: v for k, v in env.items() if k != "AWS_CA_BUNDLE"}
    renv.update(RCLONE_CONFIG_BENCH_TYPE="s3", RCLONE_CONFIG_BENCH_PROVIDER="Other",
                RCLONE_CONFIG_BENCH_ENDPOINT=env["AWS_ENDPOINT_URL"], RCLONE_CONFIG_BENCH_ACCESS_KEY_ID="bench",
                RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY="bench", RCLONE_CONFIG_BENCH_REGION="us-east-1")

    def run(source: Path, key: str, part_size: int) -> Measured:
        return timed([rclone, "copyto", str(source), f"bench:{BUCKET}/{key}", "--s3-no-head",
                      f"--s3-chunk-size={part_size // MiB}M", f"--s3-upload-concurrency={concurrency}",
                      "--s3-upload-cutoff=0", "--s3-disable-checksum"], renv)
    return run


class Moto:
    def __init__(self, work: Path, port: int) -> None:
        self.work, self.port = work, port
        self.server: services.Server | None = None

    def __enter__(self) -> Moto:
        self.server = services.Server("moto", [str(services.BIN / "moto_server"), "-H", "127.0.0.1", "-p",
                                               str(self.port)], self.work,
                                      ready=lambda: services.listening("127.0.0.1", self.port)).start()
        client().create_bucket(Bucket=BUCKET)
        return self

    def requests(self) -> int:
        assert self.server is not None
        return len(REQUEST_LINE.findall(self.server.output()))

    def __exit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.stop()


class Discard:
    def __init__(self, work: Path, port: int) -> None:
        self.server = services.Server("discard", [sys.executable, str(ROOT / "bench" / "discard_s3.py"), "--port",
                                                  str(port)], work,
                                      ready=lambda: services.listening("127.0.0.1", port))

    def __enter__(self) -> Discard:
        self.server.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.stop()


def client():  # type: ignore[no-untyped-def]
    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id="bench", aws_secret_access_key="bench")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--part-size", default="32MiB")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--memory-sizes", default="32MiB,64MiB,128MiB")
    parser.add_argument("--skip", default="", help="comma-separated: throughput,memory")
    parser.add_argument("--out", default=str(RESULTS / "peers.json"))
    args = parser.parse_args()
    size, part_size = parse_size(args.size), parse_size(args.part_size)

    work = Path(tempfile.mkdtemp(prefix="s3ferry-bench-"))
    source = work / "source.bin"
    sha256 = write_random(source, size)
    port = services.free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = bench_env(endpoint)
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    tools: dict[str, Callable[[Path, str, int], Measured]] = {
        "s3ferry": S3ferry(work, env, args.concurrency), "boto3": boto3_tool(env, args.concurrency),
        "aws s3 cp": aws_tool(env, work, args.concurrency)}
    notes = []
    rclone = rclone_tool(env, args.concurrency)
    if rclone is None:
        notes.append("rclone not installed (Debian: apt-get install rclone): skipped")
    else:
        tools["rclone"] = rclone
    result: dict[str, object] = {"params": {"size": size, "part_size": part_size, "concurrency": args.concurrency,
                                            "runs": args.runs, "server": "moto_server, restarted before every run",
                                            "cpus": os.cpu_count()}, "notes": notes}
    try:
        if "throughput" not in args.skip:
            result["throughput"] = throughput(tools, work, port, source, sha256, size, part_size, args.runs)
        if "memory" not in args.skip:
            memory_tools = {name: tools[name] for name in ("s3ferry", "boto3", "rclone") if name in tools}
            result["memory"] = memory(memory_tools, work, port, source,
                                      [parse_size(s) for s in args.memory_sizes.split(",")])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def throughput(tools: dict[str, Callable[[Path, str, int], Measured]], work: Path, port: int, source: Path,
               sha256: str, size: int, part_size: int, runs: int) -> dict[str, object]:
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in tools}
    names = list(tools)
    for run in range(runs):
        order = names[run % len(names):] + names[:run % len(names)]  # alternate who goes first
        for name in order:
            with Moto(work, port) as moto:
                key = f"{name.replace(' ', '-')}-{run}.bin"
                measured = tools[name](source, key, part_size)
                head = client().head_object(Bucket=BUCKET, Key=key)
                assert head["ContentLength"] == size, (name, head["ContentLength"], size)
                if run == 0:
                    assert sha256_of_object(client(), BUCKET, key) == sha256, f"{name}: SHA-256 differs"
                requests = moto.requests()
            samples[name].append({"seconds": measured.seconds, "cpu_s": measured.cpu, "peak_rss": measured.rss,
                                  "requests": requests, **measured.split})
            print(f"run {run + 1} {name:10s} {measured.seconds:6.2f} s  {size / measured.seconds / 1e6:6.1f} MB/s  "
                  f"cpu {measured.cpu:5.2f} s  rss {measured.rss / MiB:6.1f} MiB  {requests} requests", flush=True)
    summary: dict[str, object] = {}
    for name, runs_ in samples.items():
        median_s = statistics.median(r["seconds"] for r in runs_)
        summary[name] = {"runs": runs_, "median_s": median_s, "median_MBps": size / median_s / 1e6,
                         "cpu_s_per_GiB": statistics.median(r["cpu_s"] for r in runs_) * GiB / size,
                         "peak_rss_MiB": max(r["peak_rss"] for r in runs_) / MiB,
                         "requests_per_GiB": statistics.median(r["requests"] for r in runs_) * GiB / size}
    boto3_s = summary["boto3"]["median_s"]  # type: ignore[index]
    for name in samples:
        summary[name]["ratio_to_boto3"] = boto3_s / summary[name]["median_s"]  # type: ignore[index]
    return summary


def memory(tools: dict[str, Callable[[Path, str, int], Measured]], work: Path, port: int, source: Path,
           part_sizes: list[int]) -> dict[str, dict[str, float]]:
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    found: dict[str, dict[str, float]] = {name: {} for name in tools}
    for part_size in part_sizes:
        for name, tool in tools.items():
            with Discard(work, port):
                measured = tool(source, f"mem-{name}-{part_size}", part_size)
            found[name][f"{part_size // MiB}MiB"] = measured.rss / MiB
            print(f"memory {name:10s} {part_size // MiB:4d} MiB parts: peak RSS {measured.rss / MiB:6.1f} MiB",
                  flush=True)
    return found


def bench_env(endpoint: str, database: str = "s3ferry_bench", fresh: bool = True) -> dict[str, str]:
    """The environment of a benchmark's s3ferry commands and workers; `fresh`: an empty database and
    queue (nothing left over from an interrupted run holds the queue or takes part)."""
    pg = os.environ.get("S3FERRY_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    redis_url = os.environ.get("S3FERRY_BENCH_REDIS_URL", "redis://127.0.0.1:6379")
    if fresh:
        admin = sa.create_engine(pg, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        admin.dispose()
    db_url = sa.make_url(pg).set(database=database).render_as_string(hide_password=False)
    migrate.upgrade(db_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3FERRY_"))}
    if fresh:  # db 9 is the benchmarks' own: its unacked messages are theirs too
        services.purge_queue(f"{redis_url}/9", "s3ferry-bench", "unacked", "unacked_index")
    env.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_REGION": "us-east-1", "S3FERRY_DATABASE_URL": db_url, "S3FERRY_QUEUE": "s3ferry-bench",
                "S3FERRY_BROKER_URL": f"{redis_url}/9", "S3FERRY_RESULT_BACKEND": f"{redis_url}/10",
                # the worker is stopped after each run: at once, it is idle
                "S3FERRY_SOFT_SHUTDOWN_SECONDS": "0"})
    return env


if __name__ == "__main__":
    sys.exit(main())
