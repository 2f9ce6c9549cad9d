"""Recommendation cache: one key scheme and one invalidation API for serving and the stream processor.

Serving caches one recommendation row per (model version, user, k). Backends:
* in-process LRU with TTL (default; per server process), or
* Redis when `settings.redis_url` is set (shared by every server replica and worker): key
  `rec:{model_version}:{user_id}:{k}` → JSON row, with TTL; reverse-index sets `rec:u:{user_id}` and
  `rec:p:{property_id}` (the keys of the rows of that user / the rows containing that property) make
  invalidation exact.

Invalidation: `cache.invalidate_user(user_id)` drops every cached row of the user (all versions, all k) — call
it when the user's features change (a new interaction); `cache.invalidate_property(property_id)` drops every
cached row that lists the property — call it when the property changes (price, availability, delisting).
`invalidate(user_ids=..., property_ids=...)` is the hook for the stream processor: it reaches the shared Redis
cache when one is configured. In-process caches belong to their server process: a server invalidates them
through `POST /admin/invalidate`; otherwise the TTL bounds staleness.

Redis down (a restart, a network fault): a lookup answers "miss" for every user and a store is skipped, so
serving computes the rows itself and never fails a request for its cache; each failed call logs one line
("recommendation cache unavailable ...", at most every 10 s) and counts `ml_cache_errors_total{backend,op}`.
After a failure the cache is not tried again for `retry_after_s` (1 s), so an unreachable host does not add a
connect timeout to every request. Invalidation still raises: its caller decides (the stream processor logs it,
the TTL bounds staleness).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

import numpy as np
import orjson

from rentalml.config import Settings, get_settings

log = logging.getLogger(__name__)

PREFIX = "rec"


def _errors_counter():
    """ml_cache_errors_total in prometheus_client's default registry (serving's /metrics), created once."""
    from prometheus_client import REGISTRY, Counter

    existing = REGISTRY._names_to_collectors.get("ml_cache_errors_total")
    if existing is not None:
        return existing
    return Counter("ml_cache_errors_total", "Recommendation cache calls that failed (backend unreachable, "
                   "timeout) and were answered as misses / skipped, by backend and operation (get | put | "
                   "invalidate).", ["backend", "op"])


CACHE_ERRORS = _errors_counter()


def cache_key(model_version: str, user_id: str, k: int) -> str:
    return f"{PREFIX}:{model_version}:{user_id}:{int(k)}"


def user_index_key(user_id: str) -> str:
    return f"{PREFIX}:u:{user_id}"


def property_index_key(property_id: str) -> str:
    return f"{PREFIX}:p:{property_id}"


Row = tuple  # (property_ids: np.ndarray[object] (k,), scores: np.ndarray[float32] (k,), source: str)


class RecommendationCache:
    """Interface shared by the backends; `hits`/`misses`/`hit_rate` count this process's lookups."""

    backend = "none"

    def __init__(self, ttl_s: float):
        self.ttl_s = float(ttl_s)
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def get_many(self, model_version: str, user_ids: list[str], k: int) -> list[Row | None]:
        raise NotImplementedError

    def put_many(self, model_version: str, rows: list[tuple[str, Row]], k: int) -> None:
        raise NotImplementedError

    def put_rows(self, rows: list[tuple[str, str, int, Row]]) -> None:
        """Rows of several versions and k at once: (model_version, user_id, k, row) each."""
        groups: dict[tuple[str, int], list] = {}
        for version, u, k, row in rows:
            groups.setdefault((version, int(k)), []).append((u, row))
        for (version, k), items in groups.items():
            self.put_many(version, items, k)

    def get(self, model_version: str, user_id: str, k: int) -> Row | None:
        return self.get_many(model_version, [user_id], k)[0]

    def put(self, model_version: str, user_id: str, k: int, row: Row) -> None:
        self.put_many(model_version, [(user_id, row)], k)

    def invalidate_user(self, user_id: str) -> int:
        raise NotImplementedError

    def invalidate_property(self, property_id: str) -> int:
        raise NotImplementedError

    def invalidate_many(self, user_ids: Iterable[str] = (), property_ids: Iterable[str] = ()) -> int:
        """invalidate_user and invalidate_property over many ids; returns how many rows were dropped."""
        return (sum(self.invalidate_user(str(u)) for u in user_ids)
                + sum(self.invalidate_property(str(p)) for p in property_ids))

    def clear(self) -> None:
        raise NotImplementedError

    def _count(self, found: list) -> None:
        n_hit = sum(1 for r in found if r is not None)
        self.hits += n_hit
        self.misses += len(found) - n_hit


