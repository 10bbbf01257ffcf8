"""The `s3ferry` command.

Each command imports what it uses when it runs: `s3ferry --help` and a mistyped flag need
neither SQLAlchemy nor boto3 nor Celery.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

from typing import TYPE_CHECKING, Any, NoReturn

from models.exceptions import S3FerryError, UserError
from models.settings import Settings, format_size, parse_size
from models.states import UploadStatus
from workers import logs

if TYPE_CHECKING:
    from models.db import Database
    from orchestrator import local

log = logging.getLogger("s3ferry")

EXIT_FAILED = 1  # the upload (or command) failed
EXIT_USAGE = 2  # bad input: nothing was changed

#: commands whose output a reader may stop reading (`| head`) once it has what it wants
LISTINGS = ("ls", "status", "watch", "db")

WATCHED = (UploadStatus.QUEUED, UploadStatus.IN_PROGRESS, UploadStatus.COMPLETING, UploadStatus.PAUSED)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR if args.quiet else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if args.verbose
                        else "s3ferry: %(message)s")
    if not args.verbose and args.command != "worker":  # these commands print the reconciler's reports
        logging.getLogger("orchestrator.reconciler").setLevel(logging.ERROR)
    logs.add_context(logging.getLogger())
    try:
        settings = Settings.from_env()
        if settings.local and args.command not in ("worker", "beat", "demo"):
            from orchestrator import local

            local.interrupt_on_termination()
            if args.command != "upload":
                # single-machine mode: the state file at the newest schema (commands that use the
                # broker or run workers join the data folder themselves: local.attach)
                local.prepared(settings)
        return int(args.run(args, settings) or 0)
    except UserError as error:
        print(f"s3ferry: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (S3FerryError, ValueError) as error:
        print(f"s3ferry: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `s3ferry ls | head`: done; an upload's watcher gone: not done
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0 if args.command in LISTINGS else EXIT_FAILED


class _Parser(argparse.ArgumentParser):
    """argparse with errors on one line (the usage block is for --help)."""

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (`{self.prog} --help` shows the usage)\n")


class _Version(argparse.Action):
    """--version, the installed distribution's version (looked up only when asked)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:  # noqa: A002
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> NoReturn:
        print(f"s3ferry {version()}")
        parser.exit()


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("s3ferry")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def _common(default: object) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name (`s3ferry -v ls`, `s3ferry ls -v`).
    The commands' own take SUPPRESS as their default, so that they keep the top-level's value
    (parents share their actions: each gets a parser of its own)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=default, help="log what happens (INFO)")
    common.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="print errors and the results asked for only: no progress, no notes")
    return common


