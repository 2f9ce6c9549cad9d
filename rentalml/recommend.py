"""Two-stage recommendation with business rules: the logic behind the serving transformer.

    user → history (training + streamed, rentalml.export.foldin) → retrieval: top-C candidates
         → candidate features (Feast online store when configured, else the bundle's property table)
         → business filters (available, within the budget band, city, bedrooms)
         → ranking of the surviving candidates (+ never-seen properties placed by the content tower)
         → top-k, filled from the filtered city fallback when the filters leave fewer than k

The numeric stages run through a `Stages` object: `LocalStages` runs the bundle's retrieval.onnx/ranker.onnx
(or scorer.onnx for models without a two-tower part) with ONNX Runtime in process; the KServe transformer
(rentalml.inference.transformer) supplies one that calls a Triton predictor over the v2 protocol. Everything
else — history, features, filters, fill — is here, once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd

from rentalml.export.bundle import FALLBACK_PER_CITY as FALLBACK
from rentalml.export.onnx_export import pad_histories, trim_padding

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


_NO_RULES = Filters()  # the default rules (availability only); never mutated


class FeatureSource(Protocol):
    def properties(self, ids: list[str]) -> pd.DataFrame: ...  # index property_id, FILTER_COLUMNS

    def user(self, user_id: str) -> dict: ...  # budget / median_price, top_city, ...


class LocalFeatures:
    """The bundle's property table, with live overrides (price changes, delistings) applied on top."""

    def __init__(self, bundle, live=None):
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

    def unavailable(self) -> set[str]:
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


class FeastFeatures:
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


class Stages(Protocol):
    n_items: int

    def retrieve(self, history: np.ndarray, n: int, user_features: np.ndarray | None) -> np.ndarray:
        ...  # [N, n] candidate indices (n_items = padding)

    def rank(self, history: np.ndarray, candidates: np.ndarray,
             user_features: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]: ...


