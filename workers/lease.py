"""Keeping a claim alive while a part is sent: a heartbeat that renews its lease."""

from __future__ import annotations

import logging
import threading
import time
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

    def __init__(self, rt: Runtime, upload_id: uuid.UUID, number: int, claim: str,
                 also: Callable[[], object] | None = None) -> None:
        """`claim`: the claim's token (parts.worker) that the caller holds."""
        self.rt, self.upload_id, self.number, self.claim, self.also = rt, upload_id, number, claim, also
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{number}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=60)  # a renewal stuck on a dead connection ends by its socket timeout

    def _run(self) -> None:
        seconds = self.rt.settings.lease_seconds
        # the claim is renewed every third of its lease; the window slot (if any) every third of its own
        slot_every = self.rt.settings.window_lease_seconds / 3 if self.also else None
        claim_every = seconds / 3
        next_claim = time.monotonic() + claim_every
        next_slot = time.monotonic() + slot_every if slot_every else float("inf")
        while not self._stop.wait(max(0.0, min(next_claim, next_slot) - time.monotonic())):
            now = time.monotonic()
            if now >= next_slot:
                next_slot = now + slot_every  # type: ignore[operator]
                self._renew_slot()
            if now < next_claim:
                continue
            next_claim = now + claim_every
            try:
                with self.rt.db.statement() as session:  # one statement
                    held = transitions.renew_lease(session, self.upload_id, self.number, self.claim, seconds)
            except DatabaseError as error:
                log.warning("could not renew the lease (%s); will try again", error,
                            extra={"upload_id": str(self.upload_id), "part": self.number})
                continue
            if not held:
                self.lost = True
                log.warning("lost the claim on the part while sending it",
                            extra={"upload_id": str(self.upload_id), "part": self.number})
                return

    def _renew_slot(self) -> None:
        try:
            if not self.also():  # type: ignore[misc]
                log.warning("the part's window slot had expired (its lease ran out); it was taken again",
                            extra={"upload_id": str(self.upload_id), "part": self.number})
        except Exception as error:  # noqa: BLE001 - Redis blips; the slot lease is only a bound
            log.warning("could not renew the window slot (%s)", error,
                        extra={"upload_id": str(self.upload_id), "part": self.number})
