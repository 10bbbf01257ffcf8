"""Where the worker's time goes: py-spy samples `s3ferry worker` (threads, concurrency 4)
while it sends a 1 GiB file to the discard endpoint (bench/discard_s3.py).

    python bench/profile_worker.py [--size 1GiB]     # writes bench/results/profile.json

The table lists the frames where samples were taken (self time, idle threads excluded),
with their share of all samples.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.peers import RESULTS, Discard, bench_env, start, write_random  # noqa: E402
from models.settings import parse_size  # noqa: E402
from tests import services  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GiB")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(services.BIN / "py-spy")
    work = Path(tempfile.mkdtemp(prefix="s3ferry-profile-"))
    source = work / "source.bin"
    write_random(source, parse_size(args.size))
    port = services.free_port()
    env = bench_env(f"http://127.0.0.1:{port}")
    raw = work / "profile.txt"
    try:
        with Discard(work, port):
            worker = start(work, env, [str(services.BIN / "s3ferry"), "worker", "--pool=threads", "--concurrency=4",
                                       "--loglevel=INFO"], "worker")
            recorder = subprocess.Popen([spy, "record", "--pid", str(worker.pid), "--format", "raw", "--rate", "200",
                                         "--output", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            subprocess.run([str(services.BIN / "s3ferry"), "upload", str(source), "s3://bench/profiled"], env=env,
                           check=True, capture_output=True)
            recorder.send_signal(signal.SIGINT)
            recorder.wait(30)
            worker.send_signal(signal.SIGTERM)
            worker.wait(30)
        self_time: collections.Counter[str] = collections.Counter()
        total = 0
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frame = stack.split(";")[-1]
            if any(idle in frame for idle in ("wait (threading.py", "select (selectors.py", "_recv_into", "poll (")):
                continue  # threads waiting, not working
            self_time[frame] += int(count)
            total += int(count)
        top = [{"frame": frame, "share": count / total} for frame, count in self_time.most_common(15)]
        result = {"size": parse_size(args.size), "samples": total, "top": top}
        (RESULTS / "profile.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
