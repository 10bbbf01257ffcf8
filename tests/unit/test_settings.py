from __future__ import annotations

import pytest

from models.settings import MiB, Settings, format_size, parse_size


def test_defaults_without_environment() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.part_size == 32 * MiB
    assert settings.database_url.startswith("postgresql+psycopg://")


def test_from_env_reads_s3ferry_variables() -> None:
    settings = Settings.from_env({"S3FERRY_DATABASE_URL": "sqlite:///x.db", "S3FERRY_PART_SIZE": "64MiB",
                                  "S3FERRY_MAX_RETRIES": "3", "S3FERRY_RETRY_BACKOFF_BASE": "0.5",
                                  "S3FERRY_BROKER_URL": ""})
    assert (settings.database_url, settings.part_size, settings.max_retries) == ("sqlite:///x.db", 64 * MiB, 3)
    assert settings.retry_backoff_base == 0.5
    assert settings.broker_url == Settings().broker_url  # empty means default


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
