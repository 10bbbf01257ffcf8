"""uploads.source_ctime_ns and uploads.checksum

uploads.source_ctime_ns: the source's st_ctime_ns at submit, part of its
fingerprint (a rewrite whose mtime was put back with `touch -r` still moves the
ctime). NULL on uploads recorded before this revision: their ctime is not checked.
uploads.checksum: the object's CRC32C once complete, computed from the parts'
checksums as read (S3's COMPOSITE form for a multipart upload), which S3's own
checksum of the object must match.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("uploads") as batch:
        batch.add_column(sa.Column("source_ctime_ns", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("checksum", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("uploads") as batch:
        batch.drop_column("checksum")
        batch.drop_column("source_ctime_ns")
