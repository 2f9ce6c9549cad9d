"""The recommendation cache in front of the arms' engines, and the batching of what it misses.

A request's rows (`Rows`) are looked up in the cache first (rentalml.cache: in-process LRU or Redis, keyed by
the arm's cache version); the misses go to their arm's engine (the runtime pipeline). `run_missing` answers the
misses of several requests in as few engine calls as possible, and `LoopBatcher` gathers those requests on the
event loop (the in-process counterpart of Triton's dynamic batching). `Batcher` ties them together for the model:
`recommend` (sync) and `arecommend` (within the request timeout, never blocking the loop on I/O).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter

import numpy as np

from rentalml.cache import CACHE_ERRORS
from rentalml.runtime.features import Filters

from . import metrics as m
from .errors import RequestTimeout
from .protocol import PAD_SCORE
from .routing import Arm, RoutedRecommendations, Routing

log = logging.getLogger("rentalml.inference")


class Rows:
    """One request's rows: cache lookups first, then the misses through their arm's engine."""

    __slots__ = ("user_ids", "k", "arms", "rows", "missing", "cache_versions", "filters")

    def __init__(self, batcher: Batcher, routing: Routing, user_ids: list[str], k: int,
                 filters: Filters | None = None, lookup: bool = True):
        """`lookup=False`: every row missing, nothing counted (the reload's pre-warm)."""
        self.user_ids, self.k, self.filters = user_ids, k, filters
        self.arms, groups = routing.arms_of(user_ids)
        self.rows: list = [None] * len(user_ids)  # (ids [k] object, scores [k] float32, source) per user
        self.missing: dict[Arm, list[int]] = {}
        self.cache_versions: dict[Arm, str] = {}
        if lookup and filters is None:
            batcher.demand.seen(user_ids, k)
        for arm, idx in groups.items():
            if arm.engine.refresh is not None:
                arm.engine.refresh()  # fresh stream state first (rate-limited): it decides the cache version
            self.cache_versions[arm] = version = arm.engine.cache_version
            if filters is not None or not lookup:  # request-specific business rules: not what the cache holds
                self.missing[arm] = list(idx)
                continue
            hits = batcher.cache.get_many(version, [user_ids[i] for i in idx], k)
            n_hit = 0
            for i, hit in zip(idx, hits, strict=True):
                if hit is None:
                    self.missing.setdefault(arm, []).append(i)
                else:
                    n_hit += 1
                    self.rows[i] = hit
            batcher.count(arm.label, n_hit, len(idx) - n_hit)

    def complete(self, batcher: Batcher) -> RoutedRecommendations:
        (error,) = run_missing(batcher, [self])
        if error is not None:
            raise error
        return self.result()

    def fill(self, batcher: Batcher, arm: Arm, idx: list[int], rec, offset: int, puts: list | None = None) -> None:
        """Rows `idx` of this request from rows offset.. of `rec` (the engine's answer for its arm), cached (now,
        or appended to `puts` as (version, user, k, row) for the caller to write); short rows padded (protocol:
        property_id "" and score PAD_SCORE)."""
        k = self.k
        kk = min(k, arm.bundle.n_items)
        sc = rec.scores[offset: offset + len(idx)]
        if not np.isfinite(sc).all():  # (empty slots of short lists)
            sc = np.where(np.isfinite(sc), sc, PAD_SCORE).astype(np.float32)
        put = []
        for j, i in enumerate(idx):
            ids, scores = rec.property_ids[offset + j], sc[j]
            if kk < k:
                ids = np.concatenate([ids, np.full(k - kk, "", dtype=object)])
                scores = np.concatenate([scores, np.full(k - kk, PAD_SCORE, dtype=np.float32)])
            self.rows[i] = (np.array(ids, dtype=object), np.array(scores, dtype=np.float32), rec.sources[offset + j])
            put.append((self.user_ids[i], self.rows[i]))
        if self.filters is None:
            if puts is None:
                batcher.cache.put_many(self.cache_versions[arm], put, k)
            else:
                version = self.cache_versions[arm]
                puts.extend((version, u, k, row) for u, row in put)

    def result(self) -> RoutedRecommendations:
        k = self.k
        rows = self.rows
        if len(rows) == 1:  # the common case: views, no copies
            ids, scores = rows[0][0].reshape(1, k), rows[0][1].reshape(1, k)
        else:
            ids, scores = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
        return RoutedRecommendations(ids, scores, [r[2] for r in rows],
                                     variants=[a.label for a in self.arms],
                                     versions=[a.model_version for a in self.arms], arms=self.arms)

    @property
    def n_missing(self) -> int:
        return sum(len(v) for v in self.missing.values())


def run_missing(batcher: Batcher, requests: list[Rows], puts: list | None = None) -> list[BaseException | None]:
    """The cache misses of several requests in as few engine calls as possible: rows of the same arm and k
    without request-specific business rules go through one `Engine.recommend` (one ONNX Runtime call: the
    catalogue's item vectors are read once for all of them); filtered requests run on their own. The new rows are
    cached at once, or appended to `puts` (see Rows.fill). Returns, per request, the exception that failed it
    (None: its rows are filled)."""
    groups: dict[tuple, list[tuple[int, Rows, list[int]]]] = {}
    for n, b in enumerate(requests):
        for arm, idx in b.missing.items():
            key = (arm, min(b.k, arm.bundle.n_items)) if b.filters is None else (arm, n)
            groups.setdefault(key, []).append((n, b, idx))
    errors: list[BaseException | None] = [None] * len(requests)
    for (arm, _), members in groups.items():
        b0 = members[0][1]
        try:
            rec = arm.engine.recommend([b.user_ids[i] for _, b, idx in members for i in idx],
                                       min(b0.k, arm.bundle.n_items), b0.filters)
            offset = 0
            for _, b, idx in members:
                b.fill(batcher, arm, idx, rec, offset, puts)
                offset += len(idx)
        except Exception as exc:  # noqa: BLE001 - handed to the requests of this group
            for n, _, _ in members:
                errors[n] = exc
    for b in requests:
        b.missing = {}
    return errors


class LoopBatcher:
    """Cache misses answered on the event loop, batched (the in-process counterpart of Triton's dynamic batching).

    A request's misses are queued and flushed by a callback scheduled with `call_soon` a few loop turns later
    (`_flush_after`): every request whose handler reaches this point meanwhile (under load: the requests uvicorn
    and grpc.aio read in those polls) is answered by one engine call per arm; a lone request waits for nothing
    (`alone`: no other callback is ready). Running on the loop avoids two thread wake-ups per request (~0.25 ms on
    the 2-core machine, docs/benchmarks.md) and the GIL hand-over; it is used only for engines that do no I/O
    (graphs and features in process) and for small requests (`INLINE_MAX_ROWS`), so the loop is never blocked by
    a network call or a bulk request."""

    INLINE_MAX_ROWS = 16
    FLUSH_TURNS = 3  # loop turns a batch waits for company at most (docs/architecture.md, "Serving hot path")

    def __init__(self, batcher: Batcher):
        self.batcher = batcher
        self.pending: list[tuple[Rows, asyncio.Future]] = []

    def takes(self, rows: Rows) -> bool:
        return rows.n_missing <= self.INLINE_MAX_ROWS and all(arm.engine.in_process for arm in rows.missing)

    def submit(self, rows: Rows) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.pending.append((rows, fut))
        if len(self.pending) == 1:
            self._flush_after(loop, self.FLUSH_TURNS)
        return fut

    def _flush_after(self, loop, turns: int) -> None:
        """Flush now when nothing else is ready to run (no other request can join: saves loop turns, ~50 µs at
        concurrency 1), else after up to `turns` more loop turns, each of which lets the requests read in that turn
        reach submit() and join (8 clients on the 2-core machine: 2.0 → 4.1 rows a flush, +25 % requests/s)."""
        if turns <= 0 or self.alone(loop):
            self.flush()
        else:
            loop.call_soon(self._flush_after, loop, turns - 1)

    @staticmethod
    def alone(loop) -> bool:
        """No other callback is ready to run in this loop iteration (so no other request can reach submit()
        before a deferred flush would). asyncio's loop keeps them in `_ready`; other loops: assume company."""
        ready = getattr(loop, "_ready", None)
        return ready is not None and len(ready) == 0

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        behind = self.batcher.write_behind
        puts = None if behind is None else []
        try:
            errors = run_missing(self.batcher, [b for b, _ in pending], puts)
        except Exception as exc:  # noqa: BLE001 - never leave a request waiting
            errors = [exc] * len(pending)
        if puts:
            behind.add(puts)
        for (rows, fut), err in zip(pending, errors, strict=True):
            if fut.done():  # the request went away (client disconnect, cancellation)
                continue
            if err is not None:
                fut.set_exception(err)
            else:
                fut.set_result(rows.result())


class WriteBehind:
    """Cache writes of rows computed on the event loop (LoopBatcher), sent from the loop's thread pool after their
    requests were answered: a network cache (Redis) is never written on the loop, and the rows of many requests go
    in one pipelined round trip. At most one drain runs at a time; rows that arrive meanwhile go in the next one.
    Bounded: past `max_pending` rows (the cache is slower than the misses) new rows are not cached, only counted
    (ml_cache_errors_total{op="put"}); they are computed again on their next miss."""

    def __init__(self, cache, max_pending: int = 20_000):
        self.cache = cache
        self.max_pending = max_pending
        self.pending: list = []
        self.draining = False
        self.dropped = 0
        self._lock = threading.Lock()

    def add(self, rows: list) -> None:
        with self._lock:
            if len(self.pending) + len(rows) > self.max_pending:
                self.dropped += len(rows)
                CACHE_ERRORS.labels(self.cache.backend, "put").inc(len(rows))
                return
            self.pending.extend(rows)
            if self.draining:
                return
            self.draining = True
        asyncio.get_running_loop().run_in_executor(None, self.drain)

    def drain(self) -> None:
        while True:
            with self._lock:
                rows, self.pending = self.pending, []
                if not rows:
                    self.draining = False
                    return
            try:
                self.cache.put_rows(rows)  # a backend error is logged and counted there, never raised to a request
            except Exception:  # noqa: BLE001 - a write that failed is a miss later, nothing more
                log.exception("recommendation cache write-behind failed (%d rows not cached)", len(rows))


class Demand:
    """Which (user, k) the requests ask for, by count: the reload pre-warms the most asked ones. Bounded: past
    `4 x keep` keys the `keep` most asked are kept (so the counts favour what is asked now). Thread-safe."""

    def __init__(self, keep: int):
        self.keep = max(0, int(keep))
        self.counts: Counter = Counter()
        self._lock = threading.Lock()

    def seen(self, user_ids: list[str], k: int) -> None:
        if not self.keep or len(user_ids) > LoopBatcher.INLINE_MAX_ROWS:  # bulk requests are no one's hot set
            return
        with self._lock:
            counts = self.counts
            for u in user_ids:
                counts[(u, k)] += 1
            if len(counts) > 4 * self.keep:
                self.counts = Counter(dict(counts.most_common(self.keep)))

    def hot(self, n: int | None = None, min_count: int = 2) -> list[tuple[str, int]]:
        """The most asked (user, k), at most `n` (default `keep`), each asked at least `min_count` times."""
        with self._lock:
            top = self.counts.most_common(self.keep if n is None else n)
        return [key for key, c in top if c >= min_count]


class Batcher:
    """The cache in front of the arms' engines for one model, with its hit-rate gauge, the loop batcher, the
    write-behind of a network cache and the demand the reload pre-warms. Lives in one process (the cache holds
    locks and sockets): rebuilt in each REST worker."""

    PREWARM_CHUNK = 64  # rows per engine call of the pre-warm (one ONNX Runtime call each)

    def __init__(self, cache, model_name: str, prewarm_rows: int = 0):
        self.cache = cache
        self.name = model_name
        self._counts: dict[str, list[int]] = {}
        self.loop = LoopBatcher(self)
        self.write_behind = WriteBehind(cache) if cache.backend != "memory" else None
        self.demand = Demand(prewarm_rows if cache.enabled else 0)

    def count(self, label: str, hits: int, misses: int) -> None:
        """Feed ml_cache_hit_rate of a variant with one request's lookups."""
        if not self.cache.enabled:
            return
        c = self._counts.setdefault(label, [0, 0])
        c[0] += hits
        c[1] += misses
        m.CACHE_HIT_RATE.labels(self.name, label).set(c[0] / (c[0] + c[1]) if c[0] + c[1] else 0.0)

    def recommend(self, routing: Routing, user_ids: list[str], k: int,
                  filters: Filters | None = None) -> RoutedRecommendations:
        """Each user's arm (sticky A/B split), its cached row or its arm's engine; pads short rows."""
        return Rows(self, routing, user_ids, int(k), filters).complete(self)

    async def arecommend(self, routing: Routing, user_ids: list[str], k: int, filters: Filters | None,
                         timeout_s: float) -> RoutedRecommendations:
        """recommend() within `timeout_s` (≤ 0: no limit; RequestTimeout past it). In-process cache lookups run on
        the event loop, Redis lookups on the loop's thread pool (the loop never waits on a network call). The misses
        of small requests to an engine that does no I/O are answered on the loop, batched across the requests of
        one loop iteration (LoopBatcher), whichever the cache: a Redis cache is written behind (WriteBehind). Other
        misses (remote predictor, Feast, stream state, bulk requests) run on the thread pool."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        if self.cache.backend == "memory":
            rows = Rows(self, routing, user_ids, int(k), filters)
        else:
            rows = await self._within(loop.run_in_executor(None, Rows, self, routing, user_ids, int(k), filters),
                                      t0, timeout_s)
        if not rows.missing:
            return rows.result()
        if self.loop.takes(rows):  # in-process engine, small request: batched on the loop
            rec = await self.loop.submit(rows)
            if timeout_s <= 0 or time.perf_counter() - t0 <= timeout_s:
                return rec
            self._timed_out(timeout_s)
        return await self._within(loop.run_in_executor(None, rows.complete, self), t0, timeout_s)

    async def _within(self, fut: asyncio.Future, t0: float, timeout_s: float):
        """`fut`'s result if it lands within `timeout_s` of `t0` (≤ 0: no limit), else RequestTimeout."""
        if timeout_s <= 0:
            return await fut
        try:
            res = await asyncio.wait_for(fut, max(0.0, timeout_s - (time.perf_counter() - t0)))
            # a result that lands after the limit (the worker thread won the race with the timer) is late too
            if time.perf_counter() - t0 <= timeout_s:
                return res
        except TimeoutError:
            pass
        self._timed_out(timeout_s)

    def prewarm(self, routing: Routing, keys: list[tuple[str, int]] | None = None) -> int:
        """Cache the rows of `keys` ((user, k); default: the most asked ones, `Demand.hot`) as `routing`'s arms
        answer them, before `routing` serves (the reload): the hot users hit at once instead of all missing
        together. Runs on the caller's thread (the reload's, off the request path), `PREWARM_CHUNK` rows per
        engine call. Returns how many rows were cached."""
        keys = self.demand.hot() if keys is None else keys
        by_k: dict[int, list[str]] = {}
        for u, k in keys:
            by_k.setdefault(int(k), []).append(u)
        n = 0
        for k, users in by_k.items():
            for i in range(0, len(users), self.PREWARM_CHUNK):
                rows = Rows(self, routing, users[i:i + self.PREWARM_CHUNK], k, lookup=False)
                for err in run_missing(self, [rows]):
                    if err is not None:
                        raise err
                n += len(rows.user_ids)
        return n

    def _timed_out(self, limit: float):
        m.TIMEOUTS.labels(self.name).inc()
        raise RequestTimeout(f"the request took longer than the {limit:g} s limit (serve.request_timeout_s)")

    async def settled(self, grace_s: float = 0.05) -> None:
        """Return once the cache misses queued on the event loop when called have been answered, their requests
        have written their responses (after a swap: the requests that began on the old version) and `grace_s`
        has passed for those answers to reach their clients — a reload is confirmed after the last old-version
        answer, not beside it (tests/test_reload.py checks that order from the client's clock; a reload takes
        ~1 s, 50 ms is noise to it)."""
        queued = [fut for _, fut in self.loop.pending]
        if queued:
            await asyncio.wait(queued)
        await asyncio.sleep(0)  # the woken request tasks run (and send) before the caller goes on
        await asyncio.sleep(grace_s)