class LocalStages:
    """The bundle's graphs in process: retrieval.onnx + ranker.onnx, or scorer.onnx when there are none."""

    def __init__(self, bundle):
        self.bundle = bundle
        self.n_items = bundle.n_items
        self.two_stage = None
        if bundle.meta.get("two_stage"):
            from rentalml.export.two_stage import TwoStage

            self.two_stage = TwoStage(bundle.path, threads=getattr(bundle, "threads", 1))

    @property
    def max_candidates(self) -> int:
        return self.two_stage.n_candidates if self.two_stage is not None else self.n_items

    @property
    def exact(self) -> bool:
        """retrieve_rank scores the whole catalogue with the full model (no ANN index)."""
        return self.two_stage is None or not self.two_stage.ann

    def retrieve_rank(self, history: np.ndarray, n: int,
                      user_features: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Both stages in one call where the catalogue allows: below the ANN size the one-graph scorer ranks the
        whole catalogue by the full model (exact, and one ONNX Runtime call instead of two); ANN bundles run
        retrieval → IVF search → ranker."""
        if self.two_stage is not None and self.two_stage.ann:
            cand = self.retrieve(history, n, user_features)
            return self.rank(history, cand, user_features)
        feed = self._feed({"history": trim_padding(history, self.n_items),
                           "k": np.array([min(n, self.n_items)], np.int64)}, user_features, len(history))
        idx, sc = self.bundle.session.run(None, feed)
        return idx, sc

    def _feed(self, feed: dict, user_features: np.ndarray | None, n: int) -> dict:
        d = self.bundle.user_feature_dim
        if d:
            feed["user_features"] = user_features if user_features is not None else np.zeros((n, d), np.float32)
        return feed

    def retrieve(self, history: np.ndarray, n: int, user_features: np.ndarray | None = None) -> np.ndarray:
        n = min(n, self.max_candidates)
        if self.two_stage is not None:
            return self.two_stage.candidates(history, self._feed({}, user_features, len(history)).get(
                "user_features"), n)
        feed = self._feed({"history": history, "k": np.array([min(n, self.n_items)], np.int64)}, user_features,
                          len(history))
        idx, _ = self.bundle.session.run(None, feed)
        return idx

    def rank(self, history: np.ndarray, candidates: np.ndarray,
             user_features: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        if self.two_stage is not None:
            feed = self._feed({"history": history, "candidates": candidates}, user_features, len(history))
            return self.two_stage.rank(history, candidates, feed.get("user_features"))
        # one-graph models: the scorer's order over the whole catalogue, restricted to the candidates
        feed = self._feed({"history": trim_padding(history, self.n_items), "k": np.array([self.n_items], np.int64)},
                          user_features, len(history))
        idx, sc = self.bundle.session.run(None, feed)
        out_i = np.full(candidates.shape, self.n_items, np.int64)
        out_s = np.full(candidates.shape, -np.inf, np.float32)
        for r in range(len(candidates)):
            keep = np.isin(idx[r], candidates[r])
            row_i, row_s = idx[r][keep][: candidates.shape[1]], sc[r][keep][: candidates.shape[1]]
            out_i[r, : len(row_i)], out_s[r, : len(row_s)] = row_i, row_s
        return out_i, out_s


@dataclass
class Ranked:
    property_ids: np.ndarray  # object [N, k] ("" where nothing qualifies)
    scores: np.ndarray  # float32 [N, k]
    sources: list[str]  # "model" | "cold_start"
    filtered_out: list[int] = field(default_factory=list)  # candidates removed by the business rules, per user


def recommend(bundle, user_ids: list[str], k: int = 10, *, filters: list[Filters] | Filters | None = None,
              features: FeatureSource | None = None, stages: Stages | None = None,
              recent: Callable[[str], list[str]] | None = None, live=None, n_candidates: int = 200) -> Ranked:
    """Top-k per user after retrieval, business filters and ranking (see the module docstring)."""
    from rentalml.export.foldin import merged_histories, user_features_of

    n = len(user_ids)
    k = max(1, int(k))
    stages = stages or LocalStages(bundle)
    features = features or LocalFeatures(bundle, live)
    if filters is None or isinstance(filters, Filters):
        filters = [filters or _NO_RULES] * n
    hist_list = merged_histories(bundle, user_ids, recent, live)
    warm = [i for i, h in enumerate(hist_list) if len(h)]
    out_ids = np.full((n, k), "", dtype=object)
    out_sc = np.full((n, k), -np.inf, dtype=np.float32)
    sources = ["model" if len(h) else "cold_start" for h in hist_list]
    removed = [0] * n
    filled = [0] * n  # model items in each row
    if warm:
        # the exact in-process scorer takes any history width (trim_padding): pad to the longest history only;
        # the other graphs (two-stage, fold-in, a remote predictor) take the bundle's full width
        width = max(len(hist_list[i]) for i in warm) if type(stages) is LocalStages and stages.exact and \
            not (live is not None and len(live)) else bundle.history_len
        hist = pad_histories([hist_list[i] for i in warm], bundle.n_items, width)
        uf = user_features_of(bundle, [user_ids[i] for i in warm])
        fast = all(filters[i].trivial for i in warm) and hasattr(features, "unavailable")
        gone = features.unavailable() if fast and filters[warm[0]].available_only else set()
        # availability only: no more candidates are needed than k plus what the rule can remove
        # (only for exact stages: a two-stage retrieval needs its full C for the ranker to choose from)
        c = min(max(n_candidates, k), k + len(gone)) if fast and getattr(stages, "exact", False) else \
            max(n_candidates, k)
        if hasattr(stages, "retrieve_rank"):
            idx, sc = stages.retrieve_rank(hist, c, uf)
        else:
            idx, sc = stages.rank(hist, stages.retrieve(hist, c, uf), uf)
        real = idx < bundle.n_items  # not padding (np.where/np.clip here cost ~50 µs a request)
        ids = bundle.property_ids[np.minimum(idx, bundle.n_items - 1)]
        if not real.all():
            ids[~real] = ""
        if live is not None and len(live):
            new_sc, _ = live.scores(hist, uf)
            ids = np.concatenate([ids.astype(object), np.tile(live.ids, (len(warm), 1))], axis=1)
            sc = np.concatenate([sc, new_sc], axis=1)
            real = np.concatenate([real, np.ones(new_sc.shape, bool)], axis=1)
            order = np.argsort(-sc, axis=1, kind="stable")
            ids, sc, real = (np.take_along_axis(a, order, 1) for a in (ids, sc, real))
        if not fast:  # (availability only: a set lookup, no feature fetch)
            uniq = sorted({p for p in ids.ravel() if p})
            feats = features.properties(uniq) if uniq else pd.DataFrame(columns=FILTER_COLUMNS)
        usable = real & np.isfinite(sc)
        for r, i in enumerate(warm):
            seen = set(recent(user_ids[i]) or []) if recent else None
            row_ids, row_sc = ids[r], sc[r]
            valid = usable[r]
            if seen:
                valid = valid & np.fromiter((p not in seen for p in row_ids), bool, len(row_ids))
            if fast and not gone:
                ok = valid
            else:
                ok = valid & (np.array([p not in gone for p in row_ids]) if fast else
                              filters[i].mask(feats.reindex(row_ids)))
                removed[i] = int(valid.sum() - ok.sum())
            take = np.flatnonzero(ok)[:k]
            out_ids[i, : len(take)], out_sc[i, : len(take)] = row_ids[take], row_sc[take]
            filled[i] = len(take)
    # cold users, and lists the filters left short: the (filtered) popularity fallback of the user's city
    for i in range(n):
        have = filled[i]
        if have >= k:
            continue
        pos = bundle.user_positions([user_ids[i]])[0]
        city = filters[i].city or (bundle.user_city[pos] if pos >= 0 else None)
        exclude = {p for p in out_ids[i] if p} | set(bundle.property_ids[hist_list[i]])
        fb_idx, fb_sc = bundle.cold_start(bundle.n_items, city)
        fb_ids = bundle.property_ids[fb_idx]
        keep = ~np.isin(fb_ids, list(exclude))
        fb_ids, fb_sc = fb_ids[keep], fb_sc[keep]
        if not len(fb_ids):
            ok = np.zeros(0, bool)
        elif filters[i].trivial and hasattr(features, "unavailable"):  # availability only: no feature fetch
            gone_i = features.unavailable() if filters[i].available_only else set()
            ok = np.array([p not in gone_i for p in fb_ids], dtype=bool)
        else:  # the city list and the global one at most (FALLBACK each)
            fb_ids, fb_sc = fb_ids[: max(4 * k, 2 * FALLBACK)], fb_sc[: max(4 * k, 2 * FALLBACK)]
            ok = filters[i].mask(features.properties(list(fb_ids)))
        fb_ids, fb_sc = fb_ids[ok][: k - have], fb_sc[ok][: k - have]
        out_ids[i, have: have + len(fb_ids)] = fb_ids
        # fallback scores sit below every model score of the list
        floor = out_sc[i, :have].min() if have else 0.0
        out_sc[i, have: have + len(fb_ids)] = floor - 1.0 - np.arange(len(fb_ids), dtype=np.float32)
    return Ranked(out_ids, out_sc, sources, removed)


class Engine:
    """What a server holds per loaded model version: the bundle plus where features, fresh history and
    never-seen properties come from, and which stages run the graphs. `recommend` and `explain` are all the
    serving layer calls."""

    def __init__(self, bundle, *, stages: Stages | None = None, features: FeatureSource | None = None,
                 recent: Callable[[str], list[str]] | None = None, live=None, n_candidates: int = 200,
                 refresh: Callable[[], object] | None = None, generation: Callable[[], int] | None = None):
        self.bundle = bundle
        self._generation = generation  # changes when fresh state changed what this engine would answer
        self.refresh = refresh  # called before each recommendation (e.g. pull new listings, rate-limited)
        self.live = live
        self.stages = stages or LocalStages(bundle)
        self.features = features or LocalFeatures(bundle, live)
        self.recent = recent
        self.n_candidates = n_candidates

    @property
    def in_process(self) -> bool:
        """Everything a recommendation needs is in this process's memory (no feature store, stream state or
        remote predictor to call): the serving layer may run it on its event loop."""
        return (type(self.stages) is LocalStages and type(self.features) is LocalFeatures and self.recent is None
                and self.live is None)

    @property
    def cache_version(self) -> str:
        """The model version, plus the fresh-state generation when there is one: the key cached lists live under."""
        v = str(self.bundle.model_version)
        return v if self._generation is None else f"{v}+{self._generation()}"

    def recommend(self, user_ids: list[str], k: int, filters: list[Filters] | Filters | None = None) -> Ranked:
        if self.refresh is not None:
            self.refresh()
        return recommend(self.bundle, user_ids, k, filters=filters, features=self.features, stages=self.stages,
                         recent=self.recent, live=self.live, n_candidates=self.n_candidates)

    def explain(self, user_id: str, property_id: str) -> str:
        """The bundle's explanation, with the property's current attributes (price changes, new listings)."""
        try:
            row = self.features.properties([property_id]).iloc[0].to_dict()
        except Exception:  # the feature source is down: the explanation falls back to the bundle's table
            row = {}
        attrs = {k: v for k, v in row.items() if v is not None and not (isinstance(v, float) and np.isnan(v))}
        return self.bundle.explain(user_id, property_id, attributes=attrs,
                                   history=self._history(user_id))

    def _history(self, user_id: str) -> np.ndarray | None:
        if self.recent is None:
            return None
        from rentalml.export.foldin import merged_histories

        return merged_histories(self.bundle, [user_id], self.recent, self.live)[0]
