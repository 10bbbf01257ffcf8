from __future__ import annotations

import dataclasses

import pytest

from models.exceptions import UserError
from models.settings import RANGES, MiB, Settings, SettingsError, broker_socket, format_size, parse_size


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
    with pytest.raises(ValueError, match="S3FERRY_MAX_RETRIES='many' is not a whole number: it must be from 0 to 1000"):
        Settings.from_env({"S3FERRY_MAX_RETRIES": "many"})


@pytest.mark.parametrize(("text", "size"), [("32MiB", 32 * MiB), ("32M", 32 * MiB), ("32 mib", 32 * MiB),
                                            ("1GB", 10**9), ("5368709120", 5 * 1024**3), ("1.5KiB", 1536)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MiB", "12XB", "-1MiB", "lots", "nan", "inf", "1e400", "1e300TiB", "1e19"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):  # never OverflowError
        parse_size(text)


def test_format_size() -> None:
    assert (format_size(0), format_size(1536), format_size(32 * MiB)) == ("0 B", "1.5 KiB", "32.0 MiB")


FLEET = {"S3FERRY_DATABASE_URL": "sqlite:///x.db", "S3FERRY_BROKER_URL": "redis://r:6379/0"}


def test_window_settings_are_read_and_checked() -> None:
    settings = Settings.from_env({**FLEET, "S3FERRY_WINDOW_INITIAL": "4", "S3FERRY_WINDOW_MAX": "8",
                                  "S3FERRY_WINDOW_TARGET_SECONDS": "12.5"})
    assert (settings.window_initial, settings.window_min, settings.window_max) == (4, 1, 8)
    assert settings.window_target_seconds == 12.5
    assert Settings.from_env(FLEET).window_initial is None  # unset: the worker's concurrency
    assert Settings.from_env({**FLEET, "S3FERRY_WINDOW_MIN": "5"}).window_min == 5
    with pytest.raises(ValueError, match=r"1 <= S3FERRY_WINDOW_MIN \(5\) <= S3FERRY_WINDOW_INITIAL \(2\)"):
        Settings.from_env({**FLEET, "S3FERRY_WINDOW_MIN": "5", "S3FERRY_WINDOW_INITIAL": "2"})
    with pytest.raises(ValueError, match=r"S3FERRY_WINDOW_MIN \(9\) must be at most S3FERRY_WINDOW_MAX \(8\)"):
        Settings.from_env({**FLEET, "S3FERRY_WINDOW_MIN": "9", "S3FERRY_WINDOW_MAX": "8"})
    with pytest.raises(ValueError, match=r"S3FERRY_WINDOW_INITIAL='x' is not a whole number"):
        Settings.from_env({**FLEET, "S3FERRY_WINDOW_INITIAL": "x"})
    with pytest.raises(ValueError, match="S3FERRY_WINDOW_INITIAL \\(40\\) <= S3FERRY_WINDOW_MAX \\(32\\)"):
        Settings.from_env({**FLEET, "S3FERRY_WINDOW_INITIAL": "40"})
    with pytest.raises(ValueError, match=r"S3FERRY_WINDOW_LEASE_SECONDS \(0.0\) must be from 1 to 3600 seconds"):
        Settings.from_env({**FLEET, "S3FERRY_WINDOW_LEASE_SECONDS": "0"})


@pytest.mark.parametrize(("raw", "value"), [("1", True), ("true", True), ("on", True), ("0", False), ("no", False)])
def test_presigned_is_a_boolean(raw: str, value: bool) -> None:
    assert Settings.from_env({**FLEET, "S3FERRY_PRESIGNED": raw}).presigned is value


def test_presigned_rejects_nonsense_and_single_machine_mode(tmp_path) -> None:
    with pytest.raises(ValueError, match="S3FERRY_PRESIGNED='maybe' is not a valid boolean"):
        Settings.from_env({**FLEET, "S3FERRY_PRESIGNED": "maybe"})
    with pytest.raises(ValueError, match="S3FERRY_PRESIGNED needs a fleet"):
        Settings.from_env({"S3FERRY_HOME": str(tmp_path), "S3FERRY_PRESIGNED": "1"})


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("PART_SIZE", "1e400", "S3FERRY_PART_SIZE='1e400' is not a valid size: it must be from 5 MiB to 5 GiB"),
    ("PART_SIZE", "0", "S3FERRY_PART_SIZE (0 B) must be from 5 MiB to 5 GiB"),
    ("PART_SIZE", "4MiB", "S3FERRY_PART_SIZE (4.0 MiB) must be from 5 MiB to 5 GiB"),
    ("PART_SIZE", "6GiB", "S3FERRY_PART_SIZE (6.0 GiB) must be from 5 MiB to 5 GiB"),
    ("MAX_ACTIVE_UPLOADS", "0", "S3FERRY_MAX_ACTIVE_UPLOADS (0) must be from 1 to 100000"),
    ("MAX_RETRIES", "-1", "S3FERRY_MAX_RETRIES (-1) must be from 0 to 1000"),
    ("MAX_RETRIES", "1001", "S3FERRY_MAX_RETRIES (1001) must be from 0 to 1000"),
    ("MAX_RETRIES", "1e3", "S3FERRY_MAX_RETRIES='1e3' is not a whole number: it must be from 0 to 1000"),
    ("MAX_UPLOAD_RETRIES", "-1", "S3FERRY_MAX_UPLOAD_RETRIES (-1) must be from 0 to 1000000"),
    ("LEASE_SECONDS", "0", "S3FERRY_LEASE_SECONDS (0) must be from 1 to 86400 seconds"),
    ("LEASE_SECONDS", "-5", "S3FERRY_LEASE_SECONDS (-5) must be from 1 to 86400 seconds"),
    ("LEASE_SECONDS", "12.5", "S3FERRY_LEASE_SECONDS='12.5' is not a whole number: it must be from 1 to 86400"),
    ("LEASE_SECONDS", "9" * 400, "99999...) must be from 1 to 86400 seconds"),  # shortened, no OverflowError
    ("STALL_SECONDS", "604801", "S3FERRY_STALL_SECONDS (604801) must be from 1 to 604800 seconds"),
    ("STALL_SECONDS", "100", "S3FERRY_STALL_SECONDS (100) must be longer than S3FERRY_LEASE_SECONDS (120)"),
    ("RECONCILE_INTERVAL", "0", "S3FERRY_RECONCILE_INTERVAL (0) must be from 1 to 86400 seconds"),
    ("SWEEP_AFTER_SECONDS", "59", "S3FERRY_SWEEP_AFTER_SECONDS (59) must be from 60 to 315360000 seconds"),
    ("SOFT_SHUTDOWN_SECONDS", "-1", "S3FERRY_SOFT_SHUTDOWN_SECONDS (-1.0) must be from 0 to 86400 seconds"),
    ("SOFT_SHUTDOWN_SECONDS", "inf", "S3FERRY_SOFT_SHUTDOWN_SECONDS='inf' is not a finite number: it must be from 0"),
    ("RETRY_BACKOFF_BASE", "0", "S3FERRY_RETRY_BACKOFF_BASE (0.0) must be more than 0 and at most 86400 seconds"),
    ("RETRY_BACKOFF_BASE", "150", "S3FERRY_RETRY_BACKOFF_BASE (150.0) must be at most S3FERRY_RETRY_BACKOFF_MAX (120.0)"),
    ("RETRY_BACKOFF_MAX", "nan", "S3FERRY_RETRY_BACKOFF_MAX='nan' is not a finite number: it must be more than 0 and "
                                 "at most 86400 seconds"),
    ("RETRY_BACKOFF_MAX", "1e400", "S3FERRY_RETRY_BACKOFF_MAX='1e400' is not a finite number"),
    ("WINDOW_MAX", "10001", "S3FERRY_WINDOW_MAX (10001) must be from 1 to 10000"),
    ("WINDOW_MIN", "0", "S3FERRY_WINDOW_MIN (0) must be from 1 to 10000"),
    ("WINDOW_TARGET_SECONDS", "86401", "S3FERRY_WINDOW_TARGET_SECONDS (86401.0) must be more than 0 and at most 86400"),
    ("WINDOW_LEASE_SECONDS", "3601", "S3FERRY_WINDOW_LEASE_SECONDS (3601.0) must be from 1 to 3600 seconds"),
    ("WINDOW_WAIT_SECONDS", "0.05", "S3FERRY_WINDOW_WAIT_SECONDS (0.05) must be from 0.1 to 3600 seconds"),
    ("WINDOW_WAIT_SECONDS", "-inf", "S3FERRY_WINDOW_WAIT_SECONDS='-inf' is not a finite number"),
    ("PRESIGN_EXPIRY_SECONDS", "604801", "S3FERRY_PRESIGN_EXPIRY_SECONDS (604801) must be from 1 to 604800 seconds"),
    ("PRESIGN_EXPIRY_SECONDS", "0", "S3FERRY_PRESIGN_EXPIRY_SECONDS (0) must be from 1 to 604800 seconds"),
    ("HEARTBEAT_SECONDS", "0", "S3FERRY_HEARTBEAT_SECONDS (0.0) must be from 0.1 to 60 seconds"),
    ("HEARTBEAT_SECONDS", "61", "S3FERRY_HEARTBEAT_SECONDS (61.0) must be from 0.1 to 60 seconds"),
    ("HEARTBEAT_SECONDS", "4", "S3FERRY_LIVENESS_SECONDS (6.0) must be at least twice S3FERRY_HEARTBEAT_SECONDS (4.0)"),
    ("LIVENESS_SECONDS", "1", "S3FERRY_LIVENESS_SECONDS (1.0) must be at least twice S3FERRY_HEARTBEAT_SECONDS (2.0)"),
    ("LIVENESS_SECONDS", "nan", "S3FERRY_LIVENESS_SECONDS='nan' is not"),
    ("RECOVERY_INTERVAL", "0.4", "S3FERRY_RECOVERY_INTERVAL (0.4) must be from 0.5 to 300 seconds"),
    ("RECOVERY_INTERVAL", "301", "S3FERRY_RECOVERY_INTERVAL (301.0) must be from 0.5 to 300 seconds"),
    ("QUEUE", "parts\nsecond", "S3FERRY_QUEUE ('parts\\nsecond') is not a valid queue name: 1 to 200 characters"),
    ("QUEUE", "with space", "S3FERRY_QUEUE ('with space') is not a valid queue name"),
    ("QUEUE", "q" * 201, "is not a valid queue name: 1 to 200 characters of A-Z a-z 0-9 . _ : -"),
])
def test_a_bad_setting_is_one_line_naming_it_and_its_range(variable: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({**FLEET, f"S3FERRY_{variable}": value})
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, UserError)  # the CLI: exit 2
    text = str(raised.value)
    assert message in text
    assert "\n" not in text and len(text) < 300


