"""The features and filter steps' parts: business rules (`Filters`) and the feature sources they read.

`LocalFeatures` answers from the bundle's property table with live overrides (price changes, delistings,
never-seen properties); `FeastFeatures` from the Feast online store, falling back to the bundle's table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from rentalml.runtime.interfaces import FeatureSource

if TYPE_CHECKING:
    from rentalml.runtime.bundle import Bundle
    from rentalml.runtime.live import LiveCatalogue

#: property attributes the filters and explanations need, in the names of the property schema / Feast view
FILTER_COLUMNS = ["price", "bedrooms", "city", "available"]


@dataclass
class Filters:
    """Business rules applied to candidates. Unset fields do not filter."""

    available_only: bool = True
    city: str | None = None
    budget: float | None = None  # monthly rent the user is looking for
    budget_band: tuple[float, float] = (0.7, 1.3)  # keep prices within [lo·budget, hi·budget]
    min_bedrooms: int | None = None

    @classmethod
    def from_request(cls, params: dict | None, user: dict | None = None) -> Filters:
        """From request parameters (explicit wins), else the user's context (taste features / profile).
        Raises ValueError naming the field on a bad value."""
        p, u = dict(params or {}), dict(user or {})

        def num(name: str, v, kind=float):
            if v is None or v == "":
                return None
            try:
                out = kind(v)
            except (TypeError, ValueError):
                raise ValueError(f"{name}: expected a number, got {v!r}") from None
            if out < 0:
                raise ValueError(f"{name}: must be >= 0, got {v!r}")
            return out

        band = p.get("budget_band", (0.7, 1.3))
        if isinstance(band, str):
            band = band.split(",")
        try:
            lo, hi = (float(band[0]), float(band[1]))
        except (TypeError, ValueError, IndexError):
            raise ValueError(f"budget_band: expected two numbers lo,hi, got {band!r}") from None
        if not 0 <= lo <= hi:
            raise ValueError(f"budget_band: need 0 <= lo <= hi, got {band!r}")
        budget = num("budget", p.get("budget"))
        if budget is None:
            budget = num("user.budget", u.get("budget") if u.get("budget") is not None else u.get("median_price"))
        city = p.get("city") if p.get("city") not in (None, "") else None
        if city is not None and not isinstance(city, str):
            raise ValueError(f"city: expected a string, got {city!r}")
        avail = p.get("available_only", True)
        if isinstance(avail, str):
            avail = avail.lower() not in ("0", "false", "no")
        return cls(available_only=bool(avail), city=city, budget=budget, budget_band=(lo, hi),
                   min_bedrooms=num("min_bedrooms", p.get("min_bedrooms"), int))

    @property
    def trivial(self) -> bool:
        """Only the availability rule: answered from the feature source's unavailable set, no feature lookup."""
        return self.city is None and self.budget is None and self.min_bedrooms is None

    def mask(self, feats: pd.DataFrame) -> np.ndarray:
        """Which rows of `feats` (FILTER_COLUMNS; missing values never exclude) pass."""
        ok = np.ones(len(feats), dtype=bool)
        if self.available_only and "available" in feats:
            ok &= feats["available"].fillna(1).astype(float).to_numpy() > 0
        if self.city is not None and "city" in feats:
            c = feats["city"]
            ok &= (c.isna() | (c.astype(str) == self.city)).to_numpy()
        if self.budget is not None and "price" in feats:
            price = pd.to_numeric(feats["price"], errors="coerce").to_numpy(float)
            lo, hi = self.budget_band
            ok &= np.isnan(price) | ((price >= lo * self.budget) & (price <= hi * self.budget))
        if self.min_bedrooms is not None and "bedrooms" in feats:
            b = pd.to_numeric(feats["bedrooms"], errors="coerce").to_numpy(float)
            ok &= np.isnan(b) | (b >= self.min_bedrooms)
        return ok


NO_RULES = Filters()  # the default rules (availability only); never mutated


class LocalFeatures(FeatureSource):
    """The bundle's property table, with live overrides (price changes, delistings) applied on top."""

    in_process = True

    def __init__(self, bundle: Bundle, live: LiveCatalogue | None = None):
        props = bundle.properties.set_index("property_id")
        self.table = props.reindex(columns=[c for c in FILTER_COLUMNS if c in props.columns or c == "available"])
        if "available" not in props.columns:
            self.table["available"] = 1
        self.live = live
        self.overrides: dict[str, dict] = {}
        avail = pd.to_numeric(self.table["available"], errors="coerce").fillna(1)
        self._unavailable: set[str] = set(self.table.index[avail.to_numpy() <= 0])
        self.users: dict[str, dict] = {}

    def update(self, property_id: str, attributes: dict) -> None:
        self.overrides.setdefault(str(property_id), {}).update(attributes)
        if "available" in attributes:
            if float(attributes["available"] or 0) > 0:
                self._unavailable.discard(str(property_id))
            else:
                self._unavailable.add(str(property_id))

    def unavailable(self) -> set[str]:  # (never None: the table knows)
        """Ids that are not available (delisted): the availability rule's fast path."""
        return self._unavailable

    def properties(self, ids: list[str]) -> pd.DataFrame:
        df = self.table.reindex(ids)
        if self.live is not None and len(self.live):
            extra = self.live.attributes.reindex(columns=df.columns)
            hit = df.index.isin(extra.index) & df.isna().all(axis=1).to_numpy()
            if hit.any():
                df.loc[hit] = extra.reindex(df.index[hit]).to_numpy()
                if "available" in df:
                    df.loc[hit, "available"] = df.loc[hit, "available"].fillna(1)
        for pid in set(ids) & set(self.overrides):
            for col, v in self.overrides[pid].items():
                if col in df.columns:
                    df.loc[pid, col] = v
        return df

    def user(self, user_id: str) -> dict:
        return dict(self.users.get(user_id, {}))


class FeastFeatures(FeatureSource):
    """Candidate and user features from the Feast online store (kept fresh by `rentalml stream run`); the
    bundle's table answers for properties the store does not know yet."""

    def __init__(self, store, fallback: LocalFeatures | None = None):
        self.store = store
        self.fallback = fallback

    def properties(self, ids: list[str]) -> pd.DataFrame:
        from rentalml.features.store import online_features

        df = online_features(self.store, property_ids=ids, features=["property_attributes"]).set_index("property_id")
        df = df.reindex(columns=FILTER_COLUMNS)
        if self.fallback is not None:
            missing = df.isna().all(axis=1).to_numpy()
            if missing.any():
                df.loc[missing] = self.fallback.properties(list(df.index[missing])).reindex(
                    columns=FILTER_COLUMNS).to_numpy()
        return df

    def user(self, user_id: str) -> dict:
        from rentalml.features.store import online_features

        row = online_features(self.store, user_ids=[user_id]).iloc[0].to_dict()
        return {k: v for k, v in row.items() if v is not None and not (isinstance(v, float) and np.isnan(v))}
