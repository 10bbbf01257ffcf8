"""Bad input: a clear one-line error, a non-zero exit, and nothing written to the database or S3."""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from models.db import Database
from models.exceptions import UserError
from models.settings import Settings, local_urls
from models.tables import Upload
from orchestrator import submit
from tests import services
from tests.integration.helpers import run_cli

pytestmark = pytest.mark.integration


@pytest.fixture
def small_file(tmp_path: Path) -> Path:
    path = tmp_path / "small.bin"
    path.write_bytes(os.urandom(1000))
    return path


@pytest.fixture
def unchanged(db: Database, s3, bucket: str) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Assert the test recorded no upload, and left no object or multipart upload in S3."""
    since = dt.datetime.now(dt.UTC)
    yield
    with db.transaction() as session:  # no upload was recorded (events belong to uploads)
        assert session.scalar(sa.select(sa.func.count()).select_from(Upload).where(Upload.created_at >= since)) == 0
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
    assert not s3.list_objects_v2(Bucket=bucket).get("Contents")


def assert_one_line_error(run, exit_code: int, *fragments: str) -> None:  # type: ignore[no-untyped-def]
    assert run.returncode == exit_code, (run.returncode, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("s3ferry: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert run.stdout == ""


@pytest.mark.parametrize(("source", "destination", "extra", "message"), [
    ("missing.bin", "s3://{bucket}/k", [], "does not exist"),
    (".", "s3://{bucket}/k", [], "is a directory, not a file"),
    ("small.bin", "{bucket}/k", [], "is not of the form s3://bucket/key"),
    ("small.bin", "https://{bucket}/k", [], "is not of the form s3://bucket/key"),
    ("small.bin", "s3:///k", [], "has no bucket"),
    ("small.bin", "s3://Bad_Bucket/k", [], "invalid bucket name 'Bad_Bucket'"),
    ("small.bin", "s3://ab/k", [], "3 to 63 characters"),
    ("small.bin", "s3://192.168.1.1/k", [], "must not look like an IP address"),
    ("small.bin", "s3://{bucket}/" + "k" * 1025, [], "key is 1025 bytes long"),
    ("small.bin", "s3://{bucket}/" + "é" * 513, [], "key is 1026 bytes long"),
    ("small.bin", "s3://{bucket}/k", ["--part-size", "4MiB"], "under S3's minimum of 5 MiB"),
    ("small.bin", "s3://{bucket}/k", ["--part-size", "6GiB"], "over S3's maximum of 5 GiB"),
    ("small.bin", "s3://test-no-such-bucket-here/k", [], "bucket 'test-no-such-bucket-here' does not exist"),
], ids=["missing", "directory", "no-scheme", "wrong-scheme", "no-bucket", "bad-bucket", "short-bucket",
        "ip-bucket", "long-key", "long-utf8-key", "part-too-small", "part-too-big", "no-such-bucket"])
def test_bad_upload_input(service_env, bucket: str, small_file: Path, unchanged: None,  # type: ignore[no-untyped-def]
                          source: str, destination: str, extra: list[str], message: str) -> None:
    source_path = small_file.parent / source
    run = run_cli(["upload", str(source_path), destination.format(bucket=bucket), *extra], service_env)
    assert_one_line_error(run, 2, message)


def test_a_file_over_5_tib(service_env, bucket: str, tmp_path: Path, unchanged: None) -> None:  # type: ignore[no-untyped-def]
    huge = tmp_path / "huge.bin"
    with open(huge, "wb") as sparse:
        sparse.truncate(5 * 1024**4 + 1)
    run = run_cli(["upload", str(huge), f"s3://{bucket}/huge.bin"], service_env)
    assert_one_line_error(run, 2, "over S3's maximum object size of 5 TiB")


def test_an_unreadable_file(service_env, bucket: str, unchanged: None) -> None:  # type: ignore[no-untyped-def]
    folder = Path(tempfile.mkdtemp(prefix="s3ferry-unreadable-"))
    try:
        folder.chmod(0o755)
        secret = folder / "secret.bin"
        secret.write_bytes(b"x" * 100)
        secret.chmod(0o000)
        if os.geteuid() == 0:
            message = _as_nobody(lambda: submit.validate(Settings.from_env(), str(secret), f"s3://{bucket}/secret.bin"))
            assert message == f"source {str(secret)!r} cannot be read: Permission denied"
        else:
            run = run_cli(["upload", str(secret), f"s3://{bucket}/secret.bin"], service_env)
            assert_one_line_error(run, 2, "cannot be read: Permission denied")
    finally:
        shutil.rmtree(folder)


def _as_nobody(call) -> str:  # type: ignore[no-untyped-def]
    """Root reads any file: run `call` in a forked child that dropped to `nobody`; return its UserError."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgid(65534)
            os.setuid(65534)
            call()
            os.write(write_end, b"no error")
        except UserError as error:
            os.write(write_end, str(error).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        return pipe.read().decode()


def test_an_unreachable_database_is_named_without_its_password(service_env, bucket: str, small_file: Path,  # type: ignore[no-untyped-def]
                                                               unchanged: None) -> None:
    port = services.free_port()
    env = {**service_env,
           "S3FERRY_DATABASE_URL": f"postgresql+psycopg://ferry:Sup3rS3cret@127.0.0.1:{port}/s3ferry"}
    run = run_cli(["upload", str(small_file), f"s3://{bucket}/k"], env)
    assert_one_line_error(run, 1, f"cannot reach the database (postgresql at 127.0.0.1:{port}/s3ferry)")
    assert "Sup3rS3cret" not in run.stderr


def test_an_unreachable_broker(service_env, bucket: str, small_file: Path, unchanged: None) -> None:  # type: ignore[no-untyped-def]
    port = services.free_port()
    env = {**service_env, "S3FERRY_BROKER_URL": f"redis://:Sup3rS3cret@127.0.0.1:{port}/0"}
    run = run_cli(["upload", str(small_file), f"s3://{bucket}/k"], env)
    assert_one_line_error(run, 1, f"cannot reach the broker at redis://:**@127.0.0.1:{port}/0")
    assert "Sup3rS3cret" not in run.stderr


def test_an_invalid_part_size_text(service_env, small_file: Path, bucket: str) -> None:  # type: ignore[no-untyped-def]
    run = run_cli(["upload", str(small_file), f"s3://{bucket}/k", "--part-size", "lots"], service_env)
    assert_refused(run, "invalid size 'lots'")


@pytest.mark.parametrize(("upload_id", "code", "message"), [
    ("not-a-uuid", 2, "'not-a-uuid' is not a valid upload id"),
    (str(uuid.UUID(int=7)), 2, "no upload with id 00000000-0000-0000-0000-000000000007"),
])
def test_status_of_a_bad_id(service_env, upload_id: str, code: int, message: str) -> None:  # type: ignore[no-untyped-def]
    run = run_cli(["status", upload_id], service_env)
    assert run.returncode == code
    [line] = run.stderr.strip().splitlines()
    assert message in line


#: Settings that would break the rules of leases, retries, signing or the broker: refused at start.
BAD_SETTINGS = [
    ("S3FERRY_LEASE_SECONDS", "0", "S3FERRY_LEASE_SECONDS (0) must be from 1 to 86400 seconds"),
    ("S3FERRY_LEASE_SECONDS", "-5", "S3FERRY_LEASE_SECONDS (-5) must be from 1 to 86400 seconds"),
    ("S3FERRY_RETRY_BACKOFF_MAX", "nan", "S3FERRY_RETRY_BACKOFF_MAX='nan' is not a finite number: it must be more "
                                         "than 0 and at most 86400 seconds"),
    ("S3FERRY_RECONCILE_INTERVAL", "0", "S3FERRY_RECONCILE_INTERVAL (0) must be from 1 to 86400 seconds"),
    ("S3FERRY_MAX_RETRIES", "-1", "S3FERRY_MAX_RETRIES (-1) must be from 0 to 1000"),
    ("S3FERRY_PRESIGN_EXPIRY_SECONDS", "604801", "S3FERRY_PRESIGN_EXPIRY_SECONDS (604801) must be from 1 to 604800"),
    ("S3FERRY_QUEUE", "parts\nmore", "S3FERRY_QUEUE ('parts\\nmore') is not a valid queue name: 1 to 200 characters"),
    ("S3FERRY_PART_SIZE", "1e400", "S3FERRY_PART_SIZE='1e400' is not a valid size: it must be from 5 MiB to 5 GiB"),
    ("S3FERRY_HEARTBEAT_SECONDS", "0", "S3FERRY_HEARTBEAT_SECONDS (0.0) must be from 0.1 to 60 seconds"),
    ("S3FERRY_LIVENESS_SECONDS", "1", "S3FERRY_LIVENESS_SECONDS (1.0) must be at least twice "
                                      "S3FERRY_HEARTBEAT_SECONDS (2.0)"),
]
SETTING_IDS = [f"{name[8:].lower()}={value!r}" for name, value, _ in BAD_SETTINGS]

#: Flags out of range: one line, argparse's or s3ferry's (part size: S3's words).
BAD_FLAGS = [
    (["--max-retries", "-5"], "argument --max-retries: invalid number '-5': a whole number from 0 to 1000"),
    (["--part-size", "1e400"], "argument --part-size: invalid size '1e400': too large"),
    (["--part-size", "0"], "part size 0 B is under S3's minimum of 5 MiB"),
]
FLAG_IDS = ["max-retries=-5", "part-size=1e400", "part-size=0"]


@pytest.fixture
def single_machine_env(service_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """Single-machine mode with a data folder that does not exist yet (and must not, after a refusal)."""
    env = {key: value for key, value in service_env.items()
           if key not in ("S3FERRY_DATABASE_URL", "S3FERRY_BROKER_URL", "S3FERRY_RESULT_BACKEND")}
    return {**env, "S3FERRY_HOME": str(tmp_path / "home")}


def assert_refused(run, *fragments: str) -> None:  # type: ignore[no-untyped-def]
    """Exit 2; one line, s3ferry's error (`s3ferry upload: error:` for a flag argparse refuses)."""
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert run.stdout == ""
    [last] = run.stderr.strip().splitlines()
    assert re.match(r"s3ferry( upload)?: error: ", last), run.stderr
    for fragment in fragments:
        assert fragment in last


@pytest.mark.parametrize(("variable", "value", "message"), BAD_SETTINGS, ids=SETTING_IDS)
def test_a_bad_setting_in_single_machine_mode_writes_nothing(single_machine_env: dict[str, str], bucket: str,  # type: ignore[no-untyped-def]
                                                             small_file: Path, s3, variable: str, value: str,
                                                             message: str) -> None:
    run = run_cli(["upload", str(small_file), f"s3://{bucket}/k"], {**single_machine_env, variable: value})
    assert_one_line_error(run, 2, message)
    assert not os.path.exists(single_machine_env["S3FERRY_HOME"])  # no data folder, no state, no broker
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")


@pytest.mark.parametrize(("variable", "value", "message"), BAD_SETTINGS, ids=SETTING_IDS)
def test_a_bad_setting_in_a_fleet_writes_nothing(service_env: dict[str, str], bucket: str, small_file: Path,  # type: ignore[no-untyped-def]
                                                 unchanged: None, variable: str, value: str, message: str) -> None:
    run = run_cli(["upload", str(small_file), f"s3://{bucket}/k"], {**service_env, variable: value})
    assert_one_line_error(run, 2, message)


@pytest.mark.parametrize("command", [["worker"], ["beat"], ["signer"], ["ls"], ["db", "upgrade"]])
def test_every_command_checks_the_settings_first(service_env: dict[str, str], command: list[str]) -> None:
    run = run_cli(command, {**service_env, "S3FERRY_LEASE_SECONDS": "0"}, timeout=60)
    assert_one_line_error(run, 2, "S3FERRY_LEASE_SECONDS (0) must be from 1 to 86400 seconds")


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS, ids=FLAG_IDS)
def test_a_bad_flag_in_single_machine_mode_writes_nothing(single_machine_env: dict[str, str], bucket: str,  # type: ignore[no-untyped-def]
                                                          small_file: Path, s3, flags: list[str],
                                                          message: str) -> None:
    run = run_cli(["upload", str(small_file), f"s3://{bucket}/k", *flags], single_machine_env)
    assert_refused(run, message)
    assert not os.path.exists(single_machine_env["S3FERRY_HOME"])
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS, ids=FLAG_IDS)
def test_a_bad_flag_in_a_fleet_writes_nothing(service_env: dict[str, str], bucket: str, small_file: Path,  # type: ignore[no-untyped-def]
                                              unchanged: None, flags: list[str], message: str) -> None:
    run = run_cli(["upload", str(small_file), f"s3://{bucket}/k", *flags], service_env)
    assert_refused(run, message)


