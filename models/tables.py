"""The tables: uploads, parts, upload_events.

Column types are portable between PostgreSQL and SQLite (Uuid, BigInteger,
String, non-native enums): the same models serve a fleet and a laptop.
"""

from __future__ import annotations

import datetime as dt
import uuid

import sqlalchemy as sa
from sqlalchemy import orm

from models import clock
from models.states import PartStatus, UploadStatus

#: SQLite only auto-increments an INTEGER PRIMARY KEY.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(orm.DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING)
    type_annotation_map = {dt.datetime: sa.DateTime(timezone=True)}


def _status(enum_cls: type) -> sa.Enum:
    return sa.Enum(
        enum_cls,
        native_enum=False,
        create_constraint=True,
        length=16,
        name="status",
        values_callable=lambda e: [m.value for m in e],
    )


class Upload(Base):
    __tablename__ = "uploads"

    id: orm.Mapped[uuid.UUID] = orm.mapped_column(sa.Uuid, primary_key=True, default=uuid.uuid4)
    # source: where the bytes come from, and the fingerprint that proves they did not change
    source_uri: orm.Mapped[str] = orm.mapped_column(sa.String(4096))
    source_size: orm.Mapped[int] = orm.mapped_column(sa.BigInteger)
    source_mtime_ns: orm.Mapped[int] = orm.mapped_column(sa.BigInteger)
    source_inode: orm.Mapped[int] = orm.mapped_column(sa.BigInteger)
    #: st_ctime_ns, which `touch -r` cannot restore; NULL on rows recorded before it was taken
    source_ctime_ns: orm.Mapped[int | None] = orm.mapped_column(sa.BigInteger)
    # destination
    bucket: orm.Mapped[str] = orm.mapped_column(sa.String(63))
    key: orm.Mapped[str] = orm.mapped_column(sa.String(1024))
    endpoint_url: orm.Mapped[str | None] = orm.mapped_column(sa.String(2048))
    #: S3's multipart upload id; NULL when the file is one part (sent with one PutObject).
    s3_upload_id: orm.Mapped[str | None] = orm.mapped_column(sa.String(1024))
    part_size: orm.Mapped[int] = orm.mapped_column(sa.BigInteger)
    total_parts: orm.Mapped[int] = orm.mapped_column(sa.Integer)
    status: orm.Mapped[UploadStatus] = orm.mapped_column(_status(UploadStatus), default=UploadStatus.QUEUED)
    priority: orm.Mapped[int] = orm.mapped_column(sa.Integer, default=0)
    #: the Celery queue it was submitted to: the fleet consuming that queue sends and recovers it
    queue: orm.Mapped[str] = orm.mapped_column(sa.String(200), default="s3ferry", server_default="s3ferry")
    # retry metadata
    max_retries: orm.Mapped[int] = orm.mapped_column(sa.Integer)
    retry_count: orm.Mapped[int] = orm.mapped_column(sa.Integer, default=0)
    last_retry_at: orm.Mapped[dt.datetime | None]
    last_error: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    # timestamps
    created_at: orm.Mapped[dt.datetime] = orm.mapped_column(default=clock.now())
    updated_at: orm.Mapped[dt.datetime] = orm.mapped_column(default=clock.now())
    started_at: orm.Mapped[dt.datetime | None]
    finished_at: orm.Mapped[dt.datetime | None]
    #: when parts were last dispatched (the reconciler's ticket)
    dispatched_at: orm.Mapped[dt.datetime | None]
    #: when the multipart upload was aborted in S3 (cancelled, or failed and swept)
    s3_aborted_at: orm.Mapped[dt.datetime | None]
    #: the object's ETag once complete
    etag: orm.Mapped[str | None] = orm.mapped_column(sa.String(128))
    #: the object's CRC32C once complete, computed from the parts' checksums as read from the source:
    #: plain base64 for one part, S3's COMPOSITE form (base64 of the CRC32C of the parts' CRC32Cs, then '-N')
    checksum: orm.Mapped[str | None] = orm.mapped_column(sa.String(64))
    #: the worker process completing it (while completing): if it dies, any worker sees it
    completer: orm.Mapped[str | None] = orm.mapped_column(sa.String(255))

    __table_args__ = (
        sa.Index("ix_uploads_status_priority_created", "status", "priority", "created_at"),
        sa.Index("ix_uploads_source_destination", "source_uri", "bucket", "key"),
    )


