"""The one recommendation path: a pipeline of named steps over a loaded bundle.

    history     training history + streamed events (recent), never-seen properties by their content proxy
    retrieve    candidates from the stages (`Stages.retrieve`; exact stages fuse retrieve + rank in one call)
    rank        the candidates ordered by the full model (`Stages.rank`), then, for a bundle with a learned
                re-ranker (models.rerank), its first candidates re-ordered by it
    merge_live  never-seen properties (LiveCatalogue, content tower) merged in by score
    features    the candidates' attributes (`FeatureSource.properties`), or its unavailable set alone
    filter      business rules (Filters: available, budget band, city, bedrooms) and already-seen properties
    fill        cold users and lists the rules left short: the filtered popularity list of the user's city

Every caller goes through `Pipeline.run` (the demo, the benchmarks, the tests, `rentalml serve` through
`Engine`, the KServe transformer with `RemoteStages`), and gets one result type, `Recommendations`.

The filter step runs after rank: a rule keeps or drops one property at a time, so ranking and then filtering
gives the ranking of the filtered candidates; ranking first lets exact stages answer retrieve + rank with one
ONNX Runtime call (the serving hot path, docs/architecture.md) and lets the filter step see live properties
too. The steps share one `_Run` (the request's columns, as Merlin Systems' operators share a dataframe).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from rentalml.runtime.bundle import FALLBACK_PER_CITY as FALLBACK
from rentalml.runtime.bundle import Bundle
from rentalml.runtime.features import FILTER_COLUMNS, NO_RULES, FeastFeatures, Filters, LocalFeatures
from rentalml.runtime.history import merged_histories, pad_histories, user_features_of
from rentalml.runtime.interfaces import FeatureSource, Recommendations, Stages
from rentalml.runtime.live import LiveCatalogue
from rentalml.runtime.stages import LocalStages

__all__ = ["Engine", "FeastFeatures", "Filters", "LocalFeatures", "LocalStages", "Pipeline", "Recommendations"]


@dataclass
class _Run:
    """One call's state, passed from step to step. Candidate matrices hold the warm rows only."""

    user_ids: list[str]
    k: int
    filters: list[Filters]
    histories: list[np.ndarray] = field(default_factory=list)
    warm: list[int] = field(default_factory=list)  # rows with a history (model rows)
    hist: np.ndarray | None = None  # padded histories of the warm rows
    uf: np.ndarray | None = None  # user features of the warm rows
    gone: set[str] | None = None  # availability-only requests: the unavailable set (None: look features up)
    candidates: np.ndarray | None = None  # retrieve → rank (None when retrieve ranked already)
    keep: int = 0  # candidates the steps after rank need
    idx: np.ndarray | None = None  # ranked property indices
    ids: np.ndarray | None = None  # ranked property ids ("" = padding)
    scores: np.ndarray | None = None
    real: np.ndarray | None = None  # not padding
    feats: pd.DataFrame | None = None
    out_ids: np.ndarray | None = None
    out_sc: np.ndarray | None = None
    sources: list[str] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    filled: list[int] = field(default_factory=list)  # model items in each row


