"""A worker process's heartbeat: its liveness record, stamped on a thread of its own.

Started before the process claims its first part (or runs the recovery pass),
so every claim names a holder the fleet can see. A process that dies stops
beating, and `liveness_seconds` later any other process may hand its parts on
(models/liveness.py, orchestrator/failover.py).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref

from models import liveness
from models.db import Database

log = logging.getLogger(__name__)

#: This process's running heartbeats (stop_all).
_running: weakref.WeakSet[Heartbeat] = weakref.WeakSet()


class Heartbeat:
    """Stamps `worker`'s liveness record every `interval` seconds, valid for `ttl` seconds."""

    def __init__(self, db: Database, worker: str, interval: float, ttl: float) -> None:
        self.db, self.worker, self.interval, self.ttl = db, worker, interval, ttl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="s3ferry-heartbeat", daemon=True)
        #: monotonic time since which every beat succeeded in time (None after a failed or slow one)
        self._healthy_since: float | None = None
        #: monotonic time the last successful beat started
        self._last_ok: float | None = None
        self._failing = False

    def start(self) -> Heartbeat:
        """The first beat now (a database error propagates: nothing may be claimed without it)."""
        self._beat()
        self._thread.start()
        _running.add(self)
        return self

    def healthy_for(self) -> float:
        """Seconds of unbroken, timely beats, up to now: a process that could not beat for a while
        (a database outage, or one that stalled its writes) judges no other process dead until
        the live ones had time to beat again. 0 if the last beat is late."""
        since, last = self._healthy_since, self._last_ok
        now = time.monotonic()
        if since is None or last is None or now - last > 1.5 * self.interval:
            return 0.0
        return now - since

    def fresh(self) -> bool:
        """Whether this process's own record is surely alive (its last beat is recent): a process
        that cannot tell claims nothing, as others may already judge it dead."""
        last = self._last_ok
        return last is not None and time.monotonic() - last < self.ttl / 2

    def stop(self, retire: bool = True) -> None:
        """Stop beating; with `retire`, mark the process dead now (a graceful exit)."""
        _running.discard(self)
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if retire and not self._thread.is_alive():  # a beat still under way would undo it
            try:
                with self.db.transaction() as session:
                    liveness.retire(session, self.worker)
            except Exception as error:  # noqa: BLE001 - the record expires by itself
                log.warning("could not retire the liveness record of %s: %s", self.worker, error)

    def _run(self) -> None:
        due = time.monotonic() + self.interval
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            due += self.interval  # a fixed rate: a slow beat does not push the next one back
            try:
                self._beat()
            except Exception as error:  # noqa: BLE001 - never let the heartbeat thread die
                self._healthy_since = None
                if not self._failing:
                    log.warning("heartbeat failed (%s); retrying every %.1fs", error, self.interval)
                self._failing = True
            due = max(due, time.monotonic())

    def _beat(self) -> None:
        started = time.monotonic()
        with self.db.transaction() as session:
            liveness.beat(session, self.worker, self.ttl)
        self._last_ok = started
        if time.monotonic() - started > self.interval:  # the database stalled: others' beats may have too
            self._healthy_since = None
            return
        if self._healthy_since is None:
            self._healthy_since = started
        if self._failing:
            log.warning("heartbeat works again")
            self._failing = False


def stop_all(retire: bool = True) -> None:
    """Stop every heartbeat this process runs (e.g. before its database goes away)."""
    for beat in list(_running):
        beat.stop(retire)
