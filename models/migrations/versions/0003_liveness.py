"""workers (liveness records), recovery_turns, uploads.completer and uploads.queue

workers: one row per worker process, stamped by its heartbeat with the
database's clock; a claim whose holder's row has expired belongs to a dead
process (parts.holder names it; parts.worker becomes the claim's own token).
recovery_turns: whose turn it is to run the recovery pass.
uploads.completer: the process completing the upload. uploads.queue:
the Celery queue it was submitted to (the fleet that recovers it).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", sa.String(255), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("beat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
    )
    op.create_index("ix_workers_expires_at", "workers", ["expires_at"])
    op.create_table(
        "recovery_turns",
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("holder", sa.String(255), nullable=True),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_recovery_turns")),
    )
    with op.batch_alter_table("parts") as batch:
        batch.add_column(sa.Column("holder", sa.String(255), nullable=True))
    with op.batch_alter_table("uploads") as batch:
        batch.add_column(sa.Column("completer", sa.String(255), nullable=True))
        batch.add_column(sa.Column("queue", sa.String(200), nullable=False, server_default="s3ferry"))


def downgrade() -> None:
    with op.batch_alter_table("uploads") as batch:
        batch.drop_column("queue")
        batch.drop_column("completer")
    with op.batch_alter_table("parts") as batch:
        batch.drop_column("holder")
    op.drop_table("recovery_turns")
    op.drop_index("ix_workers_expires_at", table_name="workers")
    op.drop_table("workers")
