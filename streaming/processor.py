"""`rentalml stream run`: consume property_data and user_interactions, validate, aggregate, push to Feast,
emit processed records, commit.

Per polled batch, in this order (docs/architecture.md "Streaming"):
  1. decode + validate every record (rentalml.schema); a bad one becomes a dead_letter document with the reason;
  2. ONE atomic state-store step (rentalml.state): dedupe by event id, late check against the
     watermark, counters/attributes/histories, and the absolute state of the touched entities;
  3. push the touched entities' absolute feature values to the Feast online store (one write per view);
  4. produce processed_data (one record per valid event, also for redeliveries) and dead_letter, flush;
  5. commit the batch's offsets.
A crash anywhere replays the uncommitted batch: the dedupe set makes the counters change once per event id
(exactly-once effect), the re-push writes the same values, processed_data is at least once (dedupe by event_id).
"""

from __future__ import annotations

import gc
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import pandas as pd

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
from rentalml.state import StateStore, decode_attributes, encode_event, open_state

from . import aggregates, metrics
from .validate import InvalidEvent, dead_letter, parse

log = logging.getLogger(__name__)

ENGAGEMENT_PUSH = "property_engagement_push"
ATTRIBUTES_PUSH = "property_attributes_push"
TASTE_PUSH = "user_taste_push"


