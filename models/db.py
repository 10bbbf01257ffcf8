"""The driver boundary: engines, transactions, and driver errors turned into ours.

Business code never catches psycopg or sqlite3 errors: `Database.transaction()`
translates them into `DatabaseUnavailable` (naming the host, never the password)
or `DatabaseError`.
"""

from __future__ import annotations

import contextlib
import logging
import select
from collections.abc import Iterator

import sqlalchemy as sa
from sqlalchemy import exc, orm

from models.exceptions import DatabaseError, DatabaseUnavailable

log = logging.getLogger(__name__)


class Database:
    """One engine and session factory per process (create it after a fork, never share it).

    `threads`: how many threads of the process use the database at once (a worker's task
    threads, plus its heartbeat and recovery pass): the pool keeps that many connections, so
    that none is opened per transaction (a connect costs tens of milliseconds).
    """

    def __init__(self, url: str, threads: int | None = None) -> None:
        self.url = sa.make_url(url)
        self.engine = _make_engine(self.url, threads or DEFAULT_THREADS)
        self.sessions = orm.sessionmaker(self.engine, expire_on_commit=False)
        # PostgreSQL runs a single statement as a transaction of its own: no BEGIN, no COMMIT.
        single = self.engine if self.url.get_backend_name() == "sqlite" else \
            self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._single_statements = orm.sessionmaker(single, expire_on_commit=False)

    @property
    def where(self) -> str:
        """The database as it may appear in messages: no password."""
        return describe(self.url)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[orm.Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with wrap_errors(self.url), self.sessions.begin() as session:
            yield session

    @contextlib.contextmanager
    def statement(self) -> Iterator[orm.Session]:
        """A session for work that is ONE statement on PostgreSQL (the per-part moves of
        models/transitions.py: claim_part, finish_part, step_aside, renew_lease), run in autocommit: the
        statement is its own transaction, and costs one round trip instead of three (BEGIN,
        the statement, COMMIT). Work of several statements gets no atomicity here: use
        transaction(). On SQLite, where that work is several statements, it is a transaction."""
        with wrap_errors(self.url), self._single_statements.begin() as session:
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


#: Connections kept by a process that does not say how many threads use the database.
DEFAULT_THREADS = 2
#: Connections opened beyond those kept, at least (closed again when returned).
MIN_OVERFLOW = 4
#: Pooled connections are replaced after this long (a pooler's or firewall's limit on a connection's age).
RECYCLE_SECONDS = 1800


def _make_engine(url: sa.URL, threads: int) -> sa.Engine:
    if url.get_backend_name() != "sqlite":
        # No pool_pre_ping (a round trip per transaction): a pooled connection is checked as it is
        # taken, at no round trip (_check_on_checkout). The overflow is for bursts: a worker's
        # lease keepers renewing while all its task threads hold connections.
        engine = sa.create_engine(url, pool_size=threads, max_overflow=max(threads, MIN_OVERFLOW),
                                  pool_recycle=RECYCLE_SECONDS, connect_args={"connect_timeout": 10})
        sa.event.listen(engine, "checkout", _check_on_checkout(engine))
        return engine
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


def _check_on_checkout(engine: sa.Engine):  # type: ignore[no-untyped-def]
    """A pool checkout hook: a pooled connection the server closed (a restart, an idle timeout,
    pg_terminate_backend) has something to read, the server's last message or the end of the
    stream, where a live idle one has nothing. Only then is it pinged, and replaced if the ping
    fails (DisconnectionError: the pool connects again): what pool_pre_ping does, without its
    round trip on every checkout. A connection that died mid-transaction fails that transaction
    (DatabaseUnavailable; the callers retry), as it did with pool_pre_ping."""

    def check(dbapi_connection, _record, _proxy):  # type: ignore[no-untyped-def]
        if not _has_input(dbapi_connection):
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as error:  # whatever the driver raises, the connection is gone
            log.info("a pooled database connection was closed (%s); connecting again", error)
            raise exc.DisconnectionError(str(error)) from error

    return check


def _has_input(dbapi_connection) -> bool:  # type: ignore[no-untyped-def]
    """Whether the connection's socket has anything to read (or is gone), without waiting."""
    try:
        fd = dbapi_connection.fileno()
    except Exception:  # noqa: BLE001 - closed
        return True
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])
