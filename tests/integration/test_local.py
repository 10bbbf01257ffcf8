"""Single-machine mode: no Postgres, no Redis to run; `s3ferry upload` alone, against moto's S3 server.

Each test gets its own data folder (S3FERRY_HOME): its own SQLite state file
and its own private Redis server, which the commands start and stop.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import psutil
import pytest
import sqlalchemy as sa

from models.db import Database
from models.settings import broker_socket, local_urls
from models.states import PartStatus, UploadStatus
from models.tables import Part, Upload
from tests.conftest import sha256_of_object, write_random
from tests.faults import FlakyProxy
from tests.http_faults import FaultProxy
from tests.integration.helpers import MiB, S3FERRY, claims_per_part, run_cli, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def local_env(service_env: dict[str, str], home: Path) -> Iterator[dict[str, str]]:
    """The test environment without the fleet's database and broker: single-machine mode."""
    env = {key: value for key, value in service_env.items()
           if key not in ("S3FERRY_DATABASE_URL", "S3FERRY_BROKER_URL", "S3FERRY_RESULT_BACKEND",
                          "S3FERRY_QUEUE", "S3FERRY_MAX_ACTIVE_UPLOADS")}
    env["S3FERRY_HOME"] = str(home)
    yield env
    _assert_nothing_left_running(home)


