"""Keeping a claim alive while a part is sent: a heartbeat that renews its lease."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from types import TracebackType

from models import transitions
from models.exceptions import DatabaseError
from workers.runtime import Runtime

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews the caller's lease on a part every lease/3 seconds until the block ends.

    A renewal that finds the claim gone (it expired and another worker took the
    part) sets `lost`; the caller then does not record the part. A database
    outage only delays renewals: the lease is long enough to ride out short ones.
    """

    def __init__(self, rt: Runtime, upload_id: uuid.UUID, number: int,
                 also: Callable[[], object] | None = None) -> None:
        self.rt, self.upload_id, self.number, self.also = rt, upload_id, number, also
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{number}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        seconds = self.rt.settings.lease_seconds
        period = min(seconds, self.rt.settings.window_lease_seconds if self.also else seconds) / 3
        while not self._stop.wait(period):
            if self.also is not None:
                try:
                    self.also()  # the window slot's lease
                except Exception as error:  # noqa: BLE001 - Redis blips; the slot lease is only a bound
                    log.warning("could not renew the window slot (%s)", error,
                                extra={"upload_id": str(self.upload_id), "part": self.number})
            try:
                with self.rt.db.transaction() as session:
                    held = transitions.renew_lease(session, self.upload_id, self.number, self.rt.worker_id, seconds)
            except DatabaseError as error:
                log.warning("could not renew the lease (%s); will try again", error,
                            extra={"upload_id": str(self.upload_id), "part": self.number})
                continue
            if not held:
                self.lost = True
                log.warning("lost the claim on the part while sending it",
                            extra={"upload_id": str(self.upload_id), "part": self.number})
                return