class Pipeline:
    """A bundle with its stages (in process or remote), feature source, fresh history (`recent`) and live
    catalogue. `run` is the only way the project produces recommendations."""

    STEPS = ("history", "retrieve", "rank", "merge_live", "features", "filter", "fill")

    def __init__(self, bundle: Bundle, *, stages: Stages | None = None, features: FeatureSource | None = None,
                 recent: Callable[[str], list[str]] | None = None, live: LiveCatalogue | None = None,
                 n_candidates: int = 200):
        self.bundle = bundle
        self.live = live
        self.stages = stages or LocalStages(bundle)
        self.features = features or LocalFeatures(bundle, live)
        self.recent = recent
        self.n_candidates = n_candidates

    def run(self, user_ids: list[str], k: int = 10,
            filters: list[Filters] | Filters | None = None) -> Recommendations:
        """Top-k per user (see the module docstring for the steps)."""
        n = len(user_ids)
        if filters is None or isinstance(filters, Filters):
            filters = [filters or NO_RULES] * n
        r = _Run(list(user_ids), max(1, int(k)), filters)
        self.history(r)
        if r.warm:
            self.retrieve(r)
            self.rank(r)
            self.merge_live(r)
            self.features_step(r)
            self.filter(r)
        self.fill(r)
        return Recommendations(r.out_ids, r.out_sc, r.sources, r.removed)

    # ---- steps -------------------------------------------------------------------------------------------
    def history(self, r: _Run) -> None:
        b, n, k = self.bundle, len(r.user_ids), r.k
        r.histories = merged_histories(b, r.user_ids, self.recent, self.live)
        r.warm = [i for i, h in enumerate(r.histories) if len(h)]
        r.out_ids = np.full((n, k), "", dtype=object)
        r.out_sc = np.full((n, k), -np.inf, dtype=np.float32)
        r.sources = ["model" if len(h) else "cold_start" for h in r.histories]
        r.removed = [0] * n
        r.filled = [0] * n
        if r.warm:
            # stages that take any history width (the exact in-process scorer: trim_padding) get the longest
            # history's width only; the others (two-stage, fold-in, a remote predictor) the bundle's full width
            width = max(len(r.histories[i]) for i in r.warm) if self.stages.any_history_width and \
                not self._live_now() else b.history_len
            r.hist = pad_histories([r.histories[i] for i in r.warm], b.n_items, width)
            r.uf = user_features_of(b, [r.user_ids[i] for i in r.warm])

    def retrieve(self, r: _Run) -> None:
        k, stages = r.k, self.stages
        if all(r.filters[i].trivial for i in r.warm):
            unavailable = self.features.unavailable()
            if unavailable is not None:
                r.gone = unavailable if r.filters[r.warm[0]].available_only else set()
        # availability only: no more candidates are needed than k plus what the rule can remove (only for
        # exact stages: a two-stage retrieval needs its full C for the ranker to choose from)
        c = min(max(self.n_candidates, k), k + len(r.gone)) if r.gone is not None and stages.exact else \
            max(self.n_candidates, k)
        r.keep = c  # what the steps after rank need (the re-ranked list is cut back to it)
        if self.bundle.reranker is not None:  # the re-ranker's candidates outside the history, whatever k is
            c = max(c, self.bundle.rerank_candidates + r.hist.shape[1])
        if stages.exact:
            r.idx, r.scores = stages.retrieve_rank(r.hist, c, r.uf)
        else:
            r.candidates = stages.retrieve(r.hist, c, r.uf)

    def rank(self, r: _Run) -> None:
        b = self.bundle
        if r.candidates is not None:
            r.idx, r.scores = self.stages.rank(r.hist, r.candidates, r.uf)
        if b.reranker is not None:
            self._rerank(r)
        idx = r.idx
        r.real = idx < b.n_items  # not padding (np.where/np.clip here cost ~50 µs a request)
        r.ids = b.property_ids[np.minimum(idx, b.n_items - 1)]
        if not r.real.all():
            r.ids[~r.real] = ""

    def _rerank(self, r: _Run) -> None:
        """The bundle's learned second stage (models.rerank): each warm row's first `rerank_candidates` real
        candidates outside its history, re-ordered by the ranker over its pair features, keeping the score values
        sorted (as Fitted.score_users does offline). Training-history pairs carry their time; streamed ones are
        taken as now."""
        from rentalml.models.rerank import YEAR_SECONDS

        b, n = self.bundle, self.bundle.rerank_candidates
        now = time.time() / YEAR_SECONDS  # years since the epoch, as models.rerank.years (pandas costs ~0.7 ms)
        idx, scores = r.idx.copy(), r.scores  # the scores keep their slots
        hists = [r.histories[i] for i in r.warm]
        slots = [np.flatnonzero((idx[row] < b.n_items) & np.isfinite(scores[row]) & ~np.isin(idx[row], h))[:n]
                 for row, h in enumerate(hists)]
        times = [b.history_times(r.user_ids[i], h, now) for i, h in zip(r.warm, hists, strict=True)]
        new = b.reranker.rerank_lists(b.pair_context, hists, times, [idx[row, sl] for row, sl in enumerate(slots)],
                                      [scores[row, sl] for row, sl in enumerate(slots)])
        for row, (sl, c) in enumerate(zip(slots, new, strict=True)):
            idx[row, sl] = c
        # the features and filter steps cost per candidate: they get as many as they would without the re-ranker
        # (exact stages: k + the unavailable ones with availability as the only rule)
        r.idx, r.scores = idx[:, : r.keep], scores[:, : r.keep]

    def merge_live(self, r: _Run) -> None:
        if not self._live_now():
            return
        live = self.live
        new_sc, _ = live.scores(r.hist, r.uf)
        ids = np.concatenate([r.ids.astype(object), np.tile(live.ids, (len(r.warm), 1))], axis=1)
        sc = np.concatenate([r.scores, new_sc], axis=1)
        real = np.concatenate([r.real, np.ones(new_sc.shape, bool)], axis=1)
        order = np.argsort(-sc, axis=1, kind="stable")
        r.ids, r.scores, r.real = (np.take_along_axis(a, order, 1) for a in (ids, sc, real))

    def features_step(self, r: _Run) -> None:
        """The `features` step (named apart from the `features` source attribute)."""
        if r.gone is not None:  # availability only: a set lookup, no feature fetch
            return
        uniq = sorted({p for p in r.ids.ravel() if p})
        r.feats = self.features.properties(uniq) if uniq else pd.DataFrame(columns=FILTER_COLUMNS)

    def filter(self, r: _Run) -> None:
        k, gone, recent = r.k, r.gone, self.recent
        usable = r.real & np.isfinite(r.scores)
        for row, i in enumerate(r.warm):
            seen = set(recent(r.user_ids[i]) or []) if recent else None
            row_ids, row_sc = r.ids[row], r.scores[row]
            valid = usable[row]
            if seen:
                valid = valid & np.fromiter((p not in seen for p in row_ids), bool, len(row_ids))
            if gone is not None and not gone:
                ok = valid
            else:
                ok = valid & (np.array([p not in gone for p in row_ids]) if gone is not None else
                              r.filters[i].mask(r.feats.reindex(row_ids)))
                r.removed[i] = int(valid.sum() - ok.sum())
            take = np.flatnonzero(ok)[:k]
            r.out_ids[i, : len(take)], r.out_sc[i, : len(take)] = row_ids[take], row_sc[take]
            r.filled[i] = len(take)

    def fill(self, r: _Run) -> None:
        """Cold users, and lists the filters left short: the (filtered) popularity fallback of the user's city;
        its scores sit below every model score of the list."""
        b, k = self.bundle, r.k
        for i in range(len(r.user_ids)):
            have = r.filled[i]
            if have >= k:
                continue
            f = r.filters[i]
            pos = b.user_positions([r.user_ids[i]])[0]
            city = f.city or (b.user_city[pos] if pos >= 0 else None)
            exclude = {p for p in r.out_ids[i] if p} | set(b.property_ids[r.histories[i]])
            fb_idx, fb_sc = b.cold_start(b.n_items, city)
            fb_ids = b.property_ids[fb_idx]
            keep = ~np.isin(fb_ids, list(exclude))
            fb_ids, fb_sc = fb_ids[keep], fb_sc[keep]
            unavailable = self.features.unavailable() if len(fb_ids) and f.trivial else None
            if not len(fb_ids):
                ok = np.zeros(0, bool)
            elif unavailable is not None:  # availability only: no feature fetch
                gone_i = unavailable if f.available_only else set()
                ok = np.array([p not in gone_i for p in fb_ids], dtype=bool)
            else:  # the city list and the global one at most (FALLBACK each)
                fb_ids, fb_sc = fb_ids[: max(4 * k, 2 * FALLBACK)], fb_sc[: max(4 * k, 2 * FALLBACK)]
                ok = f.mask(self.features.properties(list(fb_ids)))
            fb_ids, fb_sc = fb_ids[ok][: k - have], fb_sc[ok][: k - have]
            r.out_ids[i, have: have + len(fb_ids)] = fb_ids
            floor = r.out_sc[i, :have].min() if have else 0.0
            r.out_sc[i, have: have + len(fb_ids)] = floor - 1.0 - np.arange(len(fb_ids), dtype=np.float32)

    def _live_now(self) -> bool:
        return self.live is not None and len(self.live) > 0


