"""The stream processor's state store: dedupe set, windowed counters, property attributes, user histories.

One `apply(events)` call is ONE atomic step (a Lua script in Redis, one transaction in SQLite) that, per event
in order: recognises a redelivery by its event id (→ "duplicate", nothing changes), rejects an event older
than the watermark (→ "late"), otherwise records the id and updates the counters (→ "processed"). It returns
the absolute state of every entity the batch touched, read in the same atomic step, with a per-entity version
(microseconds, strictly increasing on every change) used as the Feast `event_timestamp`, so an older snapshot
can never overwrite a newer one in the online store.

Key layout (Redis; SQLite stores the same keys in tables `hashes(key, field, value)`, `zsets(key, member,
score)`, `sets(key, member)`). P = settings.stream.key_prefix (default "rentalml:stream"):

  P:clock            string  max event time seen (epoch seconds); watermark = clock - allowed_lateness_s
  P:dd:{hour}        set     event ids of that event-time hour (dedupe; dropped after lateness + margin)
  P:dd_hours         zset    the hours that have a P:dd:{hour} set
  P:eng:{pid}        hash    v|s|i|a|l:{hour} counts per event type and hour, v5:{5-min bucket} view counts,
                             last = latest event time, _v = version
  P:prop:{pid}       hash    property attributes, each value JSON-encoded; @{attribute} = event time of its
                             value (an older event never overwrites a newer value; property events are never
                             "late"); _ts = time of the latest property event; _v = version
  P:eng_due          zset    property_id -> event time at which its window values next change without a new
                             event (the processor re-pushes it once the clock passes that time)
  P:user:{uid}       hash    n:{hour} event counts, last, _v
  P:props            zset    property_id -> time of its latest property event (`properties_since(ts)`: how
                             serving finds listings its model has never seen)
  P:hist:{uid}       zset    property_id -> time of the user's latest interaction with it (the newest
                             `history_len` properties; `recent_history(user_id)` reads it oldest -> newest)
  P:uev:{uid}        list    the user's newest `taste_events` interactions as "epoch|type letter|property_id"
                             (arrival order), the input of the user_taste features
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rentalml.config import Settings, get_settings

HOUR = 3600
FIVE_MIN = 300
WEEK_HOURS = 168
#: event_type -> counter letter
TYPE_CODE = {"view": "v", "save": "s", "inquiry": "i", "application": "a", "lease": "l"}


@dataclass
class Applied:
    """What one atomic apply did and the absolute state of the touched entities after it."""

    outcomes: list[str]
    clock: float
    engagement: dict[str, dict[str, str]] = field(default_factory=dict)
    properties: dict[str, dict[str, str]] = field(default_factory=dict)
    users: dict[str, dict[str, str]] = field(default_factory=dict)
    histories: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    #: per touched user: recent interactions (event time, event type letter, property id), arrival order
    user_events: dict[str, list[tuple[float, str, str]]] = field(default_factory=dict)


def encode_event(ev) -> dict:
    """The compact form of a validated event (rentalml.schema Interaction | PropertyEvent) the state stores see."""
    ts = ev.timestamp.timestamp()
    if hasattr(ev, "user_id"):
        return {"id": ev.event_id, "k": "i", "t": TYPE_CODE[ev.event_type], "u": ev.user_id, "p": ev.property_id,
                "ts": ts}
    return {"id": ev.event_id, "k": "p", "t": ev.event_type, "p": ev.property_id, "ts": ts,
            "a": {k: json.dumps(v) for k, v in ev.changed().items()}}


class StateStore:
    """Base class: settings-derived parameters and the public readers."""

    def __init__(self, settings: Settings):
        s = settings.stream
        self.prefix = s.key_prefix
        self.lateness = float(s.allowed_lateness_s)
        self.margin = float(s.dedupe_margin_s)
        self.history_len = int(s.history_len)
        self.taste_events = int(s.taste_events)

    def _params(self, events: list[dict]) -> dict:
        return {"events": events, "lateness": self.lateness, "margin": self.margin, "hist": self.history_len,
                "uev": self.taste_events,
                "keep_h": WEEK_HOURS + math.ceil(self.lateness / HOUR) + 1}

    def apply(self, events: list[dict]) -> Applied:  # pragma: no cover - interface
        raise NotImplementedError

    def recent_history(self, user_id: str) -> list[str]:  # pragma: no cover - interface
        raise NotImplementedError

    def refresh_engagement(self, property_ids: list[str]) -> Applied:  # pragma: no cover - interface
        """New version + pruned counters of properties whose windows moved on without new events."""
        raise NotImplementedError

    def due(self, clock: float, limit: int = 5000) -> list[str]:  # pragma: no cover - interface
        """Properties whose window values change at or before `clock` (scheduled by `schedule`)."""
        raise NotImplementedError

    def schedule(self, due: dict[str, float | None]) -> None:  # pragma: no cover - interface
        """property -> event time at which its window values next change (None: never)."""
        raise NotImplementedError

    def property_attributes(self, property_ids: list[str]) -> dict[str, dict]:  # pragma: no cover
        raise NotImplementedError

    def properties_since(self, ts: float) -> list[tuple[str, float]]:  # pragma: no cover - interface
        """(property id, event time) of properties with a property event at or after `ts`, oldest first."""
        raise NotImplementedError

    def seed_properties(self, attrs: dict[str, dict]) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


def decode_attributes(h: dict[str, str]) -> dict:
    return {k: json.loads(v) for k, v in h.items() if not k.startswith(("_", "@"))}


# ----------------------------------------------------------------------------------------------------- Redis
# drop the hourly ('h:<hour>') and 5-minute ('v5:<slot>') counter fields older than the windows need (min_h, min_m
# in scope); returns the kept fields as a flat list. Shared by the apply and the refresh scripts.
_LUA_PRUNE = r"""
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
"""

_LUA = r"""
local P = KEYS[1]
local cfg = cjson.decode(ARGV[1])
local lateness, margin, hist_len, keep_h, uev_len = cfg.lateness, cfg.margin, cfg.hist, cfg.keep_h, cfg.uev
local clock = tonumber(redis.call('GET', P .. ':clock') or '0')
local outcomes = {}
local eng, prop, usr = {}, {}, {}     -- touched entity -> changed (true) / touched only (false)
local function touch(t, id, changed) if changed or t[id] == nil then t[id] = changed end end
local function maxfield(key, f, v)
  local old = tonumber(redis.call('HGET', key, f) or '-1')
  if v > old then redis.call('HSET', key, f, string.format('%.6f', v)) end
