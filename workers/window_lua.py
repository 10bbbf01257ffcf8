"""The window's Lua scripts (workers/window.py): each change of a destination's window is one
atomic script on Redis, with Redis's clock."""

#: Lua shared by the scripts below: Redis's clock, and how one part's end moves the window.
COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end

-- The window (`w`, in hash `key`) after one part's end: `signal`, the part's slot still held when
-- it ended (`held`), `used` slots in use besides it, the round (`epoch_then`) and the window
-- (`sent`) it was sent under. Returns the new window and the reason recorded.
local function move(key, w, signal, held, used, epoch_then, sent, low, high, probe, reason, now)
  local epoch = tonumber(redis.call('HGET', key, 'epoch')) or 0
  local ceiling = tonumber(redis.call('HGET', key, 'ceiling')) or (high + 1)
  local whole = math.floor(w)
  local new = w
  -- below the last limit any landed part counts (it shows the link carries that much);
  -- the probe of the limit and growth past it count only parts sent since the last halving
  if signal == 'grow' and held and 2 * (used + 1) >= whole and (whole + 1 < ceiling or epoch_then == epoch) then
    if whole + 1 < ceiling then new = w + 1                            -- (re)grow to below the last limit
    elseif whole < ceiling then new = w + 1 / (probe * whole)          -- probe that limit slowly
    else new = w + 1 / whole end                                       -- past it: additive increase
    new = math.min(high, new)
    if math.floor(new + 1e-9) > whole then new = math.floor(new + 1e-9) end  -- each step starts a fresh count
  elseif signal == 'shrink' and epoch_then == epoch then
    -- the refused part was sent when the window was `sent`: the limit is there (or below),
    -- not at what the window grew to while the refusal was on its way back. A part that
    -- failed long after it was sent (a timeout) is not taken further back than half of now.
    local met = math.min(whole, math.max(sent, math.ceil(whole / 2)))
    new = math.max(low, math.floor(met / 2))
    redis.call('HSET', key, 'epoch', epoch + 1, 'ceiling', met)
  elseif signal == 'shrink' and epoch_then == epoch - 1 then
    -- another refusal of the round that was just halved: it does not halve again, but if it was
    -- sent under a smaller window, the limit is lower than recorded
    local lowered = math.max(sent, low + 1)
    if lowered < ceiling then
      redis.call('HSET', key, 'ceiling', lowered)
      if new >= lowered then new = math.max(low, lowered - 1) end
    end
  end
  if signal == 'shrink' and epoch_then ~= epoch then reason = 'limit lowered: ' .. reason end
  if new ~= w then
    redis.call('HSET', key, 'window', tostring(new))
    if math.floor(new) ~= math.floor(w) then
      redis.call('HSET', key, 'changed_ms', now, 'reason', reason)
    end
  end
  return new, reason
end

-- Wake up to `free` waiters (each release pushes one token per free slot).
-- The window's size: a new window starts at `initial`; a size outside the limits (they changed)
-- is brought within them.
local function current(key, initial, low, high, endpoint, bucket, now)
  local w = tonumber(redis.call('HGET', key, 'window'))
  if not w then
    w = initial
    redis.call('HSET', key, 'window', w, 'epoch', 0, 'endpoint', endpoint, 'bucket', bucket,
               'changed_ms', now, 'reason', 'start')
  end
  local clamped = math.max(low, math.min(high, w))
  if clamped ~= w then
    w = clamped
    redis.call('HSET', key, 'window', w, 'changed_ms', now, 'reason', 'limits')
  end
  return w
end

local function wake(key, free, high, ttl)
  if free > 0 then
    for i = 1, free do redis.call('LPUSH', key, 1) end
    redis.call('LTRIM', key, 0, high - 1)
    redis.call('PEXPIRE', key, ttl)
  end
end
"""

ACQUIRE = COMMON + """
local now = now_ms()
local token, initial, low, high, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local w = current(KEYS[1], initial, low, high, ARGV[6], ARGV[7], now)
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

RENEW = """
local now_t = redis.call('TIME')
local now = now_t[1] * 1000 + math.floor(now_t[2] / 1000)
local existed = redis.call('ZSCORE', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])  -- the part is still in flight: it counts
if existed then return 1 else return 0 end
"""

RELEASE = COMMON + """
local now = now_ms()
local token, signal, epoch_then, low, high = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local held = redis.call('ZREM', KEYS[2], token)
local w = tonumber(redis.call('HGET', KEYS[1], 'window'))
if not w then  -- the window was reset (deleted) meanwhile: the next acquire starts a new one
  redis.call('LPUSH', KEYS[3], 1)
  redis.call('PEXPIRE', KEYS[3], ARGV[7])
  return {held, 0, 0, redis.call('ZCARD', KEYS[2]), ARGV[6]}
end
local used = redis.call('ZCARD', KEYS[2])
local new, reason = move(KEYS[1], w, signal, held == 1, used, epoch_then, tonumber(ARGV[9]), low, high,
                         tonumber(ARGV[8]), ARGV[6], now)
wake(KEYS[3], math.floor(new) - used, high, ARGV[7])
return {held, math.floor(w), math.floor(new), used, reason}
"""

