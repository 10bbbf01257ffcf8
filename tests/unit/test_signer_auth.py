"""Presigned mode's trust boundary, without services: the log scrubber, the MACs of requests and
replies, and the check that a signed URL is for exactly the part (workers/signer.py)."""

from __future__ import annotations

import io
import logging
import uuid

import boto3
import botocore.config
import pytest

from workers import s3, signer

KEY = "k" * 32
UPLOAD_ID = "2~AbC/dEf+gH="


# --- the scrubber ---------------------------------------------------------------------

#: what botocore logs at DEBUG before each request (botocore.endpoint "Sending http request")
BOTOCORE_LINE = (
    "Sending http request: <AWSPreparedRequest stream_output=False, method=PUT, "
    "url=https://b.s3.amazonaws.com/k?partNumber=1&uploadId=u, headers={'User-Agent': b'Boto3/1.44.8', "
    "'X-Amz-Date': b'20261202T065559Z', 'X-Amz-Security-Token': b'FwoGZXIvYXdzEXAMPLETOKEN+/=', "
    "'X-Amz-Content-SHA256': b'UNSIGNED-PAYLOAD', 'Authorization': b'AWS4-HMAC-SHA256 "
    "Credential=AKIAEXAMPLEKEYID/20261202/us-east-1/s3/aws4_request, "
    "SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token, "
    "Signature=828f51bf237817fe02f34f4f64fd31412146398a6bb4b64e44a1f00cd103db39', 'Content-Length': '1'}>")
#: http.client / urllib3 wire text (a bytes repr: \r\n escaped)
WIRE = (r"send: b'PUT /b/k HTTP/1.1\r\nHost: b.s3.amazonaws.com\r\nAuthorization: AWS4-HMAC-SHA256 "
        r"Credential=AKIAEXAMPLEKEYID/20261202/us-east-1/s3/aws4_request, SignedHeaders=host, "
        r"Signature=828f51bf237817fe02f34f4f64fd31412146398a6bb4b64e44a1f00cd103db39\r\n"
        r"X-Amz-Security-Token: FwoGZXIvYXdzEXAMPLETOKEN+/=\r\nContent-Length: 1\r\n\r\n'")
SECRET_PARTS = ("AKIAEXAMPLEKEYID", "828f51bf237817fe", "FwoGZXIvYXdzEXAMPLETOKEN", "EXAMPLESIG")


@pytest.mark.parametrize("text", [
    BOTOCORE_LINE,
    WIRE,
    "Authorization: AWS AKIAEXAMPLEKEYID:EXAMPLESIG=",  # SigV2
    '{"headers": {"authorization": "AWS4-HMAC-SHA256 Credential=AKIAEXAMPLEKEYID/x, Signature=EXAMPLESIG"}}',
    "x-amz-security-token:FwoGZXIvYXdzEXAMPLETOKEN\nhost:b.s3.amazonaws.com",  # a canonical request
    ("X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLEKEYID%2F20261202&X-Amz-Signature=EXAMPLESIG"
     "&X-Amz-Security-Token=FwoGZXIvYXdzEXAMPLETOKEN"),  # a query string on its own
    "Failed to parse headers (url=http://h:9/b/k?uploadId=u&X-Amz-Signature=EXAMPLESIG): bad",
])
def test_scrub_removes_credentials_signatures_and_tokens(text: str) -> None:
    scrubbed = signer.scrub(text)
    for secret in SECRET_PARTS:
        assert secret not in scrubbed, scrubbed


def test_scrub_keeps_what_is_not_secret() -> None:
    scrubbed = signer.scrub(BOTOCORE_LINE)
    assert "'X-Amz-Date': b'20261202T065559Z'" in scrubbed
    assert "'Authorization': '<hidden>'" in scrubbed and "'X-Amz-Security-Token': '<hidden>'" in scrubbed
    assert "'Content-Length': '1'" in scrubbed and "method=PUT" in scrubbed
    assert r"Content-Length: 1\r\n" in signer.scrub(WIRE)
    assert signer.scrub("no signer answered (is `s3ferry signer` running?)") == \
        "no signer answered (is `s3ferry signer` running?)"


def test_log_records_and_their_tracebacks_are_scrubbed() -> None:
    signer.hide_urls_in_logs()
    logger = logging.getLogger(f"test-scrub-{uuid.uuid4().hex[:6]}")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        logger.debug("%s", BOTOCORE_LINE)
        logger.debug("urllib3: %s %s", "PUT", "/b/k?partNumber=1&X-Amz-Credential=AKIAEXAMPLEKEYID%2F2026")
        try:
            raise ConnectionError(f"failed: {WIRE}")
        except ConnectionError:
            logger.exception("sending failed")
        auth = logging.getLogger("botocore.auth")
        level, auth.level = auth.level, logging.DEBUG  # a user turned it on anyway
        auth.addHandler(handler)
        try:
            auth.debug("StringToSign:\n%s", "AWS4-HMAC-SHA256 EXAMPLESIG")
        finally:
            auth.removeHandler(handler)
            auth.setLevel(level)
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    assert "sending failed" in text and "ConnectionError" in text and "(signing details hidden)" in text
    for secret in SECRET_PARTS:
        assert secret not in text, text


