"""How long the scheduler takes to pick the next of 10,000 queued uploads (Postgres).

    python bench/scheduler.py [--queued 10000]     # writes bench/results/scheduler.json

Fills a throwaway database with queued uploads of random priorities, then times
`scheduler.next_queued()` (the two index-backed queries the scheduler runs under
its lock) and prints the query plans.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import migrate  # noqa: E402
from models.db import Database  # noqa: E402
from models.tables import Upload  # noqa: E402
from orchestrator import scheduler  # noqa: E402
from tests.conftest import drop_database  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    url = sa.make_url(args.postgres).set(database=f"s3ferry_sched_bench_{uuid.uuid4().hex[:8]}")
    migrate.upgrade(url.render_as_string(hide_password=False))
    db = Database(url.render_as_string(hide_password=False))
    try:
        rng = random.Random(1)
        now = dt.datetime.now(dt.UTC)  # fixed timestamps for the benchmark rows
        rows = [{"id": uuid.uuid4(), "source_uri": f"file:///data/{i}.bin", "source_size": 1, "source_mtime_ns": 1,
                 "source_inode": i, "bucket": "bench", "key": f"k/{i}", "part_size": 32 << 20, "total_parts": 1,
                 "status": "queued", "priority": rng.randint(0, 9), "max_retries": 8, "retry_count": 0,
                 "created_at": now, "updated_at": now} for i in range(args.queued)]
        with db.transaction() as session:
            session.execute(sa.insert(Upload), rows)
        with db.engine.begin() as connection:
            connection.execute(sa.text("ANALYZE uploads"))
        timings = []
        for _ in range(200):
            with db.transaction() as session:
                start = time.perf_counter()
                picked = scheduler.next_queued(session, "s3ferry")
                timings.append((time.perf_counter() - start) * 1000)
        expected = max(rows, key=lambda r: (r["priority"], -rows.index(r)))
        assert picked is not None and picked.priority == expected["priority"]
        with db.engine.connect() as connection:
            plans = [[r[0] for r in connection.execute(sa.text(f"EXPLAIN {q}"))] for q in (
                "SELECT max(priority) FROM uploads WHERE status = 'queued'",
                "SELECT id FROM uploads WHERE status = 'queued' AND priority = 9 ORDER BY created_at LIMIT 1 "
                "FOR UPDATE SKIP LOCKED")]
        result = {"queued": args.queued, "pick_median_ms": round(statistics.median(timings), 3),
                  "pick_p95_ms": round(sorted(timings)[int(len(timings) * 0.95)], 3), "plans": plans}
        (ROOT / "bench" / "results" / "scheduler.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        db.dispose()
        drop_database(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
