"""uploads.dispatched_at and uploads.s3_aborted_at

dispatched_at: when parts were last dispatched (the reconciler's ticket: one
reconciler re-dispatches a stalled upload at a time). s3_aborted_at: when the
sweeper aborted the upload's multipart upload in S3.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("uploads") as batch:
        batch.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("s3_aborted_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("uploads") as batch:
        batch.drop_column("s3_aborted_at")
        batch.drop_column("dispatched_at")
