"""Progress of an upload, read from the database (so it works from any machine that reaches it)."""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import time
import uuid

from models import queries
from models.db import Database
from models.settings import format_size
from models.states import UploadStatus


@dataclasses.dataclass(frozen=True)
class Snapshot:
    id: str
    status: str
    source: str
    destination: str
    endpoint: str | None
    size: int
    bytes_done: int
    part_size: int
    parts_total: int
    parts_done: int
    parts_in_flight: int
    parts_pending: int
    parts_failed: int
    retries: int
    max_retries: int
    last_error: str | None
    etag: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None

    @property
    def finished(self) -> bool:
        return self.status in (UploadStatus.COMPLETE, UploadStatus.FAILED, UploadStatus.CANCELLED)

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def snapshot(db: Database, upload_id: uuid.UUID) -> Snapshot:
    with db.transaction() as session:
        upload = queries.get_upload(session, upload_id)
        counts = queries.part_counts(session, upload_id)
    return Snapshot(
        id=str(upload.id), status=str(upload.status), source=upload.source_uri,
        destination=f"s3://{upload.bucket}/{upload.key}", endpoint=upload.endpoint_url,
        size=upload.source_size, bytes_done=counts.bytes_done, part_size=upload.part_size,
        parts_total=upload.total_parts, parts_done=counts.done, parts_in_flight=counts.in_flight,
        parts_pending=counts.pending, parts_failed=counts.failed, retries=upload.retry_count,
        max_retries=upload.max_retries, last_error=upload.last_error, etag=upload.etag,
        created_at=_iso(upload.created_at), started_at=_iso(upload.started_at),
        finished_at=_iso(upload.finished_at),
    )


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).isoformat()


class RateMeter:
    """Bytes per second over the last `window` seconds of samples."""

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self.samples: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, done: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()

    @property
    def rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def eta(self, remaining: int) -> float | None:
        rate = self.rate
        return remaining / rate if rate > 0 else None


def render(snap: Snapshot, meter: RateMeter, width: int = 30) -> str:
    """`[#########.....]  45%  1.4 GiB/3.0 GiB  87.2 MiB/s  ETA 0:19  parts 45/96 (4 in flight)`."""
    fraction = snap.bytes_done / snap.size if snap.size else (1.0 if snap.status == UploadStatus.COMPLETE else 0.0)
    filled = int(fraction * width)
    eta = meter.eta(snap.size - snap.bytes_done)
    text = (f"[{'#' * filled}{'.' * (width - filled)}] {fraction:4.0%}  "
            f"{format_size(snap.bytes_done)}/{format_size(snap.size)}  {format_size(meter.rate)}/s  "
            f"ETA {_clock(eta)}  parts {snap.parts_done}/{snap.parts_total}")
    if snap.parts_in_flight:
        text += f" ({snap.parts_in_flight} in flight)"
    if snap.retries:
        text += f"  retries {snap.retries}"
    if snap.status not in (UploadStatus.IN_PROGRESS, UploadStatus.COMPLETE):
        text += f"  [{snap.status}]"
    return text


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
