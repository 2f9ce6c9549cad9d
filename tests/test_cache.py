"""Recommendation cache: in-process LRU and Redis (real redis-server), TTL, invalidation by user and by property,
the stream processor's hook, and a real server using each (hit-rate metric, /admin/invalidate)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from serving_helpers import Server, make_bundle, warm_users

from rentalml import cache as rc
from rentalml.config import Settings
from rentalml.services import wait_until


def row(*pids, source="model"):
    return (np.array(list(pids), dtype=object), np.linspace(1, 0, len(pids)).astype(np.float32), source)


def _exercise(cache: rc.RecommendationCache):
    cache.put("1", "u_a", 3, row("p_1", "p_2", "p_3"))
    cache.put("1", "u_a", 5, row("p_1", "p_4", "p_5", "p_6", "p_7"))
    cache.put("2", "u_a", 3, row("p_9", "p_8", "p_7"))
    cache.put("1", "u_b", 3, row("p_2", "p_5", ""))  # padded row
    got = cache.get("1", "u_a", 3)
    assert list(got[0]) == ["p_1", "p_2", "p_3"] and got[2] == "model" and got[1].dtype == np.float32
    assert cache.get("1", "u_c", 3) is None
    assert cache.hits == 1 and cache.misses == 1 and cache.hit_rate == 0.5
    # a property change drops exactly the rows that list it (any user, any version, any k)
    assert cache.invalidate_property("p_2") == 2
    assert cache.get("1", "u_a", 3) is None and cache.get("1", "u_b", 3) is None
    assert cache.get("1", "u_a", 5) is not None and cache.get("2", "u_a", 3) is not None
    assert cache.invalidate_property("p_404") == 0
    # a user change drops all of that user's rows
    assert cache.invalidate_user("u_a") == 2
    assert cache.get("1", "u_a", 5) is None and cache.get("2", "u_a", 3) is None
    assert cache.invalidate_property("p_7") == 0  # its rows went with the user


class FakeClock:
    """Time that moves only when the test says so (no wall-clock sleeps)."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_local_cache_invalidation_ttl_and_lru():
    c = rc.LocalCache(size=100, ttl_s=60)
    _exercise(c)
    assert len(c) == 0  # every row went through an invalidation
    lru = rc.LocalCache(size=2, ttl_s=60)
    for u in ("u1", "u2", "u3"):
        lru.put("1", u, 2, row("p_1", f"p_{u}"))
    assert lru.get("1", "u1", 2) is None and lru.get("1", "u3", 2) is not None
    # the evicted row left the property index with it: nothing to invalidate for its own property
    assert lru.invalidate_property("p_u1") == 0 and lru.invalidate_property("p_1") == 2 and len(lru) == 0
    clock = FakeClock()
    short = rc.LocalCache(size=10, ttl_s=5, clock=clock)
    short.put("1", "u1", 2, row("p_1", "p_2"))
    clock.t += 4.9
    assert short.get("1", "u1", 2) is not None
    clock.t += 0.2  # past the TTL
    assert short.get("1", "u1", 2) is None and len(short) == 0
    assert short.invalidate_user("u1") == 0  # the expired row left the user index too
    assert not rc.LocalCache(size=0, ttl_s=60).enabled


def test_redis_cache_keys_ttl_and_invalidation(redis_url):
    import redis

    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    c = rc.RedisCache(redis_url, ttl_s=30)
    _exercise(c)
    c.put("7", "u_k", 2, row("p_1", "p_2"))
    key = rc.cache_key("7", "u_k", 2)
    assert key == "rec:7:u_k:2" and r.exists(key) and 0 < r.pttl(key) <= 30_000
    assert r.sismember("rec:p:p_2", key) and r.sismember("rec:u:u_k", key)
    # the stream processor's hook: settings with redis_url reach the shared cache
    s = Settings(redis_url=redis_url)
    assert isinstance(rc.open_cache(s), rc.RedisCache)
    assert rc.invalidate(property_ids=["p_2"], settings=s) == 1 and not r.exists(key)
    assert rc.invalidate(user_ids=["u_k"], settings=Settings(redis_url=None)) == 0  # no shared cache: nothing
    # expiry itself is Redis's (PX on the row, PEXPIRE on its index sets); what the cache owns is setting them
    short = rc.RedisCache(redis_url, ttl_s=0.05)
    short.put("1", "u_t", 2, row("p_1", "p_2"))
    short_key = rc.cache_key("1", "u_t", 2)
    assert 0 < r.pttl(short_key) <= 50 and 0 < r.pttl("rec:u:u_t") <= 50 and 0 < r.pttl("rec:p:p_1") <= 50
    c.put("1", "u_x", 2, row("p_1", "p_2"))
    c.clear()
    assert not list(r.scan_iter(match="rec:*"))


# ---- real servers --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("cache") / "bundle", "1")