class Part(Base):
    __tablename__ = "parts"

    upload_id: orm.Mapped[uuid.UUID] = orm.mapped_column(
        sa.ForeignKey("uploads.id", ondelete="CASCADE"), primary_key=True
    )
    part_number: orm.Mapped[int] = orm.mapped_column(sa.Integer, primary_key=True)
    offset: orm.Mapped[int] = orm.mapped_column(sa.BigInteger)
    size: orm.Mapped[int] = orm.mapped_column(sa.BigInteger)
    status: orm.Mapped[PartStatus] = orm.mapped_column(_status(PartStatus), default=PartStatus.PENDING)
    etag: orm.Mapped[str | None] = orm.mapped_column(sa.String(128))
    #: base64 CRC32C of the part's bytes, as S3 checked it (ChecksumCRC32C)
    checksum: orm.Mapped[str | None] = orm.mapped_column(sa.String(64))
    attempts: orm.Mapped[int] = orm.mapped_column(sa.Integer, default=0)
    last_error: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    #: the claim while in_flight: its own token (`process/delivery`: one delivery of the part
    #: holds it, not every thread of the process), the process holding it (its liveness record:
    #: see WorkerProcess), and until when
    worker: orm.Mapped[str | None] = orm.mapped_column(sa.String(255))
    holder: orm.Mapped[str | None] = orm.mapped_column(sa.String(255))
    lease_expires_at: orm.Mapped[dt.datetime | None]
    started_at: orm.Mapped[dt.datetime | None]
    finished_at: orm.Mapped[dt.datetime | None]

    __table_args__ = (sa.Index("ix_parts_status_lease", "status", "lease_expires_at"),)


class UploadEvent(Base):
    """Every status change of an upload or one of its parts, with time and reason."""

    __tablename__ = "upload_events"

    id: orm.Mapped[int] = orm.mapped_column(BigId, primary_key=True, autoincrement=True)
    upload_id: orm.Mapped[uuid.UUID] = orm.mapped_column(
        sa.ForeignKey("uploads.id", ondelete="CASCADE"), index=True
    )
    #: NULL for a change of the upload itself
    part_number: orm.Mapped[int | None] = orm.mapped_column(sa.Integer)
    from_status: orm.Mapped[str | None] = orm.mapped_column(sa.String(16))
    to_status: orm.Mapped[str] = orm.mapped_column(sa.String(16))
    reason: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    at: orm.Mapped[dt.datetime] = orm.mapped_column(default=clock.now())


class WorkerProcess(Base):
    """A worker process's liveness: stamped every few seconds by its heartbeat (the database's
    clock). A claim whose holder's record has expired belongs to a dead process."""

    __tablename__ = "workers"

    #: the process's worker id (`host:node:pid`), as it names its claims (parts.worker)
    id: orm.Mapped[str] = orm.mapped_column(sa.String(255), primary_key=True)
    started_at: orm.Mapped[dt.datetime] = orm.mapped_column(default=clock.now())
    beat_at: orm.Mapped[dt.datetime] = orm.mapped_column(default=clock.now())
    #: dead after this unless it beats again
    expires_at: orm.Mapped[dt.datetime]

    __table_args__ = (sa.Index("ix_workers_expires_at", "expires_at"),)


class RecoveryTurn(Base):
    """Whose turn it is to run a part of the recovery pass (orchestrator/failover.py): a lease on
    the database's clock, so that one pass at a time runs fleet-wide, through any pooler."""

    __tablename__ = "recovery_turns"

    name: orm.Mapped[str] = orm.mapped_column(sa.String(255), primary_key=True)
    holder: orm.Mapped[str | None] = orm.mapped_column(sa.String(255))
    until: orm.Mapped[dt.datetime]
