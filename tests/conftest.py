"""Fixtures: real Postgres, Redis, moto's S3 server over HTTP, and a real s3ferry worker.

Where the servers come from:
- PostgreSQL: S3FERRY_TEST_POSTGRES_URL if set, else the local server on
  127.0.0.1:5432 if something listens there, else one the tests start (initdb +
  postgres); each run gets a database of its own there (created, migrated, dropped);
- Redis: S3FERRY_TEST_REDIS_URL if set (then db numbers S3FERRY_TEST_REDIS_DBS,
  default "14,15", two lower for each further pytest-xdist process, with queue
  names of the run's own), else a redis-server of the run's own on a free port
  (each pytest-xdist process its own), stopped at the end: nothing is left in, or
  taken from, a Redis someone else uses;
- S3: a moto server of the run's own on a free port, its buckets per test.
No process a test started may outlive the run: `no_process_left` checks it (each
process the run starts carries PYTEST_S3FERRY_RUN in its environment, so daemonized
servers and orphans are found too).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import psutil
import pytest
import sqlalchemy as sa

from models import migrate
from models.db import Database
from orchestrator.demo import sha256_of_object, write_random
from tests import services

#: The demo's helpers are the tests' too: write a random file, hash what S3 holds.
__all__ = ["sha256_of_object", "write_random"]

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1"}
CLEARED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_CONFIG_FILE",
           "AWS_SHARED_CREDENTIALS_FILE", "AWS_CA_BUNDLE")


#: Set in this session's environment, so that every process it starts (and theirs: daemonized
#: servers and orphans too, which are no longer its children) carries it.
RUN_MARK = "PYTEST_S3FERRY_RUN"  # not S3FERRY_*: service_env keeps it


@pytest.fixture(scope="session", autouse=True)
def no_process_left() -> Iterator[None]:
    """After everything else of the session is torn down: no process the tests started is still
    running. Any that is gets killed, and the run fails (an error at the last test's teardown)."""
    mark = uuid.uuid4().hex
    os.environ[RUN_MARK] = mark
    yield
    me = os.getpid()

    def started_here() -> list[psutil.Process]:
        found = []
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if process.pid != me and process.status() != psutil.STATUS_ZOMBIE \
                        and process.environ().get(RUN_MARK) == mark:
                    found.append(process)
        return found

    _, alive = psutil.wait_procs(started_here(), timeout=15)  # those being stopped: stopped
    left = []
    for process in alive:
        with contextlib.suppress(psutil.Error):
            left.append(f"{process.pid} {' '.join(process.cmdline())[:200]}")
            process.kill()
    assert not left, "processes left running by the tests (now killed):\n" + "\n".join(left)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("S3FERRY_TEST_POSTGRES_URL")
    if url:
        yield url
    elif services.listening("127.0.0.1", 5432):
        yield "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    else:
        server, url = services.start_postgres(tmp_path_factory.mktemp("postgres"))
        with services.running(server):
            yield url


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("S3FERRY_TEST_REDIS_URL")
    if url:
        yield url.rstrip("/")
    else:
        server, url = services.start_redis(tmp_path_factory.mktemp("redis"))
        with services.running(server):
            yield url


@pytest.fixture(scope="session")
def database_url(postgres_url: str) -> Iterator[str]:
    """A fresh, migrated database for this test run; dropped at the end."""
    url = sa.make_url(postgres_url).set(database=f"s3ferry_test_{uuid.uuid4().hex[:10]}")
    rendered = url.render_as_string(hide_password=False)
    migrate.upgrade(rendered)
    yield rendered
    from workers import heartbeat

    heartbeat.stop_all(retire=False)  # the in-process runtimes' (tests that made a Runtime), before the drop
    drop_database(url)


def drop_database(url: sa.URL) -> None:
    admin = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def queue() -> str:
    """This run's own Celery queue: two test runs on one Redis never take each other's tasks."""
    return f"s3ferry-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def redis_urls(redis_url: str, queue: str) -> Iterator[tuple[str, str]]:
    """Broker and result backend URLs on the test Redis db numbers; this run's keys removed after."""
    broker_db, backend_db = (int(n) for n in os.environ.get("S3FERRY_TEST_REDIS_DBS", "14,15").split(","))
    # pytest-xdist: each process (gw0, gw1, ...) takes the two db numbers below the previous one's
    shift = 2 * int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    urls = (f"{redis_url}/{broker_db - shift}", f"{redis_url}/{backend_db - shift}")
    yield urls
    services.purge_queue(urls[0], queue)


@pytest.fixture(scope="session")
def s3_endpoint(workdir: Path) -> Iterator[str]:
    server, endpoint = services.start_moto(workdir)
    with services.running(server):
        yield endpoint


@pytest.fixture(scope="session")
def service_env(database_url: str, redis_urls: tuple[str, str], s3_endpoint: str,
                queue: str) -> Iterator[dict[str, str]]:
    """The environment s3ferry runs in during the tests; also applied to this process."""
    env = {key: value for key, value in os.environ.items() if key not in CLEARED and not key.startswith("S3FERRY_")}
    env.update(AWS_ENV)
    env.update({"AWS_ENDPOINT_URL": s3_endpoint, "S3FERRY_DATABASE_URL": database_url,
                "S3FERRY_BROKER_URL": redis_urls[0], "S3FERRY_RESULT_BACKEND": redis_urls[1], "S3FERRY_QUEUE": queue,
                "S3FERRY_RETRY_BACKOFF_BASE": "0.2", "S3FERRY_RETRY_BACKOFF_MAX": "2",
                # tests leave uploads in progress on purpose: they must not hold the queue
                # (the scheduler tests use their own database, with one slot)
                "S3FERRY_MAX_ACTIVE_UPLOADS": "1000",
                # the fleet's policy: sources under the temp folder (pytest's tmp_path), test buckets
                "S3FERRY_SOURCE_ROOTS": os.path.realpath(tempfile.gettempdir()), "S3FERRY_BUCKETS": "test-*"})
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    _configure_loaded_app(env)
    yield env
    os.environ.clear()
    os.environ.update(saved)


def _configure_loaded_app(env: dict[str, str]) -> None:
    """If the Celery app was imported before the environment was set, point it at the test broker."""
    import sys

    loaded = sys.modules.get("workers.broker")
    if loaded is not None:
        from workers import backend

        loaded.app.conf.update(broker_url=env["S3FERRY_BROKER_URL"],
                               result_backend=backend.url_for(env["S3FERRY_RESULT_BACKEND"]),
                               task_default_queue=env["S3FERRY_QUEUE"],
                               task_routes=loaded.control_routes(env["S3FERRY_QUEUE"]))


@pytest.fixture(scope="session")
def worker(workdir: Path, service_env: dict[str, str]) -> Iterator[services.Server]:
    server = services.start_worker(workdir, service_env, "worker", concurrency=2)
    with services.running(server):
        yield server


@pytest.fixture(scope="session")
def s3(service_env: dict[str, str], s3_endpoint: str):  # type: ignore[no-untyped-def]
    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture
def bucket(s3) -> Iterator[str]:  # type: ignore[no-untyped-def]
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    yield name
    try:
        for upload in s3.list_multipart_uploads(Bucket=name).get("Uploads", []):
            s3.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
        for obj in s3.list_objects_v2(Bucket=name).get("Contents", []):
            s3.delete_object(Bucket=name, Key=obj["Key"])
        s3.delete_bucket(Bucket=name)
    except s3.exceptions.NoSuchBucket:
        pass  # the test removed it


@pytest.fixture(scope="session")
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    yield database
    database.dispose()

