"""The Celery tasks: thin wrappers that unpack ids, call plain functions, and map retries.

Arguments are ids only (an upload's UUID, a part number): no credentials, URLs or bytes.
"""

from __future__ import annotations

import uuid
from typing import Any

from celery import Task

from workers import completion, parts, runtime
from workers.app import app


@app.task(bind=True, name="s3ferry.upload_part", max_retries=None)
def upload_part(self: Task, upload_id: str, part_number: int) -> dict[str, object]:
    """Send one part. Retries are counted in Postgres (parts.attempts), not by Celery."""
    try:
        return parts.send_part(runtime.get(), uuid.UUID(upload_id), part_number).as_dict()
    except parts.RetryLater as later:
        raise self.retry(countdown=later.seconds, exc=later) from later


@app.task(bind=True, name="s3ferry.complete_upload", max_retries=None)
def complete_upload(self: Task, collected: list[Any], upload_id: str) -> str:
    """The chord's callback: `collected` holds the part results, checked against Postgres."""
    rt = runtime.get()
    try:
        return completion.complete(rt, uuid.UUID(upload_id), collected)
    except parts.RetryLater as later:
        if self.request.retries >= rt.settings.max_retries:
            completion.give_up(rt, uuid.UUID(upload_id), f"completing failed: {later}")
        raise self.retry(countdown=later.seconds, exc=later) from later