class Engine(Pipeline):
    """What a server holds per loaded model version: the pipeline plus the fresh-state hooks the serving layer
    needs (`refresh` before each call, the cache `generation`). `recommend` and `explain` are all it calls."""

    def __init__(self, bundle: Bundle, *, stages: Stages | None = None, features: FeatureSource | None = None,
                 recent: Callable[[str], list[str]] | None = None, live: LiveCatalogue | None = None,
                 n_candidates: int = 200, refresh: Callable[[], object] | None = None,
                 generation: Callable[[], int] | None = None):
        super().__init__(bundle, stages=stages, features=features, recent=recent, live=live,
                         n_candidates=n_candidates)
        self._generation = generation  # changes when fresh state changed what this engine would answer
        self.refresh = refresh  # called before each recommendation (e.g. pull new listings, rate-limited)

    @property
    def in_process(self) -> bool:
        """Everything a recommendation needs is in this process's memory (no feature store, stream state or
        remote predictor to call): the serving layer may run it on its event loop."""
        return self.stages.in_process and self.features.in_process and self.recent is None and self.live is None

    @property
    def cache_version(self) -> str:
        """The model version, plus the fresh-state generation when there is one: the key cached lists live under."""
        v = str(self.bundle.model_version)
        return v if self._generation is None else f"{v}+{self._generation()}"

    def recommend(self, user_ids: list[str], k: int = 10,
                  filters: list[Filters] | Filters | None = None) -> Recommendations:
        if self.refresh is not None:
            self.refresh()
        return self.run(user_ids, k, filters)

    def explain(self, user_id: str, property_id: str) -> str:
        """The bundle's explanation, with the property's current attributes (price changes, new listings)."""
        try:
            row = self.features.properties([property_id]).iloc[0].to_dict()
        except Exception:  # the feature source is down: the explanation falls back to the bundle's table
            row = {}
        attrs = {k: v for k, v in row.items() if v is not None and not (isinstance(v, float) and np.isnan(v))}
        history = None if self.recent is None else merged_histories(self.bundle, [user_id], self.recent,
                                                                    self.live)[0]
        return self.bundle.explain(user_id, property_id, attributes=attrs, history=history)
