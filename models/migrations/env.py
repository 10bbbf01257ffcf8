"""Alembic environment: s3ferry passes an open connection in `config.attributes`."""

from __future__ import annotations

from alembic import context

from models.tables import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - s3ferry always passes a connection
    raise RuntimeError("run migrations through `s3ferry db upgrade` (models.migrate.upgrade)")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