end
for i, e in ipairs(cfg.events) do
  local h = math.floor(e.ts / 3600)
  local ddk = P .. ':dd:' .. h
  if redis.call('SISMEMBER', ddk, e.id) == 1 then
    outcomes[i] = 'duplicate'
    if e.k == 'i' then touch(eng, e.p, false); touch(usr, e.u, false) else touch(prop, e.p, false) end
  elseif e.k == 'i' and e.ts < clock - lateness then
    outcomes[i] = 'late'
  else
    outcomes[i] = 'processed'
    redis.call('SADD', ddk, e.id)
    redis.call('ZADD', P .. ':dd_hours', h, h)
    if e.ts > clock then clock = e.ts end
    if e.k == 'i' then
      local ek = P .. ':eng:' .. e.p
      redis.call('HINCRBY', ek, e.t .. ':' .. h, 1)
      if e.t == 'v' then redis.call('HINCRBY', ek, 'v5:' .. math.floor(e.ts / 300), 1) end
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
local cutoff = math.floor((clock - lateness - margin) / 3600) - 1
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
local min_h = math.floor(clock / 3600) - keep_h
local min_m = math.floor(clock / 300) - 24
""" + _LUA_PRUNE + r"""
local res = {outcomes = outcomes, clock = string.format('%.6f', clock), eng = {}, prop = {}, usr = {}, hist = {},
             uev = {}}
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
  res.hist[id] = redis.call('ZRANGE', hk, 0, -1, 'WITHSCORES')
  local lk = P .. ':uev:' .. id
  redis.call('LTRIM', lk, -uev_len, -1)
  res.uev[id] = redis.call('LRANGE', lk, 0, -1)
