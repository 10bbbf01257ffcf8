from __future__ import annotations

import pytest

from models.exceptions import UserError
from orchestrator import destination


@pytest.mark.parametrize(("uri", "bucket", "key"), [
    ("s3://media/raw/video.mp4", "media", "raw/video.mp4"),
    ("s3://media/raw/", "media", "raw/clip.mov"),
    ("s3://media", "media", "clip.mov"),
    ("s3://media/", "media", "clip.mov"),
    ("s3://my.bucket-01/a b/ü.mov", "my.bucket-01", "a b/ü.mov"),
])
def test_parse(uri: str, bucket: str, key: str) -> None:
    assert destination.parse(uri, "clip.mov") == destination.Destination(bucket, key)


@pytest.mark.parametrize("bucket", ["ab", "a" * 64, "Upper", "under_score", "-start", "end-", "a..b", "a.-b",
                                    "10.0.0.1"])
def test_invalid_buckets(bucket: str) -> None:
    with pytest.raises(UserError, match="invalid bucket name"):
        destination.check_bucket(bucket)


def test_key_length_counts_utf8_bytes() -> None:
    destination.check_key("k" * 1024)
    destination.check_key("é" * 512)
    with pytest.raises(UserError, match="1026 bytes"):
        destination.check_key("é" * 513)
