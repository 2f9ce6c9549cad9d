"""Feature rows (the Feast push contract) from the state store's absolute snapshots: `*_rows` give plain Python
rows (what the processor writes to the online store), `*_frame` the same rows as typed DataFrames.

Windows are event-time windows ending at the stream clock T (the max event time seen): a window of length W
sums the buckets b with b > floor(T / size) - W / size, i.e. the W/size most recent buckets including the
current one. views_1h uses 5-minute buckets, the 24h/7d windows hourly buckets. The windows, the attribute list
and the user_taste formula are defined once in rentalml.features.formulas (tests/test_feature_formulas.py holds
this path, the batch tables and both state stores to it).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pandas as pd

from rentalml.features import formulas as F
from rentalml.features.formulas import (
    ATTRIBUTE_FEATURES,
    ENGAGEMENT_WINDOWS,
    HOUR,
    TASTE_FEATURES,
    TASTE_WINDOW_S,
    WEIGHT_OF_CODE,
)
from rentalml.state import Applied, decode_attributes

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

__all__ = ["ATTRIBUTE_FEATURES", "ENGAGEMENT_WINDOWS", "TASTE_FEATURES", "TASTE_WINDOW_S", "WEIGHT_OF_CODE",
           "attributes_frame", "attributes_rows", "engagement_frame", "engagement_rows", "next_change", "taste",
           "taste_frame", "taste_rows", "version_time", "window_sums"]


def window_sums(h: dict[str, str], clock: float) -> dict[str, int]:
    """The engagement windows (rentalml.features.formulas.ENGAGEMENT_WINDOWS) of one property's counter hash."""
    return {name: F.bucketed_count(h, w.counter, w.bucket_s, w.window_s, clock)
            for name, w in ENGAGEMENT_WINDOWS.items()}


def next_change(h: dict[str, str], clock: float) -> float | None:
    """The event time at which a window of this counter hash next loses a bucket (None: all windows empty)."""
    buckets: dict[str, list[int]] = {}
    for f, v in h.items():
        kind, _, b = f.partition(":")
        if b and int(v) > 0:
            buckets.setdefault(kind, []).append(int(b))
    out = None
    for w in ENGAGEMENT_WINDOWS.values():
        size, n = w.bucket_s, w.window_s // w.bucket_s
        lo = math.floor(clock / size) - n
        live = [b for b in buckets.get(w.counter, ()) if b > lo]
        if live:
            t = float((min(live) + n) * size)
            out = t if out is None else min(out, t)
    return out


def version_time(v: str | float) -> datetime:
    """A state-store version (integer microseconds) as an exact UTC datetime (the Feast event_timestamp)."""
    return EPOCH + timedelta(microseconds=int(v))


def _float(v) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _int(v) -> int | None:
    f = _float(v)
    return None if f is None else round(f)


def _str(v) -> str | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


#: the Python type of each pushed feature column (rentalml.features.formulas; feature_repo/features.py dtypes)
ATTRIBUTE_TYPES = {"price": _float, "bedrooms": _int, "bathrooms": _float, "city": _str, "lat": _float,
                   "lon": _float, "available": _int, "property_type": _str}
TASTE_TYPES = {"n_events_7d": int, "median_price": _float, "pref_bedrooms": _float, "top_city": _str,
               "pref_lat": _float, "pref_lon": _float}


def engagement_rows(applied: Applied) -> list[dict]:
    """property_engagement rows (plain Python values) of the touched properties: the push contract."""
    rows = []
    for pid, h in applied.engagement.items():
        row = {"property_id": pid, "event_timestamp": version_time(h["_v"]), **window_sums(h, applied.clock)}
        row["last_event_ts"] = datetime.fromtimestamp(float(h["last"]), UTC) if "last" in h else None
        rows.append(row)
    return rows


def attributes_rows(applied: Applied) -> list[dict]:
    rows = []
    for pid, h in applied.properties.items():
        a = decode_attributes(h)
        rows.append({"property_id": pid, "event_timestamp": version_time(h["_v"]),
                     **{f: ATTRIBUTE_TYPES[f](a.get(f)) for f in ATTRIBUTE_FEATURES}})
    return rows


def taste_rows(applied: Applied, attrs: dict[str, dict]) -> list[dict]:
    rows = []
    for uid, h in applied.users.items():
        t = taste(applied.user_events.get(uid, []), attrs, h, applied.clock)
        rows.append({"user_id": uid, "event_timestamp": version_time(h["_v"]),
                     **{f: TASTE_TYPES[f](t[f]) for f in TASTE_FEATURES}})
    return rows


def engagement_frame(applied: Applied) -> pd.DataFrame:
    df = pd.DataFrame(engagement_rows(applied))
    if len(df):
        df["event_timestamp"] = pd.to_datetime(df["event_timestamp"], utc=True)
        df["last_event_ts"] = pd.to_datetime(df["last_event_ts"], utc=True)
    return df


def attributes_frame(applied: Applied) -> pd.DataFrame:
    df = pd.DataFrame(attributes_rows(applied), columns=["property_id", "event_timestamp", *ATTRIBUTE_FEATURES])
    df["event_timestamp"] = pd.to_datetime(df["event_timestamp"], utc=True)
    for col in ("price", "bathrooms", "lat", "lon"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    for col in ("bedrooms", "available"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    return df


def taste(events: list[tuple[float, str, str]], attrs: dict[str, dict], counts: dict[str, str],
          clock: float) -> dict:
    """user_taste (rentalml.features.formulas.user_taste) at the stream clock over the user's recent
    interactions (event time, type letter, property id). n_events_7d comes from the hourly counters (exact even
    beyond the bounded event list, bucketed at the window's lower edge)."""
    n7 = F.bucketed_count(counts, "n", HOUR, F.TASTE_COUNT_WINDOW_S, clock)
    return F.user_taste([(ts, WEIGHT_OF_CODE[t], attrs.get(p)) for ts, t, p in events], clock, n7)


def taste_frame(applied: Applied, attrs: dict[str, dict]) -> pd.DataFrame:
    df = pd.DataFrame(taste_rows(applied, attrs), columns=["user_id", "event_timestamp", *TASTE_FEATURES])
    df["event_timestamp"] = pd.to_datetime(df["event_timestamp"], utc=True)
    for col in ("median_price", "pref_bedrooms", "pref_lat", "pref_lon"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    df["n_events_7d"] = df["n_events_7d"].astype("int64")
    return df
