"""workers/policy.py: source roots, bucket and endpoint allow-lists (no service needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from models.settings import Settings
from workers import policy

FLEET = {"S3FERRY_DATABASE_URL": "postgresql+psycopg://db/s3ferry", "S3FERRY_BROKER_URL": "redis://r:6379/0"}


def _settings(**env: str) -> Settings:
    return Settings.from_env({**FLEET, **{f"S3FERRY_{k.upper()}": v for k, v in env.items()}})


def test_a_root_is_a_folder_not_a_prefix(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data-secret").mkdir()
    settings = _settings(source_roots=str(tmp_path / "data"))
    inside = tmp_path / "data" / "a.bin"
    assert policy.check_path(settings, str(inside)) == os.path.realpath(inside)
    for outside in (tmp_path / "data-secret" / "a.bin", tmp_path / "data" / ".." / "data-secret" / "a.bin"):
        with pytest.raises(policy.Refused, match="outside the folders"):
            policy.check_path(settings, str(outside))


def test_uris_other_than_local_absolute_files_are_refused(tmp_path: Path) -> None:
    settings = _settings(source_roots=str(tmp_path))
    assert policy.source_path(settings, (tmp_path / "a b.bin").as_uri()) == os.path.realpath(tmp_path / "a b.bin")
    for uri in ("http://evil/x", f"file://otherhost{tmp_path}/a", f"file://{tmp_path}/a?x=1", "file:relative",
                f"file://{tmp_path}/a%00b"):
        with pytest.raises(policy.Refused, match="refused: "):
            policy.source_path(settings, uri)


def test_a_fleet_without_roots_or_buckets_refuses_everything(tmp_path: Path) -> None:
    with pytest.raises(policy.Refused, match="no source roots are set"):
        policy.check_path(_settings(), str(tmp_path / "a"))
    with pytest.raises(policy.Refused, match="no buckets are allowed"):
        policy.check_destination(_settings(), None, "any")


def test_buckets_and_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy, "own_endpoint", lambda: "http://minio:9000")
    settings = _settings(buckets="media-*,backups", endpoints="https://R2.example.com:443/")
    for endpoint, bucket in (("http://minio:9000", "media-1"), ("http://MINIO:9000/", "backups"),
                             ("https://r2.example.com", "backups")):
        policy.check_destination(settings, endpoint, bucket)
    refusals = [("http://minio:9000", "media"), ("http://minio:9000", "backups2"), (None, "backups"),
                ("http://minio:9001", "backups"), ("http://user:pw@minio:9000", "backups"),
                ("http://minio:9000/other", "backups"), ("ftp://minio:9000", "backups")]
    for endpoint, bucket in refusals:
        with pytest.raises(policy.Refused):
            policy.check_destination(settings, endpoint, bucket)


def test_aws_itself_is_none_on_both_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy, "own_endpoint", lambda: None)
    settings = _settings(buckets="*")
    policy.check_destination(settings, None, "anything")
    with pytest.raises(policy.Refused, match="endpoint"):
        policy.check_destination(settings, "http://127.0.0.1:9", "anything")
