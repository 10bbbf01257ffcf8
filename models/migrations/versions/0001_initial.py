"""uploads, parts and upload_events

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UPLOAD_STATUSES = ("queued", "in_progress", "completing", "complete", "failed", "paused", "cancelled")
PART_STATUSES = ("pending", "in_flight", "done", "failed")


def _status(values: tuple[str, ...]) -> sa.Enum:
    return sa.Enum(*values, native_enum=False, create_constraint=True, length=16, name="status")


def upgrade() -> None:
    op.create_table(
        "uploads",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("source_uri", sa.String(4096), nullable=False),
        sa.Column("source_size", sa.BigInteger(), nullable=False),
        sa.Column("source_mtime_ns", sa.BigInteger(), nullable=False),
        sa.Column("source_inode", sa.BigInteger(), nullable=False),
        sa.Column("bucket", sa.String(63), nullable=False),
        sa.Column("key", sa.String(1024), nullable=False),
        sa.Column("endpoint_url", sa.String(2048), nullable=True),
        sa.Column("s3_upload_id", sa.String(1024), nullable=True),
        sa.Column("part_size", sa.BigInteger(), nullable=False),
        sa.Column("total_parts", sa.Integer(), nullable=False),
        sa.Column("status", _status(UPLOAD_STATUSES), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("max_retries", sa.Integer(), nullable=False),
        sa.Column("retry_count", sa.Integer(), nullable=False),
        sa.Column("last_retry_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("etag", sa.String(128), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_uploads")),
    )
    op.create_index("ix_uploads_status_priority_created", "uploads", ["status", "priority", "created_at"])
    op.create_index("ix_uploads_source_destination", "uploads", ["source_uri", "bucket", "key"])

    op.create_table(
        "parts",
        sa.Column("upload_id", sa.Uuid(), nullable=False),
        sa.Column("part_number", sa.Integer(), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("status", _status(PART_STATUSES), nullable=False),
        sa.Column("etag", sa.String(128), nullable=True),
        sa.Column("checksum", sa.String(64), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["upload_id"], ["uploads.id"], name=op.f("fk_parts_upload_id_uploads"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("upload_id", "part_number", name=op.f("pk_parts")),
    )
    op.create_index("ix_parts_status_lease", "parts", ["status", "lease_expires_at"])

    op.create_table(
        "upload_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True,
                  nullable=False),
        sa.Column("upload_id", sa.Uuid(), nullable=False),
        sa.Column("part_number", sa.Integer(), nullable=True),
        sa.Column("from_status", sa.String(16), nullable=True),
        sa.Column("to_status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["upload_id"], ["uploads.id"],
                                name=op.f("fk_upload_events_upload_id_uploads"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_upload_events")),
    )
    op.create_index(op.f("ix_upload_events_upload_id"), "upload_events", ["upload_id"])


def downgrade() -> None:
    op.drop_table("upload_events")
    op.drop_table("parts")
    op.drop_table("uploads")
