"""`s3ferry flower`: the real Flower against the test broker, behind basic auth."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import services
from tests.conftest import write_random
from tests.integration.helpers import MiB, run_cli, serving

pytestmark = pytest.mark.integration

AUTH = "ops:correct-horse-battery"


@pytest.fixture
def flower_env(service_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """A queue of its own: no other test's worker (which sends no task events) takes its parts."""
    queue = f"flower-{uuid.uuid4().hex[:8]}"
    yield dict(service_env, S3FERRY_QUEUE=queue)
    services.purge_queue(service_env["S3FERRY_BROKER_URL"], queue)


@pytest.fixture
def worker(workdir: Path, flower_env: dict[str, str]) -> Iterator[services.Server]:
    """A worker that sends task events from its start (S3FERRY_TASK_EVENTS, as compose and the
    Kubernetes manifests set it beside Flower): workers send none unless asked."""
    server = services.start_worker(workdir, dict(flower_env, S3FERRY_TASK_EVENTS="1"), "worker", concurrency=2)
    with services.running(server):
        yield server


@pytest.fixture
def flower(worker, flower_env: dict[str, str], tmp_path: Path) -> Iterator[str]:  # type: ignore[no-untyped-def]
    port = services.free_port()
    log = tmp_path / "flower.log"
    with serving(["flower", f"--port={port}"], dict(flower_env, S3FERRY_FLOWER_BASIC_AUTH=AUTH), port, log) as url:
        yield url
    assert "correct-horse-battery" not in log.read_text(errors="replace")  # never logged


def get(url: str, auth: str | None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""


def test_flower_shows_the_workers_and_their_tasks_only_with_credentials(  # type: ignore[no-untyped-def]
        flower: str, worker, flower_env, bucket, tmp_path: Path) -> None:
    assert get(f"{flower}/api/workers", None)[0] == 401
    assert get(f"{flower}/api/workers", "ops:wrong")[0] == 401
    assert get(f"{flower}/", None)[0] == 401

    deadline = time.monotonic() + 30
    while True:  # Flower lists workers a few seconds after it starts
        status, body = get(f"{flower}/api/workers?refresh=1", AUTH)
        assert status == 200
        if any(name.startswith("worker@") for name in json.loads(body)):
            break
        assert time.monotonic() < deadline, f"no s3ferry worker in Flower: {body[:500]}"
        time.sleep(1)

    source = tmp_path / "f.bin"
    write_random(source, 11 * MiB)
    assert run_cli(["upload", str(source), f"s3://{bucket}/f.bin", "--part-size", "5MiB"], flower_env).returncode == 0
    deadline = time.monotonic() + 30
    while True:
        status, body = get(f"{flower}/api/tasks?limit=1000", AUTH)
        tasks = [t for t in json.loads(body).values() if t.get("name") == "s3ferry.upload_part"]
        if len(tasks) >= 3:
            break
        assert time.monotonic() < deadline, "the upload's part tasks never showed in Flower"
        time.sleep(1)
    for task in tasks:  # ids only: an upload id and a part number
        assert "testing" not in body and "http" not in str(task.get("args"))


def test_flower_refuses_to_start_without_credentials(service_env: dict[str, str]) -> None:
    run = run_cli(["flower", "--port", str(services.free_port())], service_env, timeout=60)
    assert run.returncode == 2
    assert run.stderr.startswith("s3ferry: error: set S3FERRY_FLOWER_BASIC_AUTH=user:password")


@pytest.mark.parametrize(("auth", "reason"), [
    ("admin:CHANGE-ME", "is the example's placeholder CHANGE-ME"),  # what the examples used to ship
    ("ops:change-me-0123456789abcdef", "is the example's placeholder CHANGE-ME"),
    ("ops:0123456789abcde", "is shorter than 16 characters"),
    ("flower-operator-1:flower-operator-1", "equals the user name"),
    (f"{AUTH},admin:admin", "equals the user name"),
])
def test_flower_refuses_weak_or_example_credentials_before_it_listens(
        service_env: dict[str, str], auth: str, reason: str) -> None:
    port = services.free_port()
    run = run_cli(["flower", f"--port={port}"], dict(service_env, S3FERRY_FLOWER_BASIC_AUTH=auth), timeout=60)
    assert run.returncode == 2
    assert run.stderr.startswith("s3ferry: error: S3FERRY_FLOWER_BASIC_AUTH: the password of user ")
    assert reason in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert "0123456789abcde" not in run.stderr and "correct-horse-battery" not in run.stderr  # never the password
    assert not services.listening("127.0.0.1", port)  # Flower never started
