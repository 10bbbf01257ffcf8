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
    assert "ETA 0:00:05" in line and "parts 1/4 (2 in flight) (1 failed)" in line and "retries 2" in line


def test_render_before_any_rate_and_when_failed() -> None:
    line = progress.render(snap(status="failed"))
    assert "ETA --:--" in line and "[failed]" in line
    assert progress.render(snap(status="complete", size=0)).count("#") == 30
    assert "ETA 1:01:01" in progress.render(snap(rate=1.0, eta_seconds=3661))


def test_status_text_is_in_human_units() -> None:
    shown = progress.describe(snap(done=50 * MiB, rate=10.5 * MiB, eta_seconds=3725))
    assert shown["size"] == "100.0 MiB (104857600 B)" and shown["bytes_done"] == "50.0 MiB (52428800 B)"
    assert shown["part_size"] == "32.0 MiB (33554432 B)"
    assert shown["rate"] == "10.5 MiB/s" and shown["eta"] == "1:02:05"
    assert shown["last_error"] == "" and shown["status"] == "in_progress"


def test_a_complete_uploads_rate_is_its_part_phases() -> None:
    done = snap(status="complete", done=100 * MiB, rate=50 * MiB, parts_seconds=2.0, completion_seconds=0.5)
    assert progress.summary(done) == "100.0 MiB in 0:00:02: parts 2.0 s at 50.0 MiB/s, completion 0.5 s"
    assert progress.describe(done)["parts_seconds"] == "2.0 s"