def _predict(srv, user, k=4):
    r = httpx.post(f"{srv.url}/predict", json={"user_id": user, "num_recommendations": k})
    assert r.status_code == 200, r.text
    return [x["property_id"] for x in r.json()["recommendations"]]


def _hit_rate_metric(srv) -> float:
    text = httpx.get(f"{srv.url}/metrics").text
    line = [ln for ln in text.splitlines() if ln.startswith('ml_cache_hit_rate{model="rental-recommender"')]
    return float(line[0].rsplit(" ", 1)[1])


def test_server_with_redis_cache(bundle, redis_url, tmp_path):
    import redis

    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    users = warm_users(bundle)[:3]
    srv = Server(bundle, tmp_path / "redis.log", env={"RENTALML_REDIS_URL": redis_url})
    try:
        srv.wait_ready()
        first = _predict(srv, users[0])
        # a miss's row is written behind its answer (inference.batching.WriteBehind): there soon after
        wait_until(lambda: r.exists(rc.cache_key("1", users[0], 4)), 10, interval=0.01, what="the row in Redis")
        assert _predict(srv, users[0]) == first
        assert _hit_rate_metric(srv) == pytest.approx(0.5)
        assert httpx.get(f"{srv.url}/health").json()["cache"]["backend"] == "redis"
        # the server answers from Redis: a row planted there is what it serves ...
        shared = rc.RedisCache(redis_url, ttl_s=60)
        shared.put("1", users[0], 4, row("p_planted_1", "p_planted_2", "p_planted_3", "p_planted_4"))
        shared.put("1", users[1], 4, row("p_other", "p_planted_2", "p_x", "p_y"))
        assert _predict(srv, users[0]) == ["p_planted_1", "p_planted_2", "p_planted_3", "p_planted_4"]
        assert _predict(srv, users[1])[0] == "p_other"
        # ... until the stream processor's hook reports a change: a property in both rows, then a user
        assert rc.invalidate(property_ids=["p_planted_2"], settings=Settings(redis_url=redis_url)) == 2
        assert _predict(srv, users[0]) == first and _predict(srv, users[1])[0] != "p_other"
        shared.put("1", users[2], 4, row("p_a", "p_b", "p_c", "p_d"))
        assert _predict(srv, users[2])[0] == "p_a"
        assert rc.invalidate(user_ids=[users[2]], settings=Settings(redis_url=redis_url)) == 1
        assert _predict(srv, users[2])[0] != "p_a"
    finally:
        assert srv.stop() == 0, srv.log.read_text()[-3000:]


def test_server_with_local_cache_and_admin_invalidate(bundle, tmp_path):
    users = warm_users(bundle)[:2]
    srv = Server(bundle, tmp_path / "local.log")
    try:
        srv.wait_ready()
        first = _predict(srv, users[0])
        _predict(srv, users[0])
        _predict(srv, users[1])
        health = httpx.get(f"{srv.url}/health").json()
        assert health["cache"]["backend"] == "memory" and health["cache"]["hit_rate"] == pytest.approx(1 / 3)
        assert _hit_rate_metric(srv) == pytest.approx(1 / 3)
        r = httpx.post(f"{srv.url}/admin/invalidate", json={"user_ids": [users[0]]})
        assert r.status_code == 200 and r.json() == {"invalidated": 1, "backend": "memory"}
        assert _predict(srv, users[0]) == first  # recomputed (a miss), same model, same answer
        assert _hit_rate_metric(srv) == pytest.approx(1 / 4)
        shared = set(first) & set(_predict(srv, users[1]))
        pid = sorted(shared)[0] if shared else first[0]
        r = httpx.post(f"{srv.url}/admin/invalidate", json={"property_ids": [pid]})
        assert r.json()["invalidated"] == (2 if shared else 1)
        r = httpx.post(f"{srv.url}/admin/invalidate", json={"users": ["x"]})
        assert r.status_code == 422 and "users" in r.json()["error"]
        # a reload from a bundle directory swaps the version and empties the in-process cache
        _predict(srv, users[1])
        v9 = make_bundle(tmp_path / "v9", "9")
        r = httpx.post(f"{srv.url}/admin/reload", json={"champion": str(v9)}, timeout=60)
        assert r.status_code == 200 and r.json()["before"]["champion"]["model_version"] == "1", r.text
        assert r.json()["after"]["champion"]["model_version"] == "9"
        r = httpx.post(f"{srv.url}/predict", json={"user_id": users[1], "num_recommendations": 4})
        assert r.json()["model_version"] == "9" and r.headers["x-model-version"] == "9"
        health = httpx.get(f"{srv.url}/health").json()
        assert health["model_version"] == "9" and health["routing"]["champion"]["source"] == str(v9)
    finally:
        assert srv.stop() == 0, srv.log.read_text()[-3000:]
