"""The soak's short form: benchmarks/soak.py for 20 s against a real `rentalml serve` with its cache in a real
Redis — v2 REST, v2 gRPC and /predict mixed, cache hits and misses, a hot reload and an invalidation storm in the
middle. Asserted here: behaviour (no failed request, both events happened and took effect, all three protocols
answered, memory bounded loosely). The timing bars (RSS growth <= 10 %, p99 <= 3 x p50) belong to the 10-minute
run in docs/benchmarks.md, not to a test on a shared machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tritonclient")
pytest.importorskip("psutil")
from serving_helpers import make_bundle  # noqa: E402

SOAK = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"
PROTOCOLS = ("v2 REST", "v2 gRPC", "/predict")


@pytest.fixture(scope="module")
def soak(redis_url, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("soak")
    b1, b2 = make_bundle(tmp / "b1", "1"), make_bundle(tmp / "b2", "2")
    # a database of its own on the session's Redis: no other test's keys or hits in it
    url = redis_url.rsplit("/", 1)[0] + "/7"
    out = tmp / "soak.json"
    # cheap on 2 cores: one short capacity step, few client threads, 20 s of load
    cmd = [sys.executable, str(SOAK), "--duration", "20", "--bundle", str(b1), "--reload-bundle", str(b2),
           "--redis-url", url, "--ramp", "3", "--capacity-s", "2", "--capacity", "closed", "--no-miss-capacity",
           "--workers", "6", "--sample-s", "1", "--window-s", "2", "--warmup-s", "4", "--hot-users", "100",
           "--storm-calls", "3", "--storm-properties", "20", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.exists(), res.stdout[-3000:] + res.stderr[-3000:]
    return res, json.loads(out.read_text())


def test_soak_has_no_errors_on_any_protocol(soak):
    res, r = soak
    s = r["soak"]
    assert s["errors"] == 0, s["first_errors"]
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert r["server_exit_code"] == 0  # graceful shutdown at the end
    assert r["capacity"]["steps"][0]["errors"] == 0
    assert r["capacity"]["after"]["errors"] == 0 and r["capacity"]["after"]["n"] > 0  # after reload and storm
    for p in PROTOCOLS:  # all three answered, each a real share of the load
        assert s["protocols"][p]["errors"] == 0
        assert s["protocols"][p]["n"] >= s["requests"] // 4, s["protocols"]
    assert all(w["errors"] == 0 for w in s["windows"])


def test_hot_reload_happened_mid_soak(soak):
    _, r = soak
    (reload,), s = [e for e in r["events"] if e["name"] == "reload"], r["soak"]
    assert "failed" not in reload, reload
    assert reload["model_version"] == "2"
    assert 6 <= reload["t"] <= 10  # in the middle (40 % of 20 s)
    assert r["model_version_at_end"] == "2"
    for p in PROTOCOLS:  # every protocol was answered by version 1, then by version 2
        assert s["versions"][p] == ["1", "2"], s["versions"]
    assert s["old_version_after_reload"] == 0  # nothing sent after the reload returned met version 1
    # the new version's rows of the most asked (user, k) were cached before it served: every hot user hits at once
    assert reload["hot_users_cached_new_version"] == 100, reload
    assert reload["prewarmed_rows"] >= 100, reload


def test_invalidation_storm_happened_mid_soak(soak):
    _, r = soak
    ((reload,), (storm,)), s = ([e for e in r["events"] if e["name"] == n] for n in ("reload", "storm")), r["soak"]
    assert "failed" not in storm, storm
    assert storm["t"] > reload["done_t"]
    assert storm["users"] >= 200 and storm["properties"] == 20
    # the hot users had rows (hits) before; every one of them was dropped, and the cache was emptied
    assert storm["hot_users_cached_before"] >= 50, storm
    assert storm["invalidated_rows"] >= storm["hot_users_cached_before"]
    assert storm["redis_keys_after"] < storm["redis_keys_before"] / 2, storm
    # hits and misses both, by the server's own metrics
    assert 0.2 < s["hit_ratio_overall"]["server"] < 0.98, s["hit_ratio_overall"]


def test_memory_is_sampled_and_bounded(soak):
    _, r = soak
    rss = r["soak"]["rss"]
    assert len(r["samples"]) >= 15  # one a second for 20 s
    assert rss["after_warmup_mb"] > 50
    assert rss["growth"] < 0.5, rss  # loose: the 10 % bar is the 10-minute benchmark's


def _soak_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("soak_bench", SOAK)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_open_loop_capacity_is_the_highest_rate_within_the_slo(monkeypatch):
    """The soak offers 80 % of the highest open-loop rate kept within the SLO, searched down from the closed-loop
    best (the short soak above uses `--capacity closed`: the search costs 20 s steps). Here each step's outcome
    is given, so the search rule itself is what is checked."""
    soak = _soak_module()
    asked = []

    def step(served, hot, known, hot_share, workers, rate, seconds):
        asked.append(round(rate))
        return {"rate": round(rate, 1), "sustained": rate <= 700}  # backlog above 700 req/s

    monkeypatch.setattr(soak, "open_loop", step)
    found = soak.open_loop_capacity(None, [], [], 0.7, 16, 1000.0, 20.0)
    assert asked == [1000, 900, 800, 700] and found["rps"] == 700.0  # stops at the first sustained rate
    asked.clear()
    none = soak.open_loop_capacity(None, [], [], 0.7, 16, 1000.0, 20.0, floor=0.8)  # never sustained
    assert asked == [1000, 900, 800] and none["rps"] is None


def test_a_step_past_saturation_is_not_sustained():
    """The steps of the 2026-12-03 10-minute runs (benchmarks/results/soak_open_capacity*.json): 571/s sustained;
    912/s had p99 <= 3 x p50 only because the queue lifted p50 itself; 762/s just over the knee."""
    soak = _soak_module()
    step = {"n": 11423, "p50_ms": 2.85, "p99_ms": 6.86}
    assert soak.sustained(step, {"p50_ms": 2.24}, 11423, 11423, 0)
    assert not soak.sustained({"n": 18240, "p50_ms": 65.22, "p99_ms": 192.34}, {"p50_ms": 12.51}, 18240, 18241, 0)
    assert not soak.sustained({"n": 15230, "p50_ms": 3.84, "p99_ms": 11.78}, {"p50_ms": 3.27}, 15230, 15231, 0)
    assert not soak.sustained(step, {"p50_ms": 2.24}, 11423, 11423, 1)  # an error
    assert not soak.sustained(step, {"p50_ms": 2.24}, 11000, 11423, 0)  # requests left unsent
