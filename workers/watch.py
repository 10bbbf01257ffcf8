"""The recovery pass on a thread of every worker node (orchestrator/failover.py)."""

from __future__ import annotations

import logging
import random
import threading
import time

from models.settings import Settings
from orchestrator import failover
from workers.runtime import Runtime

log = logging.getLogger(__name__)


class Watch:
    """Runs the recovery pass every `recovery_interval` seconds (with jitter, so that a fleet's
    passes spread out), and the reconciler's stall rule every `reconcile_interval`.

    `reconcile`: this node may call S3 (ListParts) for lost dispatches and stalled
    uploads; part workers in presigned mode hold no credentials and only hand
    dead workers' parts on.
    """

    def __init__(self, rt: Runtime, reconcile: bool) -> None:
        self.rt, self.reconcile = rt, reconcile
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="s3ferry-watch", daemon=True)
        self._failing = False

    def start(self) -> Watch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        settings = self.rt.settings
        next_stall_rule = time.monotonic() + settings.reconcile_interval
        while not self._stop.wait(settings.recovery_interval * random.uniform(0.75, 1.25)):
            stall_rule = self.reconcile and time.monotonic() >= next_stall_rule
            if stall_rule:
                next_stall_rule = time.monotonic() + settings.reconcile_interval
            self.run_once(stall_rule)

    def run_once(self, stall_rule: bool = False) -> failover.Pass | None:
        settings = self.rt.settings
        try:
            judge = self.rt.alive().healthy_for() >= settings.liveness_seconds
            done = failover.run(settings, self.rt.db, self.rt.worker_id, judge=judge, reconcile=self.reconcile,
                                stall_rule=stall_rule, redis=self.rt.redis, held_messages=held_on_redis(settings))
        except Exception as error:  # noqa: BLE001 - the next pass tries again; never let the thread die
            if not self._failing:
                log.warning("recovery pass failed (%s); trying again every %.1fs", error, settings.recovery_interval)
            self._failing = True
            return None
        if self._failing:
            log.warning("recovery pass works again")
            self._failing = False
        if done:
            log.info("recovery pass: %s", done)
        return done


def held_on_redis(settings: Settings) -> bool:
    """Whether nodes note the part messages they hold (workers/held.py): on a Redis broker only
    (RabbitMQ returns a dead consumer's messages at once)."""
    return settings.broker_url.startswith(("redis://", "rediss://", "redis+socket://"))
