"""Which worker processes are alive: a record per process, kept fresh by its heartbeat.

Every process that claims parts stamps its record every `heartbeat_seconds`
with an expiry `liveness_seconds` ahead, both from the database's clock. A
process whose record has expired is dead (SIGKILL, OOM, a lost node): any
other process may release its claims at once, without waiting for their
leases. A process with no record at all (an older version of s3ferry) is
judged by its claims' leases alone.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import orm

from models import clock
from models.states import PartStatus
from models.tables import Part, WorkerProcess


def beat(session: orm.Session, worker: str, liveness_seconds: float) -> None:
    """Stamp `worker` alive until `liveness_seconds` from now (creating its record if new)."""
    stamped = session.execute(
        sa.update(WorkerProcess).where(WorkerProcess.id == worker)
        .values(beat_at=clock.now(), expires_at=clock.now(liveness_seconds)).returning(WorkerProcess.id)
    ).first()
    if stamped is None:
        session.add(WorkerProcess(id=worker, expires_at=clock.now(liveness_seconds)))
        session.flush()


def retire(session: orm.Session, worker: str) -> None:
    """`worker` is going away (graceful shutdown): dead from now on."""
    session.execute(sa.update(WorkerProcess).where(WorkerProcess.id == worker).values(expires_at=clock.now()))


def dead(holder: sa.ColumnElement[str | None]) -> sa.ColumnElement[bool]:
    """SQL: the process named by `holder` has a liveness record, and it has expired."""
    return sa.exists().where(WorkerProcess.id == holder, WorkerProcess.expires_at <= clock.now())


def forget(session: orm.Session, older_than_seconds: float) -> int:
    """Delete the records of processes dead for longer than this that hold no claim."""
    deleted = session.execute(
        sa.delete(WorkerProcess).where(
            WorkerProcess.expires_at < clock.now(-older_than_seconds),
            WorkerProcess.id.not_in(sa.select(Part.worker).where(Part.status == PartStatus.IN_FLIGHT,
                                                                 Part.worker.is_not(None))))
    )
    return int(deleted.rowcount or 0)


def alive(session: orm.Session) -> list[str]:
    """The worker processes alive now (for `s3ferry status` and the tests)."""
    return list(session.scalars(sa.select(WorkerProcess.id).where(WorkerProcess.expires_at > clock.now())
                                .order_by(WorkerProcess.id)))
