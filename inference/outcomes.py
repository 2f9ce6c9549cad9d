"""A/B outcome log of the server: impressions of every served item, clicks/saves/inquiries from POST /feedback.

Events have the `ab_outcomes` shape of contracts.md (built by rentalml.evaluation.ab.outcome_event). Sinks
(settings.serve.outcomes_sink): "file" — JSONL appended to $RENTALML_HOME/ab/outcomes.jsonl (or
serve.outcomes_path); "kafka" — the `ab_outcomes` topic (key = user id); "off".

Non-blocking: request handlers put one small tuple per request on a queue; a daemon thread wakes at most every
`interval_s` (50 ms), expands the queued tuples into events and writes them in one batch (one write/flush, or
one producer flush), so logging never waits on disk or the broker. `flush()` drains the queue (tests, shutdown).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import threading
import time
import uuid
from datetime import UTC, datetime

from rentalml.config import Settings, get_settings
from rentalml.evaluation.ab import outcome_event, outcomes_path
from rentalml.kafka import AB_OUTCOMES

log = logging.getLogger("rentalml.inference")
TOPIC = AB_OUTCOMES  # rentalml.kafka: the topic names are a core contract


class OutcomeLog:
    def __init__(self, settings: Settings | None = None, sink: str | None = None, batch: int = 20_000,
                 interval_s: float = 0.05):
        self.settings = settings or get_settings()
        self.sink = (sink or self.settings.serve.outcomes_sink).lower()
        if self.sink not in ("file", "kafka", "off"):
            raise ValueError(f"serve.outcomes_sink must be 'file', 'kafka' or 'off', got {self.sink!r}")
        self.batch = batch
        self.interval_s = interval_s
        self.written = 0
        self.dropped = 0
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._pending = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._producer = None
        self._fd: int | None = None
        self.path = outcomes_path(self.settings) if self.sink == "file" else None

    @property
    def enabled(self) -> bool:
        return self.sink != "off"

    # ---- producers (request handlers) ----------------------------------------------------------------
    def impressions(self, request_id: str, user_ids, property_ids, variants, versions) -> None:
        """One request's served rows: property_ids [N, k] (padding "" skipped), per-row variant and version."""
        if self.enabled:  # (the timestamp is formatted by the writer thread, off the request path)
            self._put(("imp", request_id, list(user_ids), property_ids, list(variants), list(versions), time.time()))

    def outcome(self, **event) -> dict:
        """One feedback event (click/save/inquiry); returns the event as logged."""
        e = outcome_event(event_id=event.pop("event_id", None) or uuid.uuid4().hex, **event)
        if self.enabled:
            self._put(("evt", e))
        return e

    def _put(self, item) -> None:
        with self._lock:
            self._pending += 1
            self._idle.clear()
            if self._thread is None or not self._thread.is_alive() or self._thread_pid != os.getpid():
                self._start()
        self._q.put(item)

    def _start(self) -> None:
        self._thread_pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="outcome-log", daemon=True)
        self._thread.start()
        atexit.register(self.flush, 5.0)

    # ---- writer thread -------------------------------------------------------------------------------
    def _expand(self, item) -> list[dict]:
        if item[0] == "evt":
            return [item[1]]
        _, request_id, users, ids, variants, versions, ts = item
        ts = datetime.fromtimestamp(ts, UTC).isoformat()
        out = []
        for i, u in enumerate(users):
            for rank, pid in enumerate(ids[i]):
                if pid:  # event id from the request: a replayed batch is recognisably the same events
                    out.append({"event_id": f"{request_id}:{i}:{rank}", "request_id": request_id, "user_id": u,
                                "property_id": str(pid), "variant": variants[i], "model_version": versions[i],
                                "outcome": "impression", "timestamp": ts})
        return out

    def _run(self) -> None:
        while True:
            items = [self._q.get()]
            # gather for a moment: under load the writer wakes ~1/interval times a second, not once per request
            # (each wake-up costs the request threads a GIL hand-off)
            time.sleep(self.interval_s)
            while len(items) < self.batch:
                try:
                    items.append(self._q.get_nowait())
                except queue.Empty:
                    break
            events = [e for it in items for e in self._expand(it)]
            try:
                self._write(events)
                self.written += len(events)
            except Exception as exc:  # a broken sink loses these events but never the server
                self.dropped += len(events)
                log.warning("outcome log (%s): dropped %d events: %s", self.sink, len(events), exc)
            with self._lock:
                self._pending -= len(items)
                if self._pending == 0:
                    self._idle.set()

    def _write(self, events: list[dict]) -> None:
        if not events:
            return
        if self.sink == "file":
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            # one write() per batch on an O_APPEND descriptor: REST worker processes sharing the file never
            # interleave inside a line
            data = "".join(json.dumps(e) + "\n" for e in events).encode()
            while data:
                data = data[os.write(self._fd, data):]
        else:
            producer = self._kafka()
            for e in events:
                producer.send(TOPIC, key=str(e["user_id"]).encode(), value=json.dumps(e).encode())
            producer.flush(timeout=10)

    def _kafka(self):
        if self._producer is None:
            from kafka import KafkaProducer

            # the Kafka client settings (SASL/TLS from Settings) live in one place, the core's
            from rentalml.kafka import client_config, ensure_topics

            # created by the code with the configured partitions (a first send would auto-create it with one);
            # in a Strimzi cluster it is a KafkaTopic: checked only (Describe), and a clear TopicsUnavailable
            # (logged by the writer, the events dropped, the server unharmed) where it is missing or hidden
            ensure_topics(self.settings, (TOPIC,))

            self._producer = KafkaProducer(**client_config(self.settings), linger_ms=20, acks=1)
        return self._producer

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued event is written (True) or timeout (False)."""
        return self._idle.wait(timeout)