end
return cjson.encode(res)
"""


_LUA_TOUCH = r"""
local P = KEYS[1]
local keep_h = tonumber(ARGV[1])
local clock = tonumber(redis.call('GET', P .. ':clock') or '0')
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local min_h = math.floor(clock / 3600) - keep_h
local min_m = math.floor(clock / 300) - 24
local res = {clock = string.format('%.6f', clock), eng = {}}
""" + _LUA_PRUNE + r"""
for i = 2, #ARGV do
  local k = P .. ':eng:' .. ARGV[i]
  if redis.call('EXISTS', k) == 1 then
    local v = tonumber(redis.call('HGET', k, '_v') or '0')
    redis.call('HSET', k, '_v', string.format('%d', math.max(v + 1, now_us)))
    res.eng[ARGV[i]] = prune(k)
  end
end
return cjson.encode(res)
"""


def _user_event(x: str) -> tuple[float, str, str]:
    ts, t, pid = x.split("|", 2)
    return float(ts), t, pid


def _pairs(flat) -> dict[str, str]:
    if isinstance(flat, dict):  # cjson encodes an empty table as {}
        return {}
    return dict(zip(flat[::2], flat[1::2], strict=True))


class RedisState(StateStore):
    def __init__(self, settings: Settings, url: str):
        super().__init__(settings)
        import redis

        self.redis = redis.Redis.from_url(url, decode_responses=True)
        self._script = self.redis.register_script(_LUA)
        self._touch = self.redis.register_script(_LUA_TOUCH)

    def apply(self, events: list[dict]) -> Applied:
        if not events:
            return Applied([], float(self.redis.get(f"{self.prefix}:clock") or 0.0))
        raw = json.loads(self._script(keys=[self.prefix], args=[json.dumps(self._params(events))]))
        outcomes = raw["outcomes"] if isinstance(raw["outcomes"], list) else []
        hist = {u: [(flat[j], float(flat[j + 1])) for j in range(0, len(flat), 2)] if isinstance(flat, list) else []
                for u, flat in raw["hist"].items()}  # ZRANGE order: oldest -> newest
        uev = {u: [_user_event(x) for x in flat] if isinstance(flat, list) else [] for u, flat in raw["uev"].items()}
        return Applied(outcomes, float(raw["clock"]),
                       {k: _pairs(v) for k, v in raw["eng"].items()},
                       {k: _pairs(v) for k, v in raw["prop"].items()},
                       {k: _pairs(v) for k, v in raw["usr"].items()}, hist, uev)

    def refresh_engagement(self, property_ids: list[str]) -> Applied:
        if not property_ids:
            return Applied([], float(self.redis.get(f"{self.prefix}:clock") or 0.0))
        raw = json.loads(self._touch(keys=[self.prefix], args=[self._params([])["keep_h"], *property_ids]))
        return Applied([], float(raw["clock"]), {k: _pairs(v) for k, v in raw["eng"].items()})

    def due(self, clock: float, limit: int = 5000) -> list[str]:
        return self.redis.zrangebyscore(f"{self.prefix}:eng_due", "-inf", clock, start=0, num=limit)

    def schedule(self, due: dict[str, float | None]) -> None:
        key = f"{self.prefix}:eng_due"
        pipe = self.redis.pipeline(transaction=False)
        later = {p: t for p, t in due.items() if t is not None}
        if later:
            pipe.zadd(key, later)
        gone = [p for p, t in due.items() if t is None]
        if gone:
            pipe.zrem(key, *gone)
        pipe.execute()

    def recent_history(self, user_id: str) -> list[str]:
        return self.redis.zrange(f"{self.prefix}:hist:{user_id}", 0, -1)

    def properties_since(self, ts: float) -> list[tuple[str, float]]:
        return [(m, float(sc)) for m, sc in self.redis.zrangebyscore(f"{self.prefix}:props", ts, "+inf",
                                                                     withscores=True)]

    def property_attributes(self, property_ids: list[str]) -> dict[str, dict]:
        pipe = self.redis.pipeline(transaction=False)
        for pid in property_ids:
            pipe.hgetall(f"{self.prefix}:prop:{pid}")
        return {pid: decode_attributes(h) for pid, h in zip(property_ids, pipe.execute(), strict=True) if h}

    def seed_properties(self, attrs: dict[str, dict]) -> int:
        """Attributes of properties the stream has not seen yet (from the dataset / DB of record)."""
        pipe = self.redis.pipeline(transaction=False)
        for pid in attrs:
            pipe.exists(f"{self.prefix}:prop:{pid}")
        exists = pipe.execute()
        n = 0
        for (pid, a), ex in zip(attrs.items(), exists, strict=True):
            if not ex:
                pipe.hset(f"{self.prefix}:prop:{pid}", mapping={k: json.dumps(v) for k, v in a.items()})
                n += 1
        pipe.execute()
        return n

    def close(self) -> None:
        self.redis.close()


# ----------------------------------------------------------------------------------------------------- SQLite
_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS hashes (key TEXT, field TEXT, value TEXT, PRIMARY KEY (key, field));
CREATE TABLE IF NOT EXISTS zsets (key TEXT, member TEXT, score REAL, PRIMARY KEY (key, member));
CREATE TABLE IF NOT EXISTS lists (seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT, value TEXT);
CREATE INDEX IF NOT EXISTS lists_key ON lists (key, seq);
CREATE TABLE IF NOT EXISTS dedupe (event_id TEXT PRIMARY KEY, hour INTEGER);
CREATE INDEX IF NOT EXISTS dedupe_hour ON dedupe (hour);
"""


