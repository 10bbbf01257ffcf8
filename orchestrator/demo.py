"""`s3ferry demo`: the whole story on one machine, with nothing to set up.

A local S3 server (moto's), a random file, `s3ferry upload` killed with SIGKILL
part-way (the command and its worker, as a crash or a power cut would), the
same command again, and the object downloaded and checked. Everything runs in
a temporary folder with its own data folder (S3FERRY_HOME), so the user's own
uploads are not touched, and everything is removed at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa

from models.db import Database
from models.exceptions import UserError
from models.settings import format_size, local_urls
from models.states import PartStatus
from models.tables import Part, Upload, UploadEvent

BUCKET = "s3ferry-demo"
CHUNK = 8 * 1024 * 1024


class Demo:
    def __init__(self, size: int, kill_at: float, folder: Path) -> None:
        self.size, self.kill_at, self.folder = size, kill_at, folder
        self.home = folder / "home"
        self.file = folder / "demo.bin"
        self.started = time.monotonic()
        self.step = 0
        self.commands: list[subprocess.Popen[bytes]] = []

    def say(self, text: str, seconds: float | None = None) -> None:
        timing = f"  [{seconds:.1f} s]" if seconds is not None else ""
        print(f"{text}{timing}", flush=True)

    def numbered(self, text: str, seconds: float | None = None) -> None:
        self.step += 1
        self.say(f"\n{self.step}. {text}", seconds)

    def env(self, endpoint: str) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("S3FERRY_", "AWS_")) and key != "REMAP_SIGTERM"}
        env.update(S3FERRY_HOME=str(self.home), AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="demo",
                   AWS_SECRET_ACCESS_KEY="demo", AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1")
        return env


def run(size: int, kill_at: float = 0.4, keep: bool = False) -> int:
    try:
        import moto.server  # noqa: F401  # pyflakes: ignore
    except ImportError:
        raise UserError("the demo needs moto's S3 server: pip install 's3ferry[demo]' "
                        "(or, in a checkout, pip install -e '.[demo]')") from None
    if size < 1:
        raise UserError("--size must be at least 1 byte")
    folder = Path(tempfile.mkdtemp(prefix="s3ferry-demo-"))
    demo = Demo(size, kill_at, folder)
    print(f"s3ferry demo: a {format_size(size)} upload that survives having its workers killed "
          f"(everything in {folder})")
    try:
        with moto_server(folder) as endpoint:
            return _run(demo, endpoint)
    finally:
        _stop_leftovers(demo)
        if keep:
            print(f"\nkept {folder}: the file, the state file (home/state.db) and the logs (home/logs)")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def _run(demo: Demo, endpoint: str) -> int:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="demo",
                      aws_secret_access_key="demo")
    s3.create_bucket(Bucket=BUCKET)
    demo.numbered(f"a local S3 server (moto's) on {endpoint}, with a bucket {BUCKET}",
                  time.monotonic() - demo.started)

    began = time.monotonic()
    expected = write_random(demo.file, demo.size)
    demo.numbered(f"wrote {format_size(demo.size)} of random bytes to {demo.file}\n"
                  f"   SHA-256 {expected}", time.monotonic() - began)

    destination = f"s3://{BUCKET}/{demo.file.name}"
    argv = [sys.executable, "-m", "orchestrator.cli", "upload", str(demo.file), destination]
    env = demo.env(endpoint)
    demo.numbered(f"s3ferry upload {demo.file.name} {destination}   (single-machine mode: state in "
                  f"{demo.home}/state.db, the command runs its own worker)")
    began = time.monotonic()
    first = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
    demo.commands.append(first)
    db = _state(demo)
    killed = _kill_part_way(demo, db, first)
    if killed is None:
        print(f"s3ferry demo: the upload command ended (exit {first.returncode}) before the upload reached "
              f"{demo.kill_at:.0%}{': nothing to resume; try a larger --size' if first.returncode == 0 else ''}; "
              f"logs in {demo.home / 'logs'}", file=sys.stderr)
        return 1
    done, in_flight, total = killed
    demo.say(f"\n   killed the command and its worker with SIGKILL at {done / total:.0%}: "
             f"{done} of {total} parts done, {in_flight} in flight", time.monotonic() - began)

    demo.numbered(f"what the state file says now: {_counts(db)}; the command and its worker are gone")

    demo.numbered("the same command again: it finds the upload of this file and resumes it")
    began = time.monotonic()
    second = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
    demo.commands.append(second)
    second.wait()
    resumed_in = time.monotonic() - began
    if second.returncode != 0:
        print(f"s3ferry demo: the second upload command failed (exit {second.returncode}); logs in "
              f"{demo.home / 'logs'}", file=sys.stderr)
        return 1
    demo.say("   complete", resumed_in)

    began = time.monotonic()
    actual = sha256_of_object(s3, BUCKET, demo.file.name)
    matches = actual == expected
    demo.numbered(f"downloaded {destination}: SHA-256 {actual} "
                  f"{'matches' if matches else 'DOES NOT MATCH'} the file", time.monotonic() - began)

    parts, resent, resent_bytes, adopted, leftover = _summary(db, s3)
    db.dispose()
    print(f"""