def _parser() -> argparse.ArgumentParser:
    common = _common(argparse.SUPPRESS)
    parser = _Parser(prog="s3ferry", parents=[_common(False)], description=(
        "Resumable, distributed uploads of very large files to S3-compatible storage."), epilog=(
        "exit status: 0 done; 1 the upload (or the command) failed; 2 bad input or settings, "
        "nothing changed; 130 interrupted"))
    parser.set_defaults(json=False)
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_parser = commands.add_parser

    def add_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return _add_parser(name, parents=[common], **kwargs)
    commands.add_parser = add_parser  # type: ignore[method-assign]

    upload = commands.add_parser("upload", help="upload a file to s3://bucket/key")
    upload.add_argument("source", help="path of the file to upload")
    upload.add_argument("destination", help="s3://bucket/key; s3://bucket or a key ending in / gets the "
                        "file's name")
    upload.add_argument("--part-size", type=_size, default=None,
                        help="part size, 5MiB..5GiB (default: S3FERRY_PART_SIZE or 32MiB)")
    upload.add_argument("--max-retries", type=_whole(0, 1000), default=None,
                        help="retries per part before the upload fails, 0..1000 (default: S3FERRY_MAX_RETRIES or 8)")
    upload.add_argument("--priority", type=PRIORITY, default=0, help="higher runs first (default 0)")
    upload.add_argument("--no-wait", action="store_true",
                        help="print the upload id and return at once (needs a worker fleet)")
    upload.add_argument("--concurrency", "-c", type=_whole(1, MAX_CONCURRENCY), default=4,
                        help="single-machine mode: parts sent at once by this command's worker (default 4)")
    upload.add_argument("--json", action="store_true", help="no progress; the final record (or, with "
                        "--no-wait, the upload id) as one JSON object on stdout")
    upload.set_defaults(run=_upload)

    status = commands.add_parser("status", help="show an upload's progress")
    status.add_argument("upload_id", type=_upload_id)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(run=_status)

    resume = commands.add_parser("resume", help="resume a paused upload, or get a stalled one moving; and watch it")
    resume.add_argument("upload_id", type=_upload_id)
    resume.add_argument("--no-wait", action="store_true", help="return at once (needs a worker fleet)")
    resume.add_argument("--concurrency", "-c", type=_whole(1, MAX_CONCURRENCY), default=4,
                        help="single-machine mode: parts sent at once by this command's worker (default 4)")
    resume.add_argument("--json", action="store_true", help="no progress; the final record as JSON on stdout")
    resume.set_defaults(run=_resume)

    for name, text in (("pause", "no new part starts; parts in flight finish"),
                       ("cancel", "stop an upload and abort its multipart upload in S3"),
                       ("retry", "run a failed upload again, from its done parts, retry counters reset "
                                 "(single-machine mode: and watch it, as resume does)")):
        command = commands.add_parser(name, help=text)
        command.add_argument("upload_id", type=_upload_id)
        if name == "retry":
            command.add_argument("--concurrency", "-c", type=_whole(1, MAX_CONCURRENCY), default=4,
                                 help="single-machine mode: parts sent at once by this command's worker (default 4)")
            command.add_argument("--json", action="store_true", help="the upload's record as JSON on stdout (on one "
                                 "machine: no progress, the final record), with what was done as `message`")
        command.set_defaults(run=_operation(name))

    priority = commands.add_parser("priority", help="set an upload's priority (higher runs first)")
    priority.add_argument("upload_id", type=_upload_id)
    priority.add_argument("priority", type=PRIORITY)
    priority.set_defaults(run=_priority)

    ls = commands.add_parser("ls", help="list uploads, newest first")
    ls.add_argument("--status", help="only uploads in this status")
    ls.add_argument("--limit", type=_whole(1, 1_000_000), default=50, help="at most this many (default 50)")
    ls.add_argument("--json", action="store_true", help="a JSON array of the uploads")
    ls.set_defaults(run=_ls)

    watch = commands.add_parser("watch", help="live progress of uploads (default: all active and queued)")
    watch.add_argument("upload_ids", type=_upload_id, nargs="*", metavar="UPLOAD_ID")
    watch.add_argument("--json", action="store_true", help="JSON lines on stdout: each look, one object per upload")
    watch.set_defaults(run=_watch)

    reconcile = commands.add_parser("reconcile", help="re-dispatch stalled uploads (all, or one by id)")
    reconcile.add_argument("upload_id", type=_upload_id, nargs="?")
    reconcile.add_argument("--force", action="store_true",
                           help="with an id: dispatch its missing parts even if it does not look stalled")
    reconcile.set_defaults(run=_reconcile)

    sweep = commands.add_parser("sweep", help="abort multipart uploads that nobody will complete")
    sweep.add_argument("--dry-run", action="store_true", help="list what would be aborted")
    sweep.add_argument("--older-than", type=_duration, default=None,
                       help="age past which failed (and unknown) uploads are aborted (default 24h)")
    sweep.add_argument("--unknown-in", metavar="s3://BUCKET/PREFIX",
                       help="also abort multipart uploads under this prefix that s3ferry is not running")
    sweep.set_defaults(run=_sweep)

    beat = commands.add_parser("beat", help="run the periodic reconciler and sweeper (Celery beat)")
    beat.add_argument("--loglevel", "-l", default="INFO")
    beat.add_argument("--schedule", help="beat's state file (default in the temp folder)")
    beat.set_defaults(run=_beat)

    worker = commands.add_parser("worker", help="run a Celery worker that uploads parts")
    worker.add_argument("--concurrency", "-c", type=_whole(1, MAX_CONCURRENCY), default=4,
                        help="parts sent in parallel (default 4)")
    worker.add_argument("--loglevel", "-l", default="INFO")
    worker.add_argument("--hostname", "-n", default=None, help="Celery node name (default s3ferry-TOKEN@HOST, "
                        "TOKEN random per process: several workers can share a host)")
    worker.add_argument("--pool", "-P", choices=("prefork", "threads", "solo"), default="prefork",
                        help="Celery pool: processes (default) or threads")
    worker.add_argument("--task-events", "-E", action="store_true", default=None,
                        help="send task events from the start, for Flower or `celery events` (default: "
                        "S3FERRY_TASK_EVENTS, else off; Flower turns them on while it runs)")
    worker.set_defaults(run=_worker)

    signer = commands.add_parser("signer", help="presigned mode: sign part URLs for workers without S3 "
                                 "credentials, and run the control queue (completion, reconciler, sweeper)")
    signer.add_argument("--threads", type=_whole(1, MAX_CONCURRENCY), default=4, help="signing threads (default 4)")
    signer.add_argument("--concurrency", "-c", type=_whole(1, MAX_CONCURRENCY), default=4,
                        help="control tasks run in parallel (default 4)")
    signer.add_argument("--loglevel", "-l", default="INFO")
    signer.set_defaults(run=_signer)

    flower = commands.add_parser("flower", help="Flower, the Celery dashboard, behind basic auth "
                                 "(S3FERRY_FLOWER_BASIC_AUTH=user:password)")
    flower.add_argument("--port", type=_whole(1, 65535, "port"), default=5555, help="default 5555")
    flower.add_argument("--address", default="127.0.0.1", help="listen address (default 127.0.0.1; 0.0.0.0 in "
                        "containers)")
    flower.set_defaults(run=_flower)

    metrics = commands.add_parser("metrics", help="Prometheus metrics of the whole fleet, read from the database")
    metrics.add_argument("--port", type=_whole(1, 65535, "port"), default=9808, help="default 9808")
    metrics.add_argument("--address", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    metrics.set_defaults(run=_metrics)

    demo = commands.add_parser("demo", help=(
        "upload a random file to a local S3 server, kill the workers part-way, resume, check the SHA-256"))
    demo.add_argument("--size", type=_demo_size, default=parse_size("1GiB"),
                      help="size of the file, 1B..5TiB (default 1GiB)")
    demo.add_argument("--kill-at", type=_fraction, default=0.4, help="fraction done when the workers are killed "
                      "(default 0.4)")
    demo.add_argument("--keep", action="store_true", help="keep the demo's folder (file, state, logs)")
    demo.set_defaults(run=_demo)

    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_commands.add_parser("upgrade", parents=[common], help="create or migrate the schema to the newest version"
                           ).set_defaults(run=_db_upgrade)
    db_commands.add_parser("current", parents=[common], help="print the schema version").set_defaults(run=_db_current)
    check = db_commands.add_parser("check", parents=[common], help="exit 0 if the schema is at this version's head, else 3 "
                                   "(for init containers: start only once migrated)")
    check.add_argument("--wait", type=_seconds(0, 86400), default=0.0, metavar="SECONDS",
                       help="keep checking (every 2 s) for up to this long, 0..86400")
    check.set_defaults(run=_db_check)
    return parser


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _demo_size(text: str) -> int:
    from orchestrator import plan

    size = _size(text)
    if not 1 <= size <= plan.MAX_OBJECT_SIZE:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: from 1B to 5TiB (S3's largest object)")
    return size


def _whole(low: int, high: int, what: str = "number"):  # type: ignore[no-untyped-def]
    """An argparse type: a whole number from `low` to `high`."""
    def parse(text: str) -> int:
        value = int(text) if re.fullmatch(r"\s*[+-]?[0-9]{1,20}\s*", text) else None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r}: a whole number from {low} to {high}")
        return value
    return parse


def _seconds(low: float, high: float):  # type: ignore[no-untyped-def]
    """An argparse type: a finite number of seconds from `low` to `high`."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not low <= value <= high:  # nan and inf too
            raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}: from {low:g} to {high:g}")
        return value
    return parse


#: Parts (or threads) one process runs at once.
MAX_CONCURRENCY = 1000
PRIORITY = _whole(-1_000_000, 1_000_000, "priority")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"invalid fraction {text!r}: a number between 0 and 1, like 0.4")
    return value


def _upload_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid upload id (a UUID)") from None


def _upload(args: argparse.Namespace, settings: Settings) -> int:
    from orchestrator import local, plan, submit

    if args.part_size is not None:  # 0 too: before anything starts, in S3's words
        plan.check_part_size(args.part_size)
    if settings.local:
        _refuse_no_wait(args)
        submit.validate(settings, args.source, args.destination, args.part_size)  # before starting anything
    with local.attach(settings, workers=args.concurrency) as home:
        return _upload_with(args, settings, home)


def _refuse_no_wait(args: argparse.Namespace) -> None:
    if args.no_wait:
        raise UserError("--no-wait needs a worker fleet: in single-machine mode the command runs the workers "
                        "until the upload is done (set S3FERRY_DATABASE_URL and S3FERRY_BROKER_URL for a fleet)")


def _upload_with(args: argparse.Namespace, settings: Settings, home: local.Home | None) -> int:
    from models.db import Database
    from orchestrator import operations, progress, reconciler, submit

    db = Database(settings.database_url)
    done = submit.submit(settings, db, args.source, args.destination, part_size=args.part_size,
                         max_retries=args.max_retries, priority=args.priority)
    if args.json and args.no_wait:
        print(json.dumps({"id": str(done.upload_id), "resumed": done.resumed}), flush=True)
    elif not args.json:
        print(done.upload_id, flush=True)
    if done.resumed:
        snap = progress.snapshot(db, done.upload_id)
        if snap.status == UploadStatus.PAUSED and home is None:  # a fleet's paused upload: someone paused it
            raise UserError(f"upload {done.upload_id} of this file is paused: "
                            f"`s3ferry resume {done.upload_id}` continues it")
        _note(args, f"resuming upload {done.upload_id} of this file to {done.destination}: "
                    f"{snap.parts_done} of {snap.parts_total} parts already done")
        if snap.status == UploadStatus.PAUSED:  # on one machine, stopped by Ctrl-C (or paused): go on
            _note(args, f"s3ferry: {operations.resume(settings, db, done.upload_id)}")
        else:
            _note(args, f"s3ferry: {reconciler.reconcile(settings, db, done.upload_id)}")
    else:
        if done.plan.adjusted:
            _note(args, f"s3ferry: note: {done.plan.describe_adjustment()}")
        _note(args, f"uploading {format_size(done.size)} to {done.destination} in {len(done.plan.parts)} part(s) "
                    f"of {format_size(done.plan.part_size)}")
        if progress.snapshot(db, done.upload_id).status == UploadStatus.QUEUED:
            _note(args, "queued: it starts when a running upload finishes (`s3ferry ls` shows the queue)")
    if args.no_wait:
        snap = progress.snapshot(db, done.upload_id)
        if snap.status == UploadStatus.FAILED:  # it failed as it started (CreateMultipartUpload refused)
            print(f"s3ferry: upload failed: {snap.last_error}", file=sys.stderr)
            return EXIT_FAILED
        return 0
    return wait(db, done.upload_id, home=home, shown=_shown(args))


def _note(args: argparse.Namespace, text: str) -> None:
    """A note for people, on stderr: none with --quiet or --json."""
    if not (args.quiet or args.json):
        print(text, file=sys.stderr, flush=True)


def _shown(args: argparse.Namespace) -> str:
    """What wait() prints: 'json' (the final record on stdout), 'quiet' (errors only) or 'bar'."""
    return "json" if args.json else "quiet" if args.quiet else "bar"


def _resume(args: argparse.Namespace, settings: Settings) -> int:
    from models.db import Database
    from orchestrator import local, operations, progress, submit

    db = Database(settings.database_url)
    snap = progress.snapshot(db, args.upload_id)
    if snap.status == UploadStatus.COMPLETE:
        if args.json:
            print(json.dumps(snap.as_dict()))
        _note(args, f"upload {args.upload_id} is already complete")
        return 0
    if settings.local:
        _refuse_no_wait(args)
    with local.attach(settings, workers=args.concurrency) as home:
        submit.check_broker(settings)
        _note(args, f"s3ferry: {operations.resume(settings, db, args.upload_id)}")
        if args.no_wait:
            if args.json:
                print(json.dumps(progress.snapshot(db, args.upload_id).as_dict()))
            return 0
        return wait(db, args.upload_id, home=home, shown=_shown(args))


def _operation(name: str):  # type: ignore[no-untyped-def]
    def run(args: argparse.Namespace, settings: Settings) -> int:
        from models.db import Database
        from orchestrator import local, operations, submit

        db = Database(settings.database_url)
        if name == "retry" and settings.local:
            # on one machine nothing runs an upload but a command: this one runs it, as resume does
            with local.attach(settings, workers=args.concurrency) as home:
                submit.check_broker(settings)
                _note(args, f"s3ferry: {operations.retry(settings, db, args.upload_id)}")
                return wait(db, args.upload_id, home=home, shown=_shown(args),
                            again=f"`s3ferry resume {args.upload_id}` continues it")
        with local.attach(settings):
            submit.check_broker(settings)  # each may start the next queued upload
            said = getattr(operations, name)(settings, db, args.upload_id)
        if getattr(args, "json", False):
            from orchestrator import progress

            print(json.dumps({**progress.snapshot(db, args.upload_id).as_dict(), "message": said}))
        elif not args.quiet:
            print(said)
        return 0
    return run


def _priority(args: argparse.Namespace, settings: Settings) -> int:
    from models.db import Database
    from orchestrator import operations

    said = operations.set_priority(Database(settings.database_url), args.upload_id, args.priority)
    if not args.quiet:
        print(said)
    return 0


def _ls(args: argparse.Namespace, settings: Settings) -> int:
    from models.db import Database
    from orchestrator import operations

    uploads = operations.list_uploads(Database(settings.database_url), args.status, args.limit)
    if args.json:
        print(json.dumps([operations.describe(upload) for upload in uploads], indent=2))
        return 0
    print(f"{'ID':36}  {'STATUS':11}  {'PRI':>3}  {'SIZE':>10}  {'CREATED':19}  DESTINATION")
    for upload in uploads:
        print(f"{str(upload.id):36}  {upload.status:11}  {upload.priority:>3}  "
              f"{format_size(upload.source_size):>10}  {upload.created_at:%Y-%m-%d %H:%M:%S}  "
              f"s3://{upload.bucket}/{upload.key}")
    return 0


def _watch(args: argparse.Namespace, settings: Settings) -> int:
    """Progress bars on stderr (a terminal: redrawn in place every second; else a line each 10 s),
    or with --json a JSON line per upload per look on stdout; exit 0 once all complete, else 1."""
    from models.db import Database
    from orchestrator import operations, progress

    db = Database(settings.database_url)
    out = sys.stdout if args.json else sys.stderr
    tty = out.isatty() and not args.json
    shown = 0
    seen: dict[uuid.UUID, None] = dict.fromkeys(args.upload_ids)
    try:
        while True:
            if not args.upload_ids:  # every upload seen active stays on screen until the end
                seen.update(dict.fromkeys(u.id for u in operations.list_uploads(db, None, 1000)
                                          if u.status in WATCHED))
            snaps = [progress.snapshot(db, upload_id) for upload_id in seen]
            if args.json:
                for snap in snaps:
                    print(json.dumps(snap.as_dict()), flush=True)
            elif not args.quiet:
                lines = [f"{s.id[:8]} {s.status:11} {progress.render(s, width=20)}  {s.destination}" for s in snaps]
                if tty and shown:
                    print(f"\x1b[{shown}F", end="", file=out)
                print("\n".join(line + ("\x1b[K" if tty else "") for line in lines) or "no active or queued upload",
                      file=out, flush=True)
                shown = max(len(lines), 1)
            if all(s.finished for s in snaps):
                return 0 if all(s.status == UploadStatus.COMPLETE for s in snaps) else EXIT_FAILED
            time.sleep(1.0 if tty else 10.0)
    except KeyboardInterrupt:
        return 130


def _reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from models.db import Database
    from orchestrator import local, reconciler, submit

    db = Database(settings.database_url)
    with local.attach(settings):
        submit.check_broker(settings)
        if args.upload_id:
            reports = [reconciler.reconcile(settings, db, args.upload_id, force=args.force)]
        else:
            reports = reconciler.reconcile_stalled(settings, db)
    for report in reports:
        print(report)
    if not reports:
        print("no stalled upload")
    return 0


def _sweep(args: argparse.Namespace, settings: Settings) -> int:
    from models.db import Database
    from orchestrator import sweeper

    older_than = args.older_than if args.older_than is not None else dt.timedelta(
        seconds=settings.sweep_after_seconds)
    swept = sweeper.sweep(settings, Database(settings.database_url), older_than, dry_run=args.dry_run,
                          unknown_in=args.unknown_in)
    for item in swept:
        print(item)
    print(f"{len(swept)} multipart upload(s) {'to abort' if args.dry_run else 'swept'}")
    return 0


def _beat(args: argparse.Namespace, settings: Settings) -> int:
    _refuse_local(settings, "beat")
    from workers.app import app

    schedule = args.schedule or str(Path(tempfile.gettempdir()) / "s3ferry-beat-schedule")
    app.start(["beat", f"--loglevel={args.loglevel}", f"--schedule={schedule}"])
    return 0


#: The longest `--older-than`: S3FERRY_SWEEP_AFTER_SECONDS's own limit.
MAX_AGE = dt.timedelta(days=10 * 365)


def _duration(text: str) -> dt.timedelta:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = text[:-1], text[-1:].lower()
    if unit.isdigit():
        number, unit = text, "s"
    try:
        seconds = float(number) * units[unit]
    except (ValueError, KeyError):
        seconds = -1.0
    if not 0 <= seconds <= MAX_AGE.total_seconds():  # nan, inf and 1e400 too
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: expected like 90s, 30m, 24h or 7d, "
                                         "at most 3650d")
    return dt.timedelta(seconds=seconds)


def _progress_redis(home: local.Home | None):  # type: ignore[no-untyped-def]
    """Single-machine mode's Redis, where the worker that finishes an upload says so."""
    if home is None:
        return None
    from workers import window

    url = window.redis_url(home.settings.result_backend, home.settings.broker_url)
    return window.client_from_url(url, timeout=10.0) if url else None


def _refuse_local(settings: Settings, command: str) -> None:
    if settings.local:
        raise UserError(f"`s3ferry {command}` is for a worker fleet: set S3FERRY_DATABASE_URL and "
                        "S3FERRY_BROKER_URL (in single-machine mode `s3ferry upload` runs its own workers)")


#: How often a waiting command looks at the upload when nothing told it that it moved: the
#: progress bar's pace, and single-machine mode's tending of its worker.
LOOK_SECONDS = 1.0
#: News (a NOTIFY, the finishing worker's push) is looked at at once, but at most this often:
#: a burst of it need not redraw the bar for each.
REDRAW_SECONDS = 0.25


def wait(db: Database, upload_id: uuid.UUID, interval: float = LOOK_SECONDS, home: local.Home | None = None,
         shown: str = "bar", again: str = "Run the same command again to resume it from the parts already uploaded") -> int:
    """Show a progress bar (on stderr) until the upload completes (0) or fails (1); in
    single-machine mode, tend the command's worker meanwhile. Woken by news of the upload
    (PostgreSQL NOTIFY; on SQLite, the push of the worker that finished it), else every `interval`
    seconds. `shown`: "bar", "quiet" (errors only) or "json" (the final record on stdout); `again`:
    how to go on, said when Ctrl-C stops a single-machine command."""
    from orchestrator import operations, progress

    bar = shown == "bar"
    tty = bar and sys.stderr.isatty()
    last_line = woken = 0.0
    waiter = progress.Waiter(db, upload_id, redis=_progress_redis(home))
    try:
        while True:
            if home is not None:
                home.tend()
            looked = time.monotonic()
            snap = progress.snapshot(db, upload_id)
            if tty:
                print("\r" + progress.render(snap) + "\x1b[K", end="", file=sys.stderr, flush=True)
            elif bar and (looked - last_line >= 10 or snap.finished):
                print(progress.render(snap), file=sys.stderr, flush=True)
                last_line = looked
            if snap.finished:
                break
            if waiter.wait(interval):
                since = time.monotonic() - woken
                if since < REDRAW_SECONDS:
                    time.sleep(REDRAW_SECONDS - since)
                woken = time.monotonic()
    except KeyboardInterrupt:
        if home is not None:
            # Paused, so that no other command's worker goes on with it and it does not hold
            # the queue; the same command resumes it.
            with contextlib.suppress(S3FerryError):
                operations.pause(home.settings, db, upload_id)
            home.stop_worker(graceful=False)
            print(f"\ns3ferry: stopped; upload {upload_id} is paused. {again}.", file=sys.stderr)
        else:
            print(f"\ns3ferry: stopped watching; the upload goes on. `s3ferry status {upload_id}` shows it.",
                  file=sys.stderr)
        return 130
    finally:
        waiter.close()
    if tty:
        print(file=sys.stderr)
    if shown == "json":
        print(json.dumps(snap.as_dict()), flush=True)
    if snap.status == UploadStatus.COMPLETE:
        if bar:
            print(f"complete: {snap.destination} ETag {snap.etag}; {progress.summary(snap)}", file=sys.stderr)
        return 0
    print(f"s3ferry: upload {snap.status}: {snap.last_error or 'by request'}", file=sys.stderr)
    return EXIT_FAILED


def _status(args: argparse.Namespace, settings: Settings) -> int:
    from models.db import Database
    from orchestrator import progress

    snap = progress.snapshot(Database(settings.database_url), args.upload_id,
                             window_of=lambda endpoint, bucket: _window_state(settings, endpoint, bucket))
    if args.json:
        print(json.dumps(snap.as_dict(), indent=2))
        return 0
    shown = progress.describe(snap)
    width = max(len(k) for k in shown)
    for key, value in shown.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _window_state(settings: Settings, endpoint: str | None, bucket: str) -> str | None:
    """'4 (2 in flight; halved 12s ago: SlowDown: ...)' for the destination, or None if unknown."""
    from workers import window

    url = window.redis_url(settings.result_backend, settings.broker_url)
    client = window.client_from_url(url, timeout=2.0) if url else None
    if client is None:
        return None
    try:
        state = window.Window(client, endpoint, bucket, window.Limits()).state()
    except Exception as error:  # noqa: BLE001 - status works without Redis
        # on one machine, no command running means no private Redis, and no window to show
        return None if settings.local else f"unknown (Redis: {error})"
    finally:
        client.close()
    if state is None:
        return None
    since = f"; {state.reason}, {max(0, int(time.time() - state.changed_at))}s ago" if state.changed_at else ""
    return f"{state.window} ({state.in_flight} in flight{since})"


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    _refuse_local(settings, "worker")
    parent = os.environ.pop("S3FERRY_PARENT_PID", None)
    if parent:  # started by a single-machine command: goes when it goes
        from orchestrator import local

        local.die_with_parent(int(parent))
    # SIGTERM (docker stop, Kubernetes) -> Celery's soft shutdown: parts in flight get
    # worker_soft_shutdown_timeout to finish. Read by billiard when the worker starts.
    os.environ.setdefault("REMAP_SIGTERM", "SIGQUIT")
    from workers.app import app

    after = os.environ.pop("S3FERRY_START_AFTER", None)
    if parent and after:  # started while its command sets up: imported, it waits for the go
        from orchestrator import local

        local.wait_for_file(after, local.START_WAIT_SECONDS)

    if settings.presigned:
        from workers import window

        if not settings.signer_key:
            raise UserError("S3FERRY_PRESIGNED=1: set S3FERRY_SIGNER_KEY (at least 32 characters, the same as "
                            "`s3ferry signer`'s): workers use only the URLs whose replies it authenticates")
        if window.redis_url(settings.result_backend, settings.broker_url) is None:
            raise UserError("S3FERRY_PRESIGNED=1: workers ask the signer through Redis, so S3FERRY_RESULT_BACKEND "
                            "or S3FERRY_BROKER_URL must be a redis:// URL")
    if parent:
        # The command waits for its worker to stop, and a closing Redis channel first waits out its
        # blocking read of the queue (BRPOP, 1 s by default): a short one stops it at once.
        app.conf.broker_transport_options = {**app.conf.broker_transport_options,
                                             "polling_interval": LOCAL_POLL_SECONDS}
    try:
        code: object = run_celery_worker(app, worker_argv(args, settings))
    except SystemExit as stop:
        code = stop.code
    _exit_now(code)


def run_celery_worker(app: Any, argv: list[str]) -> int:
    """What `celery worker ARGV` does, for the command lines built here (`--name=value` and
    flags), without Celery's click command line (a third of a second of imports at every start)."""
    from celery import concurrency
    from celery.utils.log import mlevel
    from celery.utils.nodenames import default_nodename, host_format
    from celery.worker import state

    options: dict[str, Any] = {}
    for arg in argv[1:]:
        name, _, value = arg.removeprefix("--").partition("=")
        options[name.replace("-", "_")] = value if value else True
    worker = app.Worker(
        hostname=host_format(default_nodename(options.pop("hostname", None))),
        pool_cls=concurrency.get_implementation(options.pop("pool")),
        loglevel=mlevel(str(options.pop("loglevel")).upper()),
        concurrency=int(options.pop("concurrency")),
        queues=options.pop("queues").split(","),
        logfile=None, pidfile=None, statedb=None, no_color=None, quiet=False,
        **options)  # without_mingle, without_gossip, task_events
    worker.start()
    if state.should_stop is not None or state.should_terminate is not None:
        return 0  # stopped as asked (SIGINT, SIGTERM, SIGQUIT), which Celery reports as a failure
    return int(worker.exitcode or 0)


def run() -> NoReturn:
    """The `s3ferry` command: main(), then the exit without interpreter teardown (see _exit_now):
    after an upload, the teardown of what it loaded (SQLAlchemy, botocore's models, Celery) took
    0.4 s of the command's wall time and CPU."""
    try:
        code: object = main()
    except SystemExit as stop:  # argparse's usage errors and --help
        code = stop.code
    if any(not thread.daemon for thread in threading.enumerate() if thread is not threading.current_thread()):
        sys.exit(code)  # threads the interpreter must wait for (and stop first: executors): its usual exit
    try:  # what the interpreter's exit would report: output that could not be written
        sys.stdout.flush()
    except BrokenPipeError:  # `s3ferry ls | head`: what was asked for was read
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as error:  # a full disk under `> file`: the output is lost, and says so
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"s3ferry: error: cannot write the output: {error}", file=sys.stderr)
        code = EXIT_FAILED
    _exit_now(code)


