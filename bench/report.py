"""Markdown table and PNG charts from the benchmark JSON in bench/results/.

    python bench/report.py      # writes bench/results/README.md and bench/results/*.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def load(name: str) -> dict | None:  # type: ignore[type-arg]
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def main() -> int:
    lines = ["# Benchmark results", "",
             "Written by `python bench/report.py` from the JSON beside it; rerun with `bash bench/run.sh`.", ""]
    peers, scale, scheduler, profile = load("peers"), load("scale"), load("scheduler"), load("profile")
    if peers and "throughput" in peers:
        lines += peers_section(peers)
    if peers and "memory" in peers:
        m = peers["memory"]
        sizes = list(dict.fromkeys(size for row in m.values() for size in row))
        lines += [f"## Peak RSS with {peers['params']['concurrency']} parts in flight (discard endpoint, http)", "",
                  "Summed over the client's processes (s3ferry: the command and its worker).", "",
                  "| tool | " + " | ".join(sizes) + " |", "|---|" + "---|" * len(sizes)]
        for name, row in m.items():
            lines.append(f"| {name} | " + " | ".join(f"{row[s]:.0f} MiB" if s in row else "failed" for s in sizes)
                         + " |")
        lines += ["", "![memory](memory.png)", ""]
        fig, ax = plt.subplots(figsize=(7, 3.8))
        for name, row in m.items():
            ax.plot([s for s in sizes if s in row], [row[s] for s in sizes if s in row], marker="o", label=name)
        ax.set_xlabel("part size")
        ax.set_ylabel("peak RSS (MiB)")
        ax.set_title("Client memory, 4 parts in flight")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(RESULTS / "memory.png", dpi=100)
        plt.close(fig)
    if peers and "orchestration" in peers:
        o = peers["orchestration"]
        lines += [f"## Orchestration with S3 stubbed: {o['parts']} parts of 5 MiB, median of {len(o['runs']['s3ferry'])} "
                  "alternating runs (`bench/peers.py`)", "",
                  f"Server: {o['server']} (drops the bytes, hashes nothing). One worker, threads, "
                  f"concurrency {o['concurrency']}.", "",
                  "| | parts/s | vs no-op chord |", "|---|---|---|",
                  f"| s3ferry (fleet), end to end | {o['s3ferry_parts_per_s']:.1f} | {o['ratio_end_to_end']:.2f} |",
                  f"| s3ferry (fleet), part phase only | {o['s3ferry_part_phase_parts_per_s']:.1f} | "
                  f"{o['ratio_part_phase']:.2f} |",
                  f"| s3ferry single-machine, end to end | {o['s3ferry single-machine_parts_per_s']:.1f} | "
                  f"{o['ratio_single_machine']:.2f} |",
                  f"| no-op Celery chord | {o['noop_chord_parts_per_s']:.1f} | 1.00 |", ""]
    if scale and "overhead" in scale:
        o = scale["overhead"]
        lines += [f"## Orchestration overhead: {o['parts']} parts of 5 MiB (discard endpoint)", "",
                  "| | parts/s | wall s |", "|---|---|---|",
                  f"| s3ferry upload, end to end | {o['s3ferry']['parts_per_s']:.1f} | {o['s3ferry']['wall_s']:.1f} |",
                  f"| s3ferry, part phase only | {o['s3ferry']['part_phase_parts_per_s']:.1f} | "
                  f"{o['s3ferry']['part_phase_s']:.1f} |",
                  f"| no-op Celery chord | {o['noop_chord']['parts_per_s']:.1f} | {o['noop_chord']['wall_s']:.1f} |",
                  "", f"Ratio to the no-op chord: {o['ratio_end_to_end']:.2f} end to end, "
                  f"{o['ratio_part_phase']:.2f} for the part phase.", ""]
        chart(["s3ferry (end to end)", "s3ferry (parts)", "no-op chord"],
              [o["s3ferry"]["parts_per_s"], o["s3ferry"]["part_phase_parts_per_s"], o["noop_chord"]["parts_per_s"]],
              "parts per second", "Orchestration overhead", "overhead.png")
        lines += ["![overhead](overhead.png)", ""]
    if scale and "scale" in scale:
        s = scale["scale"]
        lines += [f"## Scale: one upload of {s['parts']:,} parts", "",
                  "| phase | seconds |", "|---|---|",
                  f"| plan, record and CreateMultipartUpload, to dispatch | {s['record_s']:.2f} |",
                  f"| dispatch to first part | {s['dispatch_to_first_part_s']:.2f} |",
                  f"| parts ({s['part_phase_parts_per_s']:.0f} parts/s, {s['MBps_part_phase']:.0f} MB/s) | "
                  f"{s['part_phase_s']:.1f} |",
                  f"| last part to complete (CompleteMultipartUpload, HeadObject) | {s['completion_s']:.2f} |",
                  f"| wall, `s3ferry upload` | {s['wall_s']:.1f} |", ""]
    aimd = load("aimd")
    if aimd:
        sys.path.insert(0, str(RESULTS.parents[1]))
        from bench.aimd import table

        p = aimd["params"]
        lines += [f"## Parts in flight: AIMD vs fixed ({p['size'] >> 20} MiB, {p['part_size'] >> 20} MiB parts, "
                  f"{p['latency_s']} s added per request, median of {p['runs']} runs; `python bench/aimd.py`)", "",
                  "One worker with 16 threads; the window fixed at 1, 4, 16, or AIMD from a fresh window (cold) and "
                  "from the window the cold run left (warm). Throttled: 503 SlowDown for every request beyond "
                  f"{p['throttle_above']} in flight.", "", table(aimd["summary"]), "",
                  "![AIMD window, clean link](aimd-clean.png)", "", "![AIMD window, throttled link](aimd-throttled.png)",
                  ""]
    if scheduler:
        lines += ["## Scheduler", "", f"Picking the next of {scheduler.get('queued', 10000):,} queued uploads: "
                  f"{scheduler['pick_median_ms']:.2f} ms median (p95 {scheduler['pick_p95_ms']:.2f} ms).", ""]
    if profile:
        lines += ["## Worker profile (py-spy, 1 GiB to the discard endpoint)", "",
                  "| function | share of samples |", "|---|---|"]
        lines += [f"| `{row['frame']}` | {row['share']:.1%} |" for row in profile["top"]]
        lines.append("")
    (RESULTS / "README.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def chart(labels: list[str], values: list[float], ylabel: str, title: str, name: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(labels, values, color=["#d9534f" if "s3ferry" in label else "#5b8def" for label in labels])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(RESULTS / name, dpi=100)
    plt.close(fig)



TARGET_LABELS = {"moto-http": "moto, http", "moto-https": "moto, https", "discard-http": "discard, http",
                 "discard-https": "discard, https"}


def peers_section(peers: dict) -> list[str]:  # type: ignore[type-arg]
    """Tables (MB/s and ratio to boto3, CPU, RSS, requests) per tool and target, and two charts."""
    t, p, c = peers["throughput"], peers["params"], peers.get("commit", {})
    targets = list(t)
    tools = list(dict.fromkeys(name for rows in t.values() for name in rows))
    size = p["size"] / 2**30
    size_text = f"{size:.0f} GiB" if size >= 1 else f"{p['size'] >> 20} MiB"
    head = "| tool | " + " | ".join(TARGET_LABELS.get(x, x) for x in targets) + " |"
    rule = "|---|" + "---|" * len(targets)

    def table(cell) -> list[str]:  # type: ignore[no-untyped-def]
        out = [head, rule]
        for name in tools:
            out.append(f"| {name} | " + " | ".join(cell(t[x].get(name)) for x in targets) + " |")
        return out

    def failed(row) -> str:  # type: ignore[no-untyped-def]
        return "not run" if row is None else "failed"

    lines = [f"## Peers: {size_text}, {p['part_size'] >> 20} MiB parts, {p['concurrency']} at a time, "
             f"median of {p['runs']} alternating runs", "",
             "Reproduce: `python bench/peers.py"
             + (f" --rev {c['commit'][:12]}" if c.get("code", "").startswith("git") else "")
             + (f" --size {p['size'] >> 20}MiB" if p["size"] != 2**30 else "") + "` (~30 min on 2 CPUs). "
             f"s3ferry measured: {c.get('code', '?')}, commit `{c.get('commit', '?')[:12]}` "
             f"(\"{c.get('subject', '')[:90]}\"), from {c.get('measured_at', '?')}; "
             f"{p['cpus']} CPUs shared with other work (1-minute load average {p['load_average_at_start'][0]:.1f} "
             "at the start).", ""]
    lines += [f"- {x}: {desc}" for x, desc in p["targets"].items()]
    loads = [run["load_1m"] for rows in t.values() for row in rows.values() for run in row.get("runs", [])
             if "load_1m" in run]
    lines += ["", "MB/s, median (speed relative to boto3's: the median of each round's ratio to boto3's run of "
              "the same round" + (f"; the machine's 1-minute load average during the runs: {min(loads):.1f} to "
                                  f"{max(loads):.1f} on {p['cpus']} CPUs" if loads else "") + "):", ""]
    lines += table(lambda r: f"{r['median_MBps']:.1f} ({r.get('paired_ratio_to_boto3', r['ratio_to_boto3']):.2f}x)"
                   if r and "median_s" in r else failed(r))
    lines += ["", "Client CPU seconds per GiB, median (ratio to boto3's): the tool's processes and all they "
              "started; s3ferry fleet: the command and the worker, not Postgres or Redis:", ""]
    lines += table(lambda r: f"{r['cpu_s_per_GiB']:.2f}" + (f" ({r['cpu_ratio_to_boto3']:.2f}x)"
                                                           if "cpu_ratio_to_boto3" in r else "")
                   if r and "median_s" in r else failed(r))
    lines += ["", "Peak RSS, MiB, summed over the client's processes (the largest single process in brackets "
              "where there are several):", ""]
    lines += table(lambda r: (f"{r['peak_rss_MiB']:.0f}" + (f" [{r['largest_process_rss_MiB']:.0f}]"
                                                            if r['peak_rss_MiB'] - r['largest_process_rss_MiB'] > 1
                                                            else "")) if r and "median_s" in r else failed(r))
    lines += ["", "S3 requests per GiB:", ""]
    lines += table(lambda r: f"{r['requests_per_GiB']:.0f}" if r and "median_s" in r else failed(r))
    failures = [f"- {name} on {x}: {'; '.join(row['failures'])[:400]}" for x in targets
                for name, row in t[x].items() if row.get("failures")]
    if failures or peers.get("notes"):
        lines += ["", "Notes and failures:", ""] + [f"- {n}" for n in peers.get("notes", [])] + failures
    versions = peers.get("versions")
    if versions:
        lines += ["", "Versions: " + "; ".join(f"{k} {v}" for k, v in versions.items()) + "."]
    lines += ["", "![throughput](throughput.png)", "", "![cpu](cpu.png)", ""]
    grouped(tools, targets, t, "median_MBps", "MB/s (median)", "Throughput", "throughput.png")
    grouped(tools, targets, t, "cpu_s_per_GiB", "CPU s per GiB", "Client CPU", "cpu.png")
    return lines


def grouped(tools: list[str], targets: list[str], t: dict, field: str, ylabel: str, title: str,  # type: ignore[type-arg]
            name: str) -> None:
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(1, len(targets))
    for i, target in enumerate(targets):
        values = [t[target].get(tool, {}).get(field, 0) for tool in tools]
        ax.bar([x + i * width for x in range(len(tools))], values, width, label=TARGET_LABELS.get(target, target))
    ax.set_xticks([x + width * (len(targets) - 1) / 2 for x in range(len(tools))])
    ax.set_xticklabels(tools, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / name, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