what happened
  file                      {format_size(demo.size)} in {len(parts)} part(s) of {format_size(parts[0].size)}
  done before the kill      {done} part(s): not sent again
  in flight at the kill     {in_flight} part(s)
  found whole in S3         {adopted} part(s) (landed just before the kill; checked by ListParts, not sent again)
  sent again after resume   {resent} part(s), {format_size(resent_bytes)}
  multipart uploads left    {leftover} (nothing left behind in S3)
  SHA-256                   {'match' if matches else 'MISMATCH'}
  total time                {time.monotonic() - demo.started:.1f} s""")
    return 0 if matches and leftover == 0 else 1


def _state(demo: Demo) -> Database:
    url = local_urls(str(demo.home))["database_url"]
    deadline = time.monotonic() + 30
    while not (demo.home / "state.db").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return Database(url)


def _kill_part_way(demo: Demo, db: Database, command: subprocess.Popen[bytes]) -> tuple[int, int, int] | None:
    """SIGKILL the command and its worker once `kill_at` of the bytes are done; the counts then."""
    while command.poll() is None:
        counts = _progress(db)
        if counts is not None:
            done_bytes, done, in_flight, total = counts
            pids = _pids(demo.home)  # the worker first, then the command
            if done_bytes >= demo.kill_at * demo.size and len(pids) == 2:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                command.wait()
                return done, in_flight, total
        time.sleep(0.05)
    return None


def _stop_leftovers(demo: Demo) -> None:
    """Interrupted (Ctrl-C) or failed: let the upload commands stop as they do on Ctrl-C, and
    stop the Redis server a killed one left, before its folder goes."""
    for command in demo.commands:
        if command.poll() is None:
            command.send_signal(signal.SIGINT)
    for command in demo.commands:
        try:
            command.wait(30)
        except subprocess.TimeoutExpired:
            command.kill()
    with contextlib.suppress(OSError, ValueError):
        os.kill(int((demo.home / "broker" / "redis.pid").read_text()), signal.SIGTERM)


def _progress(db: Database) -> tuple[int, int, int, int] | None:
    try:
        with db.transaction() as session:
            rows = session.execute(sa.select(Part.status, Part.size)).all()
    except Exception:  # noqa: BLE001 - the schema may not be there yet
        return None
    if not rows:
        return None
    done = [size for status, size in rows if status == PartStatus.DONE]
    in_flight = sum(status == PartStatus.IN_FLIGHT for status, _ in rows)
    return sum(done), len(done), in_flight, len(rows)


def _pids(home: Path) -> list[int]:
    pids = []
    for entry in (home / "sessions").iterdir():
        with contextlib.suppress(OSError, ValueError):
            described = json.loads(entry.read_text() or "{}")
            pids += [p for p in (described.get("worker_pid"), described.get("pid")) if p]
    return pids


def _counts(db: Database) -> str:
    counts = _progress(db)
    if counts is None:
        return "no parts yet"
    _, done, in_flight, total = counts
    return (f"{done} of {total} parts done, {in_flight} still marked in flight "
            "(claimed by the dead worker)")


def _summary(db: Database, s3) -> tuple[list[Part], int, int, int, int]:  # type: ignore[no-untyped-def]
    """The parts; how many sends were repeats (claims after a part's first) and their bytes;
    the parts adopted from ListParts; multipart uploads left in the bucket."""
    with db.transaction() as session:
        upload = session.scalars(sa.select(Upload)).one()
        parts = list(session.scalars(sa.select(Part).where(Part.upload_id == upload.id).order_by(Part.part_number)))
        claims = dict(session.execute(
            sa.select(UploadEvent.part_number, sa.func.count())
            .where(UploadEvent.upload_id == upload.id, UploadEvent.to_status == PartStatus.IN_FLIGHT.value)
            .group_by(UploadEvent.part_number)).all())
        adopted = session.scalar(sa.select(sa.func.count()).select_from(UploadEvent).where(
            UploadEvent.upload_id == upload.id, UploadEvent.reason.startswith("found in S3"))) or 0
    sizes = {part.part_number: part.size for part in parts}
    resent = sum(max(count - 1, 0) for count in claims.values())
    resent_bytes = sum(max(count - 1, 0) * sizes[number] for number, count in claims.items())
    leftover = len(s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []))
    return parts, resent, resent_bytes, adopted, leftover


def write_random(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for offset in range(0, size, CHUNK):
            chunk = os.urandom(min(CHUNK, size - offset))
            out.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of_object(s3, bucket: str, key: str) -> str:  # type: ignore[no-untyped-def]
    digest = hashlib.sha256()
    for chunk in s3.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def moto_server(folder: Path) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(folder / "moto.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto's server did not start: {(folder / 'moto.log').read_text()[-2000:]}")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
