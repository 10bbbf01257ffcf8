from __future__ import annotations

from models.settings import MiB
from orchestrator import progress


def snap(status: str = "in_progress", done: int = 0, size: int = 100 * MiB, **extra: object) -> progress.Snapshot:
    fields = dict(id="u", status=status, source="file:///x", destination="s3://b/k", endpoint=None, size=size,
                  bytes_done=done, part_size=32 * MiB, parts_total=4, parts_done=1, parts_in_flight=2,
                  parts_pending=1, parts_failed=0, retries=0, max_retries=8, last_error=None, etag=None,
                  created_at="t", started_at=None, finished_at=None)
    fields.update(extra)
    return progress.Snapshot(**fields)  # type: ignore[arg-type]


def test_rate_and_eta_come_from_recent_samples() -> None:
    meter = progress.RateMeter(window=10)
    for second in range(0, 31):
        meter.add(second * 10 * MiB, now=float(second))
    assert meter.rate == 10 * MiB
    assert meter.eta(50 * MiB) == 5
    assert meter.samples[0][0] >= 19  # old samples dropped


def test_render_shows_bytes_rate_eta_and_parts() -> None:
    meter = progress.RateMeter()
    meter.add(0, now=0.0)
    meter.add(50 * MiB, now=5.0)
    line = progress.render(snap(done=50 * MiB, retries=2), meter)
    assert "50%" in line and "50.0 MiB/100.0 MiB" in line and "10.0 MiB/s" in line
    assert "ETA 0:05" in line and "parts 1/4 (2 in flight)" in line and "retries 2" in line


def test_render_before_any_rate_and_when_failed() -> None:
    line = progress.render(snap(status="failed"), progress.RateMeter())
    assert "ETA --:--" in line and "[failed]" in line
    assert progress.render(snap(status="complete", size=0), progress.RateMeter()).count("#") == 30
