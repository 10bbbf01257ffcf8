"""The S3 client, and which S3 errors are worth retrying.

Credentials, region and endpoint come from the standard AWS sources
(environment, config files, instance roles): they never pass through s3ferry.
"""

from __future__ import annotations

import functools
import os
import urllib.parse
import threading

import boto3
import botocore.config
import botocore.exceptions
from botocore.client import BaseClient

from models.exceptions import S3FerryError, UserError

#: S3 error codes that say "try again later". Expired temporary credentials belong here:
#: botocore refreshes them before the next call.
TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
    "ServiceUnavailable", "InternalError", "RequestTimeout", "BadDigest", "XAmzContentChecksumMismatch",
    "OperationAborted", "ExpiredToken", "TokenRefreshRequired", "RequestExpired",
})

#: Codes that no retry will fix, even when sent with a 5xx status.
PERMANENT_CODES = frozenset({"NotImplemented", "RequestTimeTooSkewed"})

#: botocore's network-level failures (connection refused/reset, timeouts, truncated reads).
TRANSIENT_EXCEPTIONS = (
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
)


#: Codes that say "too many requests": the AIMD window halves (workers/window.py).
THROTTLE_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
    "ServiceUnavailable", "RequestTimeout",
})


class S3Error(S3FerryError):
    """S3 refused the request."""

    def __init__(self, message: str, congestion: bool = False) -> None:
        super().__init__(message)
        #: throttled, timed out or cut off: the link is loaded, fewer parts should be in flight
        self.congestion = congestion


class TransientS3Error(S3Error):
    """S3 failed in a way that may pass: retry with backoff."""


class UnreachableS3Error(TransientS3Error):
    """S3 could not be reached at all (connection refused, connect timeout): an outage, not
    a failed attempt. Retried with backoff for as long as it lasts, without using up retries."""


class PermanentS3Error(S3Error):
    """S3 refused in a way that retrying will not change."""


def error_code(error: BaseException) -> str:
    if isinstance(error, botocore.exceptions.ClientError):
        return str(error.response.get("Error", {}).get("Code", ""))
    return ""


def describe(error: BaseException) -> str:
    """S3's own message, one line: 'NoSuchUpload: The specified upload does not exist...'."""
    if isinstance(error, botocore.exceptions.ClientError):
        details = error.response.get("Error", {})
        code = details.get("Code") or error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = details.get("Message") or ""
        return f"{code}: {message}".strip().rstrip(":")
    return f"{type(error).__name__}: {error}".splitlines()[0]


def classify_answer(code: str, status: int, text: str) -> S3Error:
    """An error S3 answered (its code and HTTP status), as TransientS3Error or PermanentS3Error."""
    if code in PERMANENT_CODES:
        return PermanentS3Error(text)
    if code in TRANSIENT_CODES or status >= 500 or status == 429:
        return TransientS3Error(text, congestion=code in THROTTLE_CODES or status in (429, 503))
    return PermanentS3Error(text)


def classify(error: BaseException) -> S3Error:
    """Map a botocore error to TransientS3Error or PermanentS3Error."""
    if isinstance(error, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError)):
        return UnreachableS3Error(describe(error), congestion=True)
    if isinstance(error, TRANSIENT_EXCEPTIONS):
        return TransientS3Error(describe(error), congestion=True)
    if isinstance(error, botocore.exceptions.ClientError):
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return classify_answer(error_code(error), status, describe(error))
    if isinstance(error, botocore.exceptions.NoCredentialsError):
        return PermanentS3Error("no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")
    return PermanentS3Error(describe(error))


def client_config(retries: int, pool: int = 16) -> botocore.config.Config:
    return botocore.config.Config(
        signature_version="s3v4",
        # The body is sent once, as read: no extra SHA-256 pass for the signature (we send
        # our own CRC32C, which S3 checks), and no default CRC32 pass by botocore.
        s3={"payload_signing_enabled": False},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        # Workers pass 1 attempt: their retries are counted in Postgres, with backoff.
        retries={"total_max_attempts": retries, "mode": "standard"},
        connect_timeout=10,
        read_timeout=120,
        max_pool_connections=pool,
        tcp_keepalive=True,
    )


_lock = threading.Lock()


@functools.cache
def _session_for_pid(pid: int) -> boto3.session.Session:
    return boto3.session.Session()


def make_client(endpoint_url: str | None = None, retries: int = 1) -> BaseClient:
    """A new S3 client from the standard AWS configuration (one per process, after a fork)."""
    with _lock:
        session = _session_for_pid(os.getpid())
        try:
            return session.client("s3", endpoint_url=endpoint_url or None, config=client_config(retries))
        except botocore.exceptions.NoRegionError:
            raise UserError("no AWS region configured: set AWS_REGION (any value for MinIO or moto)") from None
        except ValueError as error:
            raise UserError(f"invalid S3 endpoint {endpoint_url!r}: {error}") from None


def recorded_endpoint(client: object) -> str | None:
    """The endpoint the upload is bound to: a custom one (MinIO, R2, ...), or None for AWS
    itself, so that each worker resolves the bucket's regional endpoint on its own."""
    url = str(client.meta.endpoint_url)  # type: ignore[attr-defined]
    host = urllib.parse.urlsplit(url).hostname or ""
    return None if host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn") else url
