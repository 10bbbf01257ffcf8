"""The driver boundary: engines, transactions, and driver errors turned into ours.

Business code never catches psycopg or sqlite3 errors: `Database.transaction()`
translates them into `DatabaseUnavailable` (naming the host, never the password)
or `DatabaseError`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import sqlalchemy as sa
from sqlalchemy import exc, orm

from models.exceptions import DatabaseError, DatabaseUnavailable

log = logging.getLogger(__name__)


class Database:
    """One engine and session factory per process (create it after a fork, never share it)."""

    def __init__(self, url: str) -> None:
        self.url = sa.make_url(url)
        self.engine = _make_engine(self.url)
        self.sessions = orm.sessionmaker(self.engine, expire_on_commit=False)

    @property
    def where(self) -> str:
        """The database as it may appear in messages: no password."""
        return describe(self.url)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[orm.Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with wrap_errors(self.url), self.sessions.begin() as session:
            yield session

    def check(self) -> None:
        """Connect once, so an unreachable database fails early and clearly."""
        with self.transaction() as session:
            session.execute(sa.text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


def describe(url: sa.URL) -> str:
    if url.get_backend_name() == "sqlite":
        return f"sqlite file {url.database or ':memory:'}"
    port = f":{url.port}" if url.port else ""
    return f"{url.get_backend_name()} at {url.host or 'localhost'}{port}/{url.database or ''}"


@contextlib.contextmanager
def wrap_errors(url: sa.URL) -> Iterator[None]:
    try:
        yield
    except (exc.OperationalError, exc.InterfaceError) as error:
        if _missing_table(error):
            raise DatabaseError(_no_schema(url)) from error
        if f'database "{url.database}" does not exist' in str(error.orig):
            raise DatabaseError(f"the database ({describe(url)}) does not exist: run `s3ferry db upgrade`, "
                                "which creates it") from error
        raise DatabaseUnavailable(f"cannot reach the database ({describe(url)}): {_reason(error, url)}") from error
    except exc.ProgrammingError as error:
        if _missing_table(error):
            raise DatabaseError(_no_schema(url)) from error
        raise DatabaseError(f"database error ({describe(url)}): {_reason(error, url)}") from error
    except exc.DBAPIError as error:
        raise DatabaseError(f"database error ({describe(url)}): {_reason(error, url)}") from error


def _missing_table(error: exc.DBAPIError) -> bool:
    text = str(error.orig)
    return "does not exist" in text and "relation" in text or "no such table" in text


def _no_schema(url: sa.URL) -> str:
    return f"the database ({describe(url)}) has no s3ferry tables: run `s3ferry db upgrade`"


def _reason(error: exc.DBAPIError, url: sa.URL) -> str:
    lines = [line.strip() for line in str(error.orig).splitlines() if line.strip()]
    reason = lines[0] if lines else type(error.orig).__name__
    if url.password:
        reason = reason.replace(str(url.password), "***")
    return reason


def _make_engine(url: sa.URL) -> sa.Engine:
    if url.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=4,
                                connect_args={"connect_timeout": 10})
    engine = sa.create_engine(url, connect_args={"timeout": 30})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        # Let SQLAlchemy, not the driver, begin transactions (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection):  # type: ignore[no-untyped-def]
        # Take the write lock at BEGIN: two processes never deadlock upgrading a read lock.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
