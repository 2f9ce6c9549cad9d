"""The Feast online store slow or down during requests (issue 13, fault 4): `rentalml serve` with
serve.feature_source=feast on a real Redis online store. The Redis server is first stalled (`DEBUG SLEEP` from
another connection) and then killed; every request still answers 2xx, within the request timeout, from the
bundle's own features, and ml_feature_fallback_total{reason} counts each fallback (timeout, then error)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

tritonclient = pytest.importorskip("tritonclient")
import tritonclient.http as httpclient  # noqa: E402
from serving_helpers import Server, make_bundle, v2_infer, v2_params, warm_users  # noqa: E402

from rentalml import services  # noqa: E402
from rentalml.config import get_settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REQUEST_TIMEOUT_S = 5.0  # the default serve.request_timeout_s
FEATURE_TIMEOUT_S = 0.25  # above a loaded 2-core machine's Feast read (~10-100 ms), far below the stall
STALL_S = 6  # longer than the request timeout: a request that waited on the store would fail


def _fallbacks(srv, reason: str) -> float:
    """ml_feature_fallback_total{reason} from the server's /metrics (0 before the first fallback)."""
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(httpx.get(f"{srv.url}/metrics", timeout=10).text):
        for sample in fam.samples:
            if sample.name == "ml_feature_fallback_total" and sample.labels.get("reason") == reason:
                return sample.value
    return 0.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("feature-deadline")
    try:  # the online store's own Redis: this test stalls and kills it
        redis = services.start_redis(args=("--save", "", "--appendonly", "no", "--enable-debug-command", "local"))
    except services.ServiceUnavailable as exc:
        pytest.skip(str(exc))
    env = {"RENTALML_HOME": str(base / "home"), "RENTALML_FEAST__REDIS_URL": redis.url,
           "RENTALML_FEAST__ONLINE_STORE": "redis", "RENTALML_FEAST__REPO_PATH": str(ROOT / "feature_repo"),
           "RENTALML_SERVE__FEATURE_SOURCE": "feast", "RENTALML_SERVE__FEATURE_TIMEOUT_S": str(FEATURE_TIMEOUT_S),
           "RENTALML_SERVE__REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S), "RENTALML_SERVE__CACHE_SIZE": "0",
           "OMP_NUM_THREADS": "1"}
    bundle = make_bundle(base / "bundle", "1")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("RENTALML_REDIS_URL", raising=False)
        get_settings.cache_clear()
        from rentalml.features.store import apply, open_store

        apply(open_store())  # the feature views the server reads (an empty online store: nulls, no error)
        get_settings.cache_clear()
    server = Server(bundle, base / "serve.log", env=env)
    try:
        server.wait_ready(timeout=300)  # `import feast` alone takes 10-50 s on a busy 2-core machine
        server.users = warm_users(bundle)
        yield {"server": server, "redis": redis}
    finally:
        server.stop()
        redis.stop()


def _requests(srv, while_, min_n: int, threads: int = 3) -> list[tuple[float, int]]:
    """v2 REST requests from `threads` clients until `while_()` is false and at least min_n were sent:
    [(seconds, HTTP status)] (599 for a failed request)."""
    out: list[tuple[float, int]] = []
    lock = threading.Lock()

    def run(i: int):
        c = httpclient.InferenceServerClient(f"127.0.0.1:{srv.http_port}", network_timeout=30)
        n = 0
        while True:
            with lock:
                if not while_() and len(out) >= min_n:
                    break
            user = srv.users[(i * 31 + n) % len(srv.users)]
            n += 1
            t0 = time.perf_counter()
            try:
                r = v2_infer(c, httpclient, [user], k=10)
                assert r.as_numpy("property_id").shape == (1, 10)
                assert v2_params(r, False)["model_version"] == "1"
                status = 200
            except Exception:  # noqa: BLE001 - any failure is a non-2xx answer here
                status = 599
            with lock:
                out.append((time.perf_counter() - t0, status))
        c.close()

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


def test_a_slow_then_dead_online_store_falls_back_to_the_bundle(world):
    srv, redis = world["server"], world["redis"]
    before = {r: _fallbacks(srv, r) for r in ("timeout", "error")}
    healthy = _requests(srv, lambda: False, 20)
    assert [s for _, s in healthy] == [200] * len(healthy)
    assert _fallbacks(srv, "error") == before["error"]  # the store answered

    # stalled: DEBUG SLEEP blocks the Redis server for STALL_S; requests go on meanwhile
    timeouts_before = _fallbacks(srv, "timeout")
    import redis as redis_lib

    sleeper = threading.Thread(target=lambda: redis_lib.Redis.from_url(redis.url).execute_command(
        "DEBUG", "SLEEP", STALL_S))
    sleeper.start()
    stalled = _requests(srv, sleeper.is_alive, 20)
    sleeper.join()
    timeouts = _fallbacks(srv, "timeout") - timeouts_before

    # down: the Redis server is killed
    errors_before, timeouts_before = _fallbacks(srv, "error"), _fallbacks(srv, "timeout")
    redis.stop()
    dead = _requests(srv, lambda: False, 40)
    errors = _fallbacks(srv, "error") - errors_before
    late = _fallbacks(srv, "timeout") - timeouts_before  # a refused connection that took past the deadline

    faulty = stalled + dead
    statuses = [s for _, s in faulty]
    lat = np.array([t for t, _ in faulty])
    p99 = float(np.quantile(lat, 0.99))
    print(f"stalled: {len(stalled)} requests, {timeouts:.0f} timeout fallbacks; dead: {len(dead)} requests, "
          f"{errors:.0f} error + {late:.0f} timeout fallbacks; p50 {np.median(lat) * 1e3:.1f} ms, "
          f"p99 {p99 * 1e3:.1f} ms, max {lat.max() * 1e3:.1f} ms (request timeout {REQUEST_TIMEOUT_S} s)")
    for name, phase in (("healthy", healthy), ("stalled", stalled), ("dead", dead)):
        t = np.array([x for x, _ in phase])
        print(f"{name}: p50 {np.median(t) * 1e3:.1f} ms, p99 {np.quantile(t, 0.99) * 1e3:.1f} ms, "
              f"slowest {np.round(np.sort(t)[-5:] * 1e3, 1)} ms")
    assert statuses == [200] * len(faulty)
    assert p99 < REQUEST_TIMEOUT_S
    assert timeouts >= len(stalled) // 2  # most stalled requests fell back (a few may come before the stall)
    assert errors > 0 and errors + late >= len(dead)  # every request on a dead store fell back
