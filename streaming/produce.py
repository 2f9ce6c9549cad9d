"""`rentalml stream produce`: replay a Dataset as contract events at a chosen rate (dev, demo, benchmarks)."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime

from rentalml.config import Settings, get_settings
from rentalml.kafka import PROPERTY_DATA, USER_INTERACTIONS, ensure_topics, producer

#: kinds of malformed records `malformed()` makes (each must end in dead_letter)
MALFORMED_KINDS = ("bad_json", "not_utf8", "missing_field", "bad_enum", "no_zone", "unknown_attribute")


def malformed(i: int, rng: random.Random) -> tuple[str, bytes]:
    """A malformed record (topic, value) of kind MALFORMED_KINDS[i % n]."""
    kind = MALFORMED_KINDS[i % len(MALFORMED_KINDS)]
    good = {"event_id": f"bad-{i}", "event_type": "view", "user_id": "u_x", "property_id": "p_x",
            "timestamp": "2026-01-01T00:00:00+00:00", "session_id": None, "variant": None}
    if kind == "bad_json":
        return USER_INTERACTIONS, b'{"event_id": "bad-' + str(i).encode() + b'", "event_type": '
    if kind == "not_utf8":
        return USER_INTERACTIONS, b"\xff\xfe" + rng.randbytes(8)
    if kind == "missing_field":
        good.pop("user_id")
    elif kind == "bad_enum":
        good["event_type"] = "teleport"
    elif kind == "no_zone":
        good["timestamp"] = "2026-01-01T00:00:00"
    else:
        return PROPERTY_DATA, json.dumps({"event_id": f"bad-{i}", "event_type": "updated", "property_id": "p_x",
                                          "timestamp": "2026-01-01T00:00:00+00:00",
                                          "attributes": {"rooftop_helipad": True}}).encode()
    return USER_INTERACTIONS, json.dumps(good).encode()


def key_of(topic: str, event: dict) -> bytes:
    """Record key = the entity id (contracts.md): property_id on property_data, user_id on user_interactions."""
    return str(event["property_id"] if topic == PROPERTY_DATA else event["user_id"]).encode()


def send_events(events: Iterable[tuple[str, dict | bytes]], settings: Settings | None = None, rate: float = 0.0,
                malformed_fraction: float = 0.0, seed: int = 0) -> dict:
    """Produce (topic, event) pairs, `rate` events/s (0 = as fast as possible), with a fraction of malformed
    records mixed in. Returns counts and the achieved rate."""
    settings = settings or get_settings()
    ensure_topics(settings)
    prod = producer(settings, max_in_flight_requests_per_connection=5)
    rng = random.Random(seed)
    n = bad = 0
    t0 = time.perf_counter()
    try:
        for topic, ev in events:
            if malformed_fraction and rng.random() < malformed_fraction:
                btopic, value = malformed(bad, rng)
                prod.send(btopic, key=None, value=value)
                bad += 1
            value = ev if isinstance(ev, bytes) else json.dumps(ev).encode()
            prod.send(topic, key=None if isinstance(ev, bytes) else key_of(topic, ev), value=value)
            n += 1
            if rate > 0 and n % 100 == 0:
                ahead = n / rate - (time.perf_counter() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        prod.flush()
    finally:
        prod.close()
    elapsed = time.perf_counter() - t0
    return {"events": n, "malformed": bad, "seconds": round(elapsed, 3),
            "events_per_s": round((n + bad) / elapsed, 1) if elapsed > 0 else None}


def dataset_events(spec: str, listings: bool = True, timestamps: str = "now",
                   cycle: bool = False) -> Iterator[tuple[str, dict]]:
    """A dataset's property listings then its interactions. `timestamps`: "now" stamps each event with the time it
    is sent (a live-like stream, in order); "shifted" keeps the dataset's spacing, shifted to end now (a months-long
    history replayed in minutes: partitions consumed unevenly put many events behind the watermark). `cycle`
    (with "now"): replay the interactions again and again (new event ids) until the consumer stops."""
    from rentalml.data.events import interaction_events, property_events, time_shift
    from rentalml.data.loaders import load_dataset

    if timestamps not in ("now", "shifted"):
        raise ValueError(f"timestamps must be 'now' or 'shifted' (got {timestamps!r})")
    ds = load_dataset(spec)
    shift = time_shift(ds)
    live = timestamps == "now"
    if listings:
        start = ds.interactions["timestamp"].min() + shift if len(ds.interactions) and not live else None
        for ev in property_events(ds, at=start):
            yield PROPERTY_DATA, ev
    rounds = 0
    while True:
        for ev in interaction_events(ds, shift):
            if live:
                ev["timestamp"] = datetime.now(UTC).isoformat()
            if rounds:
                ev["event_id"] = f"{ev['event_id']}-r{rounds}"
            yield USER_INTERACTIONS, ev
        rounds += 1
        if not cycle or not live or not len(ds.interactions):
            return