class LocalCache(RecommendationCache):
    """Bounded in-process LRU; entries expire after ttl_s; reverse indexes per user and per property. Thread-safe."""

    backend = "memory"

    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        super().__init__(ttl_s)
        self._clock = clock  # injectable: tests move time instead of sleeping
        self.size = int(size)
        self._data: OrderedDict = OrderedDict()  # key -> (expires_at, row, user_id)
        self._by_user: dict[str, set] = {}
        self._by_prop: dict[str, set] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.size > 0 and self.ttl_s > 0

    def __len__(self) -> int:
        return len(self._data)

    def get_many(self, model_version, user_ids, k):
        if not self.enabled:
            return [None] * len(user_ids)
        now = self._clock()
        out = []
        with self._lock:
            for u in user_ids:
                key = (model_version, u, k)
                entry = self._data.get(key)
                if entry is not None and entry[0] > now:
                    self._data.move_to_end(key)
                    out.append(entry[1])
                else:
                    if entry is not None:
                        self._drop(key)
                    out.append(None)
            self._count(out)
        return out

    def put_many(self, model_version, rows, k):
        if not self.enabled:
            return
        expires = self._clock() + self.ttl_s
        with self._lock:
            for u, row in rows:
                key = (model_version, u, k)
                if key in self._data:
                    self._drop(key)
                self._data[key] = (expires, row, u)
                self._by_user.setdefault(u, set()).add(key)
                for pid in row[0]:
                    if pid:
                        self._by_prop.setdefault(pid, set()).add(key)
            while len(self._data) > self.size:
                self._drop(next(iter(self._data)))

    def _drop(self, key) -> None:  # caller holds the lock
        entry = self._data.pop(key, None)
        if entry is None:
            return
        keys = self._by_user.get(entry[2])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_user[entry[2]]
        for pid in entry[1][0]:
            keys = self._by_prop.get(pid)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_prop[pid]

    def invalidate_user(self, user_id):
        with self._lock:
            keys = list(self._by_user.get(user_id, ()))
            for key in keys:
                self._drop(key)
        return len(keys)

    def invalidate_property(self, property_id):
        with self._lock:
            keys = list(self._by_prop.get(property_id, ()))
            for key in keys:
                self._drop(key)
        return len(keys)

    def clear(self):
        with self._lock:
            self._data.clear()
            self._by_user.clear()
            self._by_prop.clear()


class RedisCache(RecommendationCache):
    """Shared cache in Redis (see the module docstring for the keys)."""

    backend = "redis"

    def __init__(self, url: str, ttl_s: float, client=None):
        super().__init__(ttl_s)
        import redis

        self.url = url
        self.client = client or redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._ttl_ms = max(1, int(self.ttl_s * 1000))
        self.retry_after_s = 1.0
        self.errors = 0
        self._down_until = 0.0
        self._logged_at = float("-inf")
        self._put_sha: str | None = None

    def _failed(self, op: str, exc: Exception) -> None:
        self.errors += 1
        CACHE_ERRORS.labels(self.backend, op).inc()
        now = time.monotonic()
        self._down_until = now + self.retry_after_s
        if now - self._logged_at > 10.0:
            self._logged_at = now
            log.warning("recommendation cache unavailable (%s %s: %s): answering from the model, cache misses "
                        "only, until Redis is back (%d cache errors so far)", op, type(exc).__name__, exc,
                        self.errors)

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def get_many(self, model_version, user_ids, k):
        import redis

        if not self.enabled:
            return [None] * len(user_ids)
        if not self.available:
            out = [None] * len(user_ids)
            self._count(out)
            return out
        try:
            raw = self.client.mget([cache_key(model_version, u, k) for u in user_ids])
        except (redis.RedisError, OSError) as exc:
            self._failed("get", exc)
            out = [None] * len(user_ids)
            self._count(out)
            return out
        out = []
        for v in raw:
            if v is None:
                out.append(None)
                continue
            d = orjson.loads(v)
            out.append((np.array(d["ids"], dtype=object), np.array(d["scores"], dtype=np.float32), d["source"]))
        self._count(out)
        return out

    def put_many(self, model_version, rows, k):
        self.put_rows([(model_version, u, k, row) for u, row in rows])

    def put_rows(self, rows):
        """Every row in one pipelined round trip, whatever its version and k."""
        import redis

        if not self.enabled or not self.available or not rows:
            return
        try:
            self._put_rows(rows)
        except (redis.RedisError, OSError) as exc:
            self._failed("put", exc)

    #: one row's write in one command: the row (with its TTL), then the row key into each reverse index and the
    #: index's TTL renewed (KEYS[1] the row, KEYS[2..] the indexes; ARGV[1] the JSON row, ARGV[2] the TTL in ms).
    #: The same keys as 2k + 3 separate commands, which cost the server ~0.5 ms of Python per k=60 row to pack
    #: (0.1 ms now; docs/benchmarks.md "Soak").
    PUT_SCRIPT = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
