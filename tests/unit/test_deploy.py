"""docker-compose.yml and the Dockerfile, checked without a Docker engine."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from orchestrator import cli

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def s3ferry_roles() -> set[str]:
    parser = cli._parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    return set(commands.choices)  # type: ignore[arg-type]


def test_the_stack_has_postgres_redis_minio_migration_workers_and_flower() -> None:
    services = compose()["services"]
    assert {"postgres", "redis", "minio", "minio-bucket", "migrate", "worker", "beat", "flower"} <= set(services)
    for name in ("postgres", "redis", "minio"):
        assert services[name]["healthcheck"]["test"]
    assert "noeviction" in services["redis"]["command"] and "--appendonly" in services["redis"]["command"]


def test_every_s3ferry_service_runs_a_real_role() -> None:
    services = compose()["services"]
    roles = s3ferry_roles()
    for name in ("migrate", "worker", "beat", "flower", "metrics"):
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"
        assert services[name]["command"][0] in roles, name
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_flower_needs_credentials_from_the_environment_and_listens_on_localhost() -> None:
    flower = compose()["services"]["flower"]
    assert flower["environment"]["S3FERRY_FLOWER_BASIC_AUTH"].startswith("${S3FERRY_FLOWER_BASIC_AUTH:?")
    assert all(str(port).startswith("127.0.0.1:") for port in flower["ports"])


def test_the_bucket_is_created_before_workers_start() -> None:
    services = compose()["services"]
    assert "mc mb --ignore-existing" in services["minio-bucket"]["command"][0]
    assert services["worker"]["depends_on"]["minio-bucket"]["condition"] == "service_completed_successfully"


def test_env_example_documents_every_variable_the_stack_reads() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    documented = set(re.findall(r"^#? ?([A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert used and used <= documented, used - documented


def test_workers_can_be_scaled() -> None:
    worker = compose()["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker


def test_no_secret_is_hard_coded() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    checked = 0
    for service in compose()["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY_ID", key):
                assert str(value).startswith("${"), f"{key} is hard-coded"
                checked += 1
    assert checked >= 3
    assert re.search(r"://[^:/\s]+:(?!\$\{)[^@\s]+@", text) is None  # no literal password in a URL


def test_the_image_runs_as_a_non_root_user_with_soft_shutdown() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^USER (?!root|0\b)\S+", dockerfile, re.M)
    assert 'ENTRYPOINT ["s3ferry"]' in dockerfile
    assert "REMAP_SIGTERM=SIGQUIT" in dockerfile
