"""The Celery tasks: thin wrappers that unpack ids, call plain functions, and map retries.

Arguments are ids only (an upload's UUID, a part number): no credentials, URLs or bytes.
Retries are counted in Postgres by the plain functions, not by Celery (max_retries=None);
database errors are retried without counting: Postgres may be restarting.
"""

from __future__ import annotations

import uuid
from typing import Any

from celery import Task

from models.exceptions import DatabaseError
from workers import completion, parts, retry, runtime
from workers.app import app


@app.task(bind=True, name="s3ferry.upload_part", max_retries=None)
def upload_part(self: Task, upload_id: str, part_number: int) -> dict[str, object]:
    rt = runtime.get()
    try:
        return parts.send_part(rt, uuid.UUID(upload_id), part_number).as_dict()
    except parts.RetryLater as later:
        countdown = later.seconds if later.seconds is not None else _outage_wait(self, rt)
        raise self.retry(countdown=countdown, exc=later) from later
    except DatabaseError as error:
        raise self.retry(countdown=_database_wait(self, rt), exc=error) from error


@app.task(bind=True, name="s3ferry.complete_upload", max_retries=None)
def complete_upload(self: Task, collected: list[Any], upload_id: str) -> str:
    """The chord's callback: `collected` holds the part results, checked against Postgres."""
    rt = runtime.get()
    try:
        return completion.complete(rt, uuid.UUID(upload_id), collected, attempt=self.request.retries)
    except parts.RetryLater as later:
        raise self.retry(countdown=later.seconds, exc=later) from later
    except DatabaseError as error:
        raise self.retry(countdown=_database_wait(self, rt), exc=error) from error


def _database_wait(task: Task, rt: runtime.Runtime) -> float:
    return retry.backoff(min(task.request.retries + 1, 6), rt.settings.retry_backoff_base, 60.0)


def _outage_wait(task: Task, rt: runtime.Runtime) -> float:
    return retry.backoff(min(task.request.retries + 1, 12), rt.settings.retry_backoff_base,
                         rt.settings.retry_backoff_max)


@app.task(name="s3ferry.reconcile")
def reconcile(upload_id: str | None = None) -> list[str]:
    """Get stalled uploads (or one upload) moving again; run by beat and when a worker starts."""
    from orchestrator import reconciler

    rt = runtime.get()
    if upload_id:
        return [str(reconciler.reconcile(rt.settings, rt.db, uuid.UUID(upload_id)))]
    return [str(report) for report in reconciler.reconcile_stalled(rt.settings, rt.db)]


@app.task(name="s3ferry.sweep")
def sweep() -> list[str]:
    """Abort the multipart uploads of cancelled uploads, and of failed ones past their TTL."""
    import datetime as dt

    from orchestrator import sweeper

    rt = runtime.get()
    return [str(s) for s in sweeper.sweep(rt.settings, rt.db, dt.timedelta(seconds=rt.settings.sweep_after_seconds))]


@app.task(name="s3ferry.schedule")
def schedule() -> list[str]:
    """Start queued uploads while slots are free (after a completion, failure, pause, cancel; and by beat)."""
    from orchestrator import scheduler

    rt = runtime.get()
    return [str(u) for u in scheduler.schedule(rt.settings, rt.db)]
