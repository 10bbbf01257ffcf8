from __future__ import annotations

import botocore.exceptions
import pytest

from workers import retry, s3


def client_error(code: str, status: int, message: str = "msg") -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}, "UploadPart")


@pytest.mark.parametrize(("error", "kind"), [
    (client_error("SlowDown", 503), s3.TransientS3Error),
    (client_error("InternalError", 500), s3.TransientS3Error),
    (client_error("RequestTimeout", 400), s3.TransientS3Error),
    (client_error("BadDigest", 400), s3.TransientS3Error),
    (client_error("Whatever", 502), s3.TransientS3Error),
    (client_error("NoSuchUpload", 404), s3.PermanentS3Error),
    (client_error("AccessDenied", 403), s3.PermanentS3Error),
    (client_error("NoSuchBucket", 404), s3.PermanentS3Error),
    (client_error("InvalidAccessKeyId", 403), s3.PermanentS3Error),
    (client_error("NotImplemented", 501), s3.PermanentS3Error),
    (client_error("RequestTimeTooSkewed", 403), s3.PermanentS3Error),
    (client_error("ExpiredToken", 400), s3.TransientS3Error),
    (client_error("RequestExpired", 400), s3.TransientS3Error),
    (botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"), s3.UnreachableS3Error),
    (botocore.exceptions.ConnectTimeoutError(endpoint_url="http://x"), s3.UnreachableS3Error),
    (botocore.exceptions.ReadTimeoutError(endpoint_url="http://x"), s3.TransientS3Error),
    (botocore.exceptions.ConnectionClosedError(endpoint_url="http://x"), s3.TransientS3Error),
    (botocore.exceptions.NoCredentialsError(), s3.PermanentS3Error),
])
def test_classify(error: Exception, kind: type) -> None:
    assert type(s3.classify(error)) is kind


def test_describe_keeps_s3s_message() -> None:
    error = client_error("NoSuchUpload", 404, "The specified upload does not exist.")
    assert str(s3.classify(error)) == "NoSuchUpload: The specified upload does not exist."


def test_backoff_grows_and_is_capped_with_jitter() -> None:
    for attempt in range(1, 12):
        delay = min(60.0, 1.0 * 2 ** (attempt - 1))
        samples = [retry.backoff(attempt, 1.0, 60.0) for _ in range(200)]
        assert all(delay / 2 <= s <= delay for s in samples)
        assert len(set(samples)) > 1


def test_throttling_timeouts_and_connection_errors_are_congestion_other_errors_are_not() -> None:
    def client_error(code: str, status: int) -> botocore.exceptions.ClientError:
        return botocore.exceptions.ClientError({"Error": {"Code": code, "Message": "m"},
                                                "ResponseMetadata": {"HTTPStatusCode": status}}, "UploadPart")

    assert s3.classify(client_error("SlowDown", 503)).congestion
    assert s3.classify(client_error("TooManyRequests", 429)).congestion
    assert s3.classify(client_error("RequestTimeout", 400)).congestion
    assert s3.classify(botocore.exceptions.ReadTimeoutError(endpoint_url="http://x")).congestion
    assert s3.classify(botocore.exceptions.EndpointConnectionError(endpoint_url="http://x")).congestion
    assert not s3.classify(client_error("InternalError", 500)).congestion
    assert not s3.classify(client_error("AccessDenied", 403)).congestion


def test_scrub_hides_a_presigned_urls_query() -> None:
    from workers.signer import scrub

    text = "ConnectionError: http://h:9/b/k?uploadId=u&X-Amz-Signature=abc&X-Amz-Credential=AKIA failed"
    assert scrub(text) == "ConnectionError: http://h:9/b/k?<query hidden> failed"
