"""Progress of an upload, read from the database (so it works from any machine that reaches it)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from models import clock, notify, queries
from models.db import Database
from models.settings import format_size
from models.states import UploadStatus

log = logging.getLogger(__name__)


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
    priority: int
    #: bytes per second over the last RATE_WINDOW seconds of part completions, and the
    #: seconds left at that rate (None: no recent completion); once complete, the rate of the
    #: part phase (from its start to the last part), completion's time apart
    rate: float
    eta_seconds: float | None
    #: once complete: seconds from the start (or the last resume) to the last part landing, and
    #: from then to CompleteMultipartUpload's answer
    parts_seconds: float | None = None
    completion_seconds: float | None = None
    #: the AIMD window of the destination: size, parts in flight to it, last change (None: none yet)
    window: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in (UploadStatus.COMPLETE, UploadStatus.FAILED, UploadStatus.CANCELLED)

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


RATE_WINDOW = dt.timedelta(seconds=30)


def snapshot(db: Database, upload_id: uuid.UUID,
             window_of: Callable[[str | None, str], str | None] | None = None) -> Snapshot:
    """The upload's progress; `window_of(endpoint, bucket)` describes its destination's window."""
    with db.transaction() as session:
        upload = queries.get_upload(session, upload_id)
        counts = queries.part_counts(session, upload_id)
        now = clock.read(session)  # the clock the parts' times were written with, not this machine's
        since = now - RATE_WINDOW
        started = _aware(upload.started_at)
        if started and started > since:
            since = started
        recent = queries.bytes_finished_since(session, upload_id, since)
        seconds = (now - since).total_seconds()
        rate = recent / seconds if recent and seconds > 0 else 0.0
        parts_seconds = completion_seconds = None
        finished = _aware(upload.finished_at)
        if upload.status == UploadStatus.COMPLETE and started and finished:
            # no part since the last resume (all had landed before): the part phase is empty
            last_part = max(_aware(queries.last_part_finished(session, upload_id)) or started, started)
            parts_seconds = max(0.0, (last_part - started).total_seconds())
            completion_seconds = max(0.0, (finished - last_part).total_seconds())
            sent = queries.bytes_finished_since(session, upload_id, started)
            rate = sent / parts_seconds if parts_seconds > 0 else 0.0
    remaining = upload.source_size - counts.bytes_done
    return Snapshot(
        id=str(upload.id), status=str(upload.status), source=upload.source_uri,
        destination=f"s3://{upload.bucket}/{upload.key}", endpoint=upload.endpoint_url,
        size=upload.source_size, bytes_done=counts.bytes_done, part_size=upload.part_size,
        parts_total=upload.total_parts, parts_done=counts.done, parts_in_flight=counts.in_flight,
        parts_pending=counts.pending, parts_failed=counts.failed, retries=upload.retry_count,
        max_retries=upload.max_retries, last_error=upload.last_error, etag=upload.etag,
        created_at=iso(upload.created_at), started_at=iso(upload.started_at),
        finished_at=iso(upload.finished_at), priority=upload.priority, rate=rate,
        eta_seconds=remaining / rate if rate > 0 and upload.status == UploadStatus.IN_PROGRESS else None,
        parts_seconds=parts_seconds, completion_seconds=completion_seconds,
        window=window_of(upload.endpoint_url, upload.bucket) if window_of else None,
    )


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).isoformat()


def render(snap: Snapshot, width: int = 30) -> str:
    """`[#########.....]  45%  1.4 GiB/3.0 GiB  87.2 MiB/s  ETA 0:19  parts 45/96 (4 in flight)`."""
    fraction = snap.bytes_done / snap.size if snap.size else (1.0 if snap.status == UploadStatus.COMPLETE else 0.0)
    filled = int(fraction * width)
    text = (f"[{'#' * filled}{'.' * (width - filled)}] {fraction:4.0%}  "
            f"{format_size(snap.bytes_done)}/{format_size(snap.size)}  {format_size(snap.rate)}/s  "
            f"ETA {_clock(snap.eta_seconds)}  parts {snap.parts_done}/{snap.parts_total}")
    if snap.parts_in_flight:
        text += f" ({snap.parts_in_flight} in flight)"
    if snap.parts_failed:
        text += f" ({snap.parts_failed} failed)"
    if snap.retries:
        text += f"  retries {snap.retries}"
    if snap.status not in (UploadStatus.IN_PROGRESS, UploadStatus.COMPLETE):
        text += f"  [{snap.status}]"
    return text


def _clock(seconds: float | None) -> str:
    """h:mm:ss, or --:--:-- when unknown."""
    if seconds is None:
        return "--:--:--"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


SIZES = ("size", "bytes_done", "part_size")


def describe(snap: Snapshot) -> dict[str, str]:
    """The snapshot for people: sizes in binary units (bytes too), the rate per second, times
    as h:mm:ss or seconds."""
    shown: dict[str, str] = {}
    for key, value in snap.as_dict().items():
        if value is None:
            text = ""
        elif key in SIZES:
            text = f"{format_size(value)} ({value} B)"  # type: ignore[arg-type]
        elif key == "rate":
            text = f"{format_size(value)}/s" if value else ""  # type: ignore[arg-type]
        elif key == "eta_seconds":
            text = _clock(value)  # type: ignore[arg-type]
        elif key.endswith("_seconds"):
            text = f"{value:.1f} s"
        else:
            text = str(value)
        shown["eta" if key == "eta_seconds" else key] = text
    return shown


def summary(snap: Snapshot) -> str:
    """'1.0 GiB in 0:00:04: parts 3.6 s at 284.4 MiB/s, completion 0.4 s' (a complete upload)."""
    if snap.parts_seconds is None or snap.completion_seconds is None:
        return format_size(snap.size)
    total = snap.parts_seconds + snap.completion_seconds
    return (f"{format_size(snap.size)} in {_clock(total)}: parts {snap.parts_seconds:.1f} s at "
            f"{format_size(snap.rate)}/s, completion {snap.completion_seconds:.1f} s")


#: The worker that finishes an upload pushes to this Redis list (workers/completion.py), so that a
#: command waiting on it wakes at once whatever the database (SQLite has no NOTIFY).
FINISHED = "s3ferry:finished:{}"
FINISHED_TTL = 600


def announce_finished(client: Any, upload_id: uuid.UUID) -> None:
    """Wake a command waiting on the upload (`client`: a redis.Redis)."""
    key = FINISHED.format(upload_id)
    with client.pipeline(transaction=False) as pipe:
        pipe.lpush(key, 1)
        pipe.expire(key, FINISHED_TTL)
        pipe.execute()


class Waiter:
    """Waits until an upload may have moved: a PostgreSQL NOTIFY about it (models/notify.py), or
    the push of the worker that finished it (`redis`, on SQLite), or else the time given."""

    def __init__(self, db: Database, upload_id: uuid.UUID, redis: Any = None) -> None:
        self.upload_id = upload_id
        self.listener = notify.listen(db.engine)
        self.redis = redis if self.listener is None else None

    def wait(self, seconds: float) -> bool:
        """Up to `seconds`; True if woken by news of the upload."""
        if self.listener is not None:
            try:
                return self.listener.wait(self.upload_id, seconds)
            except Exception as error:  # noqa: BLE001 - a lost connection: look every `seconds` from now on
                log.info("stopped listening for progress (%s)", error)
                self.listener.close()
                self.listener = None
        elif self.redis is not None:
            started = time.monotonic()
            try:
                return self.redis.blpop([FINISHED.format(self.upload_id)], timeout=seconds) is not None
            except Exception as error:  # noqa: BLE001 - the broker went away: the caller tends to it
                log.info("could not wait on Redis for the upload's end (%s)", error)
                seconds -= time.monotonic() - started
        time.sleep(max(0.0, seconds))
        return False

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                self.redis.close()
