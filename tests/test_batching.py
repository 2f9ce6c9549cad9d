"""inference.batching's parts for a network cache, against a real Redis: the write-behind of rows computed on the
event loop (bounded, never on the loop), and the demand the reload pre-warms. No model, no server process."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import redis
from rentalml.inference.batching import Demand, WriteBehind

from rentalml import cache as rc
from rentalml.services import wait_until


def row(*ids: str) -> tuple:
    return np.array(ids, dtype=object), np.linspace(1, 0, len(ids)).astype(np.float32), "model"


@pytest.fixture()
def cache(redis_url):
    url = redis_url.rsplit("/", 1)[0] + "/5"  # a database of its own
    redis.Redis.from_url(url).flushdb()
    return rc.RedisCache(url, ttl_s=60)


def test_write_behind_writes_off_the_loop_in_one_round_trip(cache):
    writer_threads, round_trips = set(), []
    put_rows = cache.put_rows

    def spy(rows):
        writer_threads.add(threading.get_ident())
        round_trips.append(len(rows))
        put_rows(rows)

    cache.put_rows = spy
    behind = WriteBehind(cache)
    rows = [("1", f"u{i}", 10 + i % 3, row(f"p{i}", "p_shared")) for i in range(30)]

    async def main():
        behind.add(rows)  # as LoopBatcher.flush does, on the loop: returns at once
        return threading.get_ident()

    loop_thread = asyncio.run(main())  # asyncio.run waits for the default executor's jobs at the end
    assert round_trips == [30] and loop_thread not in writer_threads
    for version, u, k, (ids, scores, _) in rows:  # the same keys and reverse indexes as a direct put
        got = cache.get(version, u, k)
        assert list(got[0]) == list(ids) and np.allclose(got[1], scores)
    assert cache.invalidate_many(property_ids=["p_shared"]) == 30
    assert not behind.pending and not behind.draining


def test_write_behind_is_bounded_and_counts_what_it_drops(cache):
    behind = WriteBehind(cache, max_pending=5)
    before = rc.CACHE_ERRORS.labels("redis", "put")._value.get()
    gate = threading.Event()
    put_rows = cache.put_rows
    cache.put_rows = lambda rows: (gate.wait(10), put_rows(rows))  # a slow cache

    async def main():
        behind.add([("1", "a", 10, row("p1"))])  # drained at once (the drain blocks on the gate)
        await asyncio.to_thread(wait_until, lambda: not behind.pending, 10, interval=0.01, what="the drain")
        behind.add([("1", f"b{i}", 10, row("p2")) for i in range(4)])  # pending while the drain is busy
        behind.add([("1", f"c{i}", 10, row("p3")) for i in range(3)])  # 4 + 3 > 5: not cached, counted
        gate.set()

    asyncio.run(main())
    assert behind.dropped == 3
    assert rc.CACHE_ERRORS.labels("redis", "put")._value.get() == before + 3
    assert cache.get("1", "b3", 10) is not None and cache.get("1", "c0", 10) is None


def test_write_behind_survives_redis_script_flush(cache):
    """Scripts are not persisted across a Redis restart: the write loads its script again (NOSCRIPT)."""
    cache.put_rows([("1", "x", 10, row("p1"))])
    cache.client.script_flush()
    cache.put_rows([("1", "y", 10, row("p2"))])
    assert cache.get("1", "y", 10) is not None and cache.errors == 0


def test_demand_keeps_the_most_asked_keys():
    d = Demand(keep=3)
    for _ in range(5):
        d.seen(["hot"], 10)
    d.seen(["hot", "warm"], 20)
    d.seen(["warm"], 20)
    d.seen(["once"], 10)
    d.seen([f"bulk{i}" for i in range(100)], 10)  # a bulk request is no one's hot set
    assert d.hot() == [("hot", 10), ("warm", 20)]  # asked twice or more, most asked first
    for i in range(13):  # past 4 x keep keys: the 3 most asked are kept
        d.seen([f"new{i}"], 10)
    assert len(d.counts) <= 12 and ("hot", 10) in d.counts
    assert Demand(keep=0).hot() == []
