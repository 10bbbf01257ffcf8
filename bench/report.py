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
        t = peers["throughput"]
        p = peers["params"]
        lines += [f"## Throughput: {p['size'] / 2**30:.0f} GiB to moto's server, {p['part_size'] >> 20} MiB parts, "
                  f"{p['concurrency']} at a time, median of {p['runs']} alternating runs", "",
                  "| tool | MB/s | vs boto3 | client CPU s/GiB | peak RSS MiB | S3 requests/GiB |",
                  "|---|---|---|---|---|---|"]
        for name, row in t.items():
            lines.append(f"| {name} | {row['median_MBps']:.1f} | {row['ratio_to_boto3']:.2f}x | "
                         f"{row['cpu_s_per_GiB']:.2f} | {row['peak_rss_MiB']:.0f} | {row['requests_per_GiB']:.0f} |")
        lines += ["", "![throughput](throughput.png)", ""]
        chart(list(t), [row["median_MBps"] for row in t.values()], "MB/s (median)", "Throughput", "throughput.png")
        chart(list(t), [row["cpu_s_per_GiB"] for row in t.values()], "CPU s per GiB", "Client CPU", "cpu.png")
        lines += ["![cpu](cpu.png)", ""]
    if peers and "memory" in peers:
        m = peers["memory"]
        sizes = list(next(iter(m.values())))
        lines += ["## Peak RSS with 4 parts in flight (discard endpoint)", "",
                  "| tool | " + " | ".join(sizes) + " |", "|---|" + "---|" * len(sizes)]
        for name, row in m.items():
            lines.append(f"| {name} | " + " | ".join(f"{row[s]:.0f} MiB" for s in sizes) + " |")
        lines += ["", "![memory](memory.png)", ""]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, row in m.items():
            ax.plot(sizes, [row[s] for s in sizes], marker="o", label=name)
        ax.set_xlabel("part size")
        ax.set_ylabel("peak RSS (MiB)")
        ax.set_title("Client memory, 4 parts in flight")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "memory.png", dpi=100)
        plt.close(fig)
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


if __name__ == "__main__":
    sys.exit(main())
