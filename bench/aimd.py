"""AIMD vs fixed numbers of parts in flight, on a clean link and on a throttling one.

The same file (512 MiB by default, 8 MiB parts) is uploaded by one s3ferry worker
(`s3ferry worker --pool threads --concurrency 16`, Postgres + Redis) through the
fault-injecting proxy of the tests (tests/http_faults.py) to the discard endpoint
(bench/discard_s3.py), with the window fixed at 1, 4 and 16 parts in flight
(S3FERRY_WINDOW_MIN = MAX = N) and with the AIMD window (the defaults: start at 1, up
to 32). Two links:

- clean: every request waits --latency seconds (a distant region's first byte);
- throttled: the same, and 503 SlowDown for every request beyond 4 in flight (S3
  throttling a prefix, or a small MinIO).

AIMD runs twice: cold, from a fresh window (the first upload to a destination), and warm,
right after, from the window the cold run left (every later upload to that destination:
the window is kept in Redis). Configurations alternate within each run.
For each: median wall time of `s3ferry upload`, part retries (attempts beyond the
first, from Postgres), request-body bytes beyond the file's size (from the proxy: bytes
sent again), SlowDowns. The window is sampled from Redis every 50 ms; a PNG per link
shows it over time (bench/results/aimd-<link>.png).

    python bench/aimd.py --size 512MiB --runs 3

Needs PostgreSQL and Redis like bench/peers.py. Writes bench/results/aimd.json and the PNGs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.peers import BUCKET, RESULTS, Discard, bench_env, client, start  # noqa: E402
from models.settings import MiB, parse_size  # noqa: E402
from orchestrator.demo import write_random  # noqa: E402
from tests import services  # noqa: E402
from tests.http_faults import Counts, FaultProxy  # noqa: E402
from workers.window import Limits, Window, client_from_url  # noqa: E402

THREADS = 16
#: name -> fixed window (None: AIMD). "AIMD cold" starts from a fresh window (S3FERRY_WINDOW_INITIAL);
#: "AIMD warm" runs right after it, from the window it left for the destination (kept in Redis
#: for a week), which is what every upload after a destination's first one starts from.
CONFIGS = {"fixed 1": 1, "fixed 4": 4, "fixed 16": 16, "AIMD cold": None, "AIMD warm": None}
AIMD = ("AIMD cold", "AIMD warm")
THROTTLE_ABOVE = 4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="512MiB")
    parser.add_argument("--part-size", default="8MiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.1, help="seconds added to every request")
    parser.add_argument("--out", default=str(RESULTS / "aimd.json"))
    args = parser.parse_args()
    size, part_size = parse_size(args.size), parse_size(args.part_size)

    work = Path(tempfile.mkdtemp(prefix="s3ferry-bench-aimd-"))
    source = work / "source.bin"
    write_random(source, size)
    port = services.free_port()
    # its own empty database and queue: nothing an interrupted run left behind takes part
    env = {**bench_env(f"http://127.0.0.1:{port}", database="s3ferry_bench_aimd", fresh=True),
           "S3FERRY_QUEUE": f"s3ferry-bench-aimd-{uuid.uuid4().hex[:8]}"}
    links = {"clean": {"latency": args.latency},
             "throttled": {"latency": args.latency, "slowdown_above": THROTTLE_ABOVE}}
    results: dict[str, dict[str, list[dict[str, object]]]] = {link: {name: [] for name in CONFIGS} for link in links}
    try:
        with Discard(work, port):
            os.environ["AWS_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL"]
            client().create_bucket(Bucket=BUCKET)
            proxy = FaultProxy(env["AWS_ENDPOINT_URL"])
            try:
                for run in range(args.runs):
                    for link, faults in links.items():
                        fixed = [n for n in CONFIGS if n not in AIMD]
                        names = fixed + list(AIMD) if run % 2 == 0 else list(AIMD) + fixed[::-1]
                        for name in names:
                            measured = upload(work, env, proxy, faults, CONFIGS[name], source, part_size,
                                              fresh=name != "AIMD warm")
                            results[link][name].append(measured)
                            print(f"run {run + 1} {link:9} {name:8} {measured['seconds']:6.2f}s "
                                  f"retries {measured['retries']:3} resent {measured['resent_bytes'] / MiB:7.1f} MiB "
                                  f"slowdowns {measured['slowdowns']}{'  FAILED' if measured['failed'] else ''}",
                                  flush=True)
            finally:
                proxy.close()
    finally:
        source.unlink()
        services.purge_queue(env["S3FERRY_BROKER_URL"], env["S3FERRY_QUEUE"])
    summary = summarize(results)
    output = {"params": {"size": size, "part_size": part_size, "runs": args.runs, "latency_s": args.latency,
                         "throttle_above": THROTTLE_ABOVE, "worker_threads": THREADS,
                         "window_defaults": dataclasses.asdict(Limits()),
                         "server": "bench/discard_s3.py behind tests/http_faults.py", "cpus": os.cpu_count()},
              "summary": summary, "runs": results}
    Path(args.out).write_text(json.dumps(output, indent=2) + "\n")
    print(table(summary))
    charts(results)
    return 0


def upload(work: Path, env: dict[str, str], proxy: FaultProxy, faults: dict[str, object], fixed: int | None,
           source: Path, part_size: int, fresh: bool) -> dict[str, object]:
    proxy.configure(**{"latency": 0.0, "slowdown_above": None, **faults})
    proxy.counts = Counts()
    window_env = ({"S3FERRY_WINDOW_MIN": str(fixed), "S3FERRY_WINDOW_MAX": str(fixed),
                   "S3FERRY_WINDOW_INITIAL": str(fixed)} if fixed else {})
    run_env = {**env, **window_env, "AWS_ENDPOINT_URL": proxy.url}
    kv = client_from_url(env["S3FERRY_RESULT_BACKEND"])
    assert kv is not None
    shared = Window(kv, proxy.url, BUCKET, Limits())
    if fresh:
        kv.delete(*shared.keys)
    worker = start(work, run_env, [str(services.BIN / "s3ferry"), "worker", "--pool=threads",
                                   f"--concurrency={THREADS}", "--loglevel=INFO"], "worker")
    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            state = shared.state()
            if state is not None:
                samples.append((time.perf_counter() - started, state.window, state.in_flight))

    key = f"aimd-{uuid.uuid4().hex[:8]}"
    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    sampler.start()
    try:
        done = subprocess.run([str(services.BIN / "s3ferry"), "upload", str(source), f"s3://{BUCKET}/{key}",
                               "--part-size", str(part_size)], env=run_env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
    finally:
        stop.set()
        sampler.join()
        worker.terminate()
        worker.wait(30)
        if fixed:  # its limits clamped the stored window: leave none behind
            kv.delete(*shared.keys)
        kv.close()
    failed = done.returncode != 0
    if failed and "upload failed" not in done.stderr:
        raise RuntimeError(f"s3ferry upload: {done.stderr[-2000:]}")
    engine = sa.create_engine(env["S3FERRY_DATABASE_URL"])
    with engine.connect() as connection:
        parts, attempts, retry_count, landed = connection.execute(sa.text(
            "SELECT count(*), sum(p.attempts), max(u.retry_count), "
            "coalesce(sum(p.size) FILTER (WHERE p.status = 'done'), 0) FROM uploads u "
            "JOIN parts p ON p.upload_id = u.id WHERE u.key = :key"), {"key": key}).one()
    engine.dispose()
    size = source.stat().st_size
    return {"seconds": seconds, "failed": done.stderr.strip().splitlines()[-1] if failed else None,
            "MBps": size / seconds / 1e6, "parts": parts, "retries": int(attempts) - parts,
            "upload_retry_count": retry_count, "resent_bytes": proxy.counts.body_bytes - int(landed),  # bytes sent beyond those that landed
            "slowdowns": proxy.counts.slowdowns, "max_in_flight": proxy.counts.max_in_flight,
            "window": samples}


def summarize(results: dict[str, dict[str, list[dict[str, object]]]]) -> dict[str, object]:
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for link, configs in results.items():
        rows[link] = {}
        for name, runs in configs.items():
            rows[link][name] = {
                # a failed upload took forever, as far as comparing settings goes
                "seconds": statistics.median(float("inf") if r["failed"] else float(r["seconds"])  # type: ignore[arg-type]
                                             for r in runs),
                "failed_runs": sum(1 for r in runs if r["failed"]),
                "retries": statistics.median(float(r["retries"]) for r in runs),  # type: ignore[arg-type]
                "resent_MiB": statistics.median(float(r["resent_bytes"]) / MiB for r in runs),  # type: ignore[arg-type]
                "slowdowns": statistics.median(float(r["slowdowns"]) for r in runs),  # type: ignore[arg-type]
            }
    verdict: dict[str, object] = {}
    for link, row in rows.items():
        best = min((n for n in row if n not in AIMD), key=lambda n: row[n]["seconds"])
        verdict[link] = {"best_fixed": best}
        for name in AIMD:
            ratio = row[name]["seconds"] / row[best]["seconds"]
            verdict[link][name] = {"over_best": ratio, "within_10pct": ratio <= 1.10}
    totals = {name: sum(rows[link][name]["seconds"] for link in rows) for name in CONFIGS}
    verdict["both_links_total_s"] = totals
    verdict["beats_every_fixed_overall"] = {
        name: all(totals[name] < t for n, t in totals.items() if n not in AIMD) for name in AIMD}
    return {"rows": rows, "verdict": verdict}


def table(summary: dict[str, object]) -> str:
    rows = summary["rows"]  # type: ignore[index]
    verdict = summary["verdict"]  # type: ignore[index]
    lines = ["| link | setting | time (s, median) | part retries | bytes sent again (MiB) | SlowDowns |",
             "|---|---|---|---|---|---|"]
    for link, configs in rows.items():  # type: ignore[union-attr]
        for name, row in configs.items():
            failed = f" ({row['failed_runs']:.0f} of the runs failed: out of retries)" if row["failed_runs"] else ""
            lines.append(f"| {link} | {name} | {row['seconds']:.2f}{failed} | {row['retries']:.0f} | "
                         f"{row['resent_MiB']:.1f} | {row['slowdowns']:.0f} |")
    lines.append("")
    for link in rows:  # type: ignore[union-attr]
        v = verdict[link]
        for name in AIMD:
            lines.append(f"- {link}: {name} / best fixed ({v['best_fixed']}) = {v[name]['over_best']:.2f}x "
                         f"({'within' if v[name]['within_10pct'] else 'NOT within'} 10%)")
    totals = verdict["both_links_total_s"]
    lines.append("- both links together: " + ", ".join(f"{n} {t:.1f}s" for n, t in totals.items()))
    for name in AIMD:
        lines.append(f"- {name} {'beats' if verdict['beats_every_fixed_overall'][name] else 'does NOT beat'} "
                     "every fixed setting over the two links together")
    return "\n".join(lines)


def charts(results: dict[str, dict[str, list[dict[str, object]]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for link, configs in results.items():
        figure, axis = plt.subplots(figsize=(8, 4))
        for name, style in zip(AIMD, ("-", "--"), strict=True):
            first = configs[name][0]["window"]
            axis.step([t for t, _, _ in first], [w for _, w, _ in first], style, where="post",  # type: ignore[union-attr]
                      label=f"{name}: window")
        first = configs["AIMD cold"][0]["window"]
        axis.plot([t for t, _, _ in first], [n for _, _, n in first], ".", markersize=2, alpha=0.5,  # type: ignore[union-attr]
                  label="AIMD cold: parts in flight")
        if link == "throttled":
            axis.axhline(THROTTLE_ABOVE, color="red", linestyle="--", linewidth=1, label="SlowDown above")
        for name, fixed in CONFIGS.items():
            if fixed:
                seconds = float(configs[name][0]["seconds"])  # type: ignore[arg-type]
                axis.hlines(fixed, 0, seconds, colors="gray", linestyles=":", linewidth=1)
                axis.text(seconds, fixed, f" {name} ({seconds:.1f}s)", va="center", fontsize=8, color="gray")
        axis.set_xlabel("seconds since the upload started (first run)")
        axis.set_ylabel("parts in flight")
        axis.set_title(f"AIMD window, {link} link")
        axis.legend(loc="upper right", fontsize=8)
        figure.tight_layout()
        figure.savefig(RESULTS / f"aimd-{link}.png", dpi=100)
        plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
