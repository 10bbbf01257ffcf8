"""What a process may read and where it may send: its own configuration decides, never a row.

A row of `uploads` (or a message naming one) is data (ARCHITECTURE invariant 8): its
`source_uri`, `endpoint_url` and `bucket` are checked against this process's settings
(`S3FERRY_SOURCE_ROOTS`, `S3FERRY_BUCKETS`, `S3FERRY_ENDPOINTS` and its own S3 endpoint)
before every part, completion, signature, listing and abort; `submit` applies the same
rules, so a user sees a refusal at once. A refusal names the rule that was broken and
nothing about the file: not its size, its inode, or whether it exists.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import urllib.parse
from urllib.request import url2pathname

from models.exceptions import UserError
from models.settings import Settings

#: Pseudo and device file systems: never a source, whatever the roots say.
PSEUDO = ("/proc", "/sys", "/dev")


class Refused(UserError):
    """The configuration of this process does not allow it (a source, a bucket, an endpoint)."""


def source_path(settings: Settings, uri: str) -> str:
    """The local path that `uri` (file://) names, with symlinks and `..` resolved, if this
    process may read it; raises Refused otherwise. Says nothing about the file itself."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost") or parsed.query or parsed.fragment:
        raise Refused("refused: the source is not a local file URI (file:///path)")
    path = url2pathname(urllib.parse.unquote(parsed.path))
    if not os.path.isabs(path) or "\x00" in path:
        raise Refused("refused: the source is not an absolute path")
    return check_path(settings, path)


def check_path(settings: Settings, path: str) -> str:
    """`path` resolved (symlinks, `..`), if it is under one of the source roots and outside the
    pseudo file systems; raises Refused otherwise."""
    roots = settings.source_root_list
    if not roots:
        raise Refused("refused: no source roots are set: set S3FERRY_SOURCE_ROOTS to the folders that workers "
                      "may read (separated by ':')")
    resolved = os.path.realpath(path)
    if any(_under(resolved, pseudo) for pseudo in PSEUDO):
        raise Refused("refused: sources under /proc, /sys and /dev are never read")
    if not any(_under(resolved, os.path.realpath(root)) for root in roots):
        raise Refused("refused: the source is outside the folders this worker may read (S3FERRY_SOURCE_ROOTS)")
    return resolved


def _under(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root.rstrip("/") + "/")


def check_destination(settings: Settings, endpoint_url: str | None, bucket: str) -> None:
    """Raise Refused unless this process may send to `bucket` at `endpoint_url` (None: AWS)."""
    patterns = settings.bucket_patterns
    if not patterns:
        raise Refused("refused: no buckets are allowed: set S3FERRY_BUCKETS to the buckets that workers may "
                      "send to (names or patterns with *, comma-separated)")
    if not any(fnmatch.fnmatchcase(bucket, pattern) for pattern in patterns):
        raise Refused(f"refused: bucket {bucket[:63]!r} is not one this worker may send to (S3FERRY_BUCKETS)")
    allowed = {normalize_endpoint(own_endpoint())} | {normalize_endpoint(e) for e in settings.endpoint_list}
    if normalize_endpoint(endpoint_url) not in allowed:
        raise Refused("refused: the upload's S3 endpoint is not this worker's own (AWS_ENDPOINT_URL) nor one of "
                      "S3FERRY_ENDPOINTS")


def normalize_endpoint(url: str | None) -> str | None:
    """scheme://host[:port] in lowercase, default ports dropped; None (AWS) stays None; anything
    with a path, user info or query becomes a value no allow-list holds."""
    if url is None or url == "":
        return None
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return f"invalid:{url}"
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password \
            or parts.path not in ("", "/") or parts.query or parts.fragment:
        return f"invalid:{url}"
    default = {"http": 80, "https": 443}[parts.scheme]
    host = parts.hostname.lower()
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


@functools.cache
def own_endpoint() -> str | None:
    """This process's own S3 endpoint (AWS_ENDPOINT_URL, or the AWS config file's), None for AWS."""
    from workers import s3

    return s3.recorded_endpoint(s3.make_client(None))


def client_for(settings: Settings, endpoint_url: str | None, bucket: str, retries: int = 3):  # type: ignore[no-untyped-def]
    """An S3 client for an upload's destination, once this process's policy allows it."""
    from workers import s3

    check_destination(settings, endpoint_url, bucket)
    return s3.make_client(endpoint_url, retries=retries)
