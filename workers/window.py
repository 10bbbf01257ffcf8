"""The AIMD window: how many parts may be in flight to one destination, across the whole fleet.

One window per destination (endpoint + bucket) lives in Redis, so every worker of the
fleet shares it:

- it starts at S3FERRY_WINDOW_INITIAL (unset: the worker's concurrency) and stays within
  [S3FERRY_WINDOW_MIN, S3FERRY_WINDOW_MAX];
- a part that lands within the target time, while at least half the window is in use
  (parts held back by the number of workers say nothing about the link), grows it: by 1
  per part up to just below the size that last met congestion (at first: up to the
  maximum, a slow start; after a halving, a fast regrowth to the size known to work);
  then by 1 per PROBE_ROUNDS full rounds for the last step to that size (a cautious
  probe of a limit that was hit before); past it, by 1 per round (additive increase).
  The probe and the growth past the limit count only parts sent since the last halving;
- a part refused with SlowDown / throttling, or lost to a timeout or a connection error,
  halves it (multiplicative decrease), once per round: parts sent before the last halving
  do not halve it again. The size that met congestion is the window the refused part was
  sent under (the window may have grown meanwhile, while the refusal was on its way;
  but a part that failed long after it was sent, a timeout, takes it back no further
  than half of the window now); it is halved, and recorded as the limit to probe slowly.
  Other refusals of the same round lower that limit to the smallest window they were
  sent under;
- a part holds a slot while it is sent: a Redis lease that its worker renews and that
  expires when the worker dies, so a dead worker's slot comes back by itself.

Every change is an atomic Lua script on Redis (which also gives the clock), so workers
never race. Waiting for a slot blocks on a Redis list that each release pushes to: no
spinning, and no retry counted. Keys are named after a digest of the destination.

Workers' parts do not call Redis for each slot: a worker process holds its slots between
its parts (workers/share.py), and tells Redis what its parts said, renews its slots, gives
some back and takes more in one script call (Window.sync); the rules above apply to each
part's end, in order. A new window starts at the worker's concurrency (start_at), unless
S3FERRY_WINDOW_INITIAL is set.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import time
import typing
import urllib.parse
from collections.abc import Sequence

import redis

from workers import window_lua

log = logging.getLogger(__name__)

KEY = "s3ferry:window:{}"
#: The set of every window's key (for metrics, without scanning the keyspace).
INDEX = "s3ferry:windows"
#: Full rounds of fast parts for the one step up to a size that met congestion before.
PROBE_ROUNDS = 8
#: Keys of idle destinations go after a week.
TTL_SECONDS = 7 * 24 * 3600
#: A process that found no free slot counts as waiting until it has not asked for this long:
#: meanwhile the others give back the slots they hold parked, and slots go to the processes
#: waiting, the longest-waiting first (workers/share.py).
WAITING_MS = 2500


class Signal(enum.Enum):
    """What a finished part says about the link."""

    GROW = "grow"  # landed within the target time
    SHRINK = "shrink"  # throttled (SlowDown, 503, 429), timed out, or the connection failed
    NONE = "none"  # nothing either way (another error, a slow part, a part not sent)


@dataclasses.dataclass(frozen=True)
class Limits:
    #: Where a new window starts; None: at the node's concurrency (start_at), at least 1.
    initial: int | None = None
    low: int = 1
    high: int = 32
    #: A part of 32 MiB that lands within this grows the window (scaled to larger parts).
    target_seconds: float = 30.0
    #: A slot's lease: renewed while its part is sent; a dead worker's slot frees after this.
    lease_seconds: float = 30.0

    # (validated with the rest of the settings, in models/settings.py)

    def target_for(self, size: int) -> float:
        return self.target_seconds * max(1.0, size / (32 * 1024 * 1024))


@dataclasses.dataclass(frozen=True)
class Slot:
    """A granted slot: its token, and the window's epoch when it was granted."""

    token: str
    epoch: int
    size: int  # the window's size when it was granted


class Ended(typing.NamedTuple):
    """A part that ended, as a process's share reports it (Window.sync)."""

    token: str  # the slot it was sent under
    signal: str  # Signal.value
    epoch: int  # the window's epoch when it took the slot
    size: int  # the window's size then
    reason: str


@dataclasses.dataclass(frozen=True)
class Synced:
    """What Window.sync found: the window now, and what became of the process's slots."""

    epoch: int
    size: int
    granted: list[str]
    back: list[str]  # parked slots given back
    lapsed: list[str]  # slots in use whose lease had run out (taken again)
    others_waiting: bool  # another process waits for a slot
    over: bool  # more slots are held than the window's size (it shrank)
    changes: list[tuple[int, int, str]]