def _assert_nothing_left_running(home: Path) -> None:
    sock = broker_socket(str(home))
    pid_file = home / "broker" / "redis.pid"
    leftover = []
    if pid_file.exists():  # a test that failed half-way: stop the broker it left
        pid = int(pid_file.read_text())
        leftover.append(pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            leftover.pop()
    assert not leftover and not os.path.exists(sock), "the last command out must stop the local Redis server"


def state(home: Path) -> Database:
    return Database(local_urls(str(home))["database_url"])


@contextlib.contextmanager
def in_background(args: list[str], env: dict[str, str], home: Path) -> Iterator[tuple[subprocess.Popen[str], Database]]:
    """`s3ferry ARGS` running (its stderr readable), and the state file; killed and closed after."""
    process = subprocess.Popen([S3FERRY, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    db = state(home)
    try:
        yield process, db
    finally:
        process.kill()
        process.wait()
        db.dispose()


def workers_of(home: Path) -> list[psutil.Process]:
    """The running workers of the commands of this data folder."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if "worker" in (process.info["cmdline"] or []) and process.environ().get("S3FERRY_HOME") == str(home):
                found.append(process)
    return found


def uploads(home: Path) -> list[Upload]:
    db = state(home)
    try:
        with db.transaction() as session:
            return list(session.scalars(sa.select(Upload).order_by(Upload.created_at)))
    finally:
        db.dispose()


def test_upload_with_no_services(local_env, s3, bucket, home: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "video.bin"
    sha256 = write_random(source, 21 * MiB + 7)

    run = run_cli(["upload", str(source), f"s3://{bucket}/v.bin", "--part-size", "5MiB"], local_env)

    assert run.returncode == 0, run.stderr
    assert sha256_of_object(s3, bucket, "v.bin") == sha256
    [upload] = uploads(home)
    assert (upload.status, upload.total_parts) == (UploadStatus.COMPLETE, 5)
    assert str(upload.id) in run.stdout
    assert list((home / "sessions").iterdir()) == []  # the command left
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    # the same commands that read a fleet's state read this one
    listed = run_cli(["ls"], local_env)
    assert listed.returncode == 0 and str(upload.id) in listed.stdout and "complete" in listed.stdout


def test_sigkill_then_the_same_command_resumes_without_sending_done_parts_again(  # type: ignore[no-untyped-def]
        local_env, s3, bucket, home: Path, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    sha256 = write_random(source, 120 * MiB)
    args = ["upload", str(source), f"s3://{bucket}/big.bin", "--part-size", "5MiB", "--concurrency", "2"]
    with in_background(args, local_env, home) as (first, db):
        wait_until(lambda: _done(db) >= 6, timeout=120)
        first.kill()  # SIGKILL: no cleanup of any kind
        first.wait(10)
        worker_pid = json.loads(next((home / "sessions").iterdir()).read_text())["worker_pid"]
        wait_until(lambda: not _alive(worker_pid), timeout=10)  # the worker went with its command
        with db.transaction() as session:
            done_before = set(session.scalars(sa.select(Part.part_number).where(Part.status == PartStatus.DONE)))
            [upload_id] = session.scalars(sa.select(Upload.id))

        second = run_cli(args, local_env)

        assert second.returncode == 0, second.stderr
        assert f"resuming upload {upload_id}" in second.stderr
        assert sha256_of_object(s3, bucket, "big.bin") == sha256
        claims = claims_per_part(db, upload_id)
        assert len(claims) == 24 and all(claims[n] == 1 for n in done_before), claims  # done parts not sent again
        assert [u.status for u in uploads(home)] == [UploadStatus.COMPLETE]


def test_two_commands_at_once_share_the_folder(local_env, s3, bucket, home: Path,  # type: ignore[no-untyped-def]
                                                tmp_path: Path) -> None:
    files = {name: tmp_path / f"{name}.bin" for name in ("a", "b")}
    digests = {name: write_random(path, 30 * MiB + 1) for name, path in files.items()}
    commands = {name: subprocess.Popen([S3FERRY, "upload", str(path), f"s3://{bucket}/{name}.bin", "--part-size",
                                        "5MiB"], env=local_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True) for name, path in files.items()}
    results = {name: command.communicate(timeout=300) for name, command in commands.items()}

    for name, command in commands.items():
        assert command.returncode == 0, results[name][1]
        assert sha256_of_object(s3, bucket, f"{name}.bin") == digests[name]
    assert [u.status for u in uploads(home)] == [UploadStatus.COMPLETE] * 2


def test_a_command_takes_over_from_one_killed_beside_it(local_env, s3, s3_endpoint: str, bucket,  # type: ignore[no-untyped-def]
                                                        home: Path, tmp_path: Path) -> None:
    big, small = tmp_path / "big.bin", tmp_path / "small.bin"
    digests = {"big": write_random(big, 60 * MiB), "small": write_random(small, 6 * MiB)}
    upstream = urlparse(s3_endpoint)
    proxy = FlakyProxy(upstream.hostname, upstream.port)  # both commands' link: the same AWS settings
    proxy.limit(1 * MiB)  # the big upload is mid-way while the second command starts, however slow that is
    env = {**local_env, "AWS_ENDPOINT_URL": proxy.url}
    second = None
    try:
        with in_background(["upload", str(big), f"s3://{bucket}/big.bin", "--part-size", "5MiB",
                            "--concurrency", "1"], env, home) as (first, db):
            wait_until(lambda: _done(db) >= 2, timeout=120)
            # one file at a time: the second waits, queued, behind the first
            second = subprocess.Popen([S3FERRY, "upload", str(small), f"s3://{bucket}/small.bin"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_until(lambda: len(uploads(home)) == 2, timeout=60)
            first.kill()
            assert uploads(home)[0].status == UploadStatus.IN_PROGRESS  # killed mid-upload
            proxy.limit(None)

            _, err = second.communicate(timeout=300)

        assert second.returncode == 0, err
        assert "took over from an s3ferry command that died" in err
        assert [u.status for u in uploads(home)] == [UploadStatus.COMPLETE] * 2  # the big one first
        for name in digests:
            assert sha256_of_object(s3, bucket, f"{name}.bin") == digests[name]
    finally:
        if second is not None and second.poll() is None:
            second.kill()
            second.wait()
        proxy.close()


def test_ctrl_c_stops_the_command_and_the_same_command_resumes(local_env, s3, s3_endpoint: str, bucket,  # type: ignore[no-untyped-def]
                                                               home: Path, tmp_path: Path) -> None:
    source = tmp_path / "f.bin"
    sha256 = write_random(source, 60 * MiB)
    args = ["upload", str(source), f"s3://{bucket}/f.bin", "--part-size", "5MiB", "--concurrency", "1"]
    upstream = urlparse(s3_endpoint)
    link = FlakyProxy(upstream.hostname, upstream.port)
    link.limit(4 * MiB)  # the upload lasts at least 15 s, however fast the machine: the Ctrl-C comes mid-way
    slow_env = dict(local_env, AWS_ENDPOINT_URL=link.url)
    with contextlib.closing(link), in_background(args, slow_env, home) as (first, db):
        wait_until(lambda: _done(db) >= 2, timeout=120)
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=60)
        link.limit(None)
        assert first.returncode == 130, err
        assert "is paused. Run the same command again to resume it" in err
        assert not os.path.exists(broker_socket(str(home)))  # it stopped what it started
        [stopped] = uploads(home)
        assert stopped.status == UploadStatus.PAUSED
        done = _done(db)

        # a paused upload does not hold the queue, and nobody else's worker goes on with it
        other = tmp_path / "other.bin"
        other_sha = write_random(other, 6 * MiB)
        assert run_cli(["upload", str(other), f"s3://{bucket}/other.bin"], local_env).returncode == 0
        assert sha256_of_object(s3, bucket, "other.bin") == other_sha
        assert uploads(home)[0].status == UploadStatus.PAUSED and _done(db) == done + 1

        again = run_cli(args, slow_env)

        assert again.returncode == 0, again.stderr
        assert f"resuming upload {stopped.id}" in again.stderr
        assert sha256_of_object(s3, bucket, "f.bin") == sha256


def test_a_command_with_other_aws_settings_is_refused_beside_a_running_one(  # type: ignore[no-untyped-def]
        local_env, s3, s3_endpoint: str, bucket, home: Path, tmp_path: Path) -> None:
    source = tmp_path / "f.bin"
    write_random(source, 60 * MiB)
    upstream = urlparse(s3_endpoint)
    link = FlakyProxy(upstream.hostname, upstream.port)
    link.limit(2 * MiB)  # the first upload lasts at least 30 s, however fast the machine
    slow_env = dict(local_env, AWS_ENDPOINT_URL=link.url)
    with contextlib.closing(link), in_background(["upload", str(source), f"s3://{bucket}/f.bin", "--part-size",
                                                  "5MiB", "--concurrency", "1"], slow_env, home) as (first, db):
        wait_until(lambda: _done(db) >= 1, timeout=120)

        run = run_cli(["upload", str(source), f"s3://{bucket}/g.bin"],
                      dict(slow_env, AWS_ACCESS_KEY_ID="someone-else"))

        assert first.poll() is None  # (still uploading: the refusal is because of it)
        assert len(workers_of(home)) == 1  # the refused command's worker (started early) went with it
        link.limit(None)
        assert run.returncode == 2
        assert run.stderr.startswith("s3ferry: error: another s3ferry command is uploading from this data folder "
                                     "with other AWS settings") and run.stderr.count("\n") == 1
        assert first.wait(120) == 0
        assert len(uploads(home)) == 1


def test_the_command_starts_its_redis_again_if_it_dies(local_env, s3, bucket, home: Path,  # type: ignore[no-untyped-def]
                                                        tmp_path: Path) -> None:
    source = tmp_path / "f.bin"
    sha256 = write_random(source, 60 * MiB)
    with in_background(["upload", str(source), f"s3://{bucket}/f.bin", "--part-size", "5MiB", "--concurrency", "1"],
                       local_env, home) as (command, db):
        wait_until(lambda: _done(db) >= 2, timeout=120)
        os.kill(int((home / "broker" / "redis.pid").read_text()), signal.SIGKILL)

        _, err = command.communicate(timeout=180)

        assert command.returncode == 0, err
        assert "the local Redis server was gone: started it again" in err
        assert sha256_of_object(s3, bucket, "f.bin") == sha256


def test_an_unwritable_data_folder_is_a_one_line_error(local_env, bucket, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "f.bin"
    write_random(source, 1000)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    env = dict(local_env, S3FERRY_HOME=str(blocker / "home"))

    run = run_cli(["upload", str(source), f"s3://{bucket}/f.bin"], env)

    assert run.returncode == 2
    assert run.stderr.strip() == (f"s3ferry: error: the data folder {blocker / 'home'} is not writable "
                                  "(Not a directory): set S3FERRY_HOME to a folder you can write to")


def test_a_state_file_from_a_newer_s3ferry_is_refused_and_left_alone(local_env, s3, bucket, home: Path,  # type: ignore[no-untyped-def]
                                                                     tmp_path: Path) -> None:
    assert run_cli(["db", "upgrade"], local_env).returncode == 0
    with sqlite3.connect(home / "state.db") as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    source = tmp_path / "f.bin"
    write_random(source, 1000)

    run = run_cli(["upload", str(source), f"s3://{bucket}/f.bin"], local_env)

    assert run.returncode == 2
    assert run.stderr.strip() == (f"s3ferry: error: the state file {home / 'state.db'} was written by a newer "
                                  "version of s3ferry: upgrade s3ferry, or set S3FERRY_HOME to another folder")
    with sqlite3.connect(home / "state.db") as connection:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [("9999_from_the_future",)]
        assert connection.execute("SELECT count(*) FROM uploads").fetchone() == (0,)
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


@pytest.mark.parametrize(("args", "message"), [
    (["upload", "{source}", "s3://{bucket}/f.bin", "--no-wait"], "--no-wait needs a worker fleet"),
    (["worker"], "`s3ferry worker` is for a worker fleet"),
    (["beat"], "`s3ferry beat` is for a worker fleet"),
])
def test_fleet_only_options_are_refused(local_env, bucket, tmp_path: Path, args: list[str],  # type: ignore[no-untyped-def]
                                        message: str) -> None:
    source = tmp_path / "f.bin"
    write_random(source, 1000)
    run = run_cli([a.format(source=source, bucket=bucket) for a in args], local_env, timeout=60)
    assert run.returncode == 2
    assert run.stderr.startswith(f"s3ferry: error: {message}") and run.stderr.count("\n") == 1


def test_a_missing_file_changes_nothing(local_env, bucket, home: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run = run_cli(["upload", str(tmp_path / "nope.bin"), f"s3://{bucket}/x"], local_env)
    assert run.returncode == 2 and "nope.bin" in run.stderr
    assert not home.exists()  # checked before anything is created


def test_demo_reports_a_matching_checksum(service_env: dict[str, str]) -> None:
    env = {key: value for key, value in service_env.items() if not key.startswith(("S3FERRY_", "AWS_"))}

    run = subprocess.run([S3FERRY, "demo", "--size", "160MiB"], env=env, capture_output=True, text=True,
                         timeout=300)

    assert run.returncode == 0, run.stdout + run.stderr
    assert "killed the command and its worker with SIGKILL" in run.stdout
    assert "the same command again" in run.stdout
    assert "matches the file" in run.stdout and "SHA-256                   match" in run.stdout
    folder = run.stdout.split("everything in ", 1)[1].split(")", 1)[0]
    assert not Path(folder).exists()  # cleaned up


def _done(db: Database) -> int:
    try:
        with db.transaction() as session:
            return session.scalar(sa.select(sa.func.count()).select_from(Part)
                                  .where(Part.status == PartStatus.DONE)) or 0
    except Exception:  # noqa: BLE001 - not created yet
        return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("foreign", ["open", "other-user", "symlink"])
def test_a_broker_folder_in_the_temp_folder_that_is_not_private_is_refused(  # type: ignore[no-untyped-def]
        foreign: str, service_env: dict[str, str], tmp_path: Path, s3, bucket: str) -> None:
    """A data folder path with a space puts the socket in the temp folder, at a predictable path:
    a folder someone else made there (open, theirs, or a link) is never used."""
    home = tmp_path / "with space" / "home"
    env = {key: value for key, value in service_env.items()
           if key not in ("S3FERRY_DATABASE_URL", "S3FERRY_BROKER_URL", "S3FERRY_RESULT_BACKEND",
                          "S3FERRY_QUEUE", "S3FERRY_MAX_ACTIVE_UPLOADS")}
    env["S3FERRY_HOME"] = str(home)
    folder = Path(broker_socket(str(home))).parent
    assert str(folder).startswith(tempfile.gettempdir()) and " " not in str(folder)
    elsewhere = tmp_path / "theirs"
    elsewhere.mkdir(mode=0o700)
    if foreign == "open":
        folder.mkdir(mode=0o700)
        folder.chmod(0o777)
    elif foreign == "other-user":
        if os.getuid() != 0:
            pytest.skip("giving a folder to another user needs root (CI runs as root)")
        folder.mkdir(mode=0o700)
        os.chown(folder, 12345, 12345)
    else:
        folder.symlink_to(elsewhere)
    source = tmp_path / "small.bin"
    write_random(source, MiB)
    try:
        run = run_cli(["upload", str(source), f"s3://{bucket}/small.bin"], env)
        assert run.returncode == 2 and "refusing the broker's folder" in run.stderr, (run.returncode, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert list(elsewhere.iterdir()) == [] and not (folder / "redis.sock").exists()
    finally:
        if folder.is_symlink():
            folder.unlink()
        else:
            shutil.rmtree(folder)
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_a_failed_upload_exits_1_and_retry_runs_it_to_the_end(local_env, s3, s3_endpoint: str, bucket,  # type: ignore[no-untyped-def]
                                                               home: Path, tmp_path: Path) -> None:
    source = tmp_path / "flaky.bin"
    sha256 = write_random(source, 11 * MiB)
    proxy = FaultProxy(s3_endpoint)
    try:
        proxy.configure(error_share=1.0)  # every part answered 500 InternalError
        env = {**local_env, "AWS_ENDPOINT_URL": proxy.url}
        failed = run_cli(["upload", str(source), f"s3://{bucket}/flaky.bin", "--part-size", "5MiB",
                          "--max-retries", "0"], env)
        assert failed.returncode == 1, failed.stderr
        assert "s3ferry: upload failed: " in failed.stderr.strip().splitlines()[-1]
        [upload] = uploads(home)
        assert upload.status == UploadStatus.FAILED

        proxy.configure(error_share=0.0)
        retried = run_cli(["retry", str(upload.id), "--json"], env)  # runs it here, as resume does

        assert retried.returncode == 0, retried.stderr
        record = json.loads(retried.stdout)
        assert (record["id"], record["status"], record["bytes_done"]) == (str(upload.id), "complete", 11 * MiB)
        assert sha256_of_object(s3, bucket, "flaky.bin") == sha256
        assert not workers_of(home)
    finally:
        proxy.close()
