"""Every feature formula of rentalml, defined once: its parameters and a plain-Python reference implementation.

Three paths compute these features and all take their parameters from here:
  * batch  — rentalml.features.store (`_engagement_table`, `_taste_table`): vectorised pandas over a Dataset,
             snapshots at UTC midnights and at the dataset end;
  * stream — rentalml.streaming.aggregates over the state store's counters and event lists
             (rentalml.state: Redis Lua scripts and SQLite keep the counters; bucket sizes and retention are
             passed to them from here);
  * serving — reads what the two above wrote (Feast online store), so it never recomputes a formula.
tests/test_feature_formulas.py runs the same events through every path (Redis state, SQLite state, the stream
aggregates, the batch tables) and expects the values of the reference functions below.

Windows. A window of length W ending at time T covers the events with T - W <= t <= T. The stream evaluates
it over time buckets (`bucket_s`: the W / bucket_s most recent buckets including the current one), so the
stream's count may include events up to one bucket older than T - W; the batch tables count exactly. The two
agree whenever no event lies within one bucket of a window's lower edge (the reference implementation is exact).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from rentalml.schema import EVENT_WEIGHTS

HOUR = 3600
FIVE_MIN = 300
DAY = 86_400
WEEK_HOURS = 168
#: the fine (5-minute) buckets the state store keeps behind its clock (2 h: views_1h plus headroom)
FINE_KEEP_BUCKETS = 24
#: event_type -> the state store's one-letter counter code
TYPE_CODE = {"view": "v", "save": "s", "inquiry": "i", "application": "a", "lease": "l"}
#: counter code -> event weight (rentalml.schema.EVENT_WEIGHTS)
WEIGHT_OF_CODE = {code: EVENT_WEIGHTS[t] for t, code in TYPE_CODE.items()}


@dataclass(frozen=True)
class EngagementWindow:
    """One property_engagement feature: events of `event_type` in the last `window_s` seconds (stream:
    evaluated over buckets of `bucket_s`)."""

    event_type: str
    window_s: int
    bucket_s: int = HOUR

    @property
    def counter(self) -> str:
        """The state store's counter field kind: the type letter, + "5" for the 5-minute buckets."""
        return TYPE_CODE[self.event_type] + ("5" if self.bucket_s == FIVE_MIN else "")


#: property_engagement: feature -> window (the feature view's fields, feature_repo/features.py)
ENGAGEMENT_WINDOWS: dict[str, EngagementWindow] = {
    "views_1h": EngagementWindow("view", HOUR, FIVE_MIN),
    "views_24h": EngagementWindow("view", DAY),
    "views_7d": EngagementWindow("view", 7 * DAY),
    "saves_24h": EngagementWindow("save", DAY),
    "saves_7d": EngagementWindow("save", 7 * DAY),
    "inquiries_7d": EngagementWindow("inquiry", 7 * DAY),
    "applications_7d": EngagementWindow("application", 7 * DAY),
}
# the state store keeps 5-minute buckets for views only ('v5'; rentalml/state/lua/apply.lua, sqlite.py)
assert all(w.bucket_s in (HOUR, FIVE_MIN) for w in ENGAGEMENT_WINDOWS.values())
assert all(w.event_type == "view" for w in ENGAGEMENT_WINDOWS.values() if w.bucket_s == FIVE_MIN)

#: property_attributes: the property's latest value of each (the listing's attributes, `available` 0 once delisted)
ATTRIBUTE_FEATURES = ["price", "bedrooms", "bathrooms", "city", "lat", "lon", "available", "property_type"]

#: user_taste: the user's interactions of the last 30 days; n_events_7d counts those of the last 7 days
TASTE_WINDOW_S = 30 * DAY
TASTE_COUNT_WINDOW_S = 7 * DAY
TASTE_FEATURES = ["n_events_7d", "median_price", "pref_bedrooms", "top_city", "pref_lat", "pref_lon"]
#: property attributes user_taste reads (weighted means: bedrooms, lat, lon; median: price; top: city)
TASTE_MEANS = {"bedrooms": "pref_bedrooms", "lat": "pref_lat", "lon": "pref_lon"}


def engagement(events: Iterable[tuple[float, str]], at: float) -> dict[str, int]:
    """Reference property_engagement at time `at` from one property's (event time s, event type) pairs."""
    evs = [(t, e) for t, e in events if t <= at]
    return {name: sum(1 for t, e in evs if e == w.event_type and t >= at - w.window_s)
            for name, w in ENGAGEMENT_WINDOWS.items()}


def user_taste(events: Iterable[tuple[float, float, Mapping | None]], at: float,
               n_events_7d: int | None = None) -> dict:
    """Reference user_taste at time `at` from one user's (event time s, event weight, attributes of the
    property or None) triples: over the events of the last 30 days, the median price, the weighted mean
    bedrooms / lat / lon, and the city with the largest summed weight (ties: alphabetical); n_events_7d counts
    the events of the last 7 days (the stream passes its bucketed count instead, see the module docstring).
    A feature without a value is None."""
    lo = at - TASTE_WINDOW_S
    events = [(t, w, a) for t, w, a in events if lo <= t <= at]
    if n_events_7d is None:
        lo7 = at - TASTE_COUNT_WINDOW_S
        n_events_7d = sum(1 for t, _, _ in events if t >= lo7)
    # one pass (the stream runs this per touched user per batch over up to `stream.taste_events` events):
    # per mean column the weight total and weighted sum, added in event order; a value is present when it is
    # neither None nor NaN
    cols = tuple(TASTE_MEANS)
    tot, acc, n = [0] * len(cols), [0] * len(cols), [0] * len(cols)
    prices: list[float] = []
    city_w: dict[str, float] = {}
    for _, w, a in events:
        if a is None:
            continue
        for i, col in enumerate(cols):
            v = a.get(col)
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                tot[i] += w
                acc[i] += w * float(v)
                n[i] += 1
        v = a.get("price")
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            prices.append(float(v))
        c = a.get("city")
        if c is not None and not (isinstance(c, float) and math.isnan(c)) and c:
            city_w[c] = city_w.get(c, 0.0) + w
    means = {TASTE_MEANS[col]: acc[i] / tot[i] if n[i] and tot[i] > 0 else None for i, col in enumerate(cols)}
    top_city = min(city_w, key=lambda c: (-city_w[c], c)) if city_w else None
    return {"n_events_7d": int(n_events_7d), "median_price": float(statistics.median(prices)) if prices else None,
            "pref_bedrooms": means["pref_bedrooms"], "top_city": top_city, "pref_lat": means["pref_lat"],
            "pref_lon": means["pref_lon"]}


def bucketed_count(counts: Mapping[str, str], kind: str, bucket_s: int, window_s: int, at: float) -> int:
    """The stream's count of a counter hash's `kind` buckets in the window of `window_s` ending at `at`: the
    window_s / bucket_s most recent buckets including the current one."""
    lo = math.floor(at / bucket_s) - window_s // bucket_s
    total = 0
    for f, v in counts.items():
        k, _, b = f.partition(":")
        if k == kind and b and int(b) > lo:
            total += int(v)
    return total
