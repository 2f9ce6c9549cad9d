"""A `Dataset` as contract events (contracts.md "Kafka topics and events"): `property_data` listing events and
`user_interactions` events, JSON-ready dicts. Used by `rentalml stream produce` and the streaming tests.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from rentalml.data.dataset import Dataset
from rentalml.schema import PROPERTY_ATTRIBUTES

EVENT_TYPES = ("view", "save", "inquiry", "application", "lease")


def _json_value(v):
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, list):
        return [str(x) for x in v]
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NaT:
        return None
    if isinstance(v, pd.Timestamp | datetime):
        ts = pd.Timestamp(v)
        return (ts.tz_localize("UTC") if ts.tzinfo is None else ts).isoformat()
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if isinstance(v, np.generic):
        return v.item()
    return v


def time_shift(ds: Dataset, end: datetime | None = None) -> pd.Timedelta:
    """The shift that moves the dataset's last interaction to `end` (default: now), keeping the spacing."""
    end = end or datetime.now(UTC)
    if not len(ds.interactions):
        return pd.Timedelta(0)
    return pd.Timestamp(end) - ds.interactions["timestamp"].max()


def property_events(ds: Dataset, at: datetime | None = None) -> list[dict]:
    """One `listed` event per property with all its schema attributes (timestamp `at`, default now)."""
    if ds.items is None:
        return []
    ts = (pd.Timestamp(at) if at else pd.Timestamp.now(tz="UTC")).isoformat()
    cols = [c for c in PROPERTY_ATTRIBUTES if c in ds.items.columns]
    out = []
    rows = ds.items[cols].to_dict("records") if cols else [{} for _ in range(len(ds.items))]
    for pid, row in zip(ds.items.index, rows, strict=True):
        attrs = {k: _json_value(v) for k, v in row.items()}
        attrs = {k: v for k, v in attrs.items() if v is not None}
        out.append({"event_id": f"listed-{pid}", "event_type": "listed", "property_id": str(pid),
                    "timestamp": ts, "attributes": attrs})
    return out


def interaction_events(ds: Dataset, shift: pd.Timedelta | None = None) -> Iterator[dict]:
    """The interactions as `user_interactions` events in timestamp order (shifted by `shift`)."""
    df = ds.interactions.sort_values("timestamp", kind="stable")
    ts = df["timestamp"] + (shift if shift is not None else pd.Timedelta(0))
    event_ids = df["event_id"].astype(str) if "event_id" in df else pd.Series(
        [f"e_{i:09d}" for i in range(len(df))], index=df.index)
    types = df["event_type"].astype(str) if "event_type" in df else pd.Series("view", index=df.index)
    sessions = df["session_id"] if "session_id" in df else pd.Series(None, index=df.index, dtype=object)
    for eid, et, uid, pid, t, sid in zip(event_ids, types, df["user_id"], df["property_id"], ts, sessions,
                                         strict=True):
        yield {"event_id": eid, "event_type": et if et in EVENT_TYPES else "view", "user_id": str(uid),
               "property_id": str(pid), "timestamp": t.isoformat(),
               "session_id": None if sid is None or (isinstance(sid, float) and math.isnan(sid)) else str(sid),
               "variant": None}
