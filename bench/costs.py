"""Celery's cost per part and s3ferry's fixed cost per upload (issue 15, items 2 and 4).

redis:   Redis commands per part: one fleet worker (`s3ferry worker --pool=threads
         --concurrency=4`) uploads --parts parts of 5 MiB to the discard endpoint
         (bench/discard_s3.py) on a private redis-server; INFO commandstats before and after
         the upload, less what the idle worker sends in as long (heartbeats, recovery pass),
         divided by the parts; beside a no-op Celery chord of as many tasks on the same server.
imports: `python -X importtime -m orchestrator.cli --help`, the imports' total (median of 5),
         and the same for the command of an upload (what it imported before it exited).
single:  `s3ferry upload` in single-machine mode (SQLite + the private Redis + a worker child)
         of --size to moto's server (restarted before every run), 32 MiB parts, 4 at a time,
         against boto3's upload_file with the same settings; median of --runs alternating runs.
         Also from the state file: command start to the first part's start, and how long the
         first part ran alone (the second part's start less the first's).

    python bench/costs.py --label after --also before=/tmp/base   # this tree, and another checkout
                                                                  # (git archive HEAD | tar -x -C /tmp/base)

Trees given with --also are measured in the same runs, alternating (the machine's load then
weighs on both alike).

Needs PostgreSQL (S3FERRY_BENCH_POSTGRES_URL, default the local one). Merges its results into
bench/results/costs.json under --label, and writes bench/results/costs.md from it
(`python bench/costs.py --markdown` only rewrites the latter).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.peers import BOTO3_SCRIPT, BUCKET, Discard, Moto, bench_env, client, compile_tree, start  # noqa: E402
from bench.scale import NOOP_APP, stop  # noqa: E402
from models.settings import MiB, parse_size  # noqa: E402
from orchestrator.demo import write_random  # noqa: E402
from tests import services  # noqa: E402

RESULTS = ROOT / "bench" / "results"
IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="before or after: the key in costs.json")
    parser.add_argument("--tree", default=str(ROOT), help="the s3ferry source tree to measure (--label)")
    parser.add_argument("--also", action="append", default=[], metavar="LABEL=PATH",
                        help="another source tree to measure in the same runs")
    parser.add_argument("--parts", type=int, default=200, help="redis: parts of 5 MiB")
    parser.add_argument("--size", default="512MiB", help="single: the file's size")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--monitor", action="store_true",
                        help="redis: also count requests by command with MONITOR (slows the server)")
    parser.add_argument("--skip", default="", help="comma-separated: redis,imports,single")
    parser.add_argument("--out", default=str(RESULTS / "costs.json"))
    parser.add_argument("--markdown", action="store_true", help="only write costs.md from costs.json")
    args = parser.parse_args()
    if args.markdown:
        (RESULTS / "costs.md").write_text(markdown(json.loads(Path(args.out).read_text())))
        return 0
    trees = {args.label: Path(args.tree).resolve()}
    trees.update((label, Path(path).resolve()) for label, _, path in (a.partition("=") for a in args.also))
    work = Path(tempfile.mkdtemp(prefix="s3ferry-costs-"))
    when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    results: dict[str, dict[str, object]] = {
        label: {"tree": str(tree), "cpus": os.cpu_count(), "measured_at": when,
                "compared_with": sorted(set(trees) - {label})} for label, tree in trees.items()}
    try:
        if "imports" not in args.skip:
            for label, found in imports(trees, work).items():
                results[label]["imports"] = found
        if "redis" not in args.skip:
            for label, tree in trees.items():
                results[label]["redis"] = redis_costs(tree, work, args.parts, args.monitor)
                print(label, json.dumps(results[label]["redis"], indent=2), flush=True)
        if "single" not in args.skip:
            for label, found in single(trees, work, parse_size(args.size), args.runs).items():
                results[label]["single"] = found
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    merged = json.loads(out.read_text()) if out.exists() else {}
    for label, result in results.items():
        merged[label] = {**merged.get(label, {}), **result}
    out.write_text(json.dumps(merged, indent=2) + "\n")
    if out.parent == RESULTS:
        (RESULTS / "costs.md").write_text(markdown(merged))
    print(json.dumps({label: {k: v for k, v in r.items() if k != "redis"} for label, r in results.items()},
                     indent=2))
    return 0


def tree_env(tree: Path, env: dict[str, str]) -> dict[str, str]:
    """`env` with the tree first on the path (the commands run as `python -m orchestrator.cli`), its
    code compiled once (see peers.compile_tree)."""
    compile_tree(tree)
    return {**{k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}, "PYTHONPATH": str(tree)}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", *args]


# -- imports ------------------------------------------------------------------------------


def import_seconds(stderr: str) -> tuple[float, dict[str, float]]:
    """The total of -X importtime's top-level imports, and the largest of them (seconds)."""
    top: dict[str, float] = {}
    for _self, cumulative, indent, name in IMPORT_LINE.findall(stderr):
        if len(indent) == 0:
            top[name] = top.get(name, 0.0) + int(cumulative) / 1e6
    largest = dict(sorted(top.items(), key=lambda kv: -kv[1])[:8])
    return sum(top.values()), largest


