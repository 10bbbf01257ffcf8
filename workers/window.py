"""The AIMD window: how many parts may be in flight to one destination, across the whole fleet.

One window per destination (endpoint + bucket) lives in Redis, so every worker of the
fleet shares it:

- it starts at S3FERRY_WINDOW_INITIAL and stays within [S3FERRY_WINDOW_MIN, S3FERRY_WINDOW_MAX];
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
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import time
import urllib.parse

import redis

log = logging.getLogger(__name__)

KEY = "s3ferry:window:{}"
#: The set of every window's key (for metrics, without scanning the keyspace).
INDEX = "s3ferry:windows"
#: Full rounds of fast parts for the one step up to a size that met congestion before.
PROBE_ROUNDS = 8
#: Keys of idle destinations go after a week.
TTL_SECONDS = 7 * 24 * 3600

_ACQUIRE = """
local now_t = redis.call('TIME')
local now = now_t[1] * 1000 + math.floor(now_t[2] / 1000)
local token, initial, low, high, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local w = tonumber(redis.call('HGET', KEYS[1], 'window'))
if not w then
  w = initial
  redis.call('HSET', KEYS[1], 'window', w, 'epoch', 0, 'endpoint', ARGV[6], 'bucket', ARGV[7],
             'changed_ms', now, 'reason', 'start')
end
local clamped = math.max(low, math.min(high, w))
if clamped ~= w then
  w = clamped
  redis.call('HSET', KEYS[1], 'window', w, 'changed_ms', now, 'reason', 'limits')
end
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch')) or 0
local used = redis.call('ZCARD', KEYS[2])
local granted = 0
if redis.call('ZSCORE', KEYS[2], token) or used < math.floor(w) then
  if not redis.call('ZSCORE', KEYS[2], token) then used = used + 1 end
  redis.call('ZADD', KEYS[2], now + lease, token)
  granted = 1
end
redis.call('PEXPIRE', KEYS[1], ARGV[8]); redis.call('PEXPIRE', KEYS[2], ARGV[8])
redis.call('SADD', KEYS[3], KEYS[1])
return {granted, epoch, used, math.floor(w)}
"""

_RENEW = """
local now_t = redis.call('TIME')
local now = now_t[1] * 1000 + math.floor(now_t[2] / 1000)
local existed = redis.call('ZSCORE', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])  -- the part is still in flight: it counts
if existed then return 1 else return 0 end
"""

_RELEASE = """
local now_t = redis.call('TIME')
local now = now_t[1] * 1000 + math.floor(now_t[2] / 1000)
local token, signal, epoch_then, low, high = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local held = redis.call('ZREM', KEYS[2], token)
local w = tonumber(redis.call('HGET', KEYS[1], 'window'))
if not w then  -- the window was reset (deleted) meanwhile: the next acquire starts a new one
  redis.call('LPUSH', KEYS[3], 1)
  redis.call('PEXPIRE', KEYS[3], ARGV[7])
  return {held, 0, 0, redis.call('ZCARD', KEYS[2]), ARGV[6]}
end
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch')) or 0
local ceiling = tonumber(redis.call('HGET', KEYS[1], 'ceiling')) or (high + 1)
local used = redis.call('ZCARD', KEYS[2])
local whole = math.floor(w)
local new = w
-- below the last limit any landed part counts (it shows the link carries that much);
-- the probe of the limit and growth past it count only parts sent since the last halving
if signal == 'grow' and held == 1 and 2 * (used + 1) >= whole and (whole + 1 < ceiling or epoch_then == epoch) then
  if whole + 1 < ceiling then new = w + 1                                    -- (re)grow to below the last limit
  elseif whole < ceiling then new = w + 1 / (tonumber(ARGV[8]) * whole)      -- probe that limit slowly
  else new = w + 1 / whole end                                               -- past it: additive increase
  new = math.min(high, new)
  if math.floor(new + 1e-9) > whole then new = math.floor(new + 1e-9) end  -- each step starts a fresh count
