"""The loop from a Kafka event to a served recommendation, all real: Tansu → `rentalml stream run` (state in
Redis, features pushed to Feast's Redis online store, cache rows invalidated) → `rentalml serve` with fold-in and
Feast features (tritonclient + the friendly API). No retraining anywhere:

* a brand-new user's first streamed views turn their cold-start list into model recommendations that follow
  those views;
* a never-seen listing (a re-listed copy of a popular property) is recommended to the users who get its twin;
* a price update shows in the served explanation, a delisting removes the property from every list.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from serving_helpers import Server, v2_infer, v2_params

from rentalml.config import get_settings
from rentalml.export.bundle import write_bundle
from rentalml.runtime.bundle import Bundle

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(kafka_bootstrap, redis_url, market, fit, tmp_path_factory):
    base = tmp_path_factory.mktemp("fresh")
    tag = uuid.uuid4().hex[:8]
    redis = redis_url.rsplit("/", 1)[0] + "/5"  # a database of its own on the session's server
    env = {"RENTALML_HOME": str(base / "home"), "RENTALML_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
           "RENTALML_REDIS_URL": redis, "RENTALML_FEAST__REPO_PATH": str(ROOT / "feature_repo"),
           "RENTALML_STREAM__GROUP_ID": f"fresh-{tag}", "RENTALML_STREAM__KEY_PREFIX": f"fresh:{tag}",
           "RENTALML_STREAM__ALLOWED_LATENESS_S": str(3 * 86_400), "RENTALML_SERVE__FOLD_IN": "true",
           "RENTALML_SERVE__FEATURE_SOURCE": "feast", "RENTALML_SERVE__LIVE_REFRESH_S": "0.2",
           "OMP_NUM_THREADS": "1"}
    bundle_dir = write_bundle(fit("hybrid"), market, base / "bundle", quantize=False)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        get_settings.cache_clear()
        import redis as redis_lib

        redis_lib.Redis.from_url(redis).flushdb()
        from rentalml.features.store import apply, open_store
        from rentalml.kafka import ensure_topics

        apply(open_store())
        ensure_topics()
        server = Server(bundle_dir, base / "serve.log", env=env)
        try:
            server.wait_ready()
            yield {"env": env, "tag": tag, "server": server, "bundle": Bundle(bundle_dir), "base": base}
        finally:
            server.stop()
            get_settings.cache_clear()


def _send(env: dict, records: list[tuple[str, str, dict]]) -> None:
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=env["RENTALML_KAFKA__BOOTSTRAP_SERVERS"])
    for topic, key, value in records:
        p.send(topic, key=key.encode(), value=json.dumps(value).encode())
    p.flush()
    p.close()


def _process(world) -> dict:
    """`rentalml stream run` until the topics are drained (exit after 3 idle seconds)."""
    env = {**os.environ, **world["env"]}
    out = subprocess.run([sys.executable, "-m", "rentalml.cli", "stream", "run", "--idle-exit-s", "3"],
                         env=env, capture_output=True, text=True, timeout=180, cwd=world["base"])
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _v2(world, users: list[str], k: int = 10):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{world['server'].http_port}")
    res = v2_infer(client, httpclient, users, k)
    ids = [[p.decode() if isinstance(p, bytes) else p for p in row] for row in res.as_numpy("property_id")]
    return ids, v2_params(res, False)["sources"].split(",")


def test_streamed_events_reach_served_recommendations(world, market):
    bundle, tag, env = world["bundle"], world["tag"], world["env"]
    items = market.items
    new_user = f"u_new_{tag}"
    users = list(bundle.user_index[:150])
    before, src = _v2(world, [new_user, *users])
    assert src[0] == "cold_start"  # (and now cached in Redis: the stream must invalidate it)

    counts: dict[str, int] = {}
    for row in before[1:]:
        for p in row:
            counts[p] = counts.get(p, 0) + 1
    twin = max(counts, key=counts.get)
    city = items["city"].value_counts().index[2]  # a mid-sized city, not the fallback's
    views = list(items.index[items["city"] == city][:6])
    known = before[1][0]  # user 0's top property: its price changes, then it is delisted
    twin_attrs = items.loc[twin].to_dict()
    attrs = {k: twin_attrs[k] for k in ("price", "bedrooms", "bathrooms", "area_sqm", "lat", "lon", "property_type",
                                         "room_type", "city", "neighbourhood", "pets_allowed")}
    attrs["amenities"] = list(twin_attrs["amenities"])
    attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in attrs.items()}
    new_pid = f"p_new_{tag}"
    records = [("property_data", new_pid, {"event_id": f"l-{tag}", "event_type": "listed", "property_id": new_pid,
                                           "timestamp": _now(), "attributes": attrs}),
               ("property_data", known, {"event_id": f"u-{tag}", "event_type": "updated", "property_id": known,
                                         "timestamp": _now(), "attributes": {"price": 4321.0}})]
    records += [("user_interactions", new_user, {"event_id": f"v{i}-{tag}", "event_type": "view", "user_id": new_user,
                                                 "property_id": p, "timestamp": _now(), "session_id": None,
                                                 "variant": None}) for i, p in enumerate(views)]
    _send(env, records)
    totals = _process(world)
    assert totals["processed"] >= len(records)

    # the brand-new user: model recommendations from six streamed views (fold-in), no longer the fallback
    after, src = _v2(world, [new_user, *users])
    assert src[0] == "model"
    top = [p for p in after[0] if p]
    assert not set(top) & set(views)
    assert np.mean(items.loc[[p for p in top if p in items.index], "city"].to_numpy() == city) >= 0.7
    # the never-seen listing sits where its twin is: most users who get the twin now get it too
    with_twin = [i for i in range(1, len(after)) if twin in after[i]]
    got = [i for i in with_twin if new_pid in after[i]]
    assert len(with_twin) >= 10 and len(got) / len(with_twin) >= 0.6

    # the price change shows in the served explanation (the friendly API reads Feast's online features)
    r = httpx.post(f"{world['server'].url}/predict", json={"user_id": users[0], "num_recommendations": 10,
                                                           "include_explanations": True})
    assert r.status_code == 200, r.text
    recs = {x["property_id"]: x for x in r.json()["recommendations"]}
    assert known in recs and "$4,321/month" in recs[known]["explanation"]
    r = httpx.post(f"{world['server'].url}/explain", json={"user_id": users[0], "property_id": known})
    assert r.status_code == 200 and "$4,321/month" in r.json()["explanation"]
    r = httpx.post(f"{world['server'].url}/explain", json={"user_id": users[0], "property_id": new_pid})
    assert r.status_code == 200 and r.json()["explanation"].startswith("new listing")
    r = httpx.post(f"{world['server'].url}/explain", json={"user_id": users[0]})
    assert r.status_code == 422 and "property_id" in r.text

    # a delisting takes the property out of every list (available = 0 in Feast; cached rows invalidated)
    _send(env, [("property_data", known, {"event_id": f"d-{tag}", "event_type": "delisted", "property_id": known,
                                          "timestamp": _now(), "attributes": {}})])
    _process(world)
    final, _ = _v2(world, users)
    assert all(known not in row for row in final)
