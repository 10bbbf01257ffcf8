"""What a worker process holds: settings, its database engine and S3 clients.

Created lazily in each process (after the prefork pool forks) and never
shared across processes: a forked child that finds its parent's runtime
builds its own.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
import threading

from botocore.client import BaseClient

from models.db import Database
from models.settings import Settings
from workers import s3


@dataclasses.dataclass
class Runtime:
    settings: Settings
    db: Database
    pid: int = dataclasses.field(default_factory=os.getpid)
    #: unique per process: host names and pids repeat across containers
    token: str = dataclasses.field(default_factory=lambda: secrets.token_hex(4))
    _clients: dict[str | None, BaseClient] = dataclasses.field(default_factory=dict)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @property
    def worker_id(self) -> str:
        return f"{socket.gethostname()}:{self.pid}:{self.token}"

    def s3(self, endpoint_url: str | None) -> BaseClient:
        """The S3 client for an upload's endpoint (one per endpoint per process)."""
        with self._lock:
            client = self._clients.get(endpoint_url)
            if client is None:
                client = self._clients[endpoint_url] = s3.make_client(endpoint_url, retries=1)
            return client

    def close(self) -> None:
        self.db.dispose()


_current: Runtime | None = None
_current_lock = threading.Lock()


def get() -> Runtime:
    global _current
    with _current_lock:
        if _current is None or _current.pid != os.getpid():
            settings = Settings.from_env()
            _current = Runtime(settings=settings, db=Database(settings.database_url))
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
        _current = None