elseif signal == 'shrink' and epoch_then == epoch then
  -- the refused part was sent when the window was ARGV[9]: the limit is there (or below),
  -- not at what the window grew to while the refusal was on its way back. A part that
  -- failed long after it was sent (a timeout) is not taken further back than half of now.
  local met = math.min(whole, math.max(tonumber(ARGV[9]), math.ceil(whole / 2)))
  new = math.max(low, math.floor(met / 2))
  redis.call('HSET', KEYS[1], 'epoch', epoch + 1, 'ceiling', met)
elseif signal == 'shrink' and epoch_then == epoch - 1 then
  -- another refusal of the round that was just halved: it does not halve again, but if it was
  -- sent under a smaller window, the limit is lower than recorded
  local sent = math.max(tonumber(ARGV[9]), low + 1)
  if sent < ceiling then
    redis.call('HSET', KEYS[1], 'ceiling', sent)
    if new >= sent then new = math.max(low, sent - 1) end
  end
end
local reason = ARGV[6]
if signal == 'shrink' and epoch_then ~= epoch then reason = 'limit lowered: ' .. reason end
if new ~= w then
  redis.call('HSET', KEYS[1], 'window', tostring(new))
  if math.floor(new) ~= math.floor(w) then
    redis.call('HSET', KEYS[1], 'changed_ms', now, 'reason', reason)
  end
end
local free = math.floor(new) - used
if free > 0 then
  for i = 1, free do redis.call('LPUSH', KEYS[3], 1) end
  redis.call('LTRIM', KEYS[3], 0, high - 1)
  redis.call('PEXPIRE', KEYS[3], ARGV[7])
end
return {held, math.floor(w), math.floor(new), used, reason}
"""


class Signal(enum.Enum):
    """What a finished part says about the link."""

    GROW = "grow"  # landed within the target time
    SHRINK = "shrink"  # throttled (SlowDown, 503, 429), timed out, or the connection failed
    NONE = "none"  # nothing either way (another error, a slow part, a part not sent)


@dataclasses.dataclass(frozen=True)
class Limits:
    initial: int = 1
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


@dataclasses.dataclass(frozen=True)
class State:
    window: int
    in_flight: int
    reason: str
    changed_at: float | None  # Unix time


def destination_name(endpoint_url: str | None, bucket: str) -> str:
    """'endpoint/bucket', as logged and shown: the endpoint without credentials, path or query."""
    if not endpoint_url:
        return f"s3://{bucket}"
    parts = urllib.parse.urlsplit(endpoint_url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{':' + str(parts.port) if parts.port else ''}/{bucket}"


_EVICT = """
local gone = 0
for _, token in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if string.sub(token, 1, #ARGV[1]) == ARGV[1] then
    redis.call('ZREM', KEYS[2], token)
    gone = gone + 1
  end
end
for i = 1, gone do redis.call('LPUSH', KEYS[3], 1) end
if gone > 0 then redis.call('PEXPIRE', KEYS[3], ARGV[2]) end
return gone
"""


class Window:
    """The shared window of one destination."""

    def __init__(self, client: redis.Redis, endpoint_url: str | None, bucket: str, limits: Limits) -> None:
        self.client, self.limits = client, limits
        self.name = destination_name(endpoint_url, bucket)
        base = KEY.format(hashlib.sha256(self.name.encode()).hexdigest()[:24])
        self.keys = (base, base + ":slots", base + ":freed")
        self.endpoint, self.bucket = endpoint_url or "", bucket
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._evict = client.register_script(_EVICT)

    def try_acquire(self, token: str) -> Slot | None:
        lim = self.limits
        granted, epoch, _used, size = self._acquire(
            keys=[*self.keys[:2], INDEX],
            args=[token, lim.initial, lim.low, lim.high, int(lim.lease_seconds * 1000), self.endpoint, self.bucket,
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
