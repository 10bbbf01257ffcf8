"""Celery's Redis result backend, without the result subscriptions s3ferry never uses.

Celery's Redis backend subscribes to a pub/sub channel for every task it
publishes, so that a caller may wait on the result. s3ferry never waits on an
AsyncResult: progress is read from Postgres. The chord counters it needs live
in ordinary keys, which this backend keeps exactly as Celery's does.
"""

from __future__ import annotations

from celery.backends import redis as celery_redis


class ResultConsumer(celery_redis.ResultConsumer):
    def consume_from(self, task_id: str) -> None:
        """Subscribe to nothing: nobody in s3ferry waits on a task's result."""

    def cancel_for(self, task_id: str) -> None:
        """Nothing was subscribed."""


class RedisBackend(celery_redis.RedisBackend):
    ResultConsumer = ResultConsumer


def url_for(result_backend: str) -> str:
    """Celery's `module:Class+url` form for Redis URLs (socket:// is a unix socket); others unchanged."""
    if result_backend.startswith(("redis://", "rediss://", "socket://")):
        return f"{__name__}:RedisBackend+{result_backend}"
    return result_backend


#: Set (before publishing) for every dispatch of an upload's missing parts, with the lifetime
#: of the chord's own keys. Gone means Redis lost the dispatch: its messages and its chord.
#: Parts handed on from a dead worker do not set it (they are not the whole upload).
SENTINEL = "s3ferry:dispatched:{}"


def mark_dispatched(app: object, upload_id: str, seconds: int) -> None:
    client = _client(app)
    if client is not None:
        client.set(SENTINEL.format(upload_id), "1", ex=seconds)


def forget_dispatch(app: object, upload_id: str) -> None:
    """The dispatch did not happen after all (publishing failed): let the reconciler see it."""
    client = _client(app)
    if client is not None:
        client.delete(SENTINEL.format(upload_id))


def lost_dispatches(app: object, upload_ids: list[str]) -> set[str]:
    """The uploads whose last dispatch Redis no longer knows (empty if the backend is not Redis)."""
    client = _client(app)
    if client is None or not upload_ids:
        return set()
    present = client.mget([SENTINEL.format(u) for u in upload_ids])
    return {u for u, value in zip(upload_ids, present, strict=True) if value is None}


def _client(app: object):  # type: ignore[no-untyped-def]
    backend = app.backend  # type: ignore[attr-defined]
    return backend.client if isinstance(backend, celery_redis.RedisBackend) else None