class FeastSink:
    """The one place the stream touches Feast: rentalml.features.store (open_store, apply, push)."""

    def __init__(self, settings: Settings, store=None):
        from rentalml.features import store as fs

        self._fs = fs
        self.store = store if store is not None else fs.open_store(settings)
        self.to = "online_and_offline" if settings.stream.push_offline else "online"
        try:
            for view in ("property_engagement", "property_attributes", "user_taste"):
                self.store.get_feature_view(view)
        except Exception:  # a fresh home: register the definitions first
            log.info("feature views not registered yet: applying the feature repo")
            fs.apply(self.store)

    def push(self, source: str, df: pd.DataFrame) -> None:
        if len(df):
            self._fs.push(self.store, source, df, to=self.to, fill_missing=False)


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
        self.consumer = None
        self.producer = None
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
        waited = None
        while not self.stopping:
            try:
                ensure_topics(self.settings, access.topics)
                break
            except TopicsUnavailable as exc:
                if waited is None or time.monotonic() - waited > 60:
                    log.error("%s Retrying every %.0f s.", exc, self.topic_retry_s)
                    waited = time.monotonic()
                deadline = time.monotonic() + self.topic_retry_s
                while not self.stopping and time.monotonic() < deadline:
                    time.sleep(0.2)
        if self.stopping:
            return
        self.consumer = KafkaConsumer(
            *access.consumes, **client_config(self.settings), group_id=access.group, enable_auto_commit=False,
            auto_offset_reset="earliest", session_timeout_ms=6000, heartbeat_interval_ms=1500,
            max_poll_records=s.batch_size, max_poll_interval_ms=300_000, fetch_max_wait_ms=s.fetch_max_wait_ms,
            client_id="rentalml-stream")
        self.producer = producer(self.settings, linger_ms=2, batch_size=256 * 1024,
                                 max_in_flight_requests_per_connection=5)

    def close(self) -> None:
        if self.producer is not None:
            self.producer.flush()
            self.producer.close()
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
        last_lag = 0.0
        handled = 0
        try:
            while not self.stopping:
                records = self.consumer.poll(timeout_ms=self.settings.stream.poll_timeout_ms)
                now = time.monotonic()
                if now - last_lag > 5.0 and self._update_lag():
                    last_lag = now
                if not records:
                    if idle_exit_s is not None:
                        if not self.consumer.assignment():  # the idle clock starts at the group join
                            last_data = now
                        elif now - last_data > idle_exit_s:
                            break
                    continue
                last_data = now
                handled += self.process(records)
                if max_events is not None and handled >= max_events:
                    break
            self._update_lag()
        finally:
            self.close()
        self.log_fn({"stopped": True, **self.totals})
        return dict(self.totals)

    # -------------------------------------------------------------------------------------- one batch
    def process(self, records: dict) -> int:
        from kafka.errors import CommitFailedError
        from kafka.structs import OffsetAndMetadata

        t0 = time.perf_counter()
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
        t_apply = time.perf_counter()
        applied = self.state.apply(events)
        apply_s = time.perf_counter() - t_apply
        watermark = applied.clock - self.state.lateness
        for (tp, r, ev), outcome in zip(sources, applied.outcomes, strict=True):
            if outcome == "late":
                dlq.append(dead_letter(tp.topic, tp.partition, r.offset, f"late event: field 'timestamp' "
                                       f"{ev.timestamp.isoformat()} is before the watermark "
                                       f"{datetime.fromtimestamp(watermark, UTC).isoformat()} "
                                       f"(allowed lateness {self.state.lateness:.0f} s)", r.value))

        # properties whose windows moved on with the clock (no new event of theirs): re-push them too
        due = [p for p in self.state.due(applied.clock) if p not in applied.engagement]
        if due:
            applied.engagement.update(self.state.refresh_engagement(due).engagement)
        # absolute feature values of the touched entities -> Feast (one write per view)
        eng = aggregates.engagement_frame(applied)
        self.attrs.update({p: decode_attributes(h) for p, h in applied.properties.items()})
        attrs_df = aggregates.attributes_frame(applied)
        needed = {p for evs in applied.user_events.values() for _, _, p in evs}
        taste_df = aggregates.taste_frame(applied, self.attrs.get(needed))
        t_push = time.perf_counter()
        frames_s = t_push - t_apply - apply_s
        self.sink.push(ATTRIBUTES_PUSH, attrs_df)
        self.sink.push(ENGAGEMENT_PUSH, eng)
        self.sink.push(TASTE_PUSH, taste_df)
        push_s = time.perf_counter() - t_push
        if self.rec_cache is not None and (applied.user_events or applied.properties):
            from rentalml.cache import invalidate

            try:
                invalidate(list(applied.user_events), list(applied.properties), cache=self.rec_cache)
            except Exception as exc:  # the cache is an optimisation: its TTL bounds staleness if Redis hiccups
                log.warning("recommendation cache invalidation failed: %s", exc)
        self.state.schedule({p: aggregates.next_change(h, applied.clock) for p, h in applied.engagement.items()})
        metrics.PUSH_SECONDS.observe(push_s)

        # processed_data (at least once; one record per valid event id, redeliveries flagged) and dead_letter
        windows = list(aggregates.ENGAGEMENT_WINDOWS)
        eng_by_pid = ({pid: dict(zip(windows, map(int, vals), strict=True)) for pid, *vals in
                       eng[["property_id", *windows]].itertuples(index=False)} if len(eng) else {})
        now_iso = datetime.now(UTC).isoformat()
        counts = {"processed": 0, "duplicate": 0}
        for (tp, _r, ev), outcome in zip(sources, applied.outcomes, strict=True):
            if outcome == "late":
                continue
            counts[outcome] += 1
            doc = {"event_id": ev.event_id, "source_topic": tp.topic, "event_type": ev.event_type,
                   "property_id": ev.property_id, "timestamp": ev.timestamp.isoformat(),
                   "duplicate": outcome == "duplicate", "processed_at": now_iso}
            if hasattr(ev, "user_id"):
                doc["user_id"] = ev.user_id
                if ev.property_id in eng_by_pid:
                    doc["engagement"] = eng_by_pid[ev.property_id]
            else:
                doc["attributes"] = ev.changed()
            self.producer.send(PROCESSED_DATA, key=ev.property_id.encode(), value=json.dumps(doc).encode())
        for d in dlq:
            self.producer.send(DEAD_LETTER, value=json.dumps(d).encode())
        t_flush = time.perf_counter()
        produce_s = t_flush - t_push - push_s
        self.producer.flush()
        try:
            self.consumer.commit(offsets)
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

    def _update_lag(self) -> bool:
        """ml_stream_committed_lag per assigned partition. Tansu's end offsets (high watermarks) are unreliable,
        so the lag is max(end offset, consumer position) - committed: on a real Kafka the backlog, on Tansu at
        least the records polled but not yet committed."""
        try:
            parts = list(self.consumer.assignment())
            if not parts:
                return False
            ends = self.consumer.end_offsets(parts)
            for tp in parts:
                committed = self.consumer.committed(tp) or 0
                top = max(ends.get(tp) or 0, self.consumer.position(tp) or 0)
                metrics.COMMITTED_LAG.labels(tp.topic, str(tp.partition)).set(max(top - committed, 0))
            return True
        except Exception as exc:  # metrics must never stop the stream
            log.debug("lag update failed: %s", exc)
            return False
