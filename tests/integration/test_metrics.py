"""`s3ferry metrics`: scraped before and after an upload, its counters move by what the upload did."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import services
from tests.conftest import write_random
from tests.integration.helpers import MiB, run_cli, serving

pytestmark = pytest.mark.integration


@pytest.fixture
def metrics_url(service_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    port = services.free_port()
    with serving(["metrics", f"--port={port}"], service_env, port, tmp_path / "metrics.log") as url:
        yield f"{url}/metrics"


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    return {match[1]: float(match[2]) for match in re.finditer(r"^([a-z0-9_]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


def test_counters_move_with_an_upload(metrics_url: str, worker, service_env, bucket,  # type: ignore[no-untyped-def]
                                      tmp_path: Path) -> None:
    before = scrape(metrics_url)
    source = tmp_path / "f.bin"
    write_random(source, 12 * MiB)

    assert run_cli(["upload", str(source), f"s3://{bucket}/f.bin", "--part-size", "5MiB"], service_env).returncode == 0

    after = scrape(metrics_url)
    assert after["s3ferry_uploaded_bytes_total"] - before["s3ferry_uploaded_bytes_total"] == 12 * MiB
    assert after['s3ferry_parts_total{outcome="done"}'] - before['s3ferry_parts_total{outcome="done"}'] == 3
    assert after['s3ferry_uploads{status="complete"}'] - before['s3ferry_uploads{status="complete"}'] == 1
    assert after["s3ferry_part_duration_seconds_count"] - before["s3ferry_part_duration_seconds_count"] == 3
    assert after['s3ferry_part_duration_seconds_bucket{le="+Inf"}'] == after["s3ferry_part_duration_seconds_count"]
    assert after["s3ferry_part_duration_seconds_sum"] > before["s3ferry_part_duration_seconds_sum"]
    assert "s3ferry_part_retries_total" in after and "s3ferry_parts_in_flight" in after


def test_during_an_upload_the_counters_move_and_the_window_shows(  # type: ignore[no-untyped-def]
        metrics_url: str, proxy_and_env, workdir: Path, bucket: str, db, tmp_path: Path) -> None:
    import uuid

    from tests.integration.helpers import FINISHED, submit, wait_status
    from workers.window import destination_name

    proxy, env = proxy_and_env
    proxy.configure(bytes_per_second=8 * MiB)  # 40 MiB: about 5 s
    source = tmp_path / "during.bin"
    write_random(source, 40 * MiB)
    worker = services.start_worker(workdir, env, f"metrics-{uuid.uuid4().hex[:4]}", concurrency=2)
    label = f's3ferry_window{{destination="{destination_name(proxy.url, bucket)}"}}'
    try:
        before = scrape(metrics_url)
        upload_id = submit(env, source, bucket)
        during: list[dict[str, float]] = []
        while not during or during[-1]["s3ferry_uploaded_bytes_total"] - before["s3ferry_uploaded_bytes_total"] < 10 * MiB:
            during.append(scrape(metrics_url))
        in_progress = during[-1]
        assert wait_status(db, upload_id, FINISHED, timeout=120) == "complete"
        after = scrape(metrics_url)
    finally:
        worker.stop()
    moved = in_progress["s3ferry_uploaded_bytes_total"] - before["s3ferry_uploaded_bytes_total"]
    assert 10 * MiB <= moved < 40 * MiB  # seen mid-upload, not only at the end
    assert in_progress['s3ferry_uploads{status="in_progress"}'] >= 1
    assert any(scrape_[label] >= 1 for scrape_ in during if label in scrape_), during[-1]
    assert in_progress["s3ferry_window_redis_up"] == 1
    assert after["s3ferry_uploaded_bytes_total"] - before["s3ferry_uploaded_bytes_total"] == 40 * MiB
    assert label in after and after[label.replace("s3ferry_window{", "s3ferry_window_in_flight{")] == 0
