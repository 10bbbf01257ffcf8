"""Fixtures of the integration tests that need the session's services."""

from __future__ import annotations

import os
import urllib.parse
import uuid
from collections.abc import Iterator

import pytest
import redis

from tests import services
from tests.http_faults import FaultProxy


@pytest.fixture
def proxy_and_env(service_env: dict[str, str], s3_endpoint: str,
                  redis_urls: tuple[str, str]) -> Iterator[tuple[FaultProxy, dict[str, str]]]:
    """A fault proxy, and an environment that sends through it on a queue of this test's own
    (so the session's worker does not take its parts)."""
    proxy = FaultProxy(s3_endpoint)
    queue = f"s3ferry-window-{uuid.uuid4().hex[:8]}"
    yield proxy, {**service_env, "AWS_ENDPOINT_URL": proxy.url, "S3FERRY_QUEUE": queue}
    proxy.close()
    services.purge_queue(redis_urls[0], queue)
    backend = redis.Redis.from_url(redis_urls[1])
    backend.delete(f"s3ferry:sign:{queue}:requests")
    backend.close()


RABBITMQ_URL = os.environ.get("S3FERRY_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """RabbitMQ, for the tests of a fleet on it. CI starts it (.ci/run) and fails without it; on a
    machine that has none, those tests are skipped (the rest of the suite needs only Python)."""
    parsed = urllib.parse.urlsplit(RABBITMQ_URL)
    if not services.listening(parsed.hostname or "127.0.0.1", parsed.port or 5672):
        missing = f"no RabbitMQ at {RABBITMQ_URL} (start it, or set S3FERRY_TEST_RABBITMQ_URL)"
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    return RABBITMQ_URL


@pytest.fixture
def rabbitmq_env(service_env: dict[str, str], redis_urls: tuple[str, str], rabbitmq_url: str) -> Iterator[dict[str, str]]:
    """A fleet on RabbitMQ (result backend and window on the test Redis), on a queue of this test's own."""
    queue = f"s3ferry-amqp-{uuid.uuid4().hex[:8]}"
    yield {**service_env, "S3FERRY_BROKER_URL": rabbitmq_url, "S3FERRY_RESULT_BACKEND": redis_urls[1],
           "S3FERRY_QUEUE": queue}
    services.delete_amqp_queues(rabbitmq_url, queue, f"{queue}.control", f"{queue}.recovered")
