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
    """Celery's `module:Class+url` form for redis:// and rediss:// URLs; others unchanged."""
    if result_backend.startswith(("redis://", "rediss://", "redis+socket://")):
        return f"{__name__}:RedisBackend+{result_backend}"
    return result_backend
