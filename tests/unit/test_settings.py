from __future__ import annotations

import pytest

from models.settings import MiB, Settings, broker_socket, format_size, parse_size


def test_without_database_and_broker_it_is_single_machine_mode(tmp_path) -> None:
    settings = Settings.from_env({"S3FERRY_HOME": str(tmp_path)})
    assert settings.local
    assert settings.part_size == 32 * MiB
    assert settings.database_url == f"sqlite:///{tmp_path}/state.db"
    assert settings.broker_url == f"redis+socket://{tmp_path}/broker/redis.sock"
    assert settings.result_backend == f"socket://{tmp_path}/broker/redis.sock?virtual_host=1"


def test_the_default_home_is_the_users_data_folder(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert Settings.from_env({}).home == str(tmp_path / "s3ferry")


def test_a_home_too_long_for_a_socket_puts_the_socket_in_the_temp_folder(tmp_path) -> None:
    home = tmp_path / ("x" * 120)
    sock = broker_socket(str(home))
    assert len(sock) < 100 and sock != broker_socket(str(tmp_path / "other"))
    assert broker_socket("/srv/with space/s3ferry") != "/srv/with space/s3ferry/broker/redis.sock"


def test_from_env_reads_s3ferry_variables() -> None:
    settings = Settings.from_env({"S3FERRY_DATABASE_URL": "sqlite:///x.db", "S3FERRY_PART_SIZE": "64MiB",
                                  "S3FERRY_MAX_RETRIES": "3", "S3FERRY_RETRY_BACKOFF_BASE": "0.5",
                                  "S3FERRY_BROKER_URL": "redis://r:6379/0", "S3FERRY_LOCAL": "true"})
    assert (settings.database_url, settings.part_size, settings.max_retries) == ("sqlite:///x.db", 64 * MiB, 3)
    assert settings.retry_backoff_base == 0.5
    assert settings.result_backend == "redis://r:6379/0"  # unset: beside the broker
    assert not settings.local  # never read from the environment


@pytest.mark.parametrize("given", ["S3FERRY_DATABASE_URL", "S3FERRY_BROKER_URL"])
def test_half_a_fleet_configuration_is_refused(given: str) -> None:
    with pytest.raises(ValueError, match=f"{given} is set but .* is not: set both"):
        Settings.from_env({given: "redis://r:6379/0"})


def test_a_bad_value_names_the_variable() -> None:
    with pytest.raises(ValueError, match="S3FERRY_MAX_RETRIES='many' is not a valid int"):
        Settings.from_env({"S3FERRY_MAX_RETRIES": "many"})


@pytest.mark.parametrize(("text", "size"), [("32MiB", 32 * MiB), ("32M", 32 * MiB), ("32 mib", 32 * MiB),
                                            ("1GB", 10**9), ("5368709120", 5 * 1024**3), ("1.5KiB", 1536)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MiB", "12XB", "-1MiB", "lots"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_format_size() -> None:
    assert (format_size(0), format_size(1536), format_size(32 * MiB)) == ("0 B", "1.5 KiB", "32.0 MiB")


FLEET = {"S3FERRY_DATABASE_URL": "sqlite:///x.db", "S3FERRY_BROKER_URL": "redis://r:6379/0"}


def test_window_settings_are_read_and_checked() -> None:
    settings = Settings.from_env({**FLEET, "S3FERRY_WINDOW_INITIAL": "4", "S3FERRY_WINDOW_MAX": "8",
                                  "S3FERRY_WINDOW_TARGET_SECONDS": "12.5"})
    assert (settings.window_initial, settings.window_min, settings.window_max) == (4, 1, 8)
    assert settings.window_target_seconds == 12.5
    with pytest.raises(ValueError, match=r"1 <= S3FERRY_WINDOW_MIN \(5\) <= S3FERRY_WINDOW_INITIAL \(1\)"):
        Settings.from_env({**FLEET, "S3FERRY_WINDOW_MIN": "5"})
    with pytest.raises(ValueError, match="S3FERRY_WINDOW_INITIAL \\(40\\) <= S3FERRY_WINDOW_MAX \\(32\\)"):
        Settings.from_env({**FLEET, "S3FERRY_WINDOW_INITIAL": "40"})
    with pytest.raises(ValueError, match="S3FERRY_WINDOW_LEASE_SECONDS .* must be positive"):
        Settings.from_env({**FLEET, "S3FERRY_WINDOW_LEASE_SECONDS": "0"})


@pytest.mark.parametrize(("raw", "value"), [("1", True), ("true", True), ("on", True), ("0", False), ("no", False)])
def test_presigned_is_a_boolean(raw: str, value: bool) -> None:
    assert Settings.from_env({**FLEET, "S3FERRY_PRESIGNED": raw}).presigned is value


def test_presigned_rejects_nonsense_and_single_machine_mode(tmp_path) -> None:
    with pytest.raises(ValueError, match="S3FERRY_PRESIGNED='maybe' is not a valid boolean"):
        Settings.from_env({**FLEET, "S3FERRY_PRESIGNED": "maybe"})
    with pytest.raises(ValueError, match="S3FERRY_PRESIGNED needs a fleet"):
        Settings.from_env({"S3FERRY_HOME": str(tmp_path), "S3FERRY_PRESIGNED": "1"})
