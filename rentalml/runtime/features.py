"""The features and filter steps' parts: business rules (`Filters`) and the feature sources they read.

`LocalFeatures` answers from the bundle's property table with live overrides (price changes, delistings,
never-seen properties); `FeastFeatures` from the Feast online store, falling back to the bundle's table.

A request never waits on the online store longer than serve.feature_timeout_s: past that deadline, or when the
store fails, `FeastFeatures` answers that request from the bundle's table and ml_feature_fallback_total counts
it by reason (timeout | error). Fetches run on a few worker threads; while all of them are still waiting on a
stalled store, a request does not queue behind them (reason timeout at once).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
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

log = logging.getLogger(__name__)


def _fallback_counter():
    """ml_feature_fallback_total in prometheus_client's default registry (serving's /metrics), created once."""
    from prometheus_client import REGISTRY, Counter

    existing = REGISTRY._names_to_collectors.get("ml_feature_fallback_total")
    if existing is not None:
        return existing
    return Counter("ml_feature_fallback_total", "Online feature fetches answered from the bundle's own features "
                   "instead: the store ran past serve.feature_timeout_s (timeout) or failed (error).", ["reason"])


FEATURE_FALLBACKS = _fallback_counter()


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
    bundle's table answers for properties the store does not know yet, and for the whole request when the store
    is slower than `timeout_s` (default serve.feature_timeout_s) or fails."""

    def __init__(self, store, fallback: LocalFeatures | None = None, timeout_s: float | None = None,
                 workers: int = 4):
        if timeout_s is None:
            from rentalml.config import get_settings

            timeout_s = get_settings().serve.feature_timeout_s
        if not timeout_s > 0:
            raise ValueError(f"serve.feature_timeout_s must be > 0, got {timeout_s!r}")
        self.store = store
        self.fallback = fallback
        self.timeout_s = float(timeout_s)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="feature-fetch")
        # a reload replaces the engine: its fetch threads end with it (no idle threads pile up across reloads)
        weakref.finalize(self, self._pool.shutdown, wait=False)
        self._free = threading.BoundedSemaphore(workers)  # fetch threads not stuck on the store
        self._last_warning = -float("inf")

    def _fetch(self, fn, *args):
        """fn(*args) on a fetch thread within the deadline; None (counted, logged) when it ran past it or failed."""
        if not self._free.acquire(blocking=False):  # every fetch thread still waits on the store
            return self._fell_back("timeout", "every fetch thread is still waiting on the online store")
        try:
            fut = self._pool.submit(fn, *args)
        except RuntimeError as exc:  # the pool is shut down (interpreter exit)
            self._free.release()
            return self._fell_back("error", str(exc))
        fut.add_done_callback(lambda _: self._free.release())
        try:
            return fut.result(timeout=self.timeout_s)
        except FutureTimeout:
            return self._fell_back("timeout", f"no answer within serve.feature_timeout_s={self.timeout_s}")
        except Exception as exc:  # noqa: BLE001 - any store failure: the bundle answers, the metric counts
            return self._fell_back("error", f"{type(exc).__name__}: {exc}")

    def _fell_back(self, reason: str, why: str) -> None:
        FEATURE_FALLBACKS.labels(reason).inc()
        now = time.monotonic()
        if now - self._last_warning >= 10.0:  # one line per 10 s: an outage must not flood the log
            self._last_warning = now
            log.warning("online features: %s; answering from the bundle's features (ml_feature_fallback_total"
                        "{reason=%s})", why, reason)
        return None

    def _local(self, ids: list[str]) -> pd.DataFrame:
        if self.fallback is None:
            return pd.DataFrame(index=pd.Index(ids, name="property_id"), columns=FILTER_COLUMNS)
        return self.fallback.properties(ids).reindex(columns=FILTER_COLUMNS)

    def _online_properties(self, ids: list[str]) -> pd.DataFrame:
        from rentalml.features.store import online_features

        return online_features(self.store, property_ids=ids, features=["property_attributes"]).set_index(
            "property_id")

    def properties(self, ids: list[str]) -> pd.DataFrame:
        df = self._fetch(self._online_properties, ids)
        if df is None:
            return self._local(ids)
        df = df.reindex(columns=FILTER_COLUMNS)
        if self.fallback is not None:
            missing = df.isna().all(axis=1).to_numpy()
            if missing.any():
                df.loc[missing] = self._local(list(df.index[missing])).to_numpy()
        return df

    def _online_user(self, user_id: str) -> dict:
        from rentalml.features.store import online_features

        return online_features(self.store, user_ids=[user_id]).iloc[0].to_dict()

    def user(self, user_id: str) -> dict:
        row = self._fetch(self._online_user, user_id)
        if row is None:
            return self.fallback.user(user_id) if self.fallback is not None else {}
        return {k: v for k, v in row.items() if v is not None and not (isinstance(v, float) and np.isnan(v))}
