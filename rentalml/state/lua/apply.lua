-- One atomic apply of a batch of encoded events (rentalml.state.base: StateStore.apply documents the semantics;
-- rentalml.state.sqlite is the same algorithm in one SQLite transaction).
-- KEYS[1] = key prefix; ARGV[1] = JSON {events, lateness, margin, hist, uev, keep_h, hour, fine, fine_keep}
-- (bucket sizes and retention come from rentalml.features.formulas through StateStore._params).
local P = KEYS[1]
local cfg = cjson.decode(ARGV[1])
local lateness, margin, hist_len, keep_h, uev_len = cfg.lateness, cfg.margin, cfg.hist, cfg.keep_h, cfg.uev
local HOUR, FINE, fine_keep = cfg.hour, cfg.fine, cfg.fine_keep
local clock = tonumber(redis.call('GET', P .. ':clock') or '0')
local outcomes = {}
local eng, prop, usr = {}, {}, {}     -- touched entity -> changed (true) / touched only (false)
local function touch(t, id, changed) if changed or t[id] == nil then t[id] = changed end end
local function maxfield(key, f, v)
  local old = tonumber(redis.call('HGET', key, f) or '-1')
  if v > old then redis.call('HSET', key, f, string.format('%.6f', v)) end
end
local dd_hours = {}                   -- the hours whose dedupe set this batch added to
for i, e in ipairs(cfg.events) do
  local h = math.floor(e.ts / HOUR)
  local ddk = P .. ':dd:' .. h
  -- a redelivery is recognised first, then a late event; otherwise the id is recorded. An event that may be
  -- late asks SISMEMBER; any other records its id at once (SADD answers 0 where it was there: a duplicate)
  local late = e.k == 'i' and e.ts < clock - lateness
  local seen
  if late then seen = redis.call('SISMEMBER', ddk, e.id) == 1 else seen = redis.call('SADD', ddk, e.id) == 0 end
  if seen then
    outcomes[i] = 'duplicate'
    if e.k == 'i' then touch(eng, e.p, false); touch(usr, e.u, false) else touch(prop, e.p, false) end
  elseif late then
    outcomes[i] = 'late'
  else
    outcomes[i] = 'processed'
    if not dd_hours[h] then dd_hours[h] = true; redis.call('ZADD', P .. ':dd_hours', h, h) end
    if e.ts > clock then clock = e.ts end
    if e.k == 'i' then
      local ek = P .. ':eng:' .. e.p
      redis.call('HINCRBY', ek, e.t .. ':' .. h, 1)
      if e.t == 'v' then redis.call('HINCRBY', ek, 'v5:' .. math.floor(e.ts / FINE), 1) end
      maxfield(ek, 'last', e.ts)
      local uk = P .. ':user:' .. e.u
      redis.call('HINCRBY', uk, 'n:' .. h, 1)
      maxfield(uk, 'last', e.ts)
      redis.call('ZADD', P .. ':hist:' .. e.u, 'GT', e.ts, e.p)
      redis.call('RPUSH', P .. ':uev:' .. e.u, string.format('%.3f', e.ts) .. '|' .. e.t .. '|' .. e.p)
      touch(eng, e.p, true); touch(usr, e.u, true)
    else
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
--#include prune.lua
-- (the users' histories are trimmed here and read by recent_history(), not returned: nothing reads them per batch)
local res = {outcomes = outcomes, clock = string.format('%.6f', clock), eng = {}, prop = {}, usr = {}, uev = {}}
for id, changed in pairs(eng) do
  local k = P .. ':eng:' .. id; version(k, changed); res.eng[id] = prune(k)
end
for id, changed in pairs(prop) do
  local k = P .. ':prop:' .. id; version(k, changed); res.prop[id] = redis.call('HGETALL', k)
end
for id, changed in pairs(usr) do
  local k = P .. ':user:' .. id; version(k, changed); res.usr[id] = prune(k)
  local hk = P .. ':hist:' .. id
  redis.call('ZREMRANGEBYRANK', hk, 0, -(hist_len + 1))
  local lk = P .. ':uev:' .. id
  redis.call('LTRIM', lk, -uev_len, -1)
  res.uev[id] = redis.call('LRANGE', lk, 0, -1)
end
-- the same batch again (its caller retried after a lost reply: Redis stopped right after running it): the first
-- run's outcomes, not "duplicate" for the batch's own events; kept one hour
if cfg.batch then
  local bk = P .. ':batch:' .. cfg.batch
  local first = redis.call('GET', bk)
  if first then res.outcomes = cjson.decode(first) else redis.call('SET', bk, cjson.encode(outcomes), 'EX', 3600) end
end
return cjson.encode(res)