# --- the MACs -------------------------------------------------------------------------

def request_message(**changes: object) -> dict[str, object]:
    return {"id": "a" * 32, "upload_id": str(uuid.UUID(int=1)), "part": 3, "checksum": "AAAAAA==",
            "deadline": 100, **changes}


def test_a_reply_mac_binds_the_request_it_answers_and_every_field() -> None:
    reply = {"url": "http://h/b/k", "headers": {"Content-Length": "5"}, "expires": 130}
    mac = signer.reply_mac(KEY, request_message(), reply)
    assert mac == signer.reply_mac(KEY, request_message(deadline=999), reply)  # the request's fields that matter
    for other in (request_message(id="b" * 32), request_message(part=4), request_message(checksum="BBBBBB=="),
                  request_message(upload_id=str(uuid.UUID(int=2)))):
        assert signer.reply_mac(KEY, other, reply) != mac
    for changed in ({**reply, "url": "http://h/b/k2"}, {**reply, "expires": 131},
                    {**reply, "headers": {"Content-Length": "6"}}, {**reply, "extra": 1}):
        assert signer.reply_mac(KEY, request_message(), changed) != mac
    assert signer.reply_mac("x" * 32, request_message(), reply) != mac
    assert signer.reply_mac(KEY, request_message(), {**reply, "mac": "ignored"}) == mac


def test_a_request_mac_binds_the_queue_and_every_field() -> None:
    mac = signer.request_mac(KEY, "q", request_message())
    assert signer.request_mac(KEY, "q2", request_message()) != mac
    assert signer.request_mac(KEY, "q", request_message(part=4)) != mac
    assert signer.request_mac(KEY, "q", {**request_message(), "mac": mac}) == mac
    assert signer._verified(mac, mac) and not signer._verified(None, mac) and not signer._verified("é" * 64, mac)


# --- the URL is for exactly the part ----------------------------------------------------

#: AWS itself, whatever this process's environment says (the integration tests set AWS_ENDPOINT_URL)
PLAIN = botocore.config.Config(ignore_configured_endpoint_urls=True)


def presigned_url(endpoint: str | None, region: str, bucket: str, key: str, upload_id: str | None, number: int,
                  **s3_config: object) -> str:
    """What the signer's own client (s3.client_config) signs, with the AWS config's S3 options."""
    config = s3.client_config(3).merge(PLAIN)
    if s3_config:
        config = config.merge(botocore.config.Config(s3={"payload_signing_enabled": False, **s3_config}))
    client = boto3.session.Session(aws_access_key_id="AKIAEXAMPLEKEYID", aws_secret_access_key="secret",
                                   aws_session_token="token", region_name=region).client(
        "s3", endpoint_url=endpoint, config=config)
    params: dict[str, object] = {"Bucket": bucket, "Key": key, "ContentLength": 5, "ChecksumCRC32C": "AAAAAA=="}
    if upload_id is None:
        return client.generate_presigned_url("put_object", Params=params, ExpiresIn=60)
    return client.generate_presigned_url("upload_part", Params={**params, "UploadId": upload_id,
                                                                "PartNumber": number}, ExpiresIn=60)


def target(endpoint: str | None, bucket: str = "test-bucket", key: str = "dir/a b+c?%.bin",
           upload_id: str | None = UPLOAD_ID, number: int = 7) -> signer.Target:
    return signer.Target(uuid.UUID(int=1), number, endpoint, bucket, key, upload_id)


@pytest.mark.parametrize(("endpoint", "region", "bucket", "options"), [
    ("http://127.0.0.1:5000", "us-east-1", "test-bucket", {}),  # moto, the tests' fault proxy: path-style
    ("https://minio.internal:9000", "us-east-1", "test-bucket", {}),  # botocore: path-style for custom endpoints
    ("https://minio.internal:9000", "us-east-1", "test-bucket", {"addressing_style": "virtual"}),
    ("https://minio.internal", "us-east-1", "test-bucket", {"addressing_style": "virtual"}),
    ("http://[::1]:9000", "us-east-1", "test-bucket", {}),
    (None, "us-east-1", "test-bucket", {}),  # https://test-bucket.s3.amazonaws.com/...
    (None, "eu-west-1", "test-bucket", {"addressing_style": "virtual"}),
    (None, "eu-west-1", "my.dotted.bucket", {}),  # path-style: https://s3.eu-west-1.amazonaws.com/my.dotted.bucket/
    (None, "eu-west-1", "test-bucket", {"addressing_style": "path"}),
    (None, "eu-west-1", "test-bucket", {"use_dualstack_endpoint": True}),
    (None, "us-east-1", "test-bucket", {"use_accelerate_endpoint": True}),
    (None, "cn-north-1", "test-bucket", {}),
    (None, "us-gov-west-1", "test-bucket", {}),
])
@pytest.mark.parametrize("multipart", [True, False])
def test_the_urls_the_signer_makes_match_their_part(endpoint: str | None, region: str, bucket: str,
                                                    options: dict[str, object], multipart: bool) -> None:
    upload_id = UPLOAD_ID if multipart else None
    url = presigned_url(endpoint, region, bucket, "dir/a b+c?%.bin", upload_id, 7, **options)
    assert signer.mismatch(url, target(endpoint, bucket, upload_id=upload_id)) is None, url


