"""One definition per feature formula (rentalml.features.formulas): the same events through every path that
computes the features (user_taste, property_engagement, property_attributes) — the Redis state store and the
SQLite state store (each feeding the stream aggregates, streaming/aggregates.py, as the processor does) and the
batch tables (rentalml.features.store) — give the values of the reference implementation, identically.

The event times stay clear of the windows' lower edges by more than one bucket: there the stream's bucketed
windows and the exact batch windows differ by design (formulas module docstring)."""

from __future__ import annotations

import json
import math
import uuid

import pandas as pd

from rentalml.config import Settings
from rentalml.features import formulas as F

T = 1_800_001_234  # the last event's time (s): the stream clock; the batch snapshot is T + 1 s
MIN, H, D = 60, 3600, 86_400
PROPS = {  # property -> attributes (None: unknown to the feature store)
    "p1": {"price": 1000.0, "bedrooms": 2, "city": "Austin", "lat": 30.2, "lon": -97.7},
    "p2": {"price": 1500.0, "bedrooms": 3, "city": "Denver", "lat": 39.7, "lon": -105.0},
    "p3": {"price": 2200.0, "bedrooms": None, "city": "Denver", "lat": 39.8, "lon": -104.9},
    "p4": {"price": 800.0, "bedrooms": 1, "city": "Austin", "lat": None, "lon": None},
}
# (seconds before T, user, property, event type): inside and outside every window, clear of the bucket edges
EVENTS = [
    (40 * D, "u1", "p1", "view"),  # outside user_taste's 30 days
    (20 * D, "u1", "p2", "inquiry"),
    (8 * D, "u1", "p3", "save"),  # inside 30 d, outside the 7 d windows
    (6 * D, "u2", "p1", "application"),
    (3 * D, "u1", "p4", "view"),
    (30 * H, "u2", "p2", "save"),
    (20 * H, "u1", "p1", "save"),
    (5 * H, "u2", "p3", "view"),
    (2 * H, "u1", "p9", "view"),  # a property without attributes
    (25 * MIN, "u1", "p2", "view"),
    (10 * MIN, "u2", "p2", "view"),
    (0, "u1", "p1", "lease"),
]


def _reference() -> tuple[dict, dict]:
    taste = {u: F.user_taste([(T - dt, F.EVENT_WEIGHTS[e], PROPS.get(p)) for dt, uu, p, e in EVENTS if uu == u], T)
             for u in ("u1", "u2")}
    eng = {p: F.engagement([(T - dt, e) for dt, _, pp, e in EVENTS if pp == p], T)
           for p in sorted({p for _, _, p, _ in EVENTS})}
    return taste, eng


def _stream(backend: str, redis_url: str, tmp_path) -> tuple[dict, dict]:
    from rentalml.streaming import aggregates

    from rentalml.state.redis import RedisState
    from rentalml.state.sqlite import SQLiteState

    s = Settings(home=tmp_path, stream={"key_prefix": f"formulas:{uuid.uuid4().hex[:8]}",
                                        "allowed_lateness_s": 3600})
    st = RedisState(s, redis_url) if backend == "redis" else SQLiteState(s, tmp_path / "state.db")
    try:
        listed = st.apply([{"id": f"l{p}", "k": "p", "t": "listed", "p": p, "ts": float(T - 50 * D),
                            "a": {k: json.dumps(v) for k, v in {**a, "available": 1}.items()}}
                           for p, a in PROPS.items()])
        attributes = aggregates.attributes_frame(listed).set_index("property_id")
        events = [{"id": f"e{i}", "k": "i", "t": F.TYPE_CODE[e], "u": u, "p": p, "ts": float(T - dt)}
                  for i, (dt, u, p, e) in enumerate(EVENTS)]
        applied = st.apply(events)  # in event-time order: nothing is late
        assert applied.outcomes == ["processed"] * len(EVENTS) and applied.clock == T
        attrs = st.property_attributes(list(PROPS))
        taste = aggregates.taste_frame(applied, attrs).set_index("user_id")
        eng = aggregates.engagement_frame(applied).set_index("property_id")
    finally:
        st.close()
    return ({u: {f: _value(row[f]) for f in F.TASTE_FEATURES} for u, row in taste.iterrows()},
            {p: {f: int(row[f]) for f in F.ENGAGEMENT_WINDOWS} for p, row in eng.iterrows()},
            {p: {f: _value(row[f]) for f in F.ATTRIBUTE_FEATURES} for p, row in attributes.iterrows()})


def _batch() -> tuple[dict, dict]:
    from rentalml.data.dataset import Dataset
    from rentalml.features import store

    inter = pd.DataFrame([{"user_id": u, "property_id": p, "event_type": e,
                           "timestamp": pd.Timestamp(T - dt, unit="s", tz="UTC")} for dt, u, p, e in EVENTS])
    items = pd.DataFrame([{"property_id": p, **a} for p, a in PROPS.items()]).set_index("property_id")
    ds = Dataset(inter, items)
    end = T + 1
    at = pd.Timestamp(end, unit="s", tz="UTC")
    taste = store._taste_table(ds, end)
    taste = taste[taste["event_timestamp"] == at].set_index("user_id")
    eng = store._engagement_table(ds, end)
    eng = eng[eng["event_timestamp"] == at].set_index("property_id")
    attributes = store._attribute_table(ds, at).set_index("property_id")
    return ({u: {f: _value(row[f]) for f in F.TASTE_FEATURES} for u, row in taste.iterrows()},
            {p: {f: int(row[f]) for f in F.ENGAGEMENT_WINDOWS} for p, row in eng.iterrows()},
            {p: {f: _value(row[f]) for f in F.ATTRIBUTE_FEATURES} for p, row in attributes.iterrows()})


def _value(v):
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return None
    if isinstance(v, str):
        return v
    return round(float(v), 9)


def _rounded(d: dict) -> dict:
    return {k: {f: _value(v) for f, v in row.items()} for k, row in d.items()}


def test_every_backend_computes_the_same_features(redis_url, tmp_path):
    """Redis state, SQLite state (through the stream aggregates) and the batch tables give the reference
    user_taste and property_engagement values for the same events."""
    ref_taste, ref_eng = _reference()
    ref_taste, ref_eng = _rounded(ref_taste), _rounded(ref_eng)
    # the fixture's events exercise every part of the formulas
    assert ref_taste["u1"]["n_events_7d"] == 5 and ref_taste["u1"]["top_city"] == "Austin"
    assert ref_taste["u1"]["pref_bedrooms"] is not None and ref_eng["p2"]["views_1h"] == 2
    assert ref_eng["p1"]["saves_24h"] == 1 and ref_eng["p1"]["applications_7d"] == 1

    paths = {"redis": _stream("redis", redis_url, tmp_path / "r"),
             "sqlite": _stream("sqlite", redis_url, tmp_path / "s"),
             "batch": _batch()}
    ref_attrs = {p: {f: _value({**a, "available": 1}.get(f)) for f in F.ATTRIBUTE_FEATURES} for p, a in PROPS.items()}
    for name, (taste, eng, attrs) in paths.items():
        assert taste == ref_taste, name
        assert eng == ref_eng, name
        assert attrs == ref_attrs, name
