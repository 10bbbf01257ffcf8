"""What a worker process holds: settings, its database engine and S3 clients.

Created lazily in each process (after the prefork pool forks) and never
shared across processes: a forked child that finds its parent's runtime
builds its own.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import socket
import threading

from botocore.client import BaseClient
from celery import signals
from redis import Redis

from models.db import Database
from models.settings import Settings
from workers import s3, share, window
from workers.heartbeat import Heartbeat

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Runtime:
    settings: Settings
    db: Database
    pid: int = dataclasses.field(default_factory=os.getpid)
    _clients: dict[str | None, BaseClient] = dataclasses.field(default_factory=dict)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    _windows: dict[tuple[str | None, str], share.Share] = dataclasses.field(default_factory=dict)
    _redis: Redis | None = None
    _heartbeat: Heartbeat | None = None

    @property
    def worker_id(self) -> str:
        """`host:node:pid`: the node token tells apart containers whose host names and pids repeat."""
        return f"{node_prefix()}{self.pid}"

    def alive(self) -> Heartbeat:
        """This process's heartbeat, started (with a first beat) on first use: before the
        process claims a part, completes an upload or judges other processes dead."""
        with self._lock:
            if self._heartbeat is None:
                s = self.settings
                self._heartbeat = Heartbeat(self.db, self.worker_id, s.heartbeat_seconds, s.liveness_seconds).start()
            return self._heartbeat

    def s3(self, endpoint_url: str | None) -> BaseClient:
        """The S3 client for an upload's endpoint (one per endpoint per process)."""
        with self._lock:
            client = self._clients.get(endpoint_url)
            if client is None:
                client = self._clients[endpoint_url] = s3.make_client(endpoint_url, retries=1)
            return client

    @property
    def redis(self) -> Redis | None:
        """The Redis that holds the AIMD windows (and the signing queue): the result backend's,
        else the broker's; None when neither is Redis."""
        with self._lock:
            if self._redis is None:
                url = window.redis_url(self.settings.result_backend, self.settings.broker_url)
                self._redis = window.client_from_url(url) if url else None
            return self._redis

    def window(self, endpoint_url: str | None, bucket: str) -> share.Share | None:
        """This process's share of a destination's AIMD window (None without Redis: no shared window)."""
        client = self.redis
        if client is None:
            return None
        with self._lock:
            found = self._windows.get((endpoint_url, bucket))
            if found is None:
                s = self.settings
                limits = window.Limits(s.window_initial, s.window_min, s.window_max, s.window_target_seconds,
                                       s.window_lease_seconds)
                shared = window.Window(client, endpoint_url, bucket, limits)
                found = self._windows[(endpoint_url, bucket)] = share.Share(shared, self.worker_id)
            return found

    def close(self) -> None:
        for found in self._windows.values():
            try:
                found.close()  # parked slots back to the window now, not when their leases run out
            except Exception as error:  # noqa: BLE001 - their leases free them
                log.warning("could not give window slots back: %s", error)
        if self._heartbeat is not None:
            self._heartbeat.stop(retire=True)
        self.db.dispose()
        if self._redis is not None:
            self._redis.close()


#: Made once per worker node, before the pool forks, so every pool process shares it:
#: the node can release all of its processes' claims at shutdown (node_prefix()). In
#: single-machine mode the command that starts the worker chooses it (S3FERRY_NODE_TOKEN),
#: so that a later command can release the claims of a worker that died with it.
NODE_TOKEN = os.environ.get("S3FERRY_NODE_TOKEN") or secrets.token_hex(4)


def node_prefix() -> str:
    """The start of every worker id of this node's processes."""
    return f"{socket.gethostname()}:{NODE_TOKEN}:"


_current: Runtime | None = None
_current_lock = threading.Lock()

#: How many tasks one process of this worker node runs at once, noted as the node starts (and
#: inherited by its forked pool processes); None outside a worker.
_tasks_at_once: int | None = None


@signals.worker_init.connect
def _note_concurrency(sender: object = None, **_: object) -> None:
    global _tasks_at_once
    _tasks_at_once = tasks_at_once(getattr(sender, "pool_cls", None), getattr(sender, "concurrency", None))


def tasks_at_once(pool: object, concurrency: object) -> int:
    """How many tasks one process runs at once: a thread (or greenlet) pool's concurrency
    (`--concurrency`); one in each process of a prefork pool, and in the solo pool."""
    name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    threaded = any(kind in str(name) for kind in ("thread", "gevent", "eventlet"))
    return concurrency if threaded and isinstance(concurrency, int) and concurrency > 0 else 1


def database_threads() -> int | None:
    """How many threads of this process use the database at once: its tasks, its heartbeat
    and its recovery pass (None outside a worker: the database's default)."""
    return None if _tasks_at_once is None else _tasks_at_once + 2


def get() -> Runtime:
    global _current
    with _current_lock:
        if _current is not None and _current.pid != os.getpid():  # inherited by a fork
            _current.db.engine.dispose(close=False)
            _current = None
        if _current is None:
            settings = Settings.from_env()
            _current = Runtime(settings=settings, db=Database(settings.database_url, threads=database_threads()))
        return _current


def current() -> Runtime | None:
    """This process's runtime if it made one, else None (never creates one)."""
    with _current_lock:
        return _current if _current is not None and _current.pid == os.getpid() else None


def reset() -> None:
    """Drop this process's runtime (after a fork, or at shutdown)."""
    global _current
    with _current_lock:
        if _current is not None and _current.pid == os.getpid():
            _current.close()
        elif _current is not None:  # the parent's, inherited by a fork: leave its connections to it
            _current.db.engine.dispose(close=False)
        _current = None
