"""Reading a Kafka topic back in the tests (Tansu on loopback): one reader for the streaming, fault and image tests."""

from __future__ import annotations

import json
import time

from rentalml.services import wait_until


def read_topic(bootstrap: str, topic: str, keep=lambda doc: True, idle_s: float = 2.0,
               timeout: float = 300.0) -> list[dict]:
    """Every record of `topic` from the beginning (all partitions, no consumer group) whose JSON value passes
    `keep`; reads until the topic has been idle for `idle_s` (TimeoutError when it is never quiet within
    `timeout`). Committed offsets are not used (Tansu's watermarks are unreliable, so this reads until quiet
    rather than up to the high watermark)."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                      auto_offset_reset="earliest", max_poll_records=5000)
    parts = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic) or ()]
    c.assign(parts)
    c.seek_to_beginning(*parts)
    out: list[dict] = []
    last_record_at = [time.monotonic()]

    def quiet() -> bool:
        batch = c.poll(timeout_ms=300)  # the poll itself is the wait between checks
        if batch:
            last_record_at[0] = time.monotonic()
        values = (json.loads(r.value) for recs in batch.values() for r in recs)
        # a processed_data record is a JSON array of documents (docs/architecture.md "Streaming"): one each
        out.extend(d for v in values for d in (v if isinstance(v, list) else [v]) if keep(d))
        return time.monotonic() - last_record_at[0] >= idle_s

    try:
        wait_until(quiet, timeout, interval=0, what=f"topic {topic} to be idle for {idle_s:g}s")
    finally:
        c.close()
    return out
