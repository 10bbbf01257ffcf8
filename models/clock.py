"""The one clock: the database's.

Leases, liveness, stall and sweep ages are compared across processes and
machines, so they are never computed from a worker's wall clock (which may
run minutes off): every such time is the database server's, written and
compared inside the SQL statement itself (`now()`), at no extra round trip.
PostgreSQL's `statement_timestamp()` is the time the statement started, not the
transaction's start; SQLite's (single-machine mode) is this machine's clock,
written in the text form SQLAlchemy uses for its DateTime columns so that
stored and computed times compare as text.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.ext import compiler
from sqlalchemy.sql import expression


class now(expression.FunctionElement):  # noqa: N801 - reads as the SQL function it stands for
    """The database's current time (UTC), plus `seconds` (which may be negative)."""

    type = sa.DateTime(timezone=True)
    name = "s3ferry_now"
    inherit_cache = True

    def __init__(self, seconds: float | sa.ColumnElement[float] = 0.0) -> None:
        offset = seconds if isinstance(seconds, sa.ColumnElement) else sa.literal(float(seconds), sa.Float)
        super().__init__(offset)


@compiler.compiles(now, "postgresql")
def _now_postgresql(element: now, ddl: compiler.SQLCompiler, **kw: object) -> str:
    offset = ddl.process(element.clauses, **kw)
    return f"(statement_timestamp() + make_interval(secs => CAST({offset} AS double precision)))"


@compiler.compiles(now, "sqlite")
def _now_sqlite(element: now, ddl: compiler.SQLCompiler, **kw: object) -> str:
    offset = ddl.process(element.clauses, **kw)
    # SQLite's %f is seconds with milliseconds (SS.SSS); SQLAlchemy stores microseconds (SS.SSSSSS).
    return f"strftime('%Y-%m-%d %H:%M:%f000', 'now', printf('%+.3f seconds', {offset}))"


def read(session: orm.Session) -> dt.datetime:
    """The database's time now (one round trip: for code that must compare outside SQL)."""
    value = session.scalar(sa.select(now()))
    if value.tzinfo is None:  # SQLite gives naive datetimes back; its clock is UTC
        value = value.replace(tzinfo=dt.UTC)
    return value