@dataclasses.dataclass(frozen=True)
class State:
    window: int
    in_flight: int
    reason: str
    changed_at: float | None  # Unix time


#: The worker node's concurrency, noted when it starts (workers/app.py); 0 outside a worker.
_node_concurrency = 0
def start_at(concurrency: int) -> None:
    """Note this node's concurrency: where its new windows start unless S3FERRY_WINDOW_INITIAL is
    set, so that the first parts of an upload do not go one at a time."""
    global _node_concurrency
    _node_concurrency = max(0, concurrency)


def start_size(limits: Limits) -> int:
    """The size of a new window (none yet, or it expired after a week unused); a window that
    exists keeps its last size: the one the last grow or halving left."""
    start = limits.initial if limits.initial is not None else max(1, _node_concurrency)
    return max(limits.low, min(limits.high, start))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def destination_name(endpoint_url: str | None, bucket: str) -> str:
    """'endpoint/bucket', as logged and shown: the endpoint without credentials, path or query."""
    if not endpoint_url:
        return f"s3://{bucket}"
    parts = urllib.parse.urlsplit(endpoint_url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{':' + str(parts.port) if parts.port else ''}/{bucket}"


class Window:
    """The shared window of one destination."""

    def __init__(self, client: redis.Redis, endpoint_url: str | None, bucket: str, limits: Limits) -> None:
        self.client, self.limits = client, limits
        self.name = destination_name(endpoint_url, bucket)
        base = KEY.format(hashlib.sha256(self.name.encode()).hexdigest()[:24])
        #: the window, its slots (token -> lease expiry), the wake-up list, the processes waiting for a
        #: slot (since when), and when each last asked
        self.keys = (base, base + ":slots", base + ":freed", base + ":waiting", base + ":asked")
        self.endpoint, self.bucket = endpoint_url or "", bucket
        self._acquire = client.register_script(window_lua.ACQUIRE)
        self._renew = client.register_script(window_lua.RENEW)
        self._release = client.register_script(window_lua.RELEASE)
        self._evict = client.register_script(window_lua.EVICT)
        self._sync = client.register_script(window_lua.SYNC)

    def try_acquire(self, token: str) -> Slot | None:
        lim = self.limits
        granted, epoch, _used, size = self._acquire(
            keys=[*self.keys[:2], INDEX],
            args=[token, start_size(lim), lim.low, lim.high, int(lim.lease_seconds * 1000), self.endpoint, self.bucket,
                  TTL_SECONDS * 1000])
        return Slot(token, int(epoch), int(size)) if granted else None

    def acquire(self, token: str, wait_seconds: float) -> Slot | None:
        """A slot, waiting up to `wait_seconds` for one (woken by releases; re-checked each second,
        for slots whose lease ran out). None if none came."""
        deadline = time.monotonic() + wait_seconds
        while True:
            slot = self.try_acquire(token)
            if slot is not None:
                return slot
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.client.blpop([self.keys[2]], timeout=min(1.0, max(0.01, left)))

    def renew(self, slot: Slot) -> bool:
        """Extend the slot's lease; False if it had expired meanwhile (it is taken again: the part
        is still being sent, so it counts, even if that puts the window over for a while)."""
        return bool(self._renew(keys=self.keys[:2], args=[slot.token, int(self.limits.lease_seconds * 1000)]))

    def release(self, slot: Slot, signal: Signal, reason: str) -> tuple[int, int]:
        """Give the slot back, moving the window as `signal` says; returns (before, after)."""
        lim = self.limits
        _held, before, after, _used, said = self._release(
            keys=list(self.keys),
            args=[slot.token, signal.value, slot.epoch, lim.low, lim.high, reason[:200], TTL_SECONDS * 1000,
                  PROBE_ROUNDS, slot.size])
        before, after = int(before), int(after)
        if before != after:
            reason = said.decode() if isinstance(said, bytes) else str(said)  # as recorded (a lowered limit says so)
            log.info("window %s: %d -> %d (%s)", self.name, before, after, reason,
                     extra={"destination": self.name, "window": after})
        return before, after

    def sync(self, holder: str, ended: Sequence[Ended] = (), busy: Sequence[str] = (), keep: Sequence[str] = (),
             give: Sequence[str] = (), want: Sequence[str] = (), unwait: bool = False) -> Synced:
        """One round trip for a process's share of the window (workers/share.py): the parts that
        `ended` since its last call move the window, in order; its slots in use (`busy`) are renewed
        (taken again if they lapsed); its parked ones are renewed (`keep`) or given back (`give`;
        `keep` ones too when other processes wait, when the window is over its size, or when they
        lapsed); and it takes the slots it `want`s that are free, first come first served: wanting
        more than it gets queues `holder` behind the processes already waiting (`unwait`: it
        stopped waiting)."""
        lim = self.limits
        payload = {"holder": holder, "ended": [list(e) for e in ended], "busy": list(busy), "keep": list(keep),
                   "give": list(give), "want": list(want), "unwait": unwait, "initial": start_size(lim), "low": lim.low,
                   "high": lim.high, "probe": PROBE_ROUNDS, "lease": int(lim.lease_seconds * 1000),
                   "waiting": WAITING_MS, "ttl": TTL_SECONDS * 1000, "endpoint": self.endpoint,
                   "bucket": self.bucket}
        epoch, size, granted, back, lapsed, others, over, changes = self._sync(
            keys=[*self.keys[:3], INDEX, *self.keys[3:]], args=[json.dumps(payload)])
        moved = [(int(a), int(b), _text(r)) for a, b, r in (json.loads(changes) or [])]
        for before, after, reason in moved:
            log.info("window %s: %d -> %d (%s)", self.name, before, after, reason,
                     extra={"destination": self.name, "window": after})
        return Synced(int(epoch), int(size), [_text(m) for m in granted], [_text(m) for m in back],
                      [_text(m) for m in lapsed], bool(others), bool(over), moved)

    def evict(self, prefix: str) -> int:
        """Free the slots whose token starts with `prefix` (a dead worker's part: `worker:upload:part:`)
        at once, rather than when their leases run out; returns how many."""
        return int(self._evict(keys=list(self.keys), args=[prefix, TTL_SECONDS * 1000]))

    def state(self) -> State | None:
        """The window now (None if no part was sent to this destination lately)."""
        seconds, micros = self.client.time()  # the clock the leases are scored with
        pipe = self.client.pipeline()
        pipe.hgetall(self.keys[0])
        pipe.zcount(self.keys[1], "(" + str(seconds * 1000 + micros // 1000), "+inf")
        values, in_flight = pipe.execute()
        if not values:
            return None
        values = {k.decode(): v.decode() for k, v in values.items()}
        changed = values.get("changed_ms")
        return State(int(float(values["window"])), int(in_flight), values.get("reason", ""),
                     int(changed) / 1000 if changed else None)


def all_states(client: redis.Redis) -> dict[str, State]:
    """Every destination's window that Redis holds, by destination name (for metrics)."""
    found: dict[str, State] = {}
    for key in client.smembers(INDEX):
        name = key.decode()
        values = client.hmget(name, "endpoint", "bucket")
        if values[1] is None:  # expired or reset
            client.srem(INDEX, name)
            continue
        shared = Window(client, (values[0] or b"").decode() or None, values[1].decode(), Limits())
        state = shared.state()
        if state is not None:
            found[shared.name] = state
    return found


def redis_url(result_backend: str, broker_url: str) -> str | None:
    """Where the windows live: the result backend's Redis, else the broker's; None if neither is Redis."""
    for url in (result_backend, broker_url):
        if urllib.parse.urlsplit(url).scheme in ("redis", "rediss", "socket", "redis+socket"):
            return url
    return None


#: Socket timeout of the windows' (and the signer's) Redis connections: longer than any
#: blocking pop they make, so a half-open connection fails in bounded time instead of hanging.
SOCKET_TIMEOUT = 30.0


def client_from_url(url: str, timeout: float = SOCKET_TIMEOUT) -> redis.Redis | None:
    """A Redis client for a result backend or broker URL (redis://, rediss://, Celery's socket://
    and redis+socket://); None if the URL is not Redis."""
    parts = urllib.parse.urlsplit(url)
    options = {"socket_timeout": timeout, "socket_connect_timeout": min(timeout, 10.0), "health_check_interval": 30}
    if parts.scheme in ("redis", "rediss"):
        return redis.Redis.from_url(url, socket_keepalive=True, **options)
    if parts.scheme in ("socket", "redis+socket"):
        query = urllib.parse.parse_qs(parts.query)
        db = int((query.get("virtual_host") or query.get("db") or ["0"])[0])
        return redis.Redis(unix_socket_path=parts.path, db=db, **options)
    return None