#: One round trip for everything a process's share of the window (workers/share.py) tells Redis
#: and asks of it: the parts that ended since the last call (in the order they ended), the slots it
#: holds (renewed; those in use taken again if they lapsed), the parked ones it gives back, and
#: new slots it wants. Parked slots go back anyway when other processes wait for one, when the
#: window is over its size (it was halved), or when they lapsed. ARGV[1] is JSON (see Window.sync).
SYNC = COMMON + """
local a = cjson.decode(ARGV[1])
local now = now_ms()
local low, high = a.low, a.high
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
-- the processes waiting for a slot (KEYS[5]: holder -> since when; KEYS[6]: holder -> last asked):
-- one that has not asked for a while has stopped waiting
for _, holder in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  local seen = tonumber(redis.call('HGET', KEYS[6], holder))
  if not seen or seen < now - a.waiting then
    redis.call('ZREM', KEYS[5], holder)
    redis.call('HDEL', KEYS[6], holder)
  end
end
local w = current(KEYS[1], a.initial, low, high, a.endpoint, a.bucket, now)
local before = math.floor(w)
local changes = {}
local parked = {}
for _, m in ipairs(a.keep) do parked[m] = true end
for _, m in ipairs(a.give) do parked[m] = true end
for _, s in ipairs(a.ended) do
  local held = redis.call('ZSCORE', KEYS[2], s[1]) ~= false
  -- in use besides the part that ended: the slots sending now, less its own if another part took it since
  local used = redis.call('ZCARD', KEYS[2]) - #a.keep - #a.give
  if not parked[s[1]] then used = used - 1 end
  used = math.max(0, used)
  local was = math.floor(w)
  local reason
  w, reason = move(KEYS[1], w, s[2], held, used, s[3], s[4], low, high, a.probe, s[5], now)
  if math.floor(w) ~= was then table.insert(changes, {was, math.floor(w), reason}) end
end
local lapsed = {}
for _, m in ipairs(a.busy) do
  if redis.call('ZADD', KEYS[2], now + a.lease, m) == 1 then table.insert(lapsed, m) end
end
local whole = math.floor(w)
local used = redis.call('ZCARD', KEYS[2])
local others = false
for _, holder in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  if holder ~= a.holder then others = true end
end
local back = {}
for _, m in ipairs(a.give) do
  used = used - redis.call('ZREM', KEYS[2], m)
  table.insert(back, m)
end
for _, m in ipairs(a.keep) do
  if others or used > whole or not redis.call('ZSCORE', KEYS[2], m) then
    used = used - redis.call('ZREM', KEYS[2], m)
    table.insert(back, m)
  else
    redis.call('ZADD', KEYS[2], now + a.lease, m)
  end
end
local granted = {}
-- first come, first served: free slots go to the processes waiting longest, as many as are free
-- (one that is not waiting yet queues behind them)
local ahead = redis.call('ZRANK', KEYS[5], a.holder) or redis.call('ZCARD', KEYS[5])
for _, m in ipairs(a.want) do
  if used < whole and ahead < whole - used then
    redis.call('ZADD', KEYS[2], now + a.lease, m)
    used = used + 1
    table.insert(granted, m)
  end
end
if a.unwait then  -- its parts stopped waiting
  redis.call('ZREM', KEYS[5], a.holder)
  redis.call('HDEL', KEYS[6], a.holder)
elseif #granted < #a.want then
  redis.call('ZADD', KEYS[5], 'NX', now, a.holder)
  redis.call('HSET', KEYS[6], a.holder, now)
elseif #a.want > 0 then
  redis.call('ZREM', KEYS[5], a.holder)
  redis.call('HDEL', KEYS[6], a.holder)
end
if #back > 0 or whole > before then wake(KEYS[3], whole - used, high, a.ttl) end
for i = 1, 6 do if i ~= 3 and i ~= 4 then redis.call('PEXPIRE', KEYS[i], a.ttl) end end
redis.call('SADD', KEYS[4], KEYS[1])
local over = 0
if used > whole then over = 1 end
local others_flag = 0
if others then others_flag = 1 end
return {tonumber(redis.call('HGET', KEYS[1], 'epoch')) or 0, whole, granted, back, lapsed, others_flag, over,
        cjson.encode(changes)}
"""

#: A dead part's slot, `holder:upload:part:` (ARGV[1]); and the slots its process held for its
#: parts (workers/share.py: `holder:slot:...`), which died with it.
EVICT = """
local gone = 0
local holder = string.match(ARGV[1], '^(.*):[^:]*:[^:]*:$')
local shared = holder and (holder .. ':slot:') or nil
for _, token in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if string.sub(token, 1, #ARGV[1]) == ARGV[1] or (shared and string.sub(token, 1, #shared) == shared) then
    redis.call('ZREM', KEYS[2], token)
    gone = gone + 1
  end
end
for i = 1, gone do redis.call('LPUSH', KEYS[3], 1) end
if gone > 0 then redis.call('PEXPIRE', KEYS[3], ARGV[2]) end
return gone
"""
