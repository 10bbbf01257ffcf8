"""Proving what landed: S3's ListParts checked against our own digests of the source."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

from botocore.client import BaseClient

from models.settings import Settings
from models.tables import Part, Upload
from workers import policy, reader

log = logging.getLogger(__name__)


def listed_parts(client: BaseClient, upload: Upload) -> Iterator[Mapping[str, Any]]:
    """Every part S3 holds for the upload's multipart upload (ListParts, all pages)."""
    paginator = client.get_paginator("list_parts")
    for page in paginator.paginate(Bucket=upload.bucket, Key=upload.key, UploadId=upload.s3_upload_id):
        yield from page.get("Parts", [])


def verify(settings: Settings, upload: Upload, part: Part, listed: Mapping[str, Any]) -> str | None:
    """The CRC32C of a listed part whose size, ETag (MD5) and checksum match our bytes; else None.

    Raises reader.SourceChanged if the file is no longer the one submitted: a
    part is never accepted from another version of the source.
    """
    context = {"upload_id": str(upload.id), "part": part.part_number}
    if int(listed.get("Size", -1)) != part.size:
        log.warning("listed part has %s bytes, expected %d: not accepted", listed.get("Size"), part.size,
                    extra=context)
        return None
    path = policy.source_path(settings, upload.source_uri)
    reader.check_unchanged(path, upload.source_size, upload.source_mtime_ns, upload.source_inode,
                         upload.source_ctime_ns)
    with reader.RangeReader(path, part.offset, part.size) as body:
        md5, checksum = reader.digests_of(body)
    reader.check_unchanged(path, upload.source_size, upload.source_mtime_ns, upload.source_inode,
                         upload.source_ctime_ns)
    if str(listed.get("ETag", "")).strip('"') != md5:
        log.warning("listed part's ETag differs from our MD5: not accepted", extra=context)
        return None
    if listed.get("ChecksumCRC32C") and listed["ChecksumCRC32C"] != checksum:
        log.warning("listed part's CRC32C differs from ours: not accepted", extra=context)
        return None
    return checksum
