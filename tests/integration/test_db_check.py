"""`s3ferry db check`: what init containers wait on before workers and beat start."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from tests.conftest import drop_database
from tests.integration.helpers import run_cli

pytestmark = pytest.mark.integration


def test_db_check_fails_until_the_schema_is_migrated(postgres_url: str, service_env: dict[str, str]) -> None:
    url = sa.make_url(postgres_url).set(database=f"s3ferry_check_{uuid.uuid4().hex[:8]}")
    env = {**service_env, "S3FERRY_DATABASE_URL": url.render_as_string(hide_password=False)}
    try:
        missing = run_cli(["db", "check"], env)
        assert missing.returncode == 3, missing.stderr
        assert len(missing.stderr.strip().splitlines()) == 1 and "run `s3ferry db upgrade`" in missing.stderr
        waited = run_cli(["db", "check", "--wait", "3"], env)
        assert waited.returncode == 3
        assert run_cli(["db", "upgrade"], env).returncode == 0
        ready = run_cli(["db", "check"], env)
        assert ready.returncode == 0 and "up to date" in ready.stdout
    finally:
        drop_database(url)
