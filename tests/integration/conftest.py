"""Fixtures of the integration tests that need the session's services."""

from __future__ import annotations

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
