"""Prometheus metrics of the stream processor (names from contracts.md)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()
EVENTS = Counter("ml_stream_events_total", "stream events by source topic and outcome "
                 "(processed | dead_letter | duplicate); events/s = rate()", ["topic", "outcome"], registry=REGISTRY)
PUSH_SECONDS = Histogram("ml_stream_push_seconds", "seconds per Feast online push of one batch (all views)",
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0), registry=REGISTRY)
COMMITTED_LAG = Gauge("ml_stream_committed_lag", "records not yet committed by the consumer group: "
                      "max(end offset, consumer position) - committed offset", ["topic", "partition"],
                      registry=REGISTRY)
BATCH_SECONDS = Histogram("ml_stream_batch_seconds", "seconds from poll to commit of one batch",
                          buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0), registry=REGISTRY)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Expose /metrics on `port` (a daemon thread)."""
    start_http_server(port, addr=addr, registry=REGISTRY)
