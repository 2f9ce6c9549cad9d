"""Faults injected on loopback with real processes (issue 13, points 1 and 2): what the system promises under each
is in docs/operations.md ("Faults: what the system promises").

* Broker restart mid-stream: a durable Tansu (`s3://` storage on moto's S3 server, shared/design/durable-broker.md)
  is stopped for 10 s while events (1 % malformed) flow at a steady rate, then started again on the same storage
  and port. The client's contract is the anchor (kafka-python 3.0.12, kafka/producer/kafka.py: `flush()` returns
  when every record is "completed", i.e. acknowledged *or failed*, without raising, so the caller must check each
  future before committing; `enable_idempotence` defaults to True, so a retried send is not written twice).
  The test's own producer (the outside world's events) is not idempotent against Tansu: Tansu 0.6.0's dynostore
  `produce` persists the producer's sequence (meta.json) and the high watermark before it writes the batch object,
  so a batch in flight when it stops is refused as DUPLICATE_SEQUENCE_NUMBER when resent, which kafka-python takes
  for success: 74 events lost behind an offset gap, seen in 2 of 6 runs. Without idempotence the resend is written
  again (input at least once), and the processor must count a redelivered event once.
* Redis restart mid-stream, with the persistence of manifests/base/features/redis.yaml (`--appendonly yes`;
  redis/redis 7.4.1, the newest tag stored, the manifests run 7.4.2: redis.conf `appendfsync everysec` is the
  default, and src/server.c `beforeSleep` writes the AOF buffer (`flushAppendOnlyFile`) before
  `handleClientsWithPendingWritesUsingThreads` sends replies, so an acknowledged write is in the file when the
  process stops), stopped for 10 s: same assertions for the stream, and `rentalml serve` keeps answering 200 with
  cache misses only, counting `ml_cache_errors_total`.

Both compare the online features with counts computed from the produced events, check processed_data holds every
valid event id once (first delivery), and that every malformed record is in dead_letter exactly once (by its
topic/partition/offset). Tansu's high watermarks and transactions are unreliable: everything relies on committed
offsets and reads topics until idle.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml
from kafka_helpers import read_topic

from rentalml import services
from rentalml.config import Settings, get_settings

ROOT = Path(__file__).resolve().parents[1]
LATENESS_S = 3 * 86_400
N_VALID, N_PROPS, N_USERS, RATE = 20_000, 200, 800, 1000.0
OUTAGE_S = 10.0
#: Tansu on S3 storage writes one object per produced record batch (…/partitions/N/records/OFFSET.batch) and a
#: fetch reads them one object request at a time for at most its max wait: with 5 ms-linger batches of 1-2 records
#: and the processor's 50 ms, ~85-200 records/s on moto (measured), falling as a partition's object count grows.
#: The broker test's producer batches as a bulk event producer does (200 ms linger, 512 KiB batches: ~70 records
#: per object live, ~2,000 for the backlog held through the outage) and its processor lets a fetch run 500 ms
BROKER_BATCHING = {"linger_ms": 200, "batch_size": 512 * 1024, "idempotent": False}
BROKER_FETCH_MAX_WAIT_MS = 500
TYPES = ["view"] * 70 + ["save"] * 15 + ["inquiry"] * 8 + ["application"] * 5 + ["lease"] * 2
WINDOWS = {"view": "views_7d", "save": "saves_7d", "inquiry": "inquiries_7d", "application": "applications_7d"}


def _service(fn, *a, **kw):
    try:
        return fn(*a, **kw)
    except services.ServiceUnavailable as exc:
        if os.environ.get("RENTALML_REQUIRE_SERVICES") == "1":
            pytest.fail(f"required service missing: {exc}")
        pytest.skip(str(exc))


def manifest_redis_args() -> tuple[list[str], bool]:
    """redis-server's persistence / policy flags in manifests/base/features/redis.yaml (without --dir, which is
    the test's folder, and --requirepass, whose value is a Secret), and whether it sets a password."""
    docs = list(yaml.safe_load_all((ROOT / "manifests/base/features/redis.yaml").read_text()))
    (sts,) = [d for d in docs if d and d["kind"] == "StatefulSet"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    argv = shlex.split(container["args"][0].removeprefix("exec "))
    assert argv[0] == "redis-server", argv
    out, password, i = [], False, 1
    while i < len(argv):
        if argv[i] in ("--dir", "--requirepass"):
            password |= argv[i] == "--requirepass"
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out, password


class Flow(threading.Thread):
    """A producer: the listings, then (once `go` is set) N_VALID interactions at a steady rate, stamped when sent,
    with 1 % malformed records (each carrying the tag, so the dead_letter payload names it). Keeps the metadata of
    the malformed sends (their topic/partition/offset) and the valid events. `linger_ms`/`batch_size`: the
    producer's batching (on Tansu's S3 storage each batch is one object); `idempotent`: see the module docstring."""

    def __init__(self, bootstrap: str, tag: str, rate: float = RATE, n_valid: int = N_VALID, seed: int = 13,
                 linger_ms: int = 5, batch_size: int = 16_384, idempotent: bool = True):
        super().__init__(daemon=True)
        self.bootstrap, self.tag, self.rate, self.n_valid = bootstrap, tag, rate, n_valid
        self.batching = {"linger_ms": linger_ms, "batch_size": batch_size, "enable_idempotence": idempotent}
        self.listed, self.go = threading.Event(), threading.Event()
        self.rng = random.Random(seed)
        self.props = [f"p_{tag}_{i}" for i in range(N_PROPS)]
        self.valid: list[dict] = []
        self.bad_futures: list = []
        self.error: BaseException | None = None
        self.started_at = self.done_at = None

    def _malformed(self, i: int) -> tuple[str, bytes]:
        from rentalml.streaming.produce import malformed

        topic, value = malformed(i, self.rng)
        if value.startswith(b"\xff\xfe"):  # not UTF-8: the tag inside, dead_letter carries it base64-encoded
            return topic, b"\xff\xfe" + f"bad-{self.tag}-{i}".encode()
        return topic, value.replace(b"bad-", f"bad-{self.tag}-".encode())

    def run(self) -> None:
        from rentalml.kafka import ensure_topics, producer

        try:
            settings = Settings(kafka={"bootstrap_servers": self.bootstrap})
            ensure_topics(settings)
            prod = producer(settings, max_in_flight_requests_per_connection=5, **self.batching)
            now = datetime.now(UTC).isoformat()
            for i, p in enumerate(self.props):
                ev = {"event_id": f"{self.tag}-listed-{p}", "event_type": "listed", "property_id": p,
                      "timestamp": now, "attributes": {"price": 1000.0 + i, "bedrooms": 2, "bathrooms": 1.0,
                                                       "city": "Boston", "lat": 42.36, "lon": -71.06,
                                                       "property_type": "apartment"}}
                prod.send("property_data", key=p.encode(), value=json.dumps(ev).encode())
            prod.flush()
            self.listed.set()
            if not self.go.wait(300):
                raise TimeoutError("never told to go")
            self.started_at = time.monotonic()
            for i in range(self.n_valid):
                if self.rng.random() < 0.01:
                    t, v = self._malformed(len(self.bad_futures))
                    self.bad_futures.append(prod.send(t, value=v))
                ev = {"event_id": f"{self.tag}-e{i}", "event_type": self.rng.choice(TYPES),
                      "user_id": f"u_{self.tag}_{self.rng.randrange(N_USERS)}",
                      "property_id": self.props[int(self.rng.paretovariate(1.2)) % N_PROPS],
                      "timestamp": datetime.now(UTC).isoformat(), "session_id": None, "variant": None}
                self.valid.append(ev)
                prod.send("user_interactions", key=ev["user_id"].encode(), value=json.dumps(ev).encode())
                if i % 50 == 0:
                    ahead = (i + 1) / self.rate - (time.monotonic() - self.started_at)
                    if ahead > 0:
                        time.sleep(ahead)
            prod.flush()
            self.done_at = time.monotonic()
            self.bad_coords = [(m.topic, m.partition, m.offset) for m in (f.get(timeout=60) for f in self.bad_futures)]
            prod.close()
        except BaseException as exc:  # reported by the test
            self.error = exc


def _env(home: Path, bootstrap: str, redis_url: str, tag: str) -> dict:
    return {**os.environ, "RENTALML_HOME": str(home), "RENTALML_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "RENTALML_REDIS_URL": redis_url, "RENTALML_FEAST__REPO_PATH": str(ROOT / "feature_repo"),
            "RENTALML_STREAM__ALLOWED_LATENESS_S": str(LATENESS_S), "RENTALML_STREAM__GROUP_ID": f"g-{tag}",
            "RENTALML_STREAM__KEY_PREFIX": f"t:{tag}", "OMP_NUM_THREADS": "1"}


def _apply_feast(env: dict):
    from rentalml.features.store import apply, open_store

    with pytest.MonkeyPatch.context() as mp:
        for k in ("RENTALML_HOME", "RENTALML_REDIS_URL", "RENTALML_FEAST__REPO_PATH"):
            mp.setenv(k, env[k])
        get_settings.cache_clear()
        store = open_store()
        apply(store)
    get_settings.cache_clear()
    return store


def _totals(log: Path) -> dict:
    last = {}
    for line in log.read_text(errors="replace").splitlines():
        i = line.find('{"committed"')
        if i >= 0:
            last = json.loads(line[i:])["totals"]
    return last





def _until(predicate, timeout: float, proc: subprocess.Popen, log: Path, what: str) -> None:
    """services.wait_until, failing the test with the processor's totals and log tail (also when it exits)."""
    try:
        services.wait_until(predicate, timeout, interval=0.1, proc=proc, what=what)
    except (TimeoutError, RuntimeError) as exc:
        raise AssertionError(f"{exc}; totals {_totals(log)}:\n{log.read_text()[-3000:]}") from None


def _names_tag(tag: str):
    def keep(d: dict) -> bool:
        payload = d.get("payload", "")
        if tag in payload:
            return True
        try:
            return tag.encode() in base64.b64decode(payload, validate=True)
        except ValueError:
            return False
    return keep


def _bad_index(d: dict, tag: str) -> int | None:
    """The index i of the malformed record a dead letter carries (`bad-{tag}-{i}` in its payload, base64-encoded
    when the record was not UTF-8)."""
    pattern = re.compile(rf"bad-{tag}-(\d+)".encode())
    payload = d.get("payload", "")
    m = pattern.search(payload.encode())
    if m is None:
        try:
            m = pattern.search(base64.b64decode(payload, validate=True))
        except ValueError:
            return None
    return int(m.group(1)) if m else None


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def run_outage(tmp_path: Path, tag: str, bootstrap: str, redis_url: str, stop, start, during=None,
               n_valid: int = N_VALID, rate: float = RATE, flow_opts: dict | None = None,
               env: dict | None = None, gate_flow: bool = False) -> dict:
    """The processor (`rentalml stream run`, `env` added to its environment) and a Flow (`flow_opts`: its producer
    batching); `stop()` once the processor is at work on the flow's events, `start()` OUTAGE_S later; `during()` is
    called repeatedly meanwhile. The flow starts with the processor, or with `gate_flow` once the processor has
    handled the listings, so the events flow before, through and after the outage however long the processor
    takes to start (a busy machine: 30 s, the whole flow otherwise passes before the outage; costs that start-up,
    ~9 s). Waits for every event, then SIGTERM; asserts the processor never exited and exits 0. Returns what the
    checks need."""
    env = {**_env(tmp_path / "home", bootstrap, redis_url, tag), **(env or {})}
    store = _apply_feast(env)
    metrics_port = services.free_port()
    log = tmp_path / "stream.log"
    flow = Flow(bootstrap, tag, rate=rate, n_valid=n_valid, **(flow_opts or {}))
    flow.start()
    services.wait_until(lambda: flow.listed.is_set() or flow.error is not None, 60, what="the listings sent")
    assert flow.error is None, flow.error
    if not gate_flow:
        flow.go.set()
    proc = subprocess.Popen([sys.executable, "-m", "rentalml.cli", "stream", "run", "--metrics-port",
                             str(metrics_port)], env=env, stdout=subprocess.PIPE, stderr=open(log, "ab"),
                            cwd=str(ROOT))
    try:
        if gate_flow:
            _until(lambda: _totals(log).get("processed", 0) >= N_PROPS, 90, proc, log, "the listings processed")
            flow.go.set()
        # flow events being consumed: the outage meets a processor at work, with most of the flow still to come
        _until(lambda: _totals(log).get("processed", 0) >= N_PROPS + min(1000, n_valid // 4), 60, proc, log,
               "the processor at work")
        processed_before = _totals(log).get("processed", 0)
        stop()
        t_stop = time.monotonic()

        def outage_over() -> bool:  # the outage lasts OUTAGE_S; `during` runs meanwhile
            if during is not None:
                during()
            return time.monotonic() - t_stop >= OUTAGE_S

        _until(outage_over, OUTAGE_S + 60, proc, log, "the end of the outage")
        start()
        want = n_valid + N_PROPS
        t_back = time.monotonic()

        def caught_up() -> bool:
            if during is not None:
                during()
            return _totals(log).get("processed", 0) >= want and not flow.is_alive()

        _until(caught_up, 90, proc, log, f"{want} events processed")
        assert flow.error is None, flow.error
        n_bad = len(flow.bad_coords)
        # the last batch's dead letters, within the same 90 s
        _until(lambda: _totals(log).get("dead_letter", 0) >= n_bad, max(0.0, 90 - (time.monotonic() - t_back)),
               proc, log, f"{n_bad} dead letters")
        scrape = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert processed_before > 0, "the outage began before the processor handled anything"
    return {"flow": flow, "store": store, "log": log.read_text(errors="replace"), "scrape": scrape,
            "totals": _totals(log), "env": env}


def check_stream(out: dict, tag: str, bootstrap: str, read_processed: bool = True) -> None:
    """Nothing lost, nothing double-counted, every malformed record in dead_letter exactly once. `read_processed`:
    also read processed_data back (every valid event id, once as a first delivery); without it the processor's
    totals show the same (each event processed once, no redelivery)."""
    from rentalml.features.store import online_features

    flow, store = out["flow"], out["store"]
    df = pd.DataFrame(flow.valid)
    # counted once per event: the processed total is exactly the events produced (redeliveries are duplicates)
    assert out["totals"]["processed"] == len(flow.valid) + N_PROPS, out["totals"]
    ref = pd.DataFrame({col: df[df["event_type"] == et].groupby("property_id").size()
                        for et, col in WINDOWS.items()}).reindex(flow.props).fillna(0).astype(int)
    on = online_features(store, property_ids=flow.props).set_index("property_id")
    got = on[list(ref.columns)].reindex(ref.index).fillna(0).astype(int)
    pd.testing.assert_frame_equal(got, ref, check_names=False)
    users = sorted(df["user_id"].unique())
    n7 = df.groupby("user_id").size().reindex(users)
    taste = online_features(store, user_ids=users).set_index("user_id")["n_events_7d"].reindex(users)
    assert (taste.fillna(0).astype(int).to_numpy() == n7.to_numpy()).all()

    # the processor's own outputs: exactly once with an idempotent producer; with idempotence off (as on Tansu,
    # config.py KafkaSettings.idempotence) a batch it resent across the outage may be written twice, never more
    out_copies = 2 if out["env"].get("RENTALML_KAFKA__IDEMPOTENCE") == "false" else 1
    dlq = read_topic(bootstrap, "dead_letter", _names_tag(tag))
    got_coords = Counter((d["topic"], d["partition"], d["offset"]) for d in dlq)
    assert max(got_coords.values()) <= out_copies, [c for c, n in got_coords.items() if n > 1][:5]
    # each malformed record (by the index in its payload) from the topic/partition it was sent to, and the one at
    # the offset its producer was told. A batch an idempotent producer sent again across an outage, which the
    # broker had already written, completes with offset -1 (DUPLICATE_SEQUENCE_NUMBER is success, kafka-python
    # 3.0.12 producer/sender.py _complete_batch): matched by index and partition only. A non-idempotent producer
    # may have written a resent record twice (two offsets): each is dead-lettered once, so an index twice at most
    index = Counter(_bad_index(d, tag) for d in dlq)
    assert set(index) == set(range(len(flow.bad_coords))), (len(index), len(flow.bad_coords))
    assert max(index.values()) <= (1 if flow.batching["enable_idempotence"] else 2) * out_copies, index.most_common(3)
    coords: dict[int, set] = {}
    for d in dlq:
        coords.setdefault(_bad_index(d, tag), set()).add((d["topic"], d["partition"], d["offset"]))
    for i, (topic, partition, offset) in enumerate(flow.bad_coords):
        assert {c[:2] for c in coords[i]} == {(topic, partition)}, (i, coords[i], offset)
        assert offset == -1 or (topic, partition, offset) in coords[i], (i, coords[i], offset)
    assert all(d["reason"] for d in dlq)
    if not read_processed:
        assert out["totals"]["duplicate"] == 0, out["totals"]
        return
    processed = read_topic(bootstrap, "processed_data", lambda d: d["event_id"].startswith(f"{tag}-e"))
    assert {d["event_id"] for d in processed} == set(df["event_id"])
    first = Counter(d["event_id"] for d in processed if not d["duplicate"])
    assert set(first) == set(df["event_id"]) and len(first) == len(flow.valid)
    # each event's first delivery once, or twice where a resent output batch was written twice (out_copies)
    assert max(first.values()) <= out_copies, first.most_common(3)


def test_broker_restart_mid_stream(tmp_path):
    """Tansu on S3 storage stopped (SIGTERM) for 10 s while 20k events flow, then started on the same storage and
    port: the processor waits (log lines, ml_stream_retries_total), never exits, and afterwards nothing is lost,
    nothing double-counted, and each malformed record is in dead_letter once."""
    s3 = _service(services.start_moto)
    redis = _service(services.start_redis)
    broker_log = tmp_path / "tansu.log"
    s3.create_bucket("tansu")
    port = services.free_port()
    start = lambda: _service(services.start_tansu, port=port, storage="s3://tansu/", env=s3.s3_env(),  # noqa: E731
                             log=broker_log)
    box = {"broker": start()}
    tag = uuid.uuid4().hex[:8]
    try:
        out = run_outage(tmp_path, tag, box["broker"].url, redis.url, flow_opts=BROKER_BATCHING, gate_flow=True,
                         env={"RENTALML_STREAM__FETCH_MAX_WAIT_MS": str(BROKER_FETCH_MAX_WAIT_MS),
                              # Tansu loses an idempotent producer's in-flight batch across a restart (config.py
                              # KafkaSettings.idempotence): the processor's outputs become at-least-once there
                              "RENTALML_KAFKA__IDEMPOTENCE": "false"},
                         stop=lambda: box["broker"].stop(), start=lambda: box.update(broker=start()))
        check_stream(out, tag, box["broker"].url)
    finally:
        box["broker"].stop()
        redis.stop()
        s3.stop()
    assert "waiting for kafka" in out["log"], out["log"][-3000:]
    assert _metric(out["scrape"], "ml_stream_retries_total") > 0


def test_a_producer_asking_for_acks_0_or_1_is_built_without_idempotence():
    """kafka-python refuses idempotence without acks=all at construction (the freshness benchmark's acks=1
    probe producer broke when `kafka.idempotence` became the default); real KafkaProducer construction, no
    broker needed with a pinned api_version."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaConfigurationError

    from rentalml.kafka import producer_options

    with pytest.raises(KafkaConfigurationError):
        KafkaProducer(bootstrap_servers="127.0.0.1:9", api_version=(3, 0), acks=1, enable_idempotence=True)
    for acks, idempotent in (("all", True), (-1, True), (1, False), (0, False)):
        opts = producer_options(None, acks=acks)
        assert opts["enable_idempotence"] is idempotent
        KafkaProducer(bootstrap_servers="127.0.0.1:9", api_version=(3, 0), **opts).close(timeout=0)


def test_processor_replaces_a_fatally_failed_producer():
    """An idempotent kafka-python producer whose state turned fatal (seen after a Tansu restart: InitProducerId
    answered UnknownError) fails every later send, forever: the processor's resend loop starts a new producer and
    the records are delivered. Before the fix the loop resent through the dead producer until stopped."""
    from kafka.errors import KafkaError
    from kafka_helpers import read_topic
    from rentalml.streaming.processor import Processor

    from rentalml.kafka import ensure_topics, producer

    broker = _service(services.start_tansu)
    proc = None
    try:
        settings = Settings(kafka={"bootstrap_servers": broker.url})
        ensure_topics(settings)
        proc = Processor(settings, sink=object(), state=object(), log_fn=lambda doc: None)
        proc.backoff_s = 0.01
        dead = proc.producer = producer(settings)
        dead._transaction_manager.transition_to_fatal_error(KafkaError("injected"))
        tag = uuid.uuid4().hex[:8]
        proc._send_all([("dead_letter", None, json.dumps({"payload": tag}).encode(), 0)])
        assert proc.producer is not dead
        assert [d["payload"] for d in read_topic(broker.url, "dead_letter", lambda d: d.get("payload") == tag,
                                                 idle_s=0.5)] == [tag]
    finally:
        if proc is not None and proc.producer is not None:
            proc.producer.close(timeout=1)
        broker.stop()


def test_redis_restart_mid_stream_and_serving_keeps_answering(tmp_path):
    """Redis with the manifests' persistence (AOF) stopped (SIGTERM) for 10 s while 20k events flow, restarted on
    the same port and folder: the stream's promises hold as under a broker restart, and `rentalml serve` (cache
    and stream state in that Redis) answers every request with 200 meanwhile, counting ml_cache_errors_total."""
    from serving_helpers import Server, make_bundle, warm_users

    args, has_password = manifest_redis_args()
    assert "--appendonly" in args and args[args.index("--appendonly") + 1] == "yes", args
    password = "s3cret" if has_password else None
    workdir = tmp_path / "redis-data"
    workdir.mkdir()
    port = services.free_port()
    start = lambda: _service(services.start_redis, port=port, args=args, workdir=workdir,  # noqa: E731
                             password=password)
    box = {"redis": start()}
    broker = _service(services.start_tansu)
    tag = uuid.uuid4().hex[:8]
    bundle = make_bundle(tmp_path / "bundle", "1")
    users = warm_users(bundle)[:50]
    server = Server(bundle, tmp_path / "serve.log",
                    env={"RENTALML_REDIS_URL": box["redis"].url, "RENTALML_STREAM__KEY_PREFIX": f"t:{tag}"})
    statuses: Counter = Counter()
    outage = {"on": False, "requests": 0}
    client = httpx.Client(timeout=10)

    def request():
        u = users[sum(statuses.values()) % len(users)]
        r = client.post(f"{server.url}/predict", json={"user_id": u})
        statuses[r.status_code] += 1
        if outage["on"]:
            outage["requests"] += 1

    def stop():
        box["redis"].stop()
        outage["on"] = True

    def restart():
        box["redis"] = start()
        outage["on"] = False

    try:
        server.wait_ready()
        for _ in range(20):  # warm: the cache holds these users' rows
            request()
        out = run_outage(tmp_path, tag, broker.url, box["redis"].url, stop=stop, start=restart, during=request)
        check_stream(out, tag, broker.url)
        for _ in range(20):
            request()
        scrape = httpx.get(f"{server.url}/metrics", timeout=5).text
    finally:
        client.close()
        server.stop()
        broker.stop()
        box["redis"].stop()
    assert set(statuses) == {200}, statuses
    assert outage["requests"] >= 20, outage
    assert _metric(scrape, "ml_cache_errors_total") > 0
    assert "recommendation cache unavailable" in server.log.read_text(errors="replace")
    # the processor met the outage: either it saw the error and waited (its retry loop), or a Redis client call
    # blocked through it (the Feast online store's client retries on its own); both end with nothing lost above
    waited = "waiting for redis" in out["log"] and _metric(out["scrape"], "ml_stream_retries_total") > 0
    assert waited or _longest_batch_s(out["log"]) >= OUTAGE_S / 2, out["log"][-3000:]


def _longest_batch_s(log: str) -> float:
    """The longest batch the processor reported (its per-batch JSON log line's batch_s)."""
    longest = 0.0
    for line in log.splitlines():
        i = line.find('{"committed"')
        if i >= 0:
            try:
                longest = max(longest, float(json.loads(line[i:]).get("batch_s", 0.0)))
            except ValueError:
                continue
    return longest


def test_redis_cache_down_answers_misses_and_counts():
    """The Redis cache on a port where nothing listens: lookups are misses, stores are skipped, neither raises;
    ml_cache_errors_total counts them and the cache is not tried again for retry_after_s; invalidation raises
    (its caller decides). Before the fix the lookup raised redis.ConnectionError, which `rentalml serve` turned
    into a 500 (redis-py 7.4.1, redis/client.py: execute_command raises ConnectionError once its retries end)."""
    import numpy as np
    import redis as redis_lib
    from prometheus_client import REGISTRY

    from rentalml.cache import RedisCache

    def errors(op: str) -> float:
        return REGISTRY.get_sample_value("ml_cache_errors_total", {"backend": "redis", "op": op}) or 0.0

    cache = RedisCache(f"redis://127.0.0.1:{services.free_port()}/0", ttl_s=60)
    before = errors("get"), errors("put")
    assert cache.get_many("v1", ["u1", "u2"], 10) == [None, None]
    assert not cache.available  # skipped for retry_after_s: no connect attempt per request meanwhile
    assert cache.get_many("v1", ["u1"], 10) == [None]
    assert (errors("get"), errors("put")) == (before[0] + 1, before[1])
    cache._down_until = 0.0
    cache.put_many("v1", [("u1", (np.array(["p1"], dtype=object), np.array([1.0], dtype=np.float32), "model"))], 10)
    assert errors("put") == before[1] + 1
    assert (cache.hits, cache.misses) == (0, 3)
    with pytest.raises(redis_lib.ConnectionError):
        cache.invalidate_user("u1")
