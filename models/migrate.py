"""Schema migrations (Alembic), run by `s3ferry db upgrade` and by tests."""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from models.db import describe, wrap_errors
from models.exceptions import DatabaseError

log = logging.getLogger(__name__)


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", "models:migrations")
    return config


def head() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head() or ""


def upgrade(url: str, create_database: bool = True) -> str:
    """Bring the database to the newest schema; returns the revision it is at."""
    parsed = sa.make_url(url)
    if create_database:
        ensure_database(parsed)
    engine = sa.create_engine(parsed)
    try:
        with wrap_errors(parsed), engine.begin() as connection:
            refuse_newer(connection, parsed)
            config = alembic_config()
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            return MigrationContext.configure(connection).get_current_revision() or ""
    finally:
        engine.dispose()


class NewerSchema(DatabaseError):
    """The database was written by a newer s3ferry: this one must not touch it."""


def refuse_newer(connection: sa.Connection, url: sa.URL) -> None:
    """Raise NewerSchema if the database is at a revision this s3ferry does not know."""
    revision = MigrationContext.configure(connection).get_current_revision()
    if revision is None:
        return
    try:
        known = ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except Exception:  # alembic raises several kinds for an unknown revision id  # noqa: BLE001
        known = False
    if not known:
        raise NewerSchema(f"the database ({describe(url)}) was written by a newer version of s3ferry "
                          f"(schema {revision}; this version knows up to {head()}): upgrade s3ferry to use it")


def current(url: str) -> str | None:
    parsed = sa.make_url(url)
    engine = sa.create_engine(parsed)
    try:
        with wrap_errors(parsed), engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def ensure_database(url: sa.URL) -> None:
    """Create the Postgres database named in `url` if it does not exist yet."""
    if url.get_backend_name() != "postgresql" or not url.database:
        return
    admin = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with wrap_errors(url), admin.connect() as connection:
            exists = connection.execute(
                sa.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": url.database}
            ).first()
            if not exists:
                log.info("creating database %s", describe(url))
                connection.execute(sa.text(f'CREATE DATABASE "{_identifier(url.database)}"'))
    finally:
        admin.dispose()


def _identifier(name: str) -> str:
    if '"' in name or "\x00" in name:
        raise DatabaseError(f"invalid database name {name!r}")
    return name