@pytest.mark.parametrize(("name", "value"), [("lease_seconds", 10.5), ("lease_seconds", True),
                                             ("retry_backoff_max", float("nan")), ("part_size", 10**400),
                                             ("heartbeat_seconds", "2")])
def test_settings_made_in_code_are_checked_too(name: str, value: object) -> None:
    with pytest.raises(SettingsError, match=f"S3FERRY_{name.upper()} .* must be"):
        Settings(**{name: value})  # type: ignore[arg-type]


def test_every_numeric_setting_has_a_range_and_its_default_is_inside() -> None:
    numeric = [f.name for f in dataclasses.fields(Settings) if type(f.default) in (int, float)]
    optional = [f.name for f in dataclasses.fields(Settings) if f.default is None]
    assert optional == ["window_initial"] and sorted(RANGES) == sorted(numeric + optional)
    assert all(getattr(Settings(), name) in RANGES[name] for name in numeric)
    with pytest.raises(SettingsError, match="S3FERRY_WINDOW_INITIAL .* must be"):
        Settings(window_initial=0)


def test_the_edges_of_the_ranges_are_accepted() -> None:
    settings = Settings.from_env({**FLEET, "S3FERRY_PART_SIZE": "5MiB", "S3FERRY_LEASE_SECONDS": "10",
                                  "S3FERRY_STALL_SECONDS": "11", "S3FERRY_RETRY_BACKOFF_MAX": "2",
                                  "S3FERRY_HEARTBEAT_SECONDS": "0.1", "S3FERRY_LIVENESS_SECONDS": "9.5",
                                  "S3FERRY_RECOVERY_INTERVAL": "0.5", "S3FERRY_PRESIGN_EXPIRY_SECONDS": "604800",
                                  "S3FERRY_MAX_RETRIES": "0", "S3FERRY_QUEUE": "team.s3ferry:uploads-2_a"})
    assert (settings.part_size, settings.lease_seconds, settings.liveness_seconds) == (5 * MiB, 10, 9.5)
    assert (settings.heartbeat_seconds, settings.liveness_seconds, settings.recovery_interval) == (0.1, 9.5, 0.5)


