"""The sweeper: aborts multipart uploads nobody will complete, so nobody pays for their parts.

- cancelled uploads, and failed ones older than `older_than` (until then
  `s3ferry retry` may still resume them), still holding a multipart upload;
- with `unknown_in` (s3://bucket/prefix): multipart uploads under that prefix
  older than `older_than` (at least an hour) that s3ferry does not know.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging

import sqlalchemy as sa

from models import clock, transitions
from models.db import Database
from models.exceptions import UserError
from models.settings import Settings
from models.states import UploadStatus
from models.tables import Part, Upload
from orchestrator import destination
from workers import policy, s3

log = logging.getLogger(__name__)

#: Multipart uploads younger than this are never swept as unknown: their s3ferry row may
#: not be written yet (the multipart upload is created first), and clocks differ.
MIN_UNKNOWN_AGE = dt.timedelta(hours=1)


@dataclasses.dataclass(frozen=True)
class Swept:
    bucket: str
    key: str
    s3_upload_id: str
    why: str
    aborted: bool

    def __str__(self) -> str:
        verb = "aborted" if self.aborted else "would abort"
        return f"{verb} s3://{self.bucket}/{self.key} (upload id {self.s3_upload_id[:16]}…): {self.why}"


def sweep(settings: Settings, db: Database, older_than: dt.timedelta, dry_run: bool = False,
          unknown_in: str | None = None) -> list[Swept]:
    swept = _sweep_known(settings, db, older_than, dry_run)
    if unknown_in:
        swept += _sweep_unknown(db, older_than, dry_run, unknown_in)
    return swept


def _sweep_known(settings: Settings, db: Database, older_than: dt.timedelta, dry_run: bool) -> list[Swept]:
    cutoff = clock.now(-older_than.total_seconds())
    with db.transaction() as session:
        candidates = session.scalars(sa.select(Upload.id).where(_sweepable(cutoff))).all()
    swept = []
    for upload_id in candidates:
        # Re-checked under the row lock, held across the abort: an upload being revived
        # (retry) waits for the sweep, then finds its multipart upload marked aborted.
        with db.transaction() as session:
            upload = session.scalars(sa.select(Upload).where(Upload.id == upload_id, _sweepable(cutoff))
                                     .with_for_update()).first()
            if upload is None:
                continue
            why = f"s3ferry upload {upload.id} is {upload.status}"
            try:
                client = policy.client_for(settings, upload.endpoint_url, upload.bucket)
            except policy.Refused as refused:  # the row names a destination this process may not reach
                log.warning("not swept: %s", refused, extra={"upload_id": str(upload.id)})
                swept.append(Swept(upload.bucket, upload.key, str(upload.s3_upload_id), f"{why}; {refused}", False))
                continue
            aborted = not dry_run and abort(client, upload.bucket, upload.key, str(upload.s3_upload_id))
            if aborted:
                transitions.mark_aborted(session, upload.id, "swept")
            swept.append(Swept(upload.bucket, upload.key, str(upload.s3_upload_id), why, aborted))
    return swept


def _sweepable(cutoff: sa.ColumnElement[dt.datetime]) -> sa.ColumnElement[bool]:
    # Not while a part is still being sent: it could land after the abort and stay billed.
    sending = sa.select(Part.upload_id).where(transitions.live_claim())
    return sa.and_(Upload.s3_upload_id.is_not(None), Upload.s3_aborted_at.is_(None), Upload.id.not_in(sending),
                   sa.or_(Upload.status == UploadStatus.CANCELLED,
                          sa.and_(Upload.status == UploadStatus.FAILED, Upload.finished_at < cutoff)))


def _sweep_unknown(db: Database, older_than: dt.timedelta, dry_run: bool, where: str) -> list[Swept]:
    if older_than < MIN_UNKNOWN_AGE:
        raise UserError(f"--older-than must be at least {MIN_UNKNOWN_AGE} with --unknown-in: a younger "
                        "multipart upload may belong to an upload that is just starting")
    if not where.startswith("s3://"):
        raise UserError(f"{where!r} is not of the form s3://bucket/prefix")
    bucket, _, prefix = where.removeprefix("s3://").partition("/")
    destination.check_bucket(bucket)
    client = s3.make_client(retries=3)
    with db.transaction() as session:
        cutoff = clock.read(session) - older_than
    swept = []
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        for mpu in page.get("Uploads", []):
            if mpu["Initiated"] >= cutoff or _known(db, mpu["UploadId"]):
                continue  # young, or s3ferry's own (which the known sweep handles by its status)
            why = f"unknown to s3ferry; initiated {mpu['Initiated']:%Y-%m-%d %H:%M}"
            aborted = not dry_run and abort(client, bucket, mpu["Key"], mpu["UploadId"])
            swept.append(Swept(bucket, mpu["Key"], mpu["UploadId"], why, aborted))
    return swept


def _known(db: Database, s3_upload_id: str) -> bool:
    with db.transaction() as session:
        return session.scalar(sa.select(Upload.id).where(Upload.s3_upload_id == s3_upload_id)) is not None


def abort(client: object, bucket: str, key: str, s3_upload_id: str) -> bool:
    try:
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=s3_upload_id)  # type: ignore[attr-defined]
    except Exception as error:
        if s3.error_code(error) == "NoSuchUpload":
            return True  # already gone: nothing billed
        log.error("could not abort s3://%s/%s: %s", bucket, key, s3.describe(error))
        return False
    log.info("aborted multipart upload of s3://%s/%s", bucket, key)
    return True
