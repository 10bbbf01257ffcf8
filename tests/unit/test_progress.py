from __future__ import annotations

from models.settings import MiB
from orchestrator import progress


def snap(status: str = "in_progress", done: int = 0, size: int = 100 * MiB, **extra: object) -> progress.Snapshot:
    fields = dict(id="u", status=status, source="file:///x", destination="s3://b/k", endpoint=None, size=size,
                  bytes_done=done, part_size=32 * MiB, parts_total=4, parts_done=1, parts_in_flight=2,
                  parts_pending=1, parts_failed=0, retries=0, max_retries=8, last_error=None, etag=None,
                  created_at="t", started_at=None, finished_at=None, priority=0, rate=0.0, eta_seconds=None)
    fields.update(extra)
    return progress.Snapshot(**fields)  # type: ignore[arg-type]


def test_render_shows_bytes_rate_eta_and_parts() -> None:
    line = progress.render(snap(done=50 * MiB, retries=2, rate=10 * MiB, eta_seconds=5, parts_failed=1))
    assert "50%" in line and "50.0 MiB/100.0 MiB" in line and "10.0 MiB/s" in line
    assert "ETA 0:05" in line and "parts 1/4 (2 in flight) (1 failed)" in line and "retries 2" in line


def test_render_before_any_rate_and_when_failed() -> None:
    line = progress.render(snap(status="failed"))
    assert "ETA --:--" in line and "[failed]" in line
    assert progress.render(snap(status="complete", size=0)).count("#") == 30
    assert "ETA 1:01:01" in progress.render(snap(rate=1.0, eta_seconds=3661))