def test_fleet_settings_errors_are_settings_errors_too(tmp_path) -> None:
    with pytest.raises(SettingsError):
        Settings.from_env({"S3FERRY_DATABASE_URL": "sqlite:///x.db"})
    with pytest.raises(SettingsError):
        Settings.from_env({"S3FERRY_HOME": str(tmp_path), "S3FERRY_PRESIGNED": "1"})


def test_a_rediss_url_must_ask_for_the_certificate_check() -> None:
    fleet = {"S3FERRY_DATABASE_URL": "postgresql+psycopg://db/s3ferry"}
    for name in ("BROKER_URL", "RESULT_BACKEND"):
        env = {**fleet, "S3FERRY_BROKER_URL": "redis://:pw@redis:6379/0", f"S3FERRY_{name}": "rediss://:pw@redis:6380/0"}
        with pytest.raises(SettingsError, match=f"S3FERRY_{name}: a rediss:// URL needs ssl_cert_reqs=required"):
            Settings.from_env(env)
    checked = "rediss://:pw@redis:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/s3ferry/tls/ca.pem"
    settings = Settings.from_env({**fleet, "S3FERRY_BROKER_URL": checked})
    from workers.broker import make_app

    import ssl
    assert make_app(settings).conf.broker_use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED,
                                                      "ssl_ca_certs": "/etc/s3ferry/tls/ca.pem"}