def _exit_now(code: object) -> NoReturn:
    """Exit once the worker has stopped: the exit handlers (claims released, liveness retired,
    slots given back) and the logs' flush, then no interpreter teardown. Its last garbage
    collection of everything the worker loaded (botocore's models, SQLAlchemy, Celery) took
    about a second, which a single-machine command waited out before it could exit."""
    import atexit
    import logging

    if isinstance(code, str):  # sys.exit("why"), as the interpreter would print it
        print(code, file=sys.stderr)
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


#: The blocking read of a single-machine command's worker (its idle cost: a BRPOP per this long).
LOCAL_POLL_SECONDS = 0.2


def worker_argv(args: argparse.Namespace, settings: Settings) -> list[str]:
    """`s3ferry worker`'s Celery command line."""
    from workers.broker import control_queue, recovered_queue

    # Parts, and the parts the recovery pass handed on from a dead worker (served ahead of the
    # parts still waiting). In presigned mode a worker holds no credentials: the control queue
    # (completion, reconciler, sweeper, scheduler) is `s3ferry signer`'s.
    queues = f"{settings.queue},{recovered_queue(settings.queue)}"
    if not settings.presigned:
        queues += f",{control_queue(settings.queue)}"
    events = args.task_events if args.task_events is not None else settings.task_events
    return ["worker", f"--concurrency={args.concurrency}", f"--loglevel={args.loglevel}", f"--pool={args.pool}",
            f"--queues={queues}", f"--hostname={args.hostname or node_name('s3ferry')}", *QUIET_START,
            *(["--task-events"] if events else [])]


