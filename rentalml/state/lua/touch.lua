-- New version + pruned counters of properties whose windows moved on without new events.
-- KEYS[1] = key prefix; ARGV[1] = JSON {keep_h, hour, fine, fine_keep}; ARGV[2..] = property ids.
local P = KEYS[1]
local cfg = cjson.decode(ARGV[1])
local clock = tonumber(redis.call('GET', P .. ':clock') or '0')
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local min_h = math.floor(clock / cfg.hour) - cfg.keep_h
local min_m = math.floor(clock / cfg.fine) - cfg.fine_keep
local res = {clock = string.format('%.6f', clock), eng = {}}
--#include prune.lua
for i = 2, #ARGV do
  local k = P .. ':eng:' .. ARGV[i]
  if redis.call('EXISTS', k) == 1 then
    local v = tonumber(redis.call('HGET', k, '_v') or '0')
    redis.call('HSET', k, '_v', string.format('%d', math.max(v + 1, now_us)))
    res.eng[ARGV[i]] = prune(k)
  end
end
return cjson.encode(res)
