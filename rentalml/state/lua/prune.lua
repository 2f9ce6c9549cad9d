-- drop the hourly ('<letter>:<hour>') and fine ('v5:<bucket>') counter fields older than the windows need
-- (min_h, min_m in scope); returns the kept fields as a flat list. Included by touch.lua.
local function prune(key)
  local flat = redis.call('HGETALL', key)
  local keep = {}
  for j = 1, #flat, 2 do
    local f = flat[j]
    local kind, b = string.match(f, '^(%w+):(%-?%d+)$')
    local old = false
    if kind == 'v5' then old = tonumber(b) < min_m elseif kind then old = tonumber(b) < min_h end
    if old then redis.call('HDEL', key, f) else keep[#keep + 1] = f; keep[#keep + 1] = flat[j + 1] end
  end
  return keep
end