#: No mingle (a second spent at start asking other workers for revoked task ids: s3ferry revokes
#: nothing, Postgres says what to skip) and no gossip (every worker subscribed to every other
#: worker's events). Heartbeats stay: Flower shows workers by them.
QUIET_START = ("--without-mingle", "--without-gossip")


def node_name(role: str) -> str:
    """A Celery node name unique to this process, `ROLE-TOKEN@HOST` (the token of its worker ids,
    workers/runtime.py): two workers on one host named alike share a pidbox queue, which RabbitMQ
    gives to the first alone (the second dies at start: ResourceLocked)."""
    from workers import runtime

    return f"{role}-{runtime.NODE_TOKEN}@%h"


#: user:password, or several separated by commas (Flower's own format)
FLOWER_AUTH = re.compile(r"[^:,\s]+:[^,\s]+(,[^:,\s]+:[^,\s]+)*")
#: Flower's basic auth goes over the network: shorter passwords, one equal to its user name, and the
#: examples' placeholder (CHANGE-ME, in any case, with or without the dash) are refused
FLOWER_MIN_PASSWORD = 16
FLOWER_PLACEHOLDER = re.compile(r"change-?me", re.IGNORECASE)


def _signer(args: argparse.Namespace, settings: Settings) -> int:
    _refuse_local(settings, "signer")
    if not settings.signer_key:
        raise UserError("s3ferry signer needs S3FERRY_SIGNER_KEY (at least 32 characters, the same as the "
                        "presigned workers'): they use only the URLs whose replies it authenticates")
    from workers import signer, window
    from workers.app import app, control_queue

    url = window.redis_url(settings.result_backend, settings.broker_url)
    if url is None:
        raise UserError("s3ferry signer answers workers through Redis: S3FERRY_RESULT_BACKEND or "
                        "S3FERRY_BROKER_URL must be a redis:// URL")
    from models.db import Database

    service = signer.Signer(settings, window.client_from_url(url), Database(settings.database_url))
    service.start(args.threads)
    os.environ.setdefault("REMAP_SIGTERM", "SIGQUIT")
    run_celery_worker(app, ["worker", f"--concurrency={args.concurrency}", f"--loglevel={args.loglevel}",
                            "--pool=threads", f"--queues={control_queue(settings.queue)}",
                            f"--hostname={node_name('signer')}", *QUIET_START,
                            *(["--task-events"] if settings.task_events else [])])
    service.stop.set()
    return 0


