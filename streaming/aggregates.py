"""Feature rows (the Feast push contract) from the state store's absolute snapshots.

Windows are event-time windows ending at the stream clock T (the max event time seen): a window of length W
sums the buckets b with b > floor(T / size) - W / size, i.e. the W/size most recent buckets including the
current one. views_1h uses 5-minute buckets, the 24h/7d windows hourly buckets.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from rentalml.schema import EVENT_WEIGHTS

from .state import FIVE_MIN, HOUR, TYPE_CODE, Applied, decode_attributes

#: feature -> (counter letter, bucket size s, window s)
ENGAGEMENT_WINDOWS = {
    "views_1h": ("v5", FIVE_MIN, 3600),
    "views_24h": ("v", HOUR, 86_400),
    "views_7d": ("v", HOUR, 7 * 86_400),
    "saves_24h": ("s", HOUR, 86_400),
    "saves_7d": ("s", HOUR, 7 * 86_400),
    "inquiries_7d": ("i", HOUR, 7 * 86_400),
    "applications_7d": ("a", HOUR, 7 * 86_400),
}
ATTRIBUTE_FEATURES = ["price", "bedrooms", "bathrooms", "city", "lat", "lon", "available", "property_type"]
TASTE_WINDOW_S = 30 * 86_400
WEIGHT_OF_CODE = {code: EVENT_WEIGHTS[t] for t, code in TYPE_CODE.items()}
TASTE_FEATURES = ["n_events_7d", "median_price", "pref_bedrooms", "top_city", "pref_lat", "pref_lon"]


def _ts(value: float, unit: str = "us") -> pd.Timestamp:
    """A state-store time (version in microseconds, event times in seconds) as a UTC timestamp."""
    if unit == "us":
        return pd.Timestamp(int(value), unit="us", tz="UTC")
    return pd.Timestamp(datetime.fromtimestamp(value, UTC))


def window_sums(h: dict[str, str], clock: float) -> dict[str, int]:
    """The engagement windows of one property's counter hash."""
    buckets: dict[str, list[tuple[int, int]]] = {}
    for f, v in h.items():
        kind, _, b = f.partition(":")
        if b:
            buckets.setdefault(kind, []).append((int(b), int(v)))
    out = {}
    for name, (kind, size, window) in ENGAGEMENT_WINDOWS.items():
        lo = math.floor(clock / size) - window // size
        out[name] = sum(n for b, n in buckets.get(kind, ()) if b > lo)
    return out


def next_change(h: dict[str, str], clock: float) -> float | None:
    """The event time at which a window of this counter hash next loses a bucket (None: all windows empty)."""
    buckets: dict[str, list[int]] = {}
    for f, v in h.items():
        kind, _, b = f.partition(":")
        if b and int(v) > 0:
            buckets.setdefault(kind, []).append(int(b))
    out = None
    for kind, size, window in ENGAGEMENT_WINDOWS.values():
        lo = math.floor(clock / size) - window // size
        live = [b for b in buckets.get(kind, ()) if b > lo]
        if live:
            t = float((min(live) + window // size) * size)
            out = t if out is None else min(out, t)
    return out


def engagement_frame(applied: Applied) -> pd.DataFrame:
    rows = []
    for pid, h in applied.engagement.items():
        row = {"property_id": pid, "event_timestamp": _ts(float(h["_v"])), **window_sums(h, applied.clock)}
        row["last_event_ts"] = _ts(float(h["last"]), "s") if "last" in h else pd.NaT
        rows.append(row)
    return pd.DataFrame(rows)


def attributes_frame(applied: Applied) -> pd.DataFrame:
    rows = []
    for pid, h in applied.properties.items():
        a = decode_attributes(h)
        rows.append({"property_id": pid, "event_timestamp": _ts(float(h["_v"])),
                     **{f: a.get(f) for f in ATTRIBUTE_FEATURES}})
    df = pd.DataFrame(rows, columns=["property_id", "event_timestamp", *ATTRIBUTE_FEATURES])
    for col in ("price", "bathrooms", "lat", "lon"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    for col in ("bedrooms", "available"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    return df


def taste(events: list[tuple[float, str, str]], attrs: dict[str, dict], counts: dict[str, str],
          clock: float) -> dict:
    """User taste with the batch table's definition (rentalml.features.store user_taste) over the user's recent
    interactions of the last 30 days before the stream clock: median price over events, event-weight weighted
    mean bedrooms / lat / lon, top city by summed weight (ties: alphabetical). n_events_7d comes from the hourly
    counters (exact even beyond the bounded event list)."""
    lo = math.floor(clock / HOUR) - 7 * 24
    n7 = sum(int(v) for f, v in counts.items() if f.startswith("n:") and int(f[2:]) > lo)
    rows = [(WEIGHT_OF_CODE[t], attrs[p]) for ts, t, p in events if ts >= clock - TASTE_WINDOW_S and p in attrs]

    def wmean(col: str) -> float | None:
        vals = [(w, float(a[col])) for w, a in rows if a.get(col) is not None]
        tot = sum(w for w, _ in vals)
        return sum(w * v for w, v in vals) / tot if vals and tot > 0 else None

    prices = [float(a["price"]) for _, a in rows if a.get("price") is not None]
    city_w: dict[str, float] = {}
    for w, a in rows:
        if a.get("city"):
            city_w[a["city"]] = city_w.get(a["city"], 0.0) + w
    top_city = min(city_w, key=lambda c: (-city_w[c], c)) if city_w else None
    return {"n_events_7d": n7, "median_price": float(np.median(prices)) if prices else None,
            "pref_bedrooms": wmean("bedrooms"), "top_city": top_city, "pref_lat": wmean("lat"),
            "pref_lon": wmean("lon")}


def taste_frame(applied: Applied, attrs: dict[str, dict]) -> pd.DataFrame:
    rows = []
    for uid, h in applied.users.items():
        rows.append({"user_id": uid, "event_timestamp": _ts(float(h["_v"])),
                     **taste(applied.user_events.get(uid, []), attrs, h, applied.clock)})
    df = pd.DataFrame(rows, columns=["user_id", "event_timestamp", *TASTE_FEATURES])
    for col in ("median_price", "pref_bedrooms", "pref_lat", "pref_lon"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    df["n_events_7d"] = df["n_events_7d"].astype("int64")
    return df
