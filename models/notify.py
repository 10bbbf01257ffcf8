"""Telling those who wait on an upload that it moved: PostgreSQL NOTIFY and LISTEN.

`notify(session, upload_id)` inside the transaction that moves an upload or one of its
parts: PostgreSQL delivers it when that transaction commits (never if it rolls back), once
per upload and transaction however often it is called. `Listener` is the other end, on a
connection of its own. SQLite has neither: there, a waiter looks again every second.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid

import sqlalchemy as sa
from sqlalchemy import orm

log = logging.getLogger(__name__)

#: The channel every upload's notifications go to (the payload is the upload's id).
CHANNEL = "s3ferry_progress"


def notify(session: orm.Session, upload_id: uuid.UUID) -> None:
    """Wake whoever waits on `upload_id` once this transaction commits (PostgreSQL; nothing on SQLite)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(sa.text("SELECT pg_notify(:channel, :upload)"),
                        {"channel": CHANNEL, "upload": str(upload_id)})


def returned(upload_id: sa.ColumnElement[object]) -> sa.ColumnElement[object]:
    """The same notification as a column of a statement's RETURNING (PostgreSQL): a move that is
    one statement (models/db.py: Database.statement) notifies without a second one, and only if
    it moved a row. E.g. `update(Part)...returning(Part.part_number, notify.returned(Part.upload_id))`."""
    return sa.func.pg_notify(CHANNEL, sa.cast(upload_id, sa.String))


class Listener:
    """LISTEN on a connection of its own, taken out of `engine`'s pool (PostgreSQL only)."""

    def __init__(self, engine: sa.Engine) -> None:
        fairy = engine.raw_connection()
        self._connection = fairy.driver_connection
        fairy.detach()  # never handed back to the pool still listening
        self._connection.rollback()  # (whatever the pool began) then a session of its own
        self._connection.autocommit = True
        self._connection.execute(f"LISTEN {CHANNEL}")

    def wait(self, upload_id: uuid.UUID, seconds: float) -> bool:
        """Wait up to `seconds` for a notification about `upload_id`; True if one came. A lost
        connection raises the driver's error (the caller falls back to looking every second)."""
        deadline = time.monotonic() + seconds
        wanted = str(upload_id)
        while (left := deadline - time.monotonic()) > 0:
            for note in self._connection.notifies(timeout=left, stop_after=1):
                if note.payload == wanted:
                    return True
        return False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._connection.close()


def listen(engine: sa.Engine) -> Listener | None:
    """A Listener if `engine` is PostgreSQL and reachable, else None."""
    if engine.dialect.name != "postgresql":
        return None
    try:
        return Listener(engine)
    except Exception as error:  # noqa: BLE001 - waiting works without it, one look per second
        log.info("cannot LISTEN for progress (%s); looking every second instead", error)
        return None