def _flower(args: argparse.Namespace, settings: Settings) -> int:
    _refuse_local(settings, "flower")
    auth = os.environ.get("S3FERRY_FLOWER_BASIC_AUTH", "")
    if not FLOWER_AUTH.fullmatch(auth):
        raise UserError("set S3FERRY_FLOWER_BASIC_AUTH=user:password (several separated by commas): Flower shows "
                        "every worker and task, so s3ferry never runs it without credentials")
    for user, _, password in (pair.partition(":") for pair in auth.split(",")):
        weakness = ("is the example's placeholder CHANGE-ME" if FLOWER_PLACEHOLDER.search(password)
                    else "equals the user name" if password.casefold() == user.casefold()
                    else f"is shorter than {FLOWER_MIN_PASSWORD} characters" if len(password) < FLOWER_MIN_PASSWORD
                    else None)
        if weakness:  # the password itself is never printed
            raise UserError(f"S3FERRY_FLOWER_BASIC_AUTH: the password of user {user!r} {weakness}: generate one, "
                            "e.g. `openssl rand -hex 24`")
    # Handed to Flower through its environment, not its command line, where `ps` would show it.
    os.environ["FLOWER_BASIC_AUTH"] = auth
    from workers.app import app

    app.start(["flower", f"--port={args.port}", f"--address={args.address}"])
    return 0


