"""Stream processor against real services: Tansu (Kafka API), Redis, Feast (Redis online store).

The topics are the contract's fixed names on one session broker, so every test uses its own entity ids (a
tag), consumer group and state-store key prefix; records of other tests that a processor also reads touch
other entities only. The 50,000-event test is last (later processors would re-read its records).
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from kafka_helpers import read_topic

from rentalml.config import Settings, get_settings
from rentalml.schema import PropertyEvent
from rentalml.services import wait_until

BOOTSTRAP = "RENTALML_KAFKA__BOOTSTRAP_SERVERS"  # the env entry the readers connect to

ROOT = Path(__file__).resolve().parents[1]
LATENESS_S = 3 * 86_400  # the tests' events span the last day: none of them is late


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def stream_env(kafka_bootstrap, redis_url, tmp_path_factory):
    """One isolated RENTALML_HOME with a registered Feast repo (Redis online store) for the module."""
    home = tmp_path_factory.mktemp("stream-home")
    env = {"RENTALML_HOME": str(home), "RENTALML_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
           "RENTALML_REDIS_URL": redis_url, "RENTALML_FEAST__REPO_PATH": str(ROOT / "feature_repo"),
           "RENTALML_STREAM__ALLOWED_LATENESS_S": str(LATENESS_S)}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        get_settings.cache_clear()
        from rentalml.features.store import apply, open_store
        from rentalml.kafka import ensure_topics

        store = open_store()
        apply(store)
        ensure_topics()
        from kafka import KafkaConsumer

        c = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
        for topic in ("user_interactions", "property_data", "processed_data", "dead_letter", "ab_outcomes"):
            assert c.partitions_for_topic(topic) == set(range(get_settings().kafka.partitions)), topic
        c.close()
        yield env, store
    get_settings.cache_clear()


def _tag() -> str:
    return uuid.uuid4().hex[:8]


def _settings(env: dict, tag: str, **stream) -> Settings:
    return Settings(home=Path(env["RENTALML_HOME"]), redis_url=env["RENTALML_REDIS_URL"],
                    kafka={"bootstrap_servers": env["RENTALML_KAFKA__BOOTSTRAP_SERVERS"]},
                    stream={"group_id": f"g-{tag}", "key_prefix": f"t:{tag}", "allowed_lateness_s": LATENESS_S,
                            **stream})


def _proc_env(env: dict, tag: str, **extra) -> dict:
    return {**os.environ, **env, "RENTALML_STREAM__GROUP_ID": f"g-{tag}", "RENTALML_STREAM__KEY_PREFIX": f"t:{tag}",
            "OMP_NUM_THREADS": "1", **extra}


def _start(env: dict, tag: str, log: Path, *args: str, **extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rentalml.cli", "stream", "run", *args],
                            env=_proc_env(env, tag, **extra), stdout=subprocess.PIPE, stderr=open(log, "ab"),
                            cwd=str(ROOT))


def _log_totals(log: Path) -> dict | None:
    last = None
    for line in log.read_text(errors="replace").splitlines():
        i = line.find('{"committed"')
        if i >= 0:
            last = json.loads(line[i:])["totals"]
    return last


def _run(env: dict, tag: str, log: Path, idle: float = 4.0, timeout: float = 120.0) -> dict:
    p = _start(env, tag, log, "--idle-exit-s", str(idle))
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, log.read_text()[-3000:]
    return json.loads(out.decode().strip().splitlines()[-1])


def _send(env: dict, records: list[tuple[str, bytes | None, bytes]], want_meta: bool = False) -> list:
    from rentalml.kafka import producer

    s = Settings(kafka={"bootstrap_servers": env["RENTALML_KAFKA__BOOTSTRAP_SERVERS"]})
    prod = producer(s, max_in_flight_requests_per_connection=5, linger_ms=20, batch_size=512 * 1024)
    futures = [prod.send(t, key=k, value=v) for t, k, v in records]
    prod.flush()
    meta = [f.get(timeout=30) for f in futures] if want_meta else []
    prod.close()
    return meta


def _interaction(tag: str, i: int, user: str, prop: str, etype: str, ts: datetime) -> dict:
    return {"event_id": f"{tag}-e{i}", "event_type": etype, "user_id": user, "property_id": prop,
            "timestamp": ts.isoformat(), "session_id": None, "variant": None}


def _listing(tag: str, prop: str, ts: datetime, **attrs) -> dict:
    base = {"price": 1500.0, "bedrooms": 2, "bathrooms": 1.0, "city": "Boston", "lat": 42.36, "lon": -71.06,
            "property_type": "apartment"}
    return {"event_id": f"{tag}-listed-{prop}", "event_type": "listed", "property_id": prop,
            "timestamp": ts.isoformat(), "attributes": {**base, **attrs}}


def _enc(topic: str, ev: dict) -> tuple[str, bytes, bytes]:
    key = ev["property_id"] if topic == "property_data" else ev["user_id"]
    return topic, key.encode(), json.dumps(ev).encode()


def _online(store, props=None, users=None) -> pd.DataFrame:
    from rentalml.features.store import online_features

    if props:
        return online_features(store, property_ids=props).set_index("property_id")
    return online_features(store, user_ids=users).set_index("user_id")


# ------------------------------------------------------------------------------------------------ unit level
def test_validation_reasons_name_the_field():
    from rentalml.streaming.produce import MALFORMED_KINDS, malformed
    from rentalml.streaming.validate import InvalidEvent, dead_letter, parse

    rng = random.Random(0)
    reasons = {}
    for i, kind in enumerate(MALFORMED_KINDS):
        topic, value = malformed(i, rng)
        with pytest.raises(InvalidEvent) as exc:
            parse(topic, value)
        reasons[kind] = exc.value.reason
    assert reasons["bad_json"].startswith("malformed JSON")
    assert reasons["not_utf8"].startswith("payload is not UTF-8")
    assert "'user_id'" in reasons["missing_field"]
    assert "'event_type'" in reasons["bad_enum"]
    assert "'timestamp'" in reasons["no_zone"] and "zone" in reasons["no_zone"]
    assert "'attributes.rooftop_helipad'" in reasons["unknown_attribute"]
    dl = dead_letter("user_interactions", 2, 17, reasons["not_utf8"], b"\xff\xfeabc")
    assert base64.b64decode(dl["payload"]) == b"\xff\xfeabc"
    assert set(dl) == {"topic", "partition", "offset", "reason", "payload", "received_at"}
    ev = PropertyEvent.model_validate({"event_id": "x", "event_type": "delisted", "property_id": "p",
                                       "timestamp": "2026-01-01T00:00:00Z"})
    assert ev.changed() == {"available": 0}


def test_client_config_passes_sasl_and_tls_to_every_client():
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

    from rentalml.kafka import client_config

    s = Settings(kafka={"bootstrap_servers": "k-0:9093, k-1:9093", "security_protocol": "SASL_SSL",
                        "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "rentalml-stream", "sasl_password": "pw",
                        "ssl_cafile": "/etc/kafka/ca.crt"})
    cfg = client_config(s)
    assert cfg == {"bootstrap_servers": ["k-0:9093", "k-1:9093"], "security_protocol": "SASL_SSL",
                   "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "rentalml-stream",
                   "sasl_plain_password": "pw", "ssl_check_hostname": True, "ssl_cafile": "/etc/kafka/ca.crt"}
    for client in (KafkaConsumer, KafkaProducer, KafkaAdminClient):
        assert set(cfg) <= set(client.DEFAULT_CONFIG), client
    assert client_config(Settings()) == {"bootstrap_servers": ["127.0.0.1:9092"], "security_protocol": "PLAINTEXT"}


@pytest.mark.parametrize("backend", ["redis", "sqlite"])
def test_state_store_dedupes_rejects_late_and_orders_attributes(backend, redis_url, tmp_path):
    from rentalml.streaming.aggregates import engagement_frame

    from rentalml.state.redis import RedisState
    from rentalml.state.sqlite import SQLiteState

    tag = _tag()
    s = Settings(home=tmp_path, stream={"key_prefix": f"u:{tag}", "allowed_lateness_s": 3600, "history_len": 3})
    st = RedisState(s, redis_url) if backend == "redis" else SQLiteState(s, tmp_path / "state.db")
    t0 = 1_800_000_000.0
    ev = lambda i, p, ts, t="v", u="u1": {"id": f"e{i}", "k": "i", "t": t, "u": u, "p": p, "ts": ts}  # noqa: E731
    a = st.apply([ev(1, "p1", t0), ev(2, "p1", t0 + 10, "s"), ev(1, "p1", t0)])
    assert a.outcomes == ["processed", "processed", "duplicate"]
    v1 = int(a.engagement["p1"]["_v"])
    row = engagement_frame(a).set_index("property_id").loc["p1"]
    assert (row["views_1h"], row["views_7d"], row["saves_24h"]) == (1, 1, 1)
    b = st.apply([ev(1, "p1", t0), ev(2, "p1", t0 + 10, "s")])  # a redelivered batch: nothing changes
    assert b.outcomes == ["duplicate", "duplicate"]
    assert b.engagement["p1"] == a.engagement["p1"]
    c = st.apply([ev(3, "p2", t0 + 7200), ev(4, "p1", t0 + 7200 - 3601), ev(5, "p1", t0 + 3700)])
    assert c.outcomes == ["processed", "late", "processed"]
    assert int(c.engagement["p1"]["_v"]) > v1
    row = engagement_frame(c).set_index("property_id").loc["p1"]
    assert (row["views_1h"], row["views_24h"], row["views_7d"]) == (0, 2, 2)  # clock t0+7200: t0's bucket left 1h
    # property attributes: per-attribute event time (an older update never overwrites), delisting; never late
    pe = lambda i, ts, t, **a: {"id": f"p{i}", "k": "p", "t": t, "p": "p9", "ts": ts,  # noqa: E731
                                "a": {k: json.dumps(v) for k, v in a.items()}}
    st.apply([pe(1, t0 + 100, "listed", price=1000.0, city="Austin", available=1),
              pe(2, t0 + 300, "updated", price=1200.0), pe(3, t0 + 200, "updated", price=1100.0, bedrooms=2)])
    assert st.property_attributes(["p9"])["p9"] == {"price": 1200.0, "city": "Austin", "available": 1,
                                                    "bedrooms": 2}
    d = st.apply([pe(4, t0 - 86_400, "delisted", available=0)])
    assert d.outcomes == ["processed"]  # a year-old property event is not "late" ...
    assert st.property_attributes(["p9"])["p9"]["available"] == 1  # ... but older than the listing: no effect
    # history: distinct properties, newest last, bounded
    st.apply([ev(10 + i, f"h{i}", t0 + 7200 + i, u="u2") for i in range(5)] + [ev(20, "h1", t0 + 7300, u="u2")])
    assert st.recent_history("u2") == ["h3", "h4", "h1"]
    assert st.recent_history("nobody") == []
    # windows move on with the clock: a property without new events is due for a re-push at its next change
    from rentalml.streaming.aggregates import next_change

    e = st.apply([ev(30, "w1", t0 + 10_000)])
    st.schedule({p: next_change(h, e.clock) for p, h in e.engagement.items()})
    assert st.due(e.clock) == []
    f = st.apply([ev(31, "w2", t0 + 10_000 + 3600)])
    assert "w1" in st.due(f.clock)
    g = st.refresh_engagement(["w1"])
    assert int(g.engagement["w1"]["_v"]) > int(e.engagement["w1"]["_v"])
    row = engagement_frame(g).set_index("property_id").loc["w1"]
    assert (row["views_1h"], row["views_24h"]) == (0, 1)
    st.close()


# ------------------------------------------------------------------------------------------------ services
def _wait(log: Path, proc: subprocess.Popen, **at_least) -> dict:
    def reached() -> dict | None:
        totals = _log_totals(log) or {}
        return totals if all(totals.get(k, 0) >= v for k, v in at_least.items()) else None

    try:
        return wait_until(reached, 60, proc=proc, what=f"processor totals {at_least}")
    except (TimeoutError, RuntimeError) as exc:
        raise AssertionError(f"{exc}\n{log.read_text()[-3000:]}") from None


def test_duplicates_updates_late_metrics_and_sigterm(stream_env, tmp_path):
    """(b) the same event twice -> counted once, and sent again later -> no change; (c) a price update and a
    delisting change the online attributes; late and malformed records go to dead_letter with the reason;
    (d) SIGTERM: the processor finishes, commits and exits 0 (a restart re-reads nothing it handled)."""
    import httpx

    from rentalml.services import free_port
    from rentalml.state import recent_history

    env, store = stream_env
    tag = _tag()
    now = datetime.now(UTC).replace(microsecond=0)
    p1, p2, u1 = f"p_{tag}_1", f"p_{tag}_2", f"u_{tag}_1"
    e1 = _interaction(tag, 1, u1, p1, "view", now - timedelta(minutes=10))
    e2 = _interaction(tag, 2, u1, p1, "save", now - timedelta(minutes=5))
    late = _interaction(tag, 3, u1, p2, "view", now - timedelta(seconds=LATENESS_S + 3600))
    log, port = tmp_path / "run1.log", free_port()
    proc = _start(env, tag, log, "--metrics-port", str(port))
    try:
        # listings first (the user taste reads the attributes the stream has when the user's events arrive)
        _send(env, [_enc("property_data", _listing(tag, p1, now - timedelta(hours=1), price=1000.0)),
                    _enc("property_data", _listing(tag, p2, now - timedelta(hours=1), city="Denver")),
                    ("user_interactions", None, f'{{"event_id": "{tag}-bad", "event_type": "jump"}}'.encode())])
        _wait(log, proc, processed=2)
        _send(env, [_enc("user_interactions", e) for e in (e1, e1, e2, late)])
        _wait(log, proc, processed=4, duplicate=1)
        on = _online(store, props=[p1])
        assert on.loc[p1, "views_7d"] == 1 and on.loc[p1, "saves_7d"] == 1 and on.loc[p1, "price"] == 1000.0
        _send(env, [_enc("property_data", {"event_id": f"{tag}-u1", "event_type": "updated", "property_id": p1,
                                           "timestamp": (now - timedelta(minutes=1)).isoformat(),
                                           "attributes": {"price": 1250.0}}),
                    _enc("property_data", {"event_id": f"{tag}-d2", "event_type": "delisted", "property_id": p2,
                                           "timestamp": (now - timedelta(minutes=1)).isoformat(), "attributes": {}})])
        _wait(log, proc, processed=6)
        scrape = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert 'ml_stream_events_total{outcome="duplicate",topic="user_interactions"} 1.0' in scrape
        assert 'ml_stream_events_total{outcome="dead_letter",topic="user_interactions"} 2.0' in scrape
        assert "ml_stream_push_seconds_count" in scrape and "ml_stream_committed_lag{" in scrape
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert json.loads(out.decode().strip().splitlines()[-1])["processed"] >= 6

    on = _online(store, props=[p1, p2])
    assert on.loc[p1, "views_7d"] == 1 and on.loc[p1, "saves_7d"] == 1 and on.loc[p1, "views_1h"] == 1
    assert on.loc[p1, "price"] == 1250.0 and on.loc[p1, "available"] == 1
    assert on.loc[p2, "available"] == 0 and on.loc[p2, "city"] == "Denver"
    assert pd.isna(on.loc[p2, "views_7d"])  # its only interaction was late
    taste = _online(store, users=[u1]).loc[u1]
    assert taste["n_events_7d"] == 2 and taste["top_city"] == "Boston" and taste["median_price"] == 1000.0
    assert recent_history(u1, _settings(env, tag)) == [p1]
    dlq = read_topic(env[BOOTSTRAP], "dead_letter", lambda d: tag in d["payload"])
    reasons = sorted(d["reason"] for d in dlq)
    assert len(dlq) == 2, reasons
    assert reasons[0].startswith("invalid event: field 'event_type'") and "'user_id'" in reasons[0]
    assert reasons[1].startswith("late event: field 'timestamp'")
    processed = read_topic(env[BOOTSTRAP], "processed_data", lambda d: d["event_id"].startswith(tag))
    assert sorted(d["event_id"] for d in processed if not d["duplicate"]) == sorted(
        [e1["event_id"], e2["event_id"], f"{tag}-listed-{p1}", f"{tag}-listed-{p2}", f"{tag}-u1", f"{tag}-d2"])
    assert [d["event_id"] for d in processed if d["duplicate"]] == [e1["event_id"]]

    # the same events again, later: duplicates, the online values do not change; the restart after SIGTERM
    # re-reads nothing it had handled (its commit happened): exactly these two records
    before = _online(store, props=[p1])
    _send(env, [_enc("user_interactions", e1), _enc("user_interactions", e2)])
    totals = _run(env, tag, tmp_path / "run2.log")
    assert (totals["processed"], totals["duplicate"], totals["dead_letter"]) == (0, 2, 0)
    pd.testing.assert_frame_equal(_online(store, props=[p1]), before)


def _reference(valid: list[dict]) -> tuple[pd.DataFrame, pd.Series]:
    """Engagement windows per property and n_events_7d per user, computed offline from the valid events with
    the documented window definition (bucket windows ending at the max event time)."""
    df = pd.DataFrame(valid)
    ts = pd.to_datetime(df["timestamp"], utc=True, format="ISO8601").astype("int64") / 1e9
    clock = ts.max()
    hour, m5 = (ts // 3600).astype(int), (ts // 300).astype(int)
    cur_h, cur_m = math.floor(clock / 3600), math.floor(clock / 300)
    cols = {}
    for name, et, size, window in [("views_1h", "view", 300, 3600), ("views_24h", "view", 3600, 86_400),
                                   ("views_7d", "view", 3600, 604_800), ("saves_24h", "save", 3600, 86_400),
                                   ("saves_7d", "save", 3600, 604_800), ("inquiries_7d", "inquiry", 3600, 604_800),
                                   ("applications_7d", "application", 3600, 604_800)]:
        b, cur = (m5, cur_m) if size == 300 else (hour, cur_h)
        mask = (df["event_type"] == et) & (b > cur - window // size)
        cols[name] = df[mask].groupby("property_id").size()
    ref = pd.DataFrame(cols).reindex(sorted(df["property_id"].unique())).fillna(0).astype(int)
    n7 = df[hour > cur_h - 168].groupby("user_id").size()
    return ref, n7


def test_50k_events_sigkill_midway_exactly_once_effect(stream_env, tmp_path):
    """(a) 50,000 events with 1 % malformed; the processor is SIGKILLed after some commits and restarted:
    every valid event is reflected in the online store exactly once (counts = offline reference), every
    malformed record is in dead_letter with a reason, processed_data has every valid event id."""
    from rentalml.streaming.produce import malformed

    env, store = stream_env
    tag = _tag()
    rng = random.Random(7)
    n_valid, n_props, n_users = 50_000, 300, 1000
    now = datetime.now(UTC)
    start = now - timedelta(hours=23)
    types = ["view"] * 70 + ["save"] * 15 + ["inquiry"] * 8 + ["application"] * 5 + ["lease"] * 2
    props = [f"p_{tag}_{i}" for i in range(n_props)]
    valid = [_interaction(tag, i, f"u_{tag}_{rng.randrange(n_users)}", props[int(rng.paretovariate(1.2)) % n_props],
                          rng.choice(types), start + timedelta(seconds=i * 23 * 3600 / n_valid))
             for i in range(n_valid)]
    listings = [_listing(tag, p, start - timedelta(hours=1), price=float(1000 + 10 * i)) for i, p in enumerate(props)]
    records: list[tuple[str, bytes | None, bytes]] = [_enc("property_data", e) for e in listings]
    bad_at = set(rng.sample(range(n_valid), n_valid // 100))
    bad_idx = []
    for i, ev in enumerate(valid):
        if i in bad_at:
            t, v = malformed(len(bad_idx), rng)
            bad_idx.append(len(records))
            records.append((t, None, v.replace(b"bad-", f"bad-{tag}-".encode())))
        records.append(_enc("user_interactions", ev))
    meta = _send(env, records, want_meta=True)
    bad_coords = {(meta[i].topic, meta[i].partition, meta[i].offset) for i in bad_idx}
    assert len(bad_coords) == 500

    log = tmp_path / "run.log"
    p = _start(env, tag, log, "--idle-exit-s", "3")
    try:
        wait_until(lambda: (_log_totals(log) or {}).get("processed", 0) >= 15_000 or p.poll() is not None, 90,
                   what="15,000 events processed")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{log.read_text()[-3000:]}") from None
    time.sleep(0.15)  # most likely inside the next batch: between its state update, push, produce and commit
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = _log_totals(log)
    assert killed_at["processed"] < n_valid + len(listings)
    totals = _run(env, tag, tmp_path / "rerun.log", idle=3, timeout=180)
    # the restart resumes from the last commit: it re-reads at most the batch in flight at the kill (applied to
    # the state store or not: its redeliveries count as duplicates and change nothing)
    assert (totals["processed"] + totals["duplicate"]
            <= n_valid + len(listings) - killed_at["processed"] + get_settings().stream.batch_size)

    ref, n7 = _reference(valid)
    on = _online(store, props=list(ref.index))
    got = on[list(ref.columns)].reindex(ref.index).fillna(0).astype(int)
    pd.testing.assert_frame_equal(got, ref, check_names=False)
    users = list(n7.index)
    taste = _online(store, users=users)["n_events_7d"].reindex(users)
    assert (taste.astype(int).to_numpy() == n7.to_numpy()).all()

    dlq = read_topic(env[BOOTSTRAP], "dead_letter", lambda d: (d["topic"], d["partition"], d["offset"]) in bad_coords)
    assert {(d["topic"], d["partition"], d["offset"]) for d in dlq} == bad_coords
    assert all(d["reason"] for d in dlq)
    processed = read_topic(env[BOOTSTRAP], "processed_data", lambda d: d["event_id"].startswith(f"{tag}-e"))
    assert {d["event_id"] for d in processed} == {e["event_id"] for e in valid}
    first = [d["event_id"] for d in processed if not d["duplicate"]]
    assert len(first) == len(set(first))  # no event applied twice