def test_fips_urls_match() -> None:
    config = s3.client_config(3).merge(PLAIN).merge(botocore.config.Config(use_fips_endpoint=True))
    client = boto3.session.Session(aws_access_key_id="A", aws_secret_access_key="s",
                                   region_name="us-east-1").client("s3", config=config)
    url = client.generate_presigned_url("put_object", Params={"Bucket": "test-bucket", "Key": "k"}, ExpiresIn=60)
    assert signer.mismatch(url, target(None, key="k", upload_id=None)) is None, url


MINIO = "https://minio.internal:9000"


@pytest.mark.parametrize(("url", "problem"), [
    ("https://evil.example:9000/test-bucket/k?uploadId=u&partNumber=7", "host"),
    ("https://minio.internal:9001/test-bucket/k?uploadId=u&partNumber=7", "host"),
    ("http://minio.internal:9000/test-bucket/k?uploadId=u&partNumber=7", "host"),
    ("https://minio.internal.evil.example:9000/test-bucket/k?uploadId=u&partNumber=7", "host"),
    ("https://other-bucket.minio.internal:9000/k?uploadId=u&partNumber=7", "host"),
    ("https://minio.internal:9000/other-bucket/k?uploadId=u&partNumber=7", "bucket or key"),
    ("https://minio.internal:9000/test-bucket/other-key?uploadId=u&partNumber=7", "bucket or key"),
    ("https://minio.internal:9000/test-bucket/k/?uploadId=u&partNumber=7", "bucket or key"),
    ("https://test-bucket.minio.internal:9000/test-bucket/k?uploadId=u&partNumber=7", "bucket or key"),
    ("https://minio.internal:9000/test-bucket/k?uploadId=other&partNumber=7", "uploadId"),
    ("https://minio.internal:9000/test-bucket/k?uploadId=u&partNumber=8", "partNumber"),
    ("https://minio.internal:9000/test-bucket/k?partNumber=7", "uploadId"),
    ("https://minio.internal:9000/test-bucket/k?uploadId=u&partNumber=7&partNumber=8", "repeats"),
    ("https://minio.internal:9000/test-bucket/k?uploadId=u&partNumber=7&acl=", "unexpected"),
    ("https://minio.internal:9000/test-bucket/k?uploadId=u&partNumber=7&x-id=PutObject", "x-id"),
    ("https://user:pw@minio.internal:9000/test-bucket/k?uploadId=u&partNumber=7", "plain"),
    ("https://minio.internal:9000/test-bucket/k?uploadId=u&partNumber=7#frag", "plain"),
    ("ftp://minio.internal:9000/test-bucket/k?uploadId=u&partNumber=7", "plain"),
    ("https://minio.internal:99999/test-bucket/k", "not a URL"),
])
def test_a_url_for_anything_else_is_refused(url: str, problem: str) -> None:
    found = signer.mismatch(url, target(MINIO, key="k", upload_id="u"))
    assert found is not None and problem in found, found


@pytest.mark.parametrize("url", [
    "https://test-bucket.s3.amazonaws.com.evil.example/k",
    "https://evil.example/test-bucket/k",
    "https://s3.amazonaws.com.evil.example/test-bucket/k",
    "https://test-bucket.evil.amazonaws.com/k",
    "https://test-bucket.s3.amazonaws.com:8443/k",
    "http://test-bucket.s3.amazonaws.com/k",
    "https://other.s3.amazonaws.com/k",
    "https://test-bucket.s3-website-us-east-1.amazonaws.com/k",
])
def test_an_aws_lookalike_is_refused(url: str) -> None:
    assert signer.mismatch(url, target(None, key="k", upload_id=None)) is not None


def test_a_part_url_is_not_a_put_object_url_and_back() -> None:
    part = presigned_url(MINIO, "us-east-1", "test-bucket", "k", "u", 7)
    whole = presigned_url(MINIO, "us-east-1", "test-bucket", "k", None, 7)
    assert signer.mismatch(part, target(MINIO, key="k", upload_id=None)) is not None
    assert signer.mismatch(whole, target(MINIO, key="k", upload_id="u")) is not None
