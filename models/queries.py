"""Reads: what the CLI, the API and the tests ask of the state. Nothing here writes."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy import orm

from models.exceptions import UploadNotFound
from models.states import PartStatus
from models.tables import Part, Upload, UploadEvent


@dataclasses.dataclass(frozen=True)
class PartCounts:
    pending: int = 0
    in_flight: int = 0
    done: int = 0
    failed: int = 0
    bytes_done: int = 0


def get_upload(session: orm.Session, upload_id: uuid.UUID) -> Upload:
    upload = session.get(Upload, upload_id)
    if upload is None:
        raise UploadNotFound(f"no upload with id {upload_id}")
    return upload


def part_counts(session: orm.Session, upload_id: uuid.UUID) -> PartCounts:
    rows = session.execute(
        sa.select(Part.status, sa.func.count(), sa.func.coalesce(sa.func.sum(Part.size), 0))
        .where(Part.upload_id == upload_id).group_by(Part.status)
    ).all()
    counts: dict[str, int] = {}
    bytes_done = 0
    for status, count, size in rows:
        counts[PartStatus(status).value] = int(count)
        if status == PartStatus.DONE:
            bytes_done = int(size)
    return PartCounts(bytes_done=bytes_done, **counts)


def parts(session: orm.Session, upload_id: uuid.UUID) -> Sequence[Part]:
    return session.scalars(sa.select(Part).where(Part.upload_id == upload_id).order_by(Part.part_number)).all()


def events(session: orm.Session, upload_id: uuid.UUID) -> Sequence[UploadEvent]:
    return session.scalars(sa.select(UploadEvent).where(UploadEvent.upload_id == upload_id)
                           .order_by(UploadEvent.id)).all()


def last_part_finished(session: orm.Session, upload_id: uuid.UUID) -> dt.datetime | None:
    """When the upload's last part landed (None: none has)."""
    return session.scalar(sa.select(sa.func.max(Part.finished_at)).where(
        Part.upload_id == upload_id, Part.status == PartStatus.DONE))


def bytes_finished_since(session: orm.Session, upload_id: uuid.UUID, since: dt.datetime) -> int:
    """Bytes of the parts that landed since `since` (the recent rate of an upload)."""
    return int(session.scalar(sa.select(sa.func.coalesce(sa.func.sum(Part.size), 0)).where(
        Part.upload_id == upload_id, Part.status == PartStatus.DONE, Part.finished_at >= since)) or 0)
