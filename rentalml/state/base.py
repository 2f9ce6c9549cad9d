"""The stream state store's interface: dedupe set, windowed counters, property attributes, user histories.

One `apply(events)` call is ONE atomic step (a Lua script in Redis, one transaction in SQLite) that, per event
in order: recognises a redelivery by its event id (→ "duplicate", nothing changes), rejects an event older
than the watermark (→ "late"), otherwise records the id and updates the counters (→ "processed"). It returns
the absolute state of every entity the batch touched, read in the same atomic step, with a per-entity version
(microseconds, strictly increasing on every change) used as the Feast `event_timestamp`, so an older snapshot
can never overwrite a newer one in the online store.

Key layout (Redis; SQLite stores the same keys in tables `hashes(key, field, value)`, `zsets(key, member,
score)`, `sets(key, member)`). P = settings.stream.key_prefix (default "rentalml:stream"):

  P:clock            string  max event time seen (epoch seconds); watermark = clock - allowed_lateness_s
  P:dd:{hour}        set     event ids of that event-time hour (dedupe; dropped after lateness + margin)
  P:dd_hours         zset    the hours that have a P:dd:{hour} set
  P:eng:{pid}        hash    v|s|i|a|l:{hour} counts per event type and hour, v5:{5-min bucket} view counts,
                             last = latest event time, _v = version
  P:prop:{pid}       hash    property attributes, each value JSON-encoded; @{attribute} = event time of its
                             value (an older event never overwrites a newer value; property events are never
                             "late"); _ts = time of the latest property event; _v = version
  P:eng_due          zset    property_id -> event time at which its window values next change without a new
                             event (the processor re-pushes it once the clock passes that time)
  P:user:{uid}       hash    n:{hour} event counts, last, _v
  P:props            zset    property_id -> time of its latest property event (`properties_since(ts)`: how
                             serving finds listings its model has never seen)
  P:hist:{uid}       zset    property_id -> time of the user's latest interaction with it (the newest
                             `history_len` properties; `recent_history(user_id)` reads it oldest -> newest)
  P:uev:{uid}        list    the user's newest `taste_events` interactions as "epoch|type letter|property_id"
                             (arrival order), the input of the user_taste features
  P:batch:{id}       string  the outcomes of an `apply(events, batch=id)` (JSON list), for one hour: a retry of a
                             batch whose reply was lost gets them back (Redis only)

Bucket sizes and retention come from rentalml.features.formulas (the one definition of the feature windows).
Backends: rentalml.state.redis (the Lua scripts under rentalml/state/lua/), rentalml.state.sqlite. The layout is
Feast's (feast 0.67.0, sdk/python/feast/infra/online_stores/online_store.py: an `OnlineStore(ABC)` whose
operations are `@abstractmethod`s, one module per backend beside it).
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from rentalml.config import Settings
from rentalml.features.formulas import FINE_KEEP_BUCKETS, FIVE_MIN, HOUR, TYPE_CODE, WEEK_HOURS

__all__ = ["FIVE_MIN", "HOUR", "TYPE_CODE", "WEEK_HOURS", "Applied", "StateStore", "decode_attributes",
           "encode_event", "user_event"]


@dataclass
class Applied:
    """What one atomic apply did and the absolute state of the touched entities after it."""

    outcomes: list[str]
    clock: float
    engagement: dict[str, dict[str, str]] = field(default_factory=dict)
    properties: dict[str, dict[str, str]] = field(default_factory=dict)
    users: dict[str, dict[str, str]] = field(default_factory=dict)
    #: per touched user: (property id, time) oldest -> newest; SQLite only (Redis leaves it empty: nothing reads
    #: it per batch, and `recent_history` is the reader's call)
    histories: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    #: per touched user: recent interactions (event time, event type letter, property id), arrival order
    user_events: dict[str, list[tuple[float, str, str]]] = field(default_factory=dict)


def encode_event(ev) -> dict:
    """The compact form of a validated event (rentalml.schema Interaction | PropertyEvent) the state stores see."""
    ts = ev.timestamp.timestamp()
    if hasattr(ev, "user_id"):
        return {"id": ev.event_id, "k": "i", "t": TYPE_CODE[ev.event_type], "u": ev.user_id, "p": ev.property_id,
                "ts": ts}
    return {"id": ev.event_id, "k": "p", "t": ev.event_type, "p": ev.property_id, "ts": ts,
            "a": {k: json.dumps(v) for k, v in ev.changed().items()}}


def decode_attributes(h: dict[str, str]) -> dict:
    """A property hash's attributes (JSON values), without the bookkeeping fields (`_v`, `_ts`, `@…`)."""
    return {k: json.loads(v) for k, v in h.items() if not k.startswith(("_", "@"))}


def user_event(x: str) -> tuple[float, str, str]:
    """One stored user event "epoch|type letter|property_id"."""
    ts, t, pid = x.split("|", 2)
    return float(ts), t, pid


class StateStore(ABC):
    """The state store every caller uses (streaming.processor writes, inference.freshness reads). Settings-derived
    parameters are shared; every operation is declared here and implemented by each backend."""

    def __init__(self, settings: Settings):
        s = settings.stream
        self.prefix = s.key_prefix
        self.lateness = float(s.allowed_lateness_s)
        self.margin = float(s.dedupe_margin_s)
        self.history_len = int(s.history_len)
        self.taste_events = int(s.taste_events)
        #: hourly buckets kept behind the clock: the longest window (7 d) plus the lateness bound
        self.keep_h = WEEK_HOURS + math.ceil(self.lateness / HOUR) + 1

    def _buckets(self) -> dict:
        """Bucket sizes and retention, as the backends (and the Lua scripts) take them."""
        return {"keep_h": self.keep_h, "hour": HOUR, "fine": FIVE_MIN, "fine_keep": FINE_KEEP_BUCKETS}

    def _params(self, events: list[dict]) -> dict:
        return {"events": events, "lateness": self.lateness, "margin": self.margin, "hist": self.history_len,
                "uev": self.taste_events, **self._buckets()}

    @abstractmethod
    def apply(self, events: list[dict], batch: str | None = None) -> Applied:
        """Apply encoded events (`encode_event`) in one atomic step; see the module docstring. `batch`: an id the
        caller keeps when it retries the same batch after a connection error: a run whose reply was lost (the
        server stopped right after it) then gets that run's outcomes back, not "duplicate" for its own events."""

    @abstractmethod
    def refresh_engagement(self, property_ids: list[str]) -> Applied:
        """New version + pruned counters of properties whose windows moved on without new events."""

    @abstractmethod
    def due(self, clock: float, limit: int = 5000) -> list[str]:
        """Properties whose window values change at or before `clock` (scheduled by `schedule`)."""

    @abstractmethod
    def schedule(self, due: dict[str, float | None]) -> None:
        """property -> event time at which its window values next change (None: never)."""

    @abstractmethod
    def recent_history(self, user_id: str) -> list[str]:
        """The user's most recent distinct property ids, oldest -> newest ([] for an unknown user)."""

    @abstractmethod
    def property_attributes(self, property_ids: list[str]) -> dict[str, dict]:
        """Decoded attributes of the known properties among `property_ids`."""

    @abstractmethod
    def properties_since(self, ts: float) -> list[tuple[str, float]]:
        """(property id, event time) of properties with a property event at or after `ts`, oldest first."""

    @abstractmethod
    def seed_properties(self, attrs: dict[str, dict]) -> int:
        """Attributes of properties the stream has not seen yet; returns how many were seeded."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection."""