def imports(trees: dict[str, Path], work: Path) -> dict[str, dict[str, object]]:
    """`--help`'s imports and wall time, each tree in turn, 7 rounds (medians)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("S3FERRY_")}
    runs: dict[str, list[tuple[float, float, dict[str, float]]]] = {label: [] for label in trees}
    for _ in range(7):
        for label, tree in trees.items():
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-X", "importtime", "-m", "orchestrator.cli", "--help"],
                                  env=tree_env(tree, base), cwd=work, capture_output=True, text=True, check=True)
            wall = time.perf_counter() - started
            runs[label].append((wall, *import_seconds(done.stderr)))
    found = {}
    for label, rows in runs.items():
        total = statistics.median(r[1] for r in rows)
        found[label] = {"command": "python -X importtime -m orchestrator.cli --help",
                        "help_imports_s": total, "help_wall_s": statistics.median(r[0] for r in rows),
                        "help_largest_s": min(rows, key=lambda r: abs(r[1] - total))[2]}
    return found


# -- Redis commands per part --------------------------------------------------------------


def commandstats(client: redis.Redis) -> dict[str, int]:
    """Commands run by name (scripts' own commands included), and the server's read events
    (`reads`: requests that reached it, a pipeline or a MULTI ... EXEC block mostly one)."""
    found = {name.removeprefix("cmdstat_"): int(value["calls"])
             for name, value in client.info("commandstats").items()}
    found[READS] = int(client.info("stats")["total_reads_processed"])
    return found


READS = "(read events)"


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)}


def redis_costs(tree: Path, work: Path, parts: int, monitor: bool) -> dict[str, object]:
    port = services.free_port()
    server = services.Server("redis-costs", [services.redis_server(), "--port", str(port), "--save", "",
                                             "--appendonly", "no"], work,
                             ready=lambda: services.listening("127.0.0.1", port)).start()
    redis_base = f"redis://127.0.0.1:{port}"
    s3_port = services.free_port()
    os.environ["S3FERRY_BENCH_REDIS_URL"] = redis_base
    try:
        env = tree_env(tree, dict(bench_env(f"http://127.0.0.1:{s3_port}", database="s3ferry_costs"),
                                  S3FERRY_SOURCE_ROOTS=str(work), S3FERRY_BUCKETS=BUCKET))
        kv = redis.Redis.from_url(redis_base)
        with Discard(work, s3_port):
            s3ferry = _s3ferry_commands(tree, work, env, kv, parts, monitor)
            noop = _noop_commands(work, env, kv, parts, monitor)
        kv.close()
    finally:
        server.stop()
    return {"parts": parts, "part_size": 5 * MiB, "concurrency": 4,
            "server": "private redis-server; bench/discard_s3.py", "s3ferry": s3ferry, "noop_chord": noop,
            "ratio_round_trips": s3ferry["round_trips_per_part"] / noop["round_trips_per_part"],
            "ratio_commands": s3ferry["commands_per_part"] / noop["commands_per_part"],
            "ratio_parts_per_s": s3ferry["parts_per_s"] / noop["parts_per_s"]}


MONITOR_SCRIPT = """
import sys, redis
client = redis.Redis.from_url(sys.argv[1])
with client.monitor() as monitor, open(sys.argv[2], "w") as out:
    connection = monitor.connection
    while True:
        line = connection.encoder.decode(connection.read_response(), force=True)
        if "costs-monitor-stop" in line:
            break
        out.write(line + "\\n")
"""


class Monitor:
    """Redis MONITOR in a process of its own, for the round trips clients made: a command sent
    by a client is one, a MULTI ... EXEC block is one, commands run by scripts are none."""

    def __init__(self, url: str, work: Path) -> None:
        self.url, self.path = url, work / "monitor.txt"
        self.process = subprocess.Popen([sys.executable, "-c", MONITOR_SCRIPT, url, str(self.path)])
        services.wait_for(lambda: self.path.exists(), 10, "redis monitor")
        time.sleep(0.2)

    def stop(self) -> dict[str, int]:
        redis.Redis.from_url(self.url).echo("costs-monitor-stop")
        self.process.wait(60)
        trips: dict[str, int] = {}
        in_block: set[str] = set()
        line_re = re.compile(r'[\d.]+ \[\d+ (\S*)\] "([^"]+)"')
        for line in self.path.read_text().splitlines():
            found = line_re.match(line)
            if not found or found[1] == "lua":
                continue
            who, name = found[1], found[2].lower()
            if name == "multi":
                in_block.add(who)
            elif name in ("exec", "discard"):
                in_block.discard(who)
                trips["multi/exec"] = trips.get("multi/exec", 0) + 1
            elif who not in in_block:
                trips[name] = trips.get(name, 0) + 1
        for name in ("monitor", "echo", "info"):  # the harness's own
            trips.pop(name, None)
        if os.environ.get("S3FERRY_COSTS_KEEP_MONITOR"):
            shutil.copy(self.path, Path(os.environ["S3FERRY_COSTS_KEEP_MONITOR"]) / f"monitor-{time.time():.0f}.txt")
        return trips


def _idle_rate(kv: redis.Redis, seconds: float) -> tuple[float, float, dict[str, int]]:
    """Commands and read events per second of the idle worker (the harness's INFO left out)."""
    before = commandstats(kv)
    time.sleep(seconds)
    spent = delta(commandstats(kv), before)
    spent.pop("info", None)
    reads = spent.pop(READS, 0) - 2
    return sum(spent.values()) / seconds, reads / seconds, spent


def _summary(spent: dict[str, int], idle: tuple[float, float, dict[str, int]], seconds: float,
             parts: int, trips: dict[str, int] | None) -> dict[str, object]:
    spent = dict(spent)
    spent.pop("info", None)
    reads = spent.pop(READS, 0) - 2
    total = sum(spent.values())
    found: dict[str, object] = {
        "wall_s": seconds, "parts_per_s": parts / seconds,
        "round_trips_per_part": (reads - idle[1] * seconds) / parts,
        "commands_per_part": (total - idle[0] * seconds) / parts,
        "idle_round_trips_per_s": idle[1], "idle_commands_per_s": idle[0], "idle_by_command": idle[2],
        "commands_by_name_per_part": {k: round(v / parts, 2) for k, v in sorted(spent.items(), key=lambda kv: -kv[1])}}
    if trips is not None:
        found["monitor_requests_by_name_per_part"] = {
            k: round(v / parts, 2) for k, v in sorted(trips.items(), key=lambda kv: -kv[1])}
    return found


def _s3ferry_commands(tree: Path, work: Path, env: dict[str, str], kv: redis.Redis, parts: int,
                      monitor: bool) -> dict[str, object]:
    source = work / "costs.bin"
    with open(source, "wb") as out:
        out.truncate(parts * 5 * MiB)
    worker = start(work, env, cli("worker", "--pool=threads", "--concurrency=4", "--loglevel=INFO"), "worker")
    try:
        time.sleep(3)  # past start-up (reconcile on start, first recovery pass)
        idle = _idle_rate(kv, 6.0)
        watching = Monitor(env["S3FERRY_BROKER_URL"], work) if monitor else None
        before = commandstats(kv)
        started = time.perf_counter()
        done = subprocess.run(cli("upload", str(source), f"s3://bench/costs-{uuid.uuid4().hex[:8]}",
                                  "--part-size", "5MiB"), env=env, cwd=work, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        spent = delta(commandstats(kv), before)
        trips = watching.stop() if watching else None
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
    finally:
        stop(worker)
        source.unlink()
    return _summary(spent, idle, seconds, parts, trips)


def _noop_commands(work: Path, env: dict[str, str], kv: redis.Redis, parts: int, monitor: bool) -> dict[str, object]:
    (work / "noop_app.py").write_text(NOOP_APP)
    redis_base = env["S3FERRY_BROKER_URL"].rsplit("/", 1)[0]
    noop_env = dict(env, NOOP_BROKER=f"{redis_base}/11", NOOP_BACKEND=f"{redis_base}/12", PYTHONPATH=str(work))
    backend = redis.Redis.from_url(noop_env["NOOP_BACKEND"])
    worker = start(work, noop_env, [sys.executable, "-m", "celery", "-A", "noop_app", "worker", "--pool=threads",
                                    "--concurrency=4", "-Q", "noop-bench", "--loglevel=INFO"], "noop-worker")
    try:
        time.sleep(3)
        idle = _idle_rate(kv, 6.0)
        watching = Monitor(noop_env["NOOP_BROKER"], work) if monitor else None
        script = (f"from celery import chord; import noop_app as a; "
                  f"chord([a.noop.si(i) for i in range({parts})])(a.done.s())")
        before = commandstats(kv)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", script], env=noop_env, cwd=work, check=True)
        while backend.get("noop-bench-done") is None:  # one GET (one read) per 10 ms: subtracted below
            time.sleep(0.01)
        seconds = time.perf_counter() - started
        spent = delta(commandstats(kv), before)
        trips = watching.stop() if watching else None
        polls = int(round(seconds / 0.01))  # approximately
    finally:
        stop(worker)
        backend.flushdb()
        backend.close()
    spent["get"] = max(0, spent.get("get", 0) - polls)
    spent[READS] = spent.get(READS, 0) - polls
    if trips is not None:
        trips["get"] = max(0, trips.get("get", 0) - polls)
    return _summary(spent, idle, seconds, parts, trips)


# -- single-machine mode against boto3 ----------------------------------------------------


def single(trees: dict[str, Path], work: Path, size: int, runs: int) -> dict[str, dict[str, object]]:
    """Each tree's `s3ferry upload` and boto3, in turn (the order rotating), `runs` rounds."""
    source = work / "single.bin"
    write_random(source, size)
    port = services.free_port()
    endpoint = f"http://127.0.0.1:{port}"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3FERRY_"))}
    base.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                AWS_REGION="us-east-1")
    os.environ.update({k: v for k, v in base.items() if k.startswith("AWS_")})
    homes = {label: work / f"home-{label}" for label in trees}
    envs = {label: tree_env(tree, dict(base, S3FERRY_HOME=str(homes[label]))) for label, tree in trees.items()}
    for label, env in envs.items():  # the state file, migrated
        subprocess.run(cli("ls"), env=env, cwd=work, check=True, capture_output=True)
    tools = [*trees, "boto3"]
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in tools}
    for run in range(runs):
        for name in tools[run % len(tools):] + tools[:run % len(tools)]:
            with Moto(work, port):
                key = f"{name}-{run}.bin"
                if name == "boto3":
                    started = time.perf_counter()
                    subprocess.run([sys.executable, "-c", BOTO3_SCRIPT, str(source), key, str(32 * MiB), "4"],
                                   env=base, cwd=work, check=True)
                    sample = {"seconds": time.perf_counter() - started}
                else:
                    sample = _s3ferry_single(envs[name], work, homes[name], source, key)
                assert client().head_object(Bucket=BUCKET, Key=key)["ContentLength"] == size
            samples[name].append(sample)
            print(f"run {run + 1} {name:8s} " + "  ".join(f"{k} {v:.2f}" for k, v in sample.items()), flush=True)
    boto3_s = statistics.median(r["seconds"] for r in samples["boto3"])
    found = {}
    for label in trees:
        rows = samples[label]
        summary: dict[str, object] = {
            "command": f"s3ferry upload FILE s3://{BUCKET}/KEY --part-size 32MiB --concurrency 4 "
                       "(single-machine mode, the state file already there)",
            "boto3": "upload_file, TransferConfig(multipart_chunksize=32MiB, max_concurrency=4)",
            "size": size, "runs": runs, "server": "moto_server, restarted before every run",
            "order": "each round: " + ", ".join(tools) + " (rotated by one each round)",
            "samples": rows, "boto3_samples": samples["boto3"],
            "median_s": statistics.median(r["seconds"] for r in rows), "boto3_median_s": boto3_s}
        for field in rows[0]:
            if field != "seconds":
                summary[f"median_{field}"] = statistics.median(r[field] for r in rows)
        summary["ratio_to_boto3"] = summary["median_s"] / boto3_s  # type: ignore[operator]
        found[label] = summary
    return found


def _s3ferry_single(env: dict[str, str], work: Path, home: Path, source: Path, key: str) -> dict[str, float]:
    wall_start = dt.datetime.now(dt.UTC)
    started = time.perf_counter()
    command = subprocess.Popen(cli("upload", str(source), f"s3://{BUCKET}/{key}", "--part-size", "32MiB",
                                   "--concurrency", "4"), env=env, cwd=work, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    own_cpu = 0.0
    watched = psutil.Process(command.pid)
    while command.poll() is None:
        try:
            times = watched.cpu_times()
            own_cpu = times.user + times.system  # the command alone, not its worker
        except psutil.Error:
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    out, err = command.communicate()
    if command.returncode != 0:
        raise RuntimeError(err[-3000:])
    wall_end = dt.datetime.now(dt.UTC)
    upload_id = uuid.UUID(out.split()[0])

    def at(text: str) -> dt.datetime:
        return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)

    with contextlib.closing(sqlite3.connect(home / "state.db")) as state:
        created, finished = (at(t) for t in state.execute(
            "SELECT created_at, finished_at FROM uploads WHERE id = ?", (upload_id.hex,)).fetchone())
        parts = [(at(a), at(b)) for a, b in state.execute(
            "SELECT started_at, finished_at FROM parts WHERE upload_id = ? ORDER BY started_at", (upload_id.hex,))]
    last_part = max(end for _, end in parts)
    return {"seconds": seconds, "command_cpu_s": own_cpu,
            "start_to_recorded_s": (created - wall_start).total_seconds(),
            "start_to_first_part_s": (parts[0][0] - wall_start).total_seconds(),
            "first_part_alone_s": (parts[1][0] - parts[0][0]).total_seconds(),
            "last_part_to_complete_s": (finished - last_part).total_seconds(),
            "complete_to_exit_s": (wall_end - finished).total_seconds()}



def markdown(results: dict[str, dict]) -> str:  # type: ignore[type-arg]
    """bench/results/costs.md: the tables of costs.json."""
    labels = [label for label in ("before", "after") if label in results] + \
        [label for label in results if label not in ("before", "after")]
    lines = ["# Per-part and per-upload costs (issue 15)", "",
             "Written by `python bench/costs.py` from costs.json beside it:", "",
             "    git archive <commit before> | tar -x -C /tmp/base",
             "    python bench/costs.py --label after --also before=/tmp/base --runs 3 --size 512MiB --parts 200", "",
             "The trees are measured in the same runs, alternating. "
             + "; ".join(f"{label}: {results[label].get('tree')}" for label in labels)
             + f"; {results[labels[0]].get('cpus')} CPUs, shared with other work (medians).", ""]
    if all("redis" in results[label] for label in labels):
        first = results[labels[0]]["redis"]
        lines += [f"## Redis per part: {first['parts']} parts of 5 MiB, one worker (threads, 4), "
                  "bench/discard_s3.py, a private redis-server", "",
                  "Requests: the server's read events (`total_reads_processed`; a pipeline or a MULTI/EXEC block is "
                  "mostly one), less an idle worker's. Commands: INFO commandstats, scripts' own commands included.", "",
                  "| tree | requests/part | no-op chord task | ratio | commands/part | no-op | parts/s | no-op tasks/s "
                  "| ratio |", "|---|---|---|---|---|---|---|---|---|"]
        for label in labels:
            r = results[label]["redis"]
            s3f, noop = r["s3ferry"], r["noop_chord"]
            lines.append(f"| {label} | {s3f['round_trips_per_part']:.1f} | {noop['round_trips_per_part']:.1f} | "
                         f"{r['ratio_round_trips']:.2f} | {s3f['commands_per_part']:.1f} | "
                         f"{noop['commands_per_part']:.1f} | {s3f['parts_per_s']:.1f} | {noop['parts_per_s']:.0f} | "
                         f"{r['ratio_parts_per_s']:.3f} |")
        lines += ["", "Commands per part by name (scripts' own included):", ""]
        for label in labels:
            named = results[label]["redis"]["s3ferry"]["commands_by_name_per_part"]
            lines.append(f"- {label}: " + ", ".join(f"{k} {v}" for k, v in list(named.items())[:14]))
        lines.append("")
    if all("single" in results[label] for label in labels):
        first = results[labels[0]]["single"]
        lines += [f"## `s3ferry upload`, single-machine mode: {first['size'] >> 20} MiB to moto, 32 MiB parts, "
                  f"4 at a time, median of {first['runs']} alternating runs", "",
                  f"`{first['command']}` against boto3 `{first['boto3']}`; {first['server']}.", "",
                  "| tree | wall s | boto3 s | vs boto3 | start to first part s | first part alone s "
                  "| last part to complete s | complete to exit s | command CPU s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for label in labels:
            r = results[label]["single"]
            lines.append(f"| {label} | {r['median_s']:.2f} | {r['boto3_median_s']:.2f} | {r['ratio_to_boto3']:.2f}x | "
                         f"{r['median_start_to_first_part_s']:.2f} | {r['median_first_part_alone_s']:.2f} | "
                         f"{r['median_last_part_to_complete_s']:.2f} | {r['median_complete_to_exit_s']:.2f} | "
                         f"{r['median_command_cpu_s']:.2f} |")
        lines.append("")
    if all("imports" in results[label] for label in labels):
        lines += ["## Imports of `s3ferry --help`", "", "`python -X importtime -m orchestrator.cli --help`, "
                  "the top-level imports' total; median of 7.", "", "| tree | imports s | wall s | largest |",
                  "|---|---|---|---|"]
        for label in labels:
            r = results[label]["imports"]
            largest = ", ".join(f"{k} {v:.3f}" for k, v in list(r["help_largest_s"].items())[:4])
            lines.append(f"| {label} | {r['help_imports_s']:.3f} | {r['help_wall_s']:.2f} | {largest} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