def _metrics(args: argparse.Namespace, settings: Settings) -> int:
    from models.db import Database
    from orchestrator import metrics

    db = Database(settings.database_url)
    db.check()  # an unreachable database fails here, not at the first scrape
    from workers import window

    url = window.redis_url(settings.result_backend, settings.broker_url)
    print(f"serving metrics on http://{args.address}:{args.port}/metrics", file=sys.stderr, flush=True)
    metrics.serve(db, args.port, args.address, window.client_from_url(url, timeout=5.0) if url else None)
    return 0


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from orchestrator import demo

    return demo.run(size=args.size, kill_at=args.kill_at, keep=args.keep)


def _db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from models import migrate  # Alembic is slow to import: only the db commands need it

    revision = migrate.upgrade(settings.database_url)
    print(f"database at revision {revision} (head {migrate.head()})")
    return 0


def _db_current(args: argparse.Namespace, settings: Settings) -> int:
    from models import migrate

    print(migrate.current(settings.database_url) or "empty (run `s3ferry db upgrade`)")
    return 0


def _db_check(args: argparse.Namespace, settings: Settings) -> int:
    from models import migrate

    deadline = time.monotonic() + args.wait
    while True:
        try:
            revision = migrate.current(settings.database_url)
        except Exception as error:  # noqa: BLE001 - unreachable or missing database: not migrated yet
            first = str(error).splitlines()[0] if str(error) else ""
            revision, problem = None, first if isinstance(error, S3FerryError) else f"{type(error).__name__}: {first}"
        else:
            problem = None
        if revision == migrate.head():
            print(f"database at revision {revision}: up to date")
            return 0
        if time.monotonic() >= deadline:
            print(f"s3ferry: {problem}" if problem else f"s3ferry: the database is at revision {revision or 'none'}, "
                  f"not {migrate.head()}: run `s3ferry db upgrade`", file=sys.stderr)
            return 3
        time.sleep(2)


if __name__ == "__main__":  # pragma: no cover
    run()
