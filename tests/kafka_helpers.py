"""Reading a Kafka topic back in the tests (Tansu on loopback): one reader for the streaming, fault and image tests."""

from __future__ import annotations

import json
import time


def read_topic(bootstrap: str, topic: str, keep=lambda doc: True, idle_s: float = 2.0) -> list[dict]:
    """Every record of `topic` from the beginning (all partitions, no consumer group) whose JSON value passes
    `keep`; reads until the topic has been idle for `idle_s`. Committed offsets are not used (Tansu's watermarks are
    unreliable, so this reads until quiet rather than up to the high watermark)."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                      auto_offset_reset="earliest", max_poll_records=5000)
    parts = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic) or ()]
    c.assign(parts)
    c.seek_to_beginning(*parts)
    out, idle_since = [], time.monotonic()
    while time.monotonic() - idle_since < idle_s:
        batch = c.poll(timeout_ms=300)
        if batch:
            idle_since = time.monotonic()
        out += [d for d in (json.loads(r.value) for recs in batch.values() for r in recs) if keep(d)]
    c.close()
    return out
