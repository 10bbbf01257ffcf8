"""The fault-injecting HTTP proxy (tests/http_faults.py) does what it says, against moto's server."""

from __future__ import annotations

import concurrent.futures
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import boto3
import botocore.config
import botocore.exceptions
import pytest

from tests.http_faults import FaultProxy

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    fault_proxy = FaultProxy(s3_endpoint)
    yield fault_proxy
    fault_proxy.close()


def client(proxy: FaultProxy):  # type: ignore[no-untyped-def]
    return boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing",
                        config=botocore.config.Config(retries={"total_max_attempts": 1, "mode": "standard"},
                                                      request_checksum_calculation="when_required",
                                                      signature_version="s3v4"))


def code(call) -> str:  # type: ignore[no-untyped-def]
    try:
        call()
    except botocore.exceptions.ClientError as error:
        return str(error.response["Error"]["Code"])
    return "ok"


def test_without_faults_bytes_pass_through(proxy: FaultProxy, bucket: str) -> None:
    s3 = client(proxy)
    body = os.urandom(3 * MiB + 5)
    s3.put_object(Bucket=bucket, Key="k", Body=body)
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == body
    assert s3.head_object(Bucket=bucket, Key="k")["ContentLength"] == len(body)
    assert proxy.counts.requests == 3
    # the proxy counts a request out just after its last byte went out: the client may be faster
    deadline = time.monotonic() + 5
    while proxy.counts.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.counts.in_flight == 0


def test_slowdown_above_a_number_of_requests_in_flight(proxy: FaultProxy, bucket: str) -> None:
    s3 = client(proxy)
    upload = s3.create_multipart_upload(Bucket=bucket, Key="k")["UploadId"]
    proxy.configure(slowdown_above=2, latency=0.3)
    body = os.urandom(5 * MiB)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda n: code(lambda: s3.upload_part(
            Bucket=bucket, Key="k", UploadId=upload, PartNumber=n, Body=body)), range(1, 7)))
    assert codes.count("SlowDown") == proxy.counts.slowdowns >= 1
    assert codes.count("ok") >= 2
    assert proxy.counts.max_in_flight > 2


@pytest.mark.parametrize(("faults", "expected"), [({"slowdown_share": 1.0}, "SlowDown"),
                                                  ({"error_share": 1.0}, "InternalError")])
def test_a_share_of_requests_fails(proxy: FaultProxy, bucket: str, faults: dict[str, float], expected: str) -> None:
    s3 = client(proxy)
    proxy.configure(**faults)
    assert code(lambda: s3.put_object(Bucket=bucket, Key="k", Body=b"x" * 1000)) == expected
    assert code(lambda: s3.head_bucket(Bucket=bucket)) == "ok"  # only PUTs, by default
    proxy.configure(**{name: 0.0 for name in faults})
    assert code(lambda: s3.put_object(Bucket=bucket, Key="k", Body=b"x" * 1000)) == "ok"


def test_a_reset_mid_body(proxy: FaultProxy, bucket: str) -> None:
    s3 = client(proxy)
    proxy.configure(reset_share=1.0)
    with pytest.raises((botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)):
        s3.put_object(Bucket=bucket, Key="k", Body=os.urandom(4 * MiB))
    assert proxy.counts.resets == 1
    assert code(lambda: s3.head_object(Bucket=bucket, Key="k")) == "404"  # nothing landed


def test_latency_and_bandwidth_cap(proxy: FaultProxy, bucket: str) -> None:
    s3 = client(proxy)
    proxy.configure(latency=0.4)
    started = time.monotonic()
    s3.head_bucket(Bucket=bucket)
    assert time.monotonic() - started >= 0.4
    proxy.configure(bytes_per_second=4 * MiB)
    started = time.monotonic()
    s3.put_object(Bucket=bucket, Key="k", Body=os.urandom(8 * MiB))
    assert time.monotonic() - started >= 1.5  # 8 MiB at 4 MiB/s


def test_expired_presigned_urls_are_refused(proxy: FaultProxy, bucket: str) -> None:
    s3 = client(proxy)

    def put(url: str) -> int:
        request = urllib.request.Request(url, data=b"hello", method="PUT")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as error:
            assert b"Request has expired" in error.read()
            return error.code

    short = s3.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": "k"}, ExpiresIn=1)
    time.sleep(2.1)
    assert put(short) == 403 and proxy.counts.expired == 1
    fresh = s3.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": "k"}, ExpiresIn=60)
    assert put(fresh) == 200


def test_a_refusal_comes_before_the_body_when_the_client_waits_for_100_continue(proxy: FaultProxy,
                                                                                  bucket: str) -> None:
    s3 = client(proxy)
    upload = s3.create_multipart_upload(Bucket=bucket, Key="k")["UploadId"]
    body = os.urandom(5 * MiB)
    proxy.configure(slowdown_share=1.0)
    assert code(lambda: s3.upload_part(Bucket=bucket, Key="k", UploadId=upload, PartNumber=1, Body=body)) == "SlowDown"
    assert proxy.counts.slowdowns == 1 and proxy.counts.body_bytes == 0  # botocore sent Expect: 100-continue
    proxy.configure(slowdown_share=0.0)
    s3.upload_part(Bucket=bucket, Key="k", UploadId=upload, PartNumber=1, Body=body)
    assert proxy.counts.body_bytes == len(body)
    s3.abort_multipart_upload(Bucket=bucket, Key="k", UploadId=upload)