def test_policy_settings_are_checked_and_the_signer_key_never_shown() -> None:
    fleet = {"S3FERRY_DATABASE_URL": "postgresql+psycopg://db/s3ferry", "S3FERRY_BROKER_URL": "redis://r:6379/0"}
    for name, value, message in (("SOURCE_ROOTS", "data:/srv", "is not an absolute path"),
                                 ("ENDPOINTS", "minio:9000", "is not an endpoint"),
                                 ("BUCKETS", "Upper_Case", "is not a bucket name or pattern"),
                                 ("SIGNER_KEY", "short", "at least 32 characters")):
        with pytest.raises(SettingsError, match=message):
            Settings.from_env({**fleet, f"S3FERRY_{name}": value})
    settings = Settings.from_env({**fleet, "S3FERRY_SOURCE_ROOTS": "/data:/srv/in", "S3FERRY_BUCKETS": "a-*, b",
                                  "S3FERRY_SIGNER_KEY": "k" * 40})
    assert settings.source_root_list == ["/data", "/srv/in"] and settings.bucket_patterns == ["a-*", "b"]
    assert "k" * 40 not in repr(settings) and "signer_key='***'" in repr(settings)
    unset = Settings.from_env(fleet)  # a fleet refuses everything until told
    assert unset.source_root_list == [] and unset.bucket_patterns == []