#: moto's requests before it checks: the setup below
SETUP_REQUESTS = 7


@pytest.fixture
def checking_s3(tmp_path: Path) -> Iterator[tuple[dict[str, str], dict[str, str], str]]:
    """A moto server of its own that checks credentials, signatures and rights (against its IAM,
    once the requests that set it up are done): the keys of a user allowed everything on S3,
    those of one allowed only to list (no PutObject), and the endpoint."""
    import boto3

    server, endpoint = services.start_moto(tmp_path, env={"INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_REQUESTS)},
                                           name="moto-auth")
    try:
        setup = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                     aws_secret_access_key="setup")
        iam = boto3.client("iam", **setup)
        keys = []
        for user, actions in (("uploader", '"s3:*"'), ("lister", '["s3:ListBucket", "s3:GetBucketLocation"]')):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=(
                '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": %s, "Resource": "*"}]}'
                % actions))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            keys.append({"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]})
        boto3.client("s3", **setup).create_bucket(Bucket="checked")  # the 7th: from here on, all is checked
        yield keys[0], keys[1], endpoint
    finally:
        server.stop()


@pytest.mark.parametrize("mode", ["fleet", "single-machine"])
@pytest.mark.parametrize(("wrong", "code"), [
    ({"AWS_ACCESS_KEY_ID": "AKIANOSUCHKEY0000000"}, "InvalidAccessKeyId"),
    ({"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, "SignatureDoesNotMatch"),
], ids=["unknown-key", "wrong-secret"])
def test_credentials_s3_refuses_are_bad_input(service_env: dict[str, str], single_machine_env: dict[str, str],  # type: ignore[no-untyped-def]
                                               db: Database, small_file: Path, checking_s3, wrong: dict[str, str],
                                               code: str, mode: str) -> None:
    keys, _, endpoint = checking_s3
    base = service_env if mode == "fleet" else single_machine_env
    env = {**base, **keys, "AWS_ENDPOINT_URL": endpoint, "S3FERRY_BUCKETS": "checked"}
    if mode == "single-machine":
        assert run_cli(["ls"], env).returncode == 0  # the data folder and its state file, made
    state = db if mode == "fleet" else Database(local_urls(env["S3FERRY_HOME"])["database_url"])
    with state.transaction() as session:
        before = session.scalar(sa.select(sa.func.count()).select_from(Upload))

    run = run_cli(["upload", str(small_file), "s3://checked/k"], {**env, **wrong})

    assert_one_line_error(run, 2, "S3 refused the credentials for bucket 'checked'", code)
    with state.transaction() as session:  # no row
        assert session.scalar(sa.select(sa.func.count()).select_from(Upload)) == before
    if state is not db:
        state.dispose()
    # the right keys pass the same check: what was refused was the credentials
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id=keys["AWS_ACCESS_KEY_ID"], aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])
    submit.check_bucket(s3, "checked")
    assert not s3.list_multipart_uploads(Bucket="checked").get("Uploads")


def test_no_credentials_at_all_are_bad_input(service_env: dict[str, str], bucket: str, small_file: Path,  # type: ignore[no-untyped-def]
                                             tmp_path: Path, unchanged: None) -> None:
    env = {k: v for k, v in service_env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                              "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    env.update(HOME=str(tmp_path), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true")
    run = run_cli(["upload", str(small_file), f"s3://{bucket}/k"], env)
    assert_one_line_error(run, 2, "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")


def test_credentials_without_the_right_to_write_fail_the_upload_at_once(  # type: ignore[no-untyped-def]
        service_env: dict[str, str], db: Database, small_file: Path, checking_s3) -> None:
    _, lister, endpoint = checking_s3
    env = {**service_env, **lister, "AWS_ENDPOINT_URL": endpoint, "S3FERRY_BUCKETS": "checked"}

    run = run_cli(["upload", str(small_file), "s3://checked/k", "--no-wait"], env)

    # accepted credentials, the bucket there: not bad input, but the upload cannot start
    assert run.returncode == 1, run.stderr
    assert "s3ferry: upload failed: " in run.stderr and "AccessDenied" in run.stderr.strip().splitlines()[-1]
    upload_id = uuid.UUID(run.stdout.strip())
    with db.transaction() as session:
        assert session.get(Upload, upload_id).status == "failed"
