-- One atomic apply of a batch of encoded events (rentalml.state.base: StateStore.apply documents the semantics;
-- rentalml.state.sqlite is the same algorithm in one SQLite transaction).
-- KEYS[1] = key prefix; ARGV[1] = JSON {events, lateness, margin, hist, uev, keep_h, hour, fine, fine_keep}
-- (bucket sizes and retention come from rentalml.features.formulas through StateStore._params).
--
-- The events are decided in order in Lua and their effects gathered per key, then written once per key: one
-- SMISMEMBER and one SADD per event-time hour for the dedupe sets, and per touched counter hash one HGETALL, one
-- HSET (the summed increments, `last`, `_v`) and one HDEL (the buckets past retention) — the same end state as
-- one HINCRBY/HSET per event (Redis spent ~25 us per event in redis.call before), in fewer calls.
local P = KEYS[1]
local cfg = cjson.decode(ARGV[1])
local lateness, margin, hist_len, keep_h, uev_len = cfg.lateness, cfg.margin, cfg.hist, cfg.keep_h, cfg.uev
local HOUR, FINE, fine_keep = cfg.hour, cfg.fine, cfg.fine_keep
local events = cfg.events
local clock = tonumber(redis.call('GET', P .. ':clock') or '0')
local STEP = 1000                     -- arguments per variadic call (well within Lua's C stack)
local function each_slice(list, fn)   -- fn(first, last) over `list` in slices of STEP
  for i = 1, #list, STEP do fn(i, math.min(i + STEP - 1, #list)) end
end
local outcomes = {}
local eng, prop, usr = {}, {}, {}     -- touched entity -> changed (true) / touched only (false)
local function touch(t, id, changed) if changed or t[id] == nil then t[id] = changed end end
local function maxfield(key, f, v)
  local old = tonumber(redis.call('HGET', key, f) or '-1')
  if v > old then redis.call('HSET', key, f, string.format('%.6f', v)) end
end
local function bump(t, id, f, n)       -- t[id][f] += n
  local m = t[id]
  if not m then m = {}; t[id] = m end
  m[f] = (m[f] or 0) + n
end
local function maxof(t, id, v) if not t[id] or v > t[id] then t[id] = v end end
-- the ids already recorded, per event-time hour (a redelivery is recognised before the late check)
local hour, ids_of = {}, {}
for i, e in ipairs(events) do
  local h = math.floor(e.ts / HOUR)
  hour[i] = h
  local l = ids_of[h]
  if not l then l = {}; ids_of[h] = l end
  l[#l + 1] = e.id
end
local known = {}                      -- hour -> {id -> true}: in that hour's dedupe set before this step
for h, ids in pairs(ids_of) do
  local kh = {}
  known[h] = kh
  each_slice(ids, function(a, b)
    local r = redis.call('SMISMEMBER', P .. ':dd:' .. h, unpack(ids, a, b))
    for j = 1, #r do if r[j] == 1 then kh[ids[a + j - 1]] = true end end
  end)
end
local added = {}                      -- hour -> ids recorded by this step, in order
local recorded = {}                   -- hour .. '|' .. id recorded by this step (a second copy is a duplicate)
local e_inc, u_inc, e_last, u_last = {}, {}, {}, {}
local hist, uev = {}, {}              -- user -> {property -> latest time}, {"time|type|property", ...}
for i, e in ipairs(events) do
  local h = hour[i]
  local late = e.k == 'i' and e.ts < clock - lateness
  if known[h][e.id] or recorded[h .. '|' .. e.id] then
    outcomes[i] = 'duplicate'
    if e.k == 'i' then touch(eng, e.p, false); touch(usr, e.u, false) else touch(prop, e.p, false) end
  elseif late then
    outcomes[i] = 'late'
  else
    outcomes[i] = 'processed'
    recorded[h .. '|' .. e.id] = true
    local l = added[h]
    if not l then l = {}; added[h] = l end
    l[#l + 1] = e.id
    if e.ts > clock then clock = e.ts end
    if e.k == 'i' then
      bump(e_inc, e.p, e.t .. ':' .. h, 1)
      if e.t == 'v' then bump(e_inc, e.p, 'v5:' .. math.floor(e.ts / FINE), 1) end
      maxof(e_last, e.p, e.ts)
      bump(u_inc, e.u, 'n:' .. h, 1)
      maxof(u_last, e.u, e.ts)
      local hu = hist[e.u]
      if not hu then hu = {}; hist[e.u] = hu end
      maxof(hu, e.p, e.ts)
      local lu = uev[e.u]
      if not lu then lu = {}; uev[e.u] = lu end
      lu[#lu + 1] = string.format('%.3f', e.ts) .. '|' .. e.t .. '|' .. e.p
      touch(eng, e.p, true); touch(usr, e.u, true)
    else                              -- property events are few: applied one by one, in order
      local pk = P .. ':prop:' .. e.p
      for k, v in pairs(e.a) do  -- per-attribute event time: an older event never overwrites a newer value
        local at = tonumber(redis.call('HGET', pk, '@' .. k) or '-1')
        if e.ts >= at then redis.call('HSET', pk, k, v, '@' .. k, string.format('%.6f', e.ts)) end
      end
      maxfield(pk, '_ts', e.ts)
      redis.call('ZADD', P .. ':props', 'GT', e.ts, e.p)
      touch(prop, e.p, true)
    end
  end
end
for h, ids in pairs(added) do
  redis.call('ZADD', P .. ':dd_hours', h, h)
  each_slice(ids, function(a, b) redis.call('SADD', P .. ':dd:' .. h, unpack(ids, a, b)) end)
end
redis.call('SET', P .. ':clock', string.format('%.6f', clock))
-- drop dedupe sets older than the lateness bound plus the margin (duplicates of such events are late anyway)
local cutoff = math.floor((clock - lateness - margin) / HOUR) - 1
for _, hh in ipairs(redis.call('ZRANGEBYSCORE', P .. ':dd_hours', '-inf', cutoff)) do
  redis.call('DEL', P .. ':dd:' .. hh)
end
redis.call('ZREMRANGEBYSCORE', P .. ':dd_hours', '-inf', cutoff)
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function version(key, changed)
  local v = tonumber(redis.call('HGET', key, '_v') or '0')
  if changed or v == 0 then
    v = math.max(v + 1, now_us)
    redis.call('HSET', key, '_v', string.format('%d', v))
  end
end
local min_h = math.floor(clock / HOUR) - keep_h
local min_m = math.floor(clock / FINE) - fine_keep
local function expired(f)             -- an hourly ('<letter>:<hour>') or fine ('v5:<bucket>') counter past retention
  local kind, b = string.match(f, '^(%w+):(%-?%d+)$')
  if kind == 'v5' then return tonumber(b) < min_m elseif kind then return tonumber(b) < min_h end
  return false
end
-- a counter hash after this step: stored + increments, `last` raised, a new version where changed (or none
-- yet), buckets past retention dropped; written in one HSET and one HDEL; returns the kept fields, flat, and
-- the version before this step
local function settle(key, inc, last, changed)
  local flat = redis.call('HGETALL', key)
  local h = {}
  for j = 1, #flat, 2 do h[flat[j]] = flat[j + 1] end
  local v_before = h['_v'] or ''
  local set = {}
  if inc then
    for f, n in pairs(inc) do h[f] = string.format('%d', (tonumber(h[f]) or 0) + n); set[#set + 1] = f end
  end
  if last and last > tonumber(h['last'] or '-1') then h['last'] = string.format('%.6f', last); set[#set + 1] = 'last' end
  local v = tonumber(h['_v'] or '0')
  if changed or v == 0 then h['_v'] = string.format('%d', math.max(v + 1, now_us)); set[#set + 1] = '_v' end
  local args, gone, keep = {}, {}, {}
  for _, f in ipairs(set) do
    if not expired(f) then args[#args + 1] = f; args[#args + 1] = h[f] end
  end
  for f, val in pairs(h) do
    if expired(f) then gone[#gone + 1] = f else keep[#keep + 1] = f; keep[#keep + 1] = val end
  end
  each_slice(args, function(a, b) redis.call('HSET', key, unpack(args, a, b)) end)
  each_slice(gone, function(a, b) redis.call('HDEL', key, unpack(gone, a, b)) end)
  return keep, v_before
end
-- (the users' histories are trimmed here and read by recent_history(), not returned: nothing reads them per batch;
-- of the users' event lists only what this step appended is returned, after the user's version before the step:
-- RedisState keeps the lists it has seen and reads a whole list only where its copy is not of that version)
local res = {outcomes = outcomes, clock = string.format('%.6f', clock), eng = {}, prop = {}, usr = {}, uev = {}}
for id, changed in pairs(eng) do
  res.eng[id] = settle(P .. ':eng:' .. id, e_inc[id], e_last[id], changed)
end
for id, changed in pairs(prop) do
  local k = P .. ':prop:' .. id; version(k, changed); res.prop[id] = redis.call('HGETALL', k)
end
for id, changed in pairs(usr) do
  local v_before
  res.usr[id], v_before = settle(P .. ':user:' .. id, u_inc[id], u_last[id], changed)
  local hk = P .. ':hist:' .. id
  if hist[id] then
    local pairs_ = {}
    for p, ts in pairs(hist[id]) do pairs_[#pairs_ + 1] = ts; pairs_[#pairs_ + 1] = p end
    each_slice(pairs_, function(a, b) redis.call('ZADD', hk, 'GT', unpack(pairs_, a, b)) end)
  end
  redis.call('ZREMRANGEBYRANK', hk, 0, -(hist_len + 1))
  local lk = P .. ':uev:' .. id
  if uev[id] then each_slice(uev[id], function(a, b) redis.call('RPUSH', lk, unpack(uev[id], a, b)) end) end
  redis.call('LTRIM', lk, -uev_len, -1)
  local new = {v_before}
  for _, x in ipairs(uev[id] or {}) do new[#new + 1] = x end
  res.uev[id] = new
end
-- the same batch again (its caller retried after a lost reply: Redis stopped right after running it): the first
-- run's outcomes, not "duplicate" for the batch's own events; kept one hour
if cfg.batch then
  local bk = P .. ':batch:' .. cfg.batch
  local first = redis.call('GET', bk)
  if first then res.outcomes = cjson.decode(first) else redis.call('SET', bk, cjson.encode(outcomes), 'EX', 3600) end
end
return cjson.encode(res)
