"""A process's share of a destination's AIMD window: slots without a Redis round trip per part.

The window (workers/window.py) counts slots in Redis, fleet-wide. A slot this process
took stays with it between its parts: when a part ends, its slot is parked here, and the
next part of this process takes it without asking Redis. Redis hears from the process in
one script call (Window.sync) that reports what the parts said (grow, shrink: the window
moves part by part, in the order they ended, as if each had released its slot), renews
the slots it holds, gives back the ones it does not need, and takes new ones. That call is
made:

- when a part wants a slot and none is parked here (or the process's view is older than
  FRESH_SECONDS, or the window is over its size, or other processes wait for slots);
- within FLUSH_SECONDS of a part ending, by a keeper thread; at once for a refusal (shrink);
- every third of the slot lease while slots are held (the dead-holder lease: a process
  that dies stops renewing, and its slots free when the lease runs out; the recovery pass
  frees them at once, Window.evict);
- when parked slots have been idle for IDLE_SECONDS (the upload's last parts have landed),
  or as soon as another process waits for a slot: parked slots then go back to Redis and
  this process's parts take slots there, first come first served, like everyone's.

The fleet-wide cap holds in Redis: a process never holds more slots than the window had
free when it took them. After a halving elsewhere, a process may start a part on a parked
slot for at most FRESH_SECONDS before it learns of it; then it gives back what is over.

Waiting for a slot blocks on the process's condition (a part of this process ending) and,
through the keeper, on the window's Redis list (a slot freed elsewhere).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import threading
import time

import redis

from workers.window import Ended, Limits, Signal, Slot, State, Synced, Window

log = logging.getLogger(__name__)

#: The ends of parts reach Redis within this long (a refusal at once).
FLUSH_SECONDS = 0.25
#: A parked slot is taken without asking Redis only if the process heard from Redis this recently.
FRESH_SECONDS = 0.5
#: Parked slots that no part took for this long go back to Redis.
IDLE_SECONDS = 0.2
#: The keeper waits on the window's Redis list for at most this long at a time.
BLOCK_SECONDS = 0.5
#: Ends of parts kept for Redis while it cannot be reached (the oldest are dropped beyond).
MAX_PENDING = 1000


@dataclasses.dataclass(frozen=True)
class Held(Slot):
    """A slot of this process's share (its token is the process's, `holder:slot:...`)."""


class Share:
    """This process's share of one destination's window; parts use it as they would the window."""

    def __init__(self, window: Window, holder: str | None = None) -> None:
        self.window = window
        self._holder = holder
        self._cond = threading.Condition()
        self._sync_lock = threading.Lock()
        self._busy: dict[str, str] = {}  # slot -> the part's token
        self._parked: dict[str, float] = {}  # slot -> when it was parked (monotonic)
        self._ended: list[Ended] = []
        self._first_ended = 0.0
        self._lapsed: set[str] = set()
        self._epoch, self._size = 0, 0
        self._others_waiting = self._over = False
        self._synced = -1e9  # monotonic time of the last sync
        self._waiters = 0
        self._keeper: threading.Thread | None = None
        self._failing = False

    @property
    def name(self) -> str:
        return self.window.name

    @property
    def limits(self) -> Limits:
        return self.window.limits

    def state(self) -> State | None:
        return self.window.state()

    # -- what a part does -------------------------------------------------------------------

    def try_acquire(self, token: str) -> Slot | None:
        """A slot now if one is parked here or free in the window, else None (one round trip at most)."""
        self._name_holder(token)
        for _ in range(3):
            with self._cond:
                slot = self._take_parked(token)
                if slot is not None or not self._parked or self._may_reuse():
                    break
            self._sync()  # parked slots, but an old view of the window: look first
        return slot if slot is not None else self._take_new(token)

    def acquire(self, token: str, wait_seconds: float) -> Slot | None:
        """A slot, waiting up to `wait_seconds` for one: a part of this process ending, or a slot
        freed in the window (the keeper watches its Redis list). None if none came."""
        deadline = time.monotonic() + wait_seconds
        while True:
            slot = self.try_acquire(token)
            if slot is not None:
                return slot
            with self._cond:
                left = deadline - time.monotonic()
                if left <= 0:
                    last = self._waiters == 0
                    break
                if not self._parked:
                    self._waiters += 1
                    self._ensure_keeper()
                    try:
                        self._cond.wait(min(left, 1.0))
                    finally:
                        self._waiters -= 1
        if last:  # no part of this process waits any more: out of the queue, not holding it up
            with contextlib.suppress(redis.RedisError):
                self._sync(unwait=True)
        return None

    def release(self, slot: Slot, signal: Signal, reason: str) -> tuple[int, int]:
        """The part ended: its slot is parked for this process's next part, and what it says about
        the link reaches Redis within FLUSH_SECONDS (a refusal at once). Returns the window's size
        before and after, as far as this process knows."""
        with self._cond:
            if self._busy.pop(slot.token, None) is None:
                return self._size, self._size
            if not self._ended:
                self._first_ended = time.monotonic()
            self._ended.append(Ended(slot.token, signal.value, slot.epoch, slot.size, reason[:200]))
            del self._ended[:-MAX_PENDING]
            if signal is Signal.SHRINK:
                self._over = True  # nobody takes a parked slot before Redis has heard of the refusal
            self._parked[slot.token] = time.monotonic()
            self._cond.notify()
            self._ensure_keeper()
            before = self._size
        if signal is Signal.SHRINK:
            synced = self._sync()
            return (synced.changes[0][0], synced.changes[-1][1]) if synced.changes else (before, synced.size)
        return before, before

    def renew(self, slot: Slot) -> bool:
        """The keeper renews the process's slots; False if this one had lapsed meanwhile (it was
        taken again: the part is still being sent, so it counts)."""
        with self._cond:
            lapsed = slot.token in self._lapsed
            self._lapsed.discard(slot.token)
            self._ensure_keeper()
            return not lapsed

    def close(self) -> None:
        """Tell Redis what ended and give every parked slot back (at shutdown); slots in use go
        with their parts' ends, or their leases."""
        with self._cond:
            idle = not (self._parked or self._ended)
        if not idle:
            self._sync(give_all=True)

    # -- with Redis ---------------------------------------------------------------------------

    def _name_holder(self, token: str) -> None:
        if self._holder is None:  # a part's token is `holder:upload:part:nonce` (workers/parts.py)
            self._holder = token.rsplit(":", 3)[0]

    def _may_reuse(self) -> bool:
        return not (self._others_waiting or self._over) and time.monotonic() - self._synced < FRESH_SECONDS

    def _take_parked(self, token: str) -> Held | None:
        if not self._parked or not self._may_reuse():
            return None
        member = next(iter(self._parked))
        del self._parked[member]
        self._busy[member] = token
        self._ensure_keeper()  # it renews the slot while the part is sent
        return Held(member, self._epoch, self._size)

    def _take_new(self, token: str) -> Held | None:
        member = f"{self._holder}:slot:{secrets.token_hex(6)}"
        synced = self._sync(want=member)
        if member not in synced.granted:
            return None
        with self._cond:
            self._busy[member] = token
            self._ensure_keeper()  # it renews the slot while the part is sent
            return Held(member, synced.epoch, synced.size)

    def _sync(self, want: str | None = None, give_idle: bool = False, give_all: bool = False,
              unwait: bool = False) -> Synced:
        """One Window.sync: what ended, the slots held, parked ones given back, one more wanted."""
        with self._sync_lock:
            with self._cond:
                ended, self._ended = self._ended, []
                now = time.monotonic()
                parked, self._parked = self._parked, {}
                give = [m for m, at in parked.items() if give_all or (give_idle and now - at >= IDLE_SECONDS)]
                keep = [m for m in parked if m not in give]
                busy = list(self._busy)
            try:
                synced = self.window.sync(self._holder or "", ended, busy, keep, give, [want] if want else [],
                                          unwait=unwait)
            except Exception:
                with self._cond:  # told nothing: it is all still to tell
                    self._ended[:0] = ended
                    self._parked.update(parked)
                    self._cond.notify_all()
                raise
            with self._cond:
                self._epoch, self._size = synced.epoch, synced.size
                self._others_waiting, self._over = synced.others_waiting, synced.over
                self._synced = time.monotonic()
                self._lapsed.update(synced.lapsed)
                back = set(synced.back)
                self._parked.update((m, at) for m, at in parked.items() if m not in back)
                if self._parked or self._ended or self._busy:
                    self._ensure_keeper()  # one that looked while the parked slots were away may have left
                self._cond.notify_all()
            return synced

    # -- the keeper ---------------------------------------------------------------------------

    def _ensure_keeper(self) -> None:
        """(Called with the condition held.)"""
        if self._keeper is None or not self._keeper.is_alive():
            self._keeper = threading.Thread(target=self._keep, name=f"s3ferry-share-{self.name}", daemon=True)
            self._keeper.start()

    def _keep(self) -> None:
        while True:
            with self._cond:
                if not (self._busy or self._parked or self._ended or self._waiters):
                    self._keeper = None
                    return
                wait = self._next_due() - time.monotonic()
                if wait > 0 and not self._waiters:
                    self._cond.wait(wait)
                    continue
            if wait > 0:  # parts of this process wait: watch for a slot freed elsewhere meanwhile
                self._watch_freed(min(wait, BLOCK_SECONDS))
                continue
            try:
                self._sync(give_idle=True)
                if self._failing:
                    log.warning("window %s: Redis answers again", self.name)
                self._failing = False
            except Exception as error:  # noqa: BLE001 - parts see it themselves when they want a slot
                if not self._failing:
                    log.warning("window %s: could not reach Redis (%s); trying again", self.name, error)
                self._failing = True
                time.sleep(1.0)

    def _next_due(self) -> float:
        """(With the condition held.) When the keeper must next call Redis."""
        due = self._synced + self.limits.lease_seconds / 3 if (self._busy or self._parked) else float("inf")
        if self._ended:
            due = min(due, self._first_ended + FLUSH_SECONDS)
        if self._parked:
            soonest = min(self._parked.values()) + IDLE_SECONDS
            due = min(due, time.monotonic() if (self._others_waiting or self._over) else soonest)
        return due

    def _watch_freed(self, seconds: float) -> None:
        try:
            self.window.client.blpop([self.window.keys[2]], timeout=max(0.01, seconds))
        except Exception:  # noqa: BLE001 - the waiting parts look again themselves each second
            time.sleep(seconds)
        with self._cond:
            self._cond.notify_all()