for i = 2, #KEYS do
  redis.call('SADD', KEYS[i], KEYS[1])
  redis.call('PEXPIRE', KEYS[i], ARGV[2])
end
return #KEYS
"""

    def _put_rows(self, rows):
        import redis

        ttl = self._ttl_ms
        calls = []
        for model_version, u, k, (ids, scores, source) in rows:
            key = cache_key(model_version, u, k)
            ids = [str(x) for x in ids]
            value = orjson.dumps({"ids": ids, "scores": np.asarray(scores, dtype=np.float32).tolist(),
                                  "source": source})
            keys = [key, user_index_key(u), *(property_index_key(p) for p in ids if p)]
            calls.append((len(keys), *keys, value, ttl))
        for attempt in (0, 1):
            if self._put_sha is None:
                self._put_sha = self.client.script_load(self.PUT_SCRIPT)
            pipe = self.client.pipeline(transaction=False)
            for call in calls:
                pipe.evalsha(self._put_sha, *call)
            try:
                pipe.execute()
                return
            except redis.exceptions.NoScriptError:  # Redis restarted (scripts are not persisted): load it again
                self._put_sha = None
                if attempt:
                    raise

    def _drop_index(self, index_key: str) -> int:
        import redis

        try:
            return self._drop_index_once(index_key)
        except (redis.RedisError, OSError):
            self.errors += 1
            CACHE_ERRORS.labels(self.backend, "invalidate").inc()
            raise

    def _drop_index_once(self, index_key: str) -> int:
        keys = self.client.smembers(index_key)
        pipe = self.client.pipeline(transaction=False)
        if keys:
            pipe.delete(*keys)
        pipe.delete(index_key)
        res = pipe.execute()
        return int(res[0]) if keys else 0

    def invalidate_user(self, user_id):
        return self._drop_index(user_index_key(user_id))

    def invalidate_many(self, user_ids=(), property_ids=()):
        """Every index in two round trips (the stream processor drops thousands per batch): read the indexes'
        members, then delete those rows and the indexes, 1,000 keys per command."""
        import redis

        idx = [user_index_key(str(u)) for u in user_ids] + [property_index_key(str(p)) for p in property_ids]
        if not idx:
            return 0
        try:
            pipe = self.client.pipeline(transaction=False)
            for key in idx:
                pipe.smembers(key)
            rows = sorted(set().union(*pipe.execute()))
            pipe = self.client.pipeline(transaction=False)
            for i in range(0, len(rows), 1000):
                pipe.delete(*rows[i:i + 1000])
            for i in range(0, len(idx), 1000):
                pipe.delete(*idx[i:i + 1000])
            res = pipe.execute()
        except (redis.RedisError, OSError):
            self.errors += 1
            CACHE_ERRORS.labels(self.backend, "invalidate").inc()
            raise
        return int(sum(res[:(len(rows) + 999) // 1000]))

    def invalidate_property(self, property_id):
        return self._drop_index(property_index_key(property_id))

    def clear(self):
        keys = list(self.client.scan_iter(match=f"{PREFIX}:*", count=1000))
        for i in range(0, len(keys), 1000):
            self.client.delete(*keys[i:i + 1000])


def open_cache(settings: Settings | None = None, *, size: int | None = None,
               ttl_s: float | None = None) -> RecommendationCache:
    """Redis when settings.redis_url is set, else the in-process LRU (sizes from settings.serve)."""
    s = settings or get_settings()
    ttl = float(ttl_s if ttl_s is not None else s.serve.cache_ttl_s)
    if s.redis_url:
        return RedisCache(s.redis_url, ttl)
    return LocalCache(int(size if size is not None else s.serve.cache_size), ttl)


def invalidate(user_ids: Iterable[str] = (), property_ids: Iterable[str] = (), *,
               settings: Settings | None = None, cache: RecommendationCache | None = None) -> int:
    """Drop the cached recommendations of these users and those listing these properties; returns how many rows.

    The stream processor's hook: with `settings.redis_url` set it reaches the Redis cache every server shares;
    without Redis there is no shared cache to reach (0; server-local caches expire by TTL or through
    `POST /admin/invalidate`)."""
    if cache is None:
        s = settings or get_settings()
        if not s.redis_url:
            return 0
        cache = RedisCache(s.redis_url, s.serve.cache_ttl_s)
    return cache.invalidate_many(user_ids, property_ids)
