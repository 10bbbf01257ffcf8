"""Destinations: `s3://bucket/key`, validated before anything is written."""

from __future__ import annotations

import dataclasses
import ipaddress
import re

from models.exceptions import UserError

MAX_KEY_BYTES = 1024
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclasses.dataclass(frozen=True)
class Destination:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse(uri: str, source_name: str) -> Destination:
    """Parse `s3://bucket/key`. A key that is empty or ends in `/` gets the source's file name."""
    if not uri.startswith("s3://"):
        raise UserError(f"destination {uri!r} is not of the form s3://bucket/key")
    bucket, _, key = uri[len("s3://"):].partition("/")
    check_bucket(bucket)
    if key == "" or key.endswith("/"):
        key += source_name
    check_key(key)
    return Destination(bucket, key)


def check_bucket(bucket: str) -> None:
    if not bucket:
        raise UserError("destination has no bucket: expected s3://bucket/key")
    problem = _bucket_problem(bucket)
    if problem:
        raise UserError(f"invalid bucket name {bucket!r}: {problem}")


def _bucket_problem(bucket: str) -> str | None:
    if not 3 <= len(bucket) <= 63:
        return "it must be 3 to 63 characters long"
    if not _BUCKET.match(bucket):
        return "use only lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit"
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        return "dots may not be doubled or next to a hyphen"
    try:
        ipaddress.IPv4Address(bucket)
        return "it must not look like an IP address"
    except ValueError:
        return None


def check_key(key: str) -> None:
    size = len(key.encode("utf-8"))
    if size > MAX_KEY_BYTES:
        raise UserError(f"key is {size} bytes long: S3 allows at most {MAX_KEY_BYTES} bytes (UTF-8)")
