"""The Redis backend of the stream state store: each apply / refresh is one Lua script (rentalml/state/lua/,
package data), so a batch is atomic and the processor replicas may share one Redis."""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources

import orjson

from rentalml.config import Settings

from .base import Applied, StateStore, decode_attributes, user_event

_INCLUDE = re.compile(r"^--#include (\S+)$", re.M)


@cache
def lua(name: str) -> str:
    """The Lua script `name` (rentalml/state/lua/), with its `--#include other.lua` lines expanded."""
    text = resources.files(__package__).joinpath("lua", name).read_text(encoding="utf-8")
    return _INCLUDE.sub(lambda m: lua(m.group(1)), text)


def _pairs(flat) -> dict[str, str]:
    if isinstance(flat, dict):  # cjson encodes an empty table as {}
        return {}
    return dict(zip(flat[::2], flat[1::2], strict=True))


class RedisState(StateStore):
    def __init__(self, settings: Settings, url: str):
        super().__init__(settings)
        import redis

        self.redis = redis.Redis.from_url(url, decode_responses=True)
        self._script = self.redis.register_script(lua("apply.lua"))
        self._touch = self.redis.register_script(lua("touch.lua"))
        #: user -> (the user hash's `_v`, its event list P:uev:{uid} at that version, decoded): apply.lua returns
        #: only what a step appended (most of a list is the same from batch to batch); a copy that is not of the
        #: version the step started from (first sight, another instance wrote meanwhile, a retried step whose
        #: reply was lost, Redis restarted) is read again whole after the step
        self._uev: dict[str, tuple[str, list[tuple[float, str, str]]]] = {}

    #: events per Lua run. A script blocks Redis while it runs, and the Feast online store and the recommendation
    #: cache share this Redis with serving: a large batch runs as several atomic steps of at most this many events
    #: (pipelined, one round trip), so serving waits at most one step (~50 ms), not the whole batch. Each event's
    #: step is atomic (dedupe + counters), which is what the exactly-once effect needs.
    chunk = 2000

    def apply(self, events: list[dict], batch: str | None = None) -> Applied:
        if not events:
            return Applied([], float(self.redis.get(f"{self.prefix}:clock") or 0.0))
        pipe = self.redis.pipeline(transaction=False)
        for n, i in enumerate(range(0, len(events), self.chunk)):
            params = self._params(events[i:i + self.chunk]) | ({"batch": f"{batch}:{n}"} if batch else {})
            self._script(keys=[self.prefix], args=[orjson.dumps(params)], client=pipe)
        out = Applied([], 0.0)
        if len(self._uev) > 200_000:  # bounded: users are many
            self._uev.clear()
        cache, n_keep, stale = self._uev, self.taste_events, set()
        for text in pipe.execute():  # in order: a later step's snapshot of an entity supersedes an earlier one
            raw = orjson.loads(text)
            out.outcomes += raw["outcomes"] if isinstance(raw["outcomes"], list) else []
            out.clock = float(raw["clock"])
            out.engagement.update((k, _pairs(v)) for k, v in raw["eng"].items())
            out.properties.update((k, _pairs(v)) for k, v in raw["prop"].items())
            users = {k: _pairs(v) for k, v in raw["usr"].items()}
            out.users.update(users)
            for u, (v_before, *new) in raw["uev"].items():  # the version before the step, then what it appended
                mine = cache.get(u)
                if u in stale or mine is None or mine[0] != v_before:
                    stale.add(u)
                    continue
                lst = mine[1] + [user_event(x) for x in new] if new else mine[1]
                cache[u] = (users[u].get("_v", ""), lst[-n_keep:])
        if stale:  # whole lists, with the version they are of, in one transaction
            pipe = self.redis.pipeline(transaction=True)
            order = list(stale)
            for u in order:
                pipe.hget(f"{self.prefix}:user:{u}", "_v")
                pipe.lrange(f"{self.prefix}:uev:{u}", 0, -1)
            got = pipe.execute()
            for i, u in enumerate(order):
                cache[u] = (got[2 * i] or "", [user_event(x) for x in got[2 * i + 1]])
        out.user_events = {u: cache[u][1] for u in out.users}
        return out

    def refresh_engagement(self, property_ids: list[str]) -> Applied:
        if not property_ids:
            return Applied([], float(self.redis.get(f"{self.prefix}:clock") or 0.0))
        raw = orjson.loads(self._touch(keys=[self.prefix], args=[orjson.dumps(self._buckets()), *property_ids]))
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
