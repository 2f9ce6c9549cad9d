"""`rentalml stream run`: consume property_data and user_interactions, validate, aggregate, push to Feast,
emit processed records, commit.

Per polled batch, in this order (docs/architecture.md "Streaming"):
  1. decode + validate every record (rentalml.schema); a bad one becomes a dead_letter document with the reason;
  2. ONE atomic state-store step (rentalml.state): dedupe by event id, late check against the
     watermark, counters/attributes/histories, and the absolute state of the touched entities;
  3. push the touched entities' absolute feature values to the Feast online store (one write per view);
  4. produce processed_data (one document per valid event, also for redeliveries; JSON arrays of up to 500
     documents per record, by output partition) and dead_letter, flush;
  5. commit the batch's offsets.
A crash anywhere replays the uncommitted batch: the dedupe set makes the counters change once per event id
(exactly-once effect), the re-push writes the same values, processed_data is at least once (dedupe by event_id).
While step 2 runs (in a worker thread: Redis works, the processor waits), the next batch kafka-python has already
fetched is taken and parsed (read-ahead, `Processor._read_ahead`); it is processed and committed after this one,
so a crash or stop loses nothing there either: it is redelivered.

Outages (a broker or Redis restart) never end the process: each step of a batch that fails on a connection
error is retried with exponential backoff (0.5 s doubling to 5 s), logging "waiting for <dependency>" once per
attempt and counting `ml_stream_retries_total{dependency}`; the batch resumes at the step that failed (a state
step that succeeded is not applied again), the records not acknowledged by the broker are sent again (only
those), and the offsets are committed once everything before is done. Nothing is lost or applied twice, and each
output record is produced once unless the consumer group rebalanced meanwhile (then its new owner replays).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import signal
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import orjson
import pandas as pd
from prometheus_client import Counter

from rentalml.config import Settings, get_settings
from rentalml.kafka import (
    DEAD_LETTER,
    PROCESSED_DATA,
    TopicsUnavailable,
    client_config,
    ensure_topics,
    processor_access,
    producer,
)
from rentalml.services import wait_until
from rentalml.state import Applied, StateStore, decode_attributes, encode_event, open_state

from . import aggregates, metrics
from .validate import InvalidEvent, dead_letter, parse

log = logging.getLogger(__name__)

#: connection-level failures of a batch step (poll, topic check, state apply, feature push, produce, commit),
#: each waited out and retried with backoff; and steps that succeeded again after such a wait
RETRIES = Counter("ml_stream_retries_total", "batch steps that failed on a connection error and are retried with "
                  "backoff, by dependency (kafka | redis)", ["dependency"], registry=metrics.REGISTRY)
RECONNECTS = Counter("ml_stream_reconnects_total", "batch steps that succeeded again after one or more retries "
                     "(a dependency came back), by dependency", ["dependency"], registry=metrics.REGISTRY)

ENGAGEMENT_PUSH = "property_engagement_push"
ATTRIBUTES_PUSH = "property_attributes_push"
TASTE_PUSH = "user_taste_push"


class FeastSink:
    """The one place the stream touches Feast: rentalml.features.store (open_store, apply, push).

    `write(source, rows)` is the stream's path: the rows (plain Python values, streaming.aggregates.*_rows) become
    Feast's value protos here and go to the provider's `online_write_batch`, the call `FeatureStore.push` ends in
    (Feast's own Redis layout and its older-never-overwrites-newer check on `event_timestamp`), without the
    DataFrame → Arrow → proto conversions of `push`, which cost more than the write itself. With
    `stream.push_offline` the rows take `push` (online and offline)."""

    VIEWS = {ENGAGEMENT_PUSH: "property_engagement", ATTRIBUTES_PUSH: "property_attributes",
             TASTE_PUSH: "user_taste"}

    def __init__(self, settings: Settings, store=None):
        from rentalml.features import store as fs

        self._fs = fs
        self.store = store if store is not None else fs.open_store(settings)
        self.to = "online_and_offline" if settings.stream.push_offline else "online"
        try:
            for view in self.VIEWS.values():
                self.store.get_feature_view(view)
        except Exception:  # a fresh home: register the definitions first
            log.info("feature views not registered yet: applying the feature repo")
            fs.apply(self.store)
        self._plans: dict[str, tuple[float, object, str, list]] = {}

    def push(self, source: str, df: pd.DataFrame) -> None:
        if len(df):
            self._fs.push(self.store, source, df, to=self.to, fill_missing=False)

    def _plan(self, source: str):
        """(feature view, join key, [(feature, to-proto)]) of a push source's view, re-read from the registry
        (its cache) once a minute."""
        now = time.monotonic()
        plan = self._plans.get(source)
        if plan is None or now - plan[0] > 60.0:
            from feast.protos.feast.types.Value_pb2 import Value
            from feast.type_map import NULL_TIMESTAMP_INT_VALUE
            from feast.value_type import ValueType

            fv = self.store.get_feature_view(self.VIEWS[source])
            empty = Value()
            kinds = {ValueType.DOUBLE: ("double_val", float), ValueType.FLOAT: ("float_val", float),
                     ValueType.INT64: ("int64_val", int), ValueType.INT32: ("int32_val", int),
                     ValueType.STRING: ("string_val", str), ValueType.BOOL: ("bool_val", bool),
                     ValueType.UNIX_TIMESTAMP: ("unix_timestamp_val", lambda d: int(d.timestamp()))}

            def conv(vt):
                field, cast = kinds[vt]
                # a missing timestamp is Feast's NULL_TIMESTAMP_INT_VALUE (what `push` writes for NaT), any
                # other missing value an empty Value: byte for byte what `push` writes
                none = (Value(unix_timestamp_val=NULL_TIMESTAMP_INT_VALUE) if vt == ValueType.UNIX_TIMESTAMP
                        else empty)
                return lambda v: none if v is None else Value(**{field: cast(v)})

            feats = [(f.name, conv(f.dtype.to_value_type())) for f in fv.features]
            plan = (now, fv, fv.entity_columns[0].name, feats)
            self._plans[source] = plan
        return plan[1:]

    def write(self, source: str, rows: list[dict]) -> None:
        if not rows:
            return
        if self.to != "online":
            self.push(source, pd.DataFrame(rows))
            return
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        fv, key, feats = self._plan(source)
        data = [(EntityKey(join_keys=[key], entity_values=[Value(string_val=r[key])]),
                 {name: conv(r[name]) for name, conv in feats}, r["event_timestamp"], None) for r in rows]
        self.store._get_provider().online_write_batch(self.store.config, fv, data, progress=None)


class _Stopped(Exception):
    """request_stop() while waiting for a dependency: leave the batch uncommitted (it is redelivered)."""


def transient(exc: BaseException) -> str | None:
    """The dependency a connection-level error belongs to ("kafka", "redis"), None for any other error."""
    try:
        import redis.exceptions as rex

        if isinstance(exc, (rex.ConnectionError, rex.TimeoutError, rex.BusyLoadingError, rex.TryAgainError)):
            return "redis"
    except ImportError:  # pragma: no cover
        pass
    from kafka.errors import KafkaError

    # kafka-python marks the errors a retry can cure (connection lost, timeouts, coordinator moving); the others
    # (authorization, a rebalance's CommitFailedError, illegal state) are not waited out here
    if isinstance(exc, KafkaError) and getattr(exc, "retriable", False):
        return "kafka"
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return "redis" if "redis" in type(exc).__module__ else "network"
    return None


class _AttrCache:
    """Property attributes for the user-taste features: a short-lived cache over the state store."""

    def __init__(self, state: StateStore, ttl_s: float = 30.0):
        self.state, self.ttl, self.data, self.at = state, ttl_s, {}, {}

    def update(self, attrs: dict[str, dict]) -> None:
        now = time.monotonic()
        for pid, a in attrs.items():
            self.data[pid], self.at[pid] = a, now

    def get(self, pids: set[str]) -> dict[str, dict]:
        now = time.monotonic()
        missing = [p for p in pids if p not in self.data or now - self.at[p] > self.ttl]
        if missing:
            found = self.state.property_attributes(missing)
            self.update(found)
            for p in missing:
                if p not in found:
                    self.data.pop(p, None)
        return {p: self.data[p] for p in pids if p in self.data}


class Processor:
    def __init__(self, settings: Settings | None = None, sink: FeastSink | None = None,
                 state: StateStore | None = None, log_fn: Callable[[dict], None] | None = None):
        self.settings = settings or get_settings()
        self.state = state or open_state(self.settings)
        self.sink = sink or FeastSink(self.settings)
        self.attrs = _AttrCache(self.state)
        self.stopping = False
        self.log_fn = log_fn or (lambda doc: log.info("%s", json.dumps(doc)))
        self.totals = {"processed": 0, "duplicate": 0, "dead_letter": 0, "batches": 0}
        self.topic_retry_s = 10.0  # wait between topic checks while the topics are unavailable
        self.backoff_s, self.backoff_max_s = 0.5, 5.0  # retries of a step that failed on a connection error
        self.consumer = None
        self.producer = None
        #: read the next batch while the state step runs (Processor._read_ahead); the batch read ahead, parsed
        self.read_ahead = True
        self._ahead: tuple | None = None
        self._worker = None
        # the recommendation cache every server shares (Redis): rows of users with new events and rows listing
        # changed properties are dropped once their features are pushed (rentalml.cache.invalidate)
        self.rec_cache = None
        if self.settings.redis_url:
            from rentalml.cache import RedisCache

            self.rec_cache = RedisCache(self.settings.redis_url, self.settings.serve.cache_ttl_s)

    # -------------------------------------------------------------------------------------- lifecycle
    def request_stop(self, *_):
        self.stopping = True

    def _connect(self) -> None:
        from kafka import KafkaConsumer

        s = self.settings.stream
        access = processor_access(self.settings)
        # only the processor's own topics: a topic it does not use (ab_outcomes) needs no ACL. Where they are
        # missing or hidden (Strimzi: KafkaTopic not Ready yet, or no Describe ACL), wait and say why, once a
        # minute, instead of exiting into a crash loop
        logged = -math.inf
        while not self.stopping:
            try:
                self.retry("topic check", lambda: ensure_topics(self.settings, access.topics, timeout_s=5.0),
                           dependency="kafka")
                break
            except TopicsUnavailable as exc:
                if time.monotonic() - logged > 60:
                    log.error("%s Retrying every %.0f s.", exc, self.topic_retry_s)
                    logged = time.monotonic()
                try:
                    self._sleep(self.topic_retry_s)
                except _Stopped:
                    break
            except _Stopped:
                break
        if self.stopping:
            return
        self.consumer = KafkaConsumer(
            *access.consumes, **client_config(self.settings), group_id=access.group, enable_auto_commit=False,
            auto_offset_reset="earliest", session_timeout_ms=6000, heartbeat_interval_ms=1500,
            max_poll_records=s.batch_size, max_poll_interval_ms=300_000, fetch_max_wait_ms=s.fetch_max_wait_ms,
            max_partition_fetch_bytes=4 * 1024 * 1024, receive_buffer_bytes=4 * 1024 * 1024,
            client_id="rentalml-stream")
        # every batch ends in flush(), which sends at once: a long linger keeps kafka-python's sender thread
        # asleep while the batch's records are appended (waking it per record-batch halved the append rate)
        self.producer = producer(self.settings, linger_ms=1000, batch_size=1024 * 1024,
                                 max_in_flight_requests_per_connection=5)
        self._partitions: dict = {}  # topic -> partition count, (topic, key) -> partition

    def retry(self, what: str, fn: Callable, *, dependency: str | None = None):
        """fn() until it succeeds; a connection-level error (`transient`) waits with exponential backoff and
        tries again, logging that it waits; any other error propagates. request_stop() ends the wait (_Stopped)."""
        delay, attempt, since = self.backoff_s, 0, time.monotonic()
        while True:
            try:
                result = fn()
            except _Stopped:
                raise
            except Exception as exc:
                dep = transient(exc)
                if dep is None:
                    raise
                dep = dependency or dep
                attempt += 1
                RETRIES.labels(dep).inc()
                log.warning("waiting for %s: %s failed (%s: %s); retry %d in %.1f s (%.0f s so far)", dep, what,
                            type(exc).__name__, exc, attempt, delay, time.monotonic() - since)
                self._sleep(delay)
                delay = min(delay * 2, self.backoff_max_s)
            else:
                if attempt:
                    RECONNECTS.labels(dependency or "any").inc()
                    log.warning("%s recovered after %d retries (%.1f s)", what, attempt, time.monotonic() - since)
                return result

    def _sleep(self, seconds: float) -> None:
        """Wait `seconds`, or raise _Stopped as soon as request_stop() is called."""
        try:
            wait_until(lambda: self.stopping, timeout=seconds, interval=min(0.1, seconds), what="stop request")
        except TimeoutError:
            return
        raise _Stopped()

    def _partition(self, topic: str, key: bytes) -> int:
        """kafka-python's DefaultPartitioner (murmur2 of the key over all partitions), remembered per key (a
        pure-Python murmur2 per record cost more than the send), with the partition count looked up once per
        topic: the same partition per key as the producer would choose."""
        part = self._partitions.get((topic, key))
        if part is None:
            from kafka.partitioner.default import murmur2

            n = self._partitions.get(topic)
            if n is None:
                n = self._partitions[topic] = len(self.producer.partitions_for(topic))
            if len(self._partitions) > 200_000:  # bounded: entity ids are many but finite
                self._partitions = {topic: n}
            part = self._partitions[(topic, key)] = (murmur2(key) & 0x7FFFFFFF) % n
        return part

    #: processed_data documents per record (at most; ~0.4 KB each), and the most bytes of one record's value
    #: (below kafka-python's max_request_size and the broker's message.max.bytes, 1 MiB by default)
    processed_per_record, processed_max_bytes = 500, 900_000

    def _processed_records(self, docs: list[dict]) -> list[tuple[str, None, bytes, int]]:
        """processed_data records (docs/architecture.md "Streaming"): the documents of one output partition (the
        partition of their property id as key, kafka-python's DefaultPartitioner) in arrival order, as JSON
        arrays of at most `processed_per_record` documents, one record each. A record per document cost more than
        everything else the processor does per event (kafka-python's `send` is ~10 µs of Python per record)."""
        by_part: dict[int, list[dict]] = {}
        for d in docs:
            by_part.setdefault(self._partition(PROCESSED_DATA, d["property_id"].encode()), []).append(d)
        out: list[tuple[str, None, bytes, int]] = []

        def add(chunk: list[dict], part: int) -> None:
            value = orjson.dumps(chunk)
            if len(value) > self.processed_max_bytes and len(chunk) > 1:
                half = len(chunk) // 2
                add(chunk[:half], part)
                add(chunk[half:], part)
            else:
                out.append((PROCESSED_DATA, None, value, part))

        for part, ds in by_part.items():
            for i in range(0, len(ds), self.processed_per_record):
                add(ds[i:i + self.processed_per_record], part)
        return out

    def _send_all(self, sends: list[tuple[str, bytes | None, bytes, int | None]]) -> None:
        """Produce `sends` (topic, key, value, partition or None: by key) and wait until the broker acknowledged
        every one of them; the ones that failed (the broker was away past the producer's own retries) are sent
        again, only those."""
        from kafka.errors import KafkaTimeoutError

        pending = list(sends)
        delay, attempt, since = self.backoff_s, 0, time.monotonic()
        while pending:
            futures = []
            for rec in pending:
                topic, key, value, part = rec
                try:
                    if part is None and key is not None:
                        part = self._partition(topic, key)
                    futures.append((rec, self.producer.send(topic, key=key, value=value, partition=part)))
                except KafkaTimeoutError as exc:  # no metadata (broker away): keep it for the next round
                    futures.append((rec, exc))
            waited = False
            while True:
                try:
                    self.producer.flush(timeout=5.0)
                    break
                except KafkaTimeoutError:
                    waited = True
                    RETRIES.labels("kafka").inc()
                    undone = sum(1 for _, f in futures if not isinstance(f, Exception) and not f.is_done)
                    log.warning("waiting for kafka: %d records of the batch not acknowledged yet (%.0f s so far)",
                                undone, time.monotonic() - since)
                    if self.stopping:
                        raise _Stopped() from None
            failed = [rec for rec, f in futures if isinstance(f, Exception) or f.failed()]
            if not failed:
                if attempt or waited:
                    RECONNECTS.labels("kafka").inc()
                    log.warning("kafka: the batch's records acknowledged after %d resends (%.1f s)", attempt,
                                time.monotonic() - since)
                return
            attempt += 1
            RETRIES.labels("kafka").inc()
            first = next(f for _, f in futures if isinstance(f, Exception) or f.failed())
            log.warning("waiting for kafka: %d of %d records not delivered (%s); sending them again in %.1f s",
                        len(failed), len(pending), first if isinstance(first, Exception) else first.exception,
                        delay)
            self._sleep(delay)
            delay = min(delay * 2, self.backoff_max_s)
            pending = failed
            tm = getattr(self.producer, "_transaction_manager", None)
            if tm is not None and tm.has_fatal_error():
                # kafka-python 3.0.12 (producer/sender.py): once the idempotent producer's state is fatal (e.g. a
                # restarted Tansu answered InitProducerId with an error) it fails every later send; a new one
                # (a new producer id) recovers. Its resends may duplicate output records: at least once, as above
                log.warning("kafka: the producer failed fatally; starting a new one")
                self.producer.close(timeout=0)
                self.producer = producer(self.settings, linger_ms=1000, batch_size=1024 * 1024,
                                         max_in_flight_requests_per_connection=5)

    def close(self) -> None:
        if self.producer is not None:
            try:
                self.producer.flush(timeout=30)
            except Exception as exc:  # the broker is away at shutdown: the batch was not committed anyway
                log.warning("producer flush at shutdown failed: %s", exc)
            self.producer.close(timeout=5)
        if self._worker is not None:
            self._worker.shutdown(wait=True)
        if self.consumer is not None:
            self.consumer.close(autocommit=False)
        self.state.close()

    def run(self, idle_exit_s: float | None = None, max_events: int | None = None) -> dict:
        """Consume until SIGTERM/SIGINT, `idle_exit_s` seconds without records (after the group join), or
        `max_events` records handled. Returns the totals."""
        if threading.current_thread() is threading.main_thread():  # elsewhere the caller uses request_stop()
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        self._connect()
        if self.consumer is None:  # stopped while waiting for the topics
            self.close()
            return dict(self.totals)
        gc.collect()
        gc.freeze()  # the long-lived imports (Feast, pandas) stay out of every later full collection
        last_data = time.monotonic()
        seen_group: tuple = (None, frozenset())
        last_lag = 0.0
        handled = 0
        try:
            while not self.stopping:
                ahead, self._ahead = self._ahead, None
                try:
                    records = ahead[0] if ahead else self.retry("poll", lambda: self.consumer.poll(
                        timeout_ms=self.settings.stream.poll_timeout_ms), dependency="kafka")
                except _Stopped:
                    break
                now = time.monotonic()
                if now - last_lag > 5.0 and self._update_lag() is not None:  # every 5 s once assigned
                    last_lag = now
                if not records:
                    if idle_exit_s is not None:
                        # the idle clock starts at the group join and again after every rebalance (a member
                        # joining stops the group for seconds: that is not the end of the backlog)
                        group = self._group_state()
                        if not group[1] or group != seen_group:
                            seen_group, last_data = group, now
                        elif now - last_data > idle_exit_s:
                            break
                    continue
                last_data = now
                try:
                    handled += self.process(records, ahead[1] if ahead else None)
                except _Stopped:  # stopped while waiting for a dependency: nothing committed, redelivered
                    log.warning("stopped while waiting: the batch in flight stays uncommitted (redelivered)")
                    break
                if max_events is not None and handled >= max_events:
                    break
            self._update_lag()
        finally:
            self.close()
        self.log_fn({"stopped": True, **self.totals})
        return dict(self.totals)

    # -------------------------------------------------------------------------------------- one batch
    @staticmethod
    def _parse(records: dict) -> tuple:
        """(encoded events, (partition, record, event) of each, dead_letter documents, offsets to commit, records)
        of a polled batch: step 1."""
        from kafka.structs import OffsetAndMetadata

        events, sources, dlq = [], [], []
        offsets = {}
        n = 0
        for tp, recs in records.items():
            for r in recs:
                n += 1
                try:
                    ev = parse(tp.topic, r.value)
                except InvalidEvent as exc:
                    dlq.append(dead_letter(tp.topic, tp.partition, r.offset, exc.reason, r.value))
                else:
                    events.append(encode_event(ev))
                    sources.append((tp, r, ev))
            offsets[tp] = OffsetAndMetadata(recs[-1].offset + 1, "", -1)
        return events, sources, dlq, offsets, n

    def _read_ahead(self) -> None:
        """While the state step of a batch runs (Redis works, this thread waits): take the next batch kafka-python
        has already fetched (poll without waiting) and parse it, so the Kafka decoding and the validation of
        batch N+1 overlap the Lua step of batch N. Its offsets are committed after its own batch, as always; a
        batch read ahead and never processed (stop, crash) is simply redelivered. A failed poll here is left to
        the next regular poll, which retries it."""
        if self._ahead is not None or self.stopping or not self.read_ahead:
            return
        try:
            records = self.consumer.poll(timeout_ms=0)
        except Exception as exc:  # noqa: BLE001 - the regular poll retries or raises it
            log.debug("read-ahead poll failed: %s", exc)
            return
        if records:
            self._ahead = (records, self._parse(records))

    @staticmethod
    def _doc_skeletons(sources: list[tuple]) -> list[dict]:
        """The processed_data documents of a batch's valid events, in the contract's field order, but for what the
        state step decides (`duplicate`, `engagement`) and `processed_at`: built while the step runs."""
        out = []
        for tp, _r, ev in sources:
            doc = {"event_id": ev.event_id, "source_topic": tp.topic, "event_type": ev.event_type,
                   "property_id": ev.property_id, "timestamp": ev.timestamp.isoformat(), "duplicate": False,
                   "processed_at": None}
            if hasattr(ev, "user_id"):
                doc["user_id"] = ev.user_id
            else:
                doc["attributes"] = ev.changed()
            out.append(doc)
        return out

    def process(self, records: dict, parsed: tuple | None = None) -> int:
        from kafka.errors import CommitFailedError

        t0 = time.perf_counter()
        events, sources, dlq, offsets, n = parsed if parsed is not None else self._parse(records)
        t_apply = time.perf_counter()
        # one atomic step: retried until it succeeds, never applied again once it has (its outcomes are the batch's)
        batch = uuid.uuid4().hex  # the same id on every retry: a run whose reply was lost keeps its outcomes
        step = lambda: self.retry("state apply", lambda: self.state.apply(events, batch=batch),  # noqa: E731
                                  dependency="redis")
        if self.read_ahead and self.consumer is not None:
            # the step in a worker thread (waiting on Redis releases the GIL), the next batch read meanwhile
            if self._worker is None:
                from concurrent.futures import ThreadPoolExecutor

                self._worker = ThreadPoolExecutor(1, thread_name_prefix="stream-state")
            running = self._worker.submit(step)
            try:
                self._read_ahead()
                skeletons = self._doc_skeletons(sources)
            finally:
                applied = running.result()
        else:
            applied = step()
            skeletons = None
        apply_s = time.perf_counter() - t_apply
        watermark = applied.clock - self.state.lateness
        for (tp, r, ev), outcome in zip(sources, applied.outcomes, strict=True):
            if outcome == "late":
                dlq.append(dead_letter(tp.topic, tp.partition, r.offset, f"late event: field 'timestamp' "
                                       f"{ev.timestamp.isoformat()} is before the watermark "
                                       f"{datetime.fromtimestamp(watermark, UTC).isoformat()} "
                                       f"(allowed lateness {self.state.lateness:.0f} s)", r.value))

        timing: dict[str, float] = {}

        def features():  # reads and absolute writes only: safe to run again after a connection error
            t_frames = time.perf_counter()
            # properties whose windows moved on with the clock (no new event of theirs): re-push them too
            due = [p for p in self.state.due(applied.clock) if p not in applied.engagement]
            engagement = dict(applied.engagement)
            if due:
                engagement.update(self.state.refresh_engagement(due).engagement)
            view = Applied(applied.outcomes, applied.clock, engagement, applied.properties, applied.users,
                           applied.histories, applied.user_events)
            # absolute feature values of the touched entities -> Feast (one write per view)
            eng = aggregates.engagement_rows(view)
            self.attrs.update({p: decode_attributes(h) for p, h in applied.properties.items()})
            attrs_rows = aggregates.attributes_rows(view)
            needed = {p for evs in applied.user_events.values() for _, _, p in evs}
            taste_rows = aggregates.taste_rows(view, self.attrs.get(needed))
            t_push = time.perf_counter()
            timing["frames"] = t_push - t_frames
            self.sink.write(ATTRIBUTES_PUSH, attrs_rows)
            self.sink.write(ENGAGEMENT_PUSH, eng)
            self.sink.write(TASTE_PUSH, taste_rows)
            timing["push"] = time.perf_counter() - t_push
            return view, eng

        applied, eng = self.retry("feature push", features, dependency="redis")
        frames_s, push_s = timing["frames"], timing["push"]
        t_push = time.perf_counter() - push_s
        if self.rec_cache is not None and (applied.user_events or applied.properties):
            from rentalml.cache import invalidate

            try:
                invalidate(list(applied.user_events), list(applied.properties), cache=self.rec_cache)
            except Exception as exc:  # the cache is an optimisation: its TTL bounds staleness if Redis hiccups
                log.warning("recommendation cache invalidation failed: %s", exc)
        self.retry("state schedule", lambda: self.state.schedule(
            {p: aggregates.next_change(h, applied.clock) for p, h in applied.engagement.items()}), dependency="redis")
        metrics.PUSH_SECONDS.observe(push_s)

        # processed_data (at least once; one document per valid event id, redeliveries flagged) and dead_letter
        windows = list(aggregates.ENGAGEMENT_WINDOWS)
        eng_by_pid = {row["property_id"]: {w: row[w] for w in windows} for row in eng}
        now_iso = datetime.now(UTC).isoformat()
        counts = {"processed": 0, "duplicate": 0}
        docs: list[dict] = []
        if skeletons is None:
            skeletons = self._doc_skeletons(sources)
        for doc, outcome in zip(skeletons, applied.outcomes, strict=True):
            if outcome == "late":
                continue
            counts[outcome] += 1
            doc["duplicate"], doc["processed_at"] = outcome == "duplicate", now_iso
            if "user_id" in doc and doc["property_id"] in eng_by_pid:
                doc["engagement"] = eng_by_pid[doc["property_id"]]
            docs.append(doc)
        sends = self.retry("processed_data partitions", lambda: self._processed_records(docs), dependency="kafka")
        for d in dlq:
            sends.append((DEAD_LETTER, None, orjson.dumps(d), None))
        t_flush = time.perf_counter()
        produce_s = t_flush - t_push - push_s
        self._send_all(sends)
        try:
            self.retry("offset commit", lambda: self.consumer.commit(offsets, timeout_ms=5000), dependency="kafka")
        except CommitFailedError as exc:  # a rebalance took the partitions: their new owner replays (deduped)
            log.warning("commit failed after a rebalance, the batch will be redelivered: %s", exc)
        commit_s = time.perf_counter() - t_flush

        by_topic: dict[tuple[str, str], int] = {}
        for (tp, _, _), outcome in zip(sources, applied.outcomes, strict=True):
            key = (tp.topic, "dead_letter" if outcome == "late" else outcome)
            by_topic[key] = by_topic.get(key, 0) + 1
        for d in dlq:
            if not d["reason"].startswith("late event"):
                by_topic[(d["topic"], "dead_letter")] = by_topic.get((d["topic"], "dead_letter"), 0) + 1
        for (topic, outcome), k in by_topic.items():
            metrics.EVENTS.labels(topic, outcome).inc(k)
        self.totals["processed"] += counts["processed"]
        self.totals["duplicate"] += counts["duplicate"]
        self.totals["dead_letter"] += len(dlq)
        self.totals["batches"] += 1
        batch_s = time.perf_counter() - t0
        metrics.BATCH_SECONDS.observe(batch_s)
        self.log_fn({"committed": {f"{tp.topic}/{tp.partition}": om.offset for tp, om in offsets.items()},
                     "records": n, **counts, "dead_letter": len(dlq), "parse_s": round(t_apply - t0, 4),
                     "apply_s": round(apply_s, 4), "frames_s": round(frames_s, 4), "produce_s": round(produce_s, 4),
                     "push_s": round(push_s, 4), "flush_commit_s": round(commit_s, 4),
                     "batch_s": round(batch_s, 4), "totals": dict(self.totals)})
        return n

    def _group_state(self) -> tuple:
        """(generation id, assigned partitions) of this member; the generation is None while it rebalances."""
        gen = None
        coordinator = getattr(self.consumer, "_coordinator", None)  # kafka-python's; absent in test doubles
        if coordinator is not None:
            try:
                stable = coordinator.generation_if_stable()
                gen = stable.generation_id if stable is not None else None
            except Exception:  # noqa: BLE001 - an introspection aid only
                gen = None
        return gen, frozenset(self.consumer.assignment())

    def _update_lag(self) -> bool | None:
        """ml_stream_committed_lag per assigned partition. Tansu's end offsets (high watermarks) are unreliable,
        so the lag is max(end offset, consumer position) - committed: on a real Kafka the backlog, on Tansu at
        least the records polled but not yet committed. None: no partitions yet; False: the broker did not answer
        within 3 s (between batches, the one sign of a broker outage: logged as waiting)."""
        try:
            parts = list(self.consumer.assignment())
            if not parts:
                return None
            ends = self.consumer.end_offsets(parts, timeout_ms=3000)
            for tp in parts:
                committed = self.consumer.committed(tp, timeout_ms=3000) or 0
                top = max(ends.get(tp) or 0, self.consumer.position(tp) or 0)
                metrics.COMMITTED_LAG.labels(tp.topic, str(tp.partition)).set(max(top - committed, 0))
            return True
        except Exception as exc:  # metrics must never stop the stream
            if transient(exc) == "kafka":
                RETRIES.labels("kafka").inc()
                log.warning("waiting for kafka: no answer to an offsets request (%s: %s); polling on",
                            type(exc).__name__, exc)
            else:
                log.debug("lag update failed: %s", exc)
            return False