class SQLiteState(StateStore):
    """The same semantics as the Lua script, one SQLite transaction per apply (single processor instance)."""

    def __init__(self, settings: Settings, path: Path):
        super().__init__(settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        # readers (a server's request threads) share the connection: serialized by SQLite and by self._read
        self.db = sqlite3.connect(str(path), isolation_level=None, timeout=30, check_same_thread=False)
        self._read = threading.Lock()
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)

    # small hash/zset helpers over the tables
    def _hget(self, key: str, f: str) -> str | None:
        row = self.db.execute("SELECT value FROM hashes WHERE key=? AND field=?", (key, f)).fetchone()
        return row[0] if row else None

    def _hset(self, key: str, f: str, v: str) -> None:
        self.db.execute("INSERT INTO hashes VALUES (?,?,?) ON CONFLICT(key, field) DO UPDATE SET value=excluded.value",
                        (key, f, v))

    def _hincr(self, key: str, f: str) -> None:
        self.db.execute("INSERT INTO hashes VALUES (?,?,'1') ON CONFLICT(key, field) DO UPDATE SET "
                        "value=CAST(CAST(value AS INTEGER) + 1 AS TEXT)", (key, f))

    def _hgetall(self, key: str) -> dict[str, str]:
        return dict(self.db.execute("SELECT field, value FROM hashes WHERE key=?", (key,)).fetchall())

    def _prune(self, key: str, min_h: int, min_m: int) -> dict[str, str]:
        """Delete counter fields older than the windows need (as _LUA_PRUNE); return the kept fields."""
        out = {}
        for f, v in self._hgetall(key).items():
            kind, _, b = f.partition(":")
            if b and b.lstrip("-").isdigit() and int(b) < (min_m if kind == "v5" else min_h):
                self.db.execute("DELETE FROM hashes WHERE key=? AND field=?", (key, f))
            else:
                out[f] = v
        return out

    def _maxfield(self, key: str, f: str, v: float) -> None:
        old = self._hget(key, f)
        if old is None or v > float(old):
            self._hset(key, f, f"{v:.6f}")

    def apply(self, events: list[dict]) -> Applied:
        P, db = self.prefix, self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT value FROM kv WHERE key=?", (f"{P}:clock",)).fetchone()
            clock = float(row[0]) if row else 0.0
            outcomes: list[str] = []
            eng: dict[str, bool] = {}
            prop: dict[str, bool] = {}
            usr: dict[str, bool] = {}

            def touch(t: dict, i: str, changed: bool) -> None:
                if changed or i not in t:
                    t[i] = changed

            for e in events:
                h = math.floor(e["ts"] / HOUR)
                if db.execute("SELECT 1 FROM dedupe WHERE event_id=?", (e["id"],)).fetchone():
                    outcomes.append("duplicate")
                    if e["k"] == "i":
                        touch(eng, e["p"], False)
                        touch(usr, e["u"], False)
                    else:
                        touch(prop, e["p"], False)
                    continue
                if e["k"] == "i" and e["ts"] < clock - self.lateness:
                    outcomes.append("late")
                    continue
                outcomes.append("processed")
                db.execute("INSERT INTO dedupe VALUES (?,?)", (e["id"], h))
                clock = max(clock, e["ts"])
                if e["k"] == "i":
                    ek = f"{P}:eng:{e['p']}"
                    self._hincr(ek, f"{e['t']}:{h}")
                    if e["t"] == "v":
                        self._hincr(ek, f"v5:{math.floor(e['ts'] / FIVE_MIN)}")
                    self._maxfield(ek, "last", e["ts"])
                    uk = f"{P}:user:{e['u']}"
                    self._hincr(uk, f"n:{h}")
                    self._maxfield(uk, "last", e["ts"])
                    db.execute("INSERT INTO zsets VALUES (?,?,?) ON CONFLICT(key, member) DO UPDATE SET "
                               "score=MAX(score, excluded.score)", (f"{P}:hist:{e['u']}", e["p"], e["ts"]))
                    db.execute("INSERT INTO lists (key, value) VALUES (?,?)",
                               (f"{P}:uev:{e['u']}", f"{e['ts']:.3f}|{e['t']}|{e['p']}"))
                    touch(eng, e["p"], True)
                    touch(usr, e["u"], True)
                else:
                    pk = f"{P}:prop:{e['p']}"
                    for k, v in e["a"].items():
                        at = self._hget(pk, "@" + k)
                        if at is None or e["ts"] >= float(at):
                            self._hset(pk, k, v)
                            self._hset(pk, "@" + k, f"{e['ts']:.6f}")
                    self._maxfield(pk, "_ts", e["ts"])
                    db.execute("INSERT INTO zsets VALUES (?,?,?) ON CONFLICT(key, member) DO UPDATE SET "
                               "score=MAX(score, excluded.score)", (f"{P}:props", e["p"], e["ts"]))
                    touch(prop, e["p"], True)
            db.execute("INSERT INTO kv VALUES (?,?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                       (f"{P}:clock", f"{clock:.6f}"))
            db.execute("DELETE FROM dedupe WHERE hour < ?",
                       (math.floor((clock - self.lateness - self.margin) / HOUR) - 1,))
            now_us = time.time_ns() // 1000
            min_h = math.floor(clock / HOUR) - self._params([])["keep_h"]
            min_m = math.floor(clock / FIVE_MIN) - 24

            def version(key: str, changed: bool) -> None:
                v = int(self._hget(key, "_v") or 0)
                if changed or v == 0:
                    self._hset(key, "_v", str(max(v + 1, now_us)))

            res = Applied(outcomes, clock)
            for i, changed in eng.items():
                version(f"{P}:eng:{i}", changed)
                res.engagement[i] = self._prune(f"{P}:eng:{i}", min_h, min_m)
            for i, changed in prop.items():
                version(f"{P}:prop:{i}", changed)
                res.properties[i] = self._hgetall(f"{P}:prop:{i}")
            for i, changed in usr.items():
                version(f"{P}:user:{i}", changed)
                res.users[i] = self._prune(f"{P}:user:{i}", min_h, min_m)
                hk = f"{P}:hist:{i}"
                db.execute("DELETE FROM zsets WHERE key=? AND member NOT IN (SELECT member FROM zsets WHERE key=? "
                           "ORDER BY score DESC, member DESC LIMIT ?)", (hk, hk, self.history_len))
                res.histories[i] = [(m, s) for m, s in db.execute(
                    "SELECT member, score FROM zsets WHERE key=? ORDER BY score, member", (hk,)).fetchall()]
                lk = f"{P}:uev:{i}"
                db.execute("DELETE FROM lists WHERE key=? AND seq NOT IN (SELECT seq FROM lists WHERE key=? "
                           "ORDER BY seq DESC LIMIT ?)", (lk, lk, self.taste_events))
                res.user_events[i] = [_user_event(v) for (v,) in db.execute(
                    "SELECT value FROM lists WHERE key=? ORDER BY seq", (lk,)).fetchall()]
            db.execute("COMMIT")
            return res
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def refresh_engagement(self, property_ids: list[str]) -> Applied:
        db, P = self.db, self.prefix
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT value FROM kv WHERE key=?", (f"{P}:clock",)).fetchone()
            clock = float(row[0]) if row else 0.0
            res = Applied([], clock)
            now_us = time.time_ns() // 1000
            min_h = math.floor(clock / HOUR) - self._params([])["keep_h"]
            min_m = math.floor(clock / FIVE_MIN) - 24
            for pid in property_ids:
                key = f"{P}:eng:{pid}"
                h = self._hgetall(key)
                if not h:
                    continue
                self._hset(key, "_v", str(max(int(h.get("_v", 0)) + 1, now_us)))
                res.engagement[pid] = self._prune(key, min_h, min_m)
            db.execute("COMMIT")
            return res
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def due(self, clock: float, limit: int = 5000) -> list[str]:
        return [m for (m,) in self.db.execute("SELECT member FROM zsets WHERE key=? AND score<=? ORDER BY score "
                                              "LIMIT ?", (f"{self.prefix}:eng_due", clock, limit)).fetchall()]

    def schedule(self, due: dict[str, float | None]) -> None:
        key = f"{self.prefix}:eng_due"
        with self.db:
            for p, t in due.items():
                if t is None:
                    self.db.execute("DELETE FROM zsets WHERE key=? AND member=?", (key, p))
                else:
                    self.db.execute("INSERT INTO zsets VALUES (?,?,?) ON CONFLICT(key, member) DO UPDATE SET "
                                    "score=excluded.score", (key, p, t))

    def properties_since(self, ts: float) -> list[tuple[str, float]]:
        with self._read:
            return [(m, float(sc)) for m, sc in self.db.execute(
                "SELECT member, score FROM zsets WHERE key=? AND score>=? ORDER BY score, member",
                (f"{self.prefix}:props", ts)).fetchall()]

    def recent_history(self, user_id: str) -> list[str]:
        with self._read:
            return [m for (m,) in self.db.execute("SELECT member FROM zsets WHERE key=? ORDER BY score, member",
                                                  (f"{self.prefix}:hist:{user_id}",)).fetchall()]

    def property_attributes(self, property_ids: list[str]) -> dict[str, dict]:
        out = {}
        with self._read:
            for pid in property_ids:
                h = self._hgetall(f"{self.prefix}:prop:{pid}")
                if h:
                    out[pid] = decode_attributes(h)
        return out

    def seed_properties(self, attrs: dict[str, dict]) -> int:
        n = 0
        self.db.execute("BEGIN IMMEDIATE")
        for pid, a in attrs.items():
            key = f"{self.prefix}:prop:{pid}"
            if self.db.execute("SELECT 1 FROM hashes WHERE key=? LIMIT 1", (key,)).fetchone():
                continue
            for k, v in a.items():
                self._hset(key, k, json.dumps(v))
            n += 1
        self.db.execute("COMMIT")
        return n

    def close(self) -> None:
        self.db.close()


def open_state(settings: Settings | None = None) -> StateStore:
    """Redis when settings.redis_url is set, else SQLite at $RENTALML_HOME/stream/state.db."""
    settings = settings or get_settings()
    if settings.redis_url:
        return RedisState(settings, settings.redis_url)
    return SQLiteState(settings, settings.home_dir / "stream" / "state.db")


def recent_history(user_id: str, settings: Settings | None = None) -> list[str]:
    """The user's most recently interacted distinct property ids as seen by the stream, oldest -> newest
    (at most settings.stream.history_len); [] for a user the stream has not seen."""
    store = open_state(settings)
    try:
        return store.recent_history(user_id)
    finally:
        store.close()


def seed_from_dataset(store: StateStore, dataset) -> int:
    """Seed the attributes of properties the stream has not seen from a Dataset's properties table (as listed,
    available=1). Returns the number of properties seeded."""
    from rentalml.data.events import property_events

    return store.seed_properties({ev["property_id"]: {**ev["attributes"], "available": 1}
                                  for ev in property_events(dataset)})
