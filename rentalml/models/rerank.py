"""A learned second stage: a pair ranker over a first stage's candidates (Merlin Systems' rank op after
retrieve). The hybrid learns one on its validation holdout (models/hybrid.py); serving applies it in the runtime's
rank step. Figures: docs/benchmarks.md "A learned re-ranker" (Albany nDCG@10 0.2432 → 0.2641 over seeds 1–5).

A first stage (the hybrid, the item-item model) scores what co-occurs; on a rental marketplace a user's next
property also depends on how it stands to the ones they already had: the same landlord, the same neighbourhood,
a few kilometres away, a similar price and size, and let at the time they were looking. `pair_features` turns
(history, candidates, first-stage scores) into those numbers, one definition for learning and for re-ranking;
`PairRanker` is an L2 logistic regression on them, learned on a holdout the first stage did not see.

    ctx = PairContext.build(items, item_ids, train_binary, train_times)   # what the features read about items
    x = pair_features(ctx, history, times, candidates, scores)            # [n_candidates, len(FEATURES)]
    ranker = PairRanker.fit(x_learn, labels)                               # learned on held-out pairs
    candidates, scores = ranker.rerank(ctx, history, times, candidates, scores)  # warm candidates re-ordered

Times are years since the Unix epoch (`years`). Item attributes that a catalogue lacks (MovieLens has no
landlord or location) give features that are constant 0, which the standardisation leaves at weight 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property

import numpy as np
import pandas as pd
import scipy.sparse as sp

from rentalml.data.dataset import pair_indices

FEATURES = (
    "rank", "score_rel", "score_gap",  # the first stage: position, score / top score, (top - score) / top
    "pop", "hist",  # the item's training count, the user's history length
    "same_host", "same_nb", "same_rt",  # shared landlord / neighbourhood (counts), room-type match (share)
    "dmin", "dmean", "dprice", "dacc",  # km to the history (min, mean); |Δ log price|, |Δ accommodates| to its mean
    "dt_mean", "dt_last", "dt_first", "u_t",  # the user's mean time against the item's mean/last/first review; it
    "tdens",  # the item's training reviews near the user's times: Σ exp(-|Δt| / TAU_YEARS), over its count
)
#: features passed through log1p before standardising (counts and distances with long tails)
LOGGED = frozenset({"rank", "pop", "hist", "same_host", "same_nb", "dmin", "dmean", "tdens"})
TAU_YEARS = 0.5
BIN_YEARS = 1 / 12  # the item review-time histogram's bin: a month
YEAR_SECONDS = 365.25 * 86400
EARTH_KM = 6371.0


def years(ts) -> np.ndarray:
    """Timestamps (datetime64, pandas datetimes with or without a zone) → years since the Unix epoch."""
    s = pd.to_datetime(pd.Series(ts).reset_index(drop=True), utc=True)
    # a Timedelta division, not astype(int64): the stored unit may be ns, us or s
    return ((s - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(days=365.25)).to_numpy(np.float64)


def pair_times(pairs: pd.DataFrame, item_ids: np.ndarray, user_ids: np.ndarray) -> sp.csr_matrix:
    """Users × items (float64 CSR): each (user_id, property_id) pair's latest `timestamp` in `years`. Pairs
    outside the id maps are dropped."""
    rows, cols = pair_indices(pairs, item_ids, user_ids)
    keep = (rows >= 0) & (cols >= 0)
    t = pd.Series(years(pairs["timestamp"])[keep]).groupby([rows[keep], cols[keep]]).max()  # repeated events
    return sp.csr_matrix((t.to_numpy(np.float64), (t.index.get_level_values(0), t.index.get_level_values(1))),
                         shape=(len(user_ids), len(item_ids)))


def _codes(items: pd.DataFrame | None, column: str, n: int) -> np.ndarray:
    if items is None or column not in items.columns:
        return np.full(n, -1, np.int64)
    col = items[column].astype("object")
    codes = pd.factorize(col.where(col.notna() & (col.astype(str) != "") & (col.astype(str) != "unknown")))[0]
    return codes.astype(np.int64)  # -1 = unknown: never a match


def _floats(items: pd.DataFrame | None, column: str, n: int) -> np.ndarray:
    if items is None or column not in items.columns:
        return np.full(n, np.nan)
    return pd.to_numeric(items[column], errors="coerce").to_numpy(np.float64)


@dataclass
class PairContext:
    """Per item (the model's index order): attributes and statistics of its training interactions."""

    lat: np.ndarray  # radians, NaN unknown
    lon: np.ndarray
    log_price: np.ndarray  # NaN unknown
    accommodates: np.ndarray
    landlord: np.ndarray  # int codes, -1 unknown
    neighbourhood: np.ndarray
    room_type: np.ndarray
    pop: np.ndarray  # training interactions
    t_mean: np.ndarray  # years; 0 for items with no training interaction
    t_first: np.ndarray
    t_last: np.ndarray
    t0: float  # the first histogram bin's start (years)
    item_hist: sp.csr_matrix  # [n_items, n_bins] training interactions per BIN_YEARS bin

    @classmethod
    def build(cls, items: pd.DataFrame | None, item_ids: np.ndarray, train: sp.csr_matrix,
              times: sp.csr_matrix) -> PairContext:
        """`items`: the property table indexed by property_id (None: no attributes); `train` users × items
        (its pattern: the training pairs); `times` the same pattern with each pair's time in years."""
        n = len(item_ids)
        it = items.reindex(item_ids) if items is not None else None
        t = times.tocoo()
        cols, when = t.col, t.data.astype(np.float64)
        pop = np.bincount(cols, minlength=n).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            t_mean = np.where(pop > 0, np.bincount(cols, weights=when, minlength=n) / np.maximum(pop, 1), 0.0)
        t_first, t_last = np.full(n, np.inf), np.full(n, -np.inf)
        np.minimum.at(t_first, cols, when)
        np.maximum.at(t_last, cols, when)
        t_first[pop == 0] = 0.0
        t_last[pop == 0] = 0.0
        t0 = float(when.min()) if len(when) else 0.0
        b = np.floor((when - t0) / BIN_YEARS).astype(np.int64) if len(when) else np.zeros(0, np.int64)
        n_bins = int(b.max()) + 1 if len(b) else 1
        item_hist = sp.csr_matrix((np.ones(len(b)), (cols, b)), shape=(n, n_bins))
        item_hist.sum_duplicates()
        price = _floats(it, "price", n)
        with np.errstate(invalid="ignore", divide="ignore"):
            log_price = np.log(np.clip(price, 10.0, None))
        return cls(np.radians(_floats(it, "lat", n)), np.radians(_floats(it, "lon", n)), log_price,
                   _floats(it, "accommodates", n), _codes(it, "landlord_id", n), _codes(it, "neighbourhood", n),
                   _codes(it, "room_type", n), pop, t_mean, t_first, t_last, t0, item_hist)

    # derived arrays the request path reads (computed once per context, never stored)
    @cached_property
    def codes(self) -> np.ndarray:
        return np.column_stack([self.landlord, self.neighbourhood, self.room_type])

    @cached_property
    def cos_lat(self) -> np.ndarray:
        return np.cos(self.lat)

    @cached_property
    def numeric(self) -> np.ndarray:
        return np.column_stack([self.log_price, self.accommodates])

    @cached_property
    def time_stats(self) -> np.ndarray:
        return np.column_stack([self.t_mean, self.t_last, self.t_first])

    @cached_property
    def bin_centres(self) -> np.ndarray:
        return self.t0 + (np.arange(self.item_hist.shape[1]) + 0.5) * BIN_YEARS

    def to_npz(self, path) -> None:
        arrays = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("item_hist", "t0")}
        h = self.item_hist
        np.savez(path, **arrays, t0=np.float64(self.t0), hist_data=h.data, hist_indices=h.indices,
                 hist_indptr=h.indptr, hist_shape=np.asarray(h.shape))

    @classmethod
    def from_npz(cls, path) -> PairContext:
        z = np.load(path)
        h = sp.csr_matrix((z["hist_data"], z["hist_indices"], z["hist_indptr"]), shape=tuple(z["hist_shape"]))
        kw = {f.name: z[f.name] for f in fields(cls) if f.name not in ("item_hist", "t0")}
        return cls(**kw, t0=float(z["t0"]), item_hist=h)


_COL = {f: i for i, f in enumerate(FEATURES)}
_SAME = [_COL["same_host"], _COL["same_nb"], _COL["same_rt"]]
_DIST = [_COL["dmin"], _COL["dmean"]]
_DIFF = [_COL["dprice"], _COL["dacc"]]
_TIME = [_COL["dt_mean"], _COL["dt_last"], _COL["dt_first"]]
_LOGGED = np.array([f in LOGGED for f in FEATURES])


def pair_features(ctx: PairContext, history: np.ndarray, times: np.ndarray, candidates: np.ndarray,
                  scores: np.ndarray) -> np.ndarray:
    """[len(candidates), len(FEATURES)] for one user: `history` item indices with their `times` (years),
    `candidates` in the first stage's order with its `scores` (descending). `pair_features_batch` of one row."""
    return pair_features_batch(ctx, [history], [times], np.asarray(candidates)[None, :],
                               np.asarray(scores)[None, :])[0]


def pair_features_batch(ctx: PairContext, histories: list[np.ndarray], times: list[np.ndarray],
                        candidates: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """[users, C, len(FEATURES)]: `pair_features` for a batch of users with C candidates each (`candidates`,
    `scores`: [users, C], each row best first), histories of any lengths. On the request path (the runtime's rank
    step), so written as whole-array operations over the batch: the per-user cost is a few numpy calls shared by
    every user of a request batch."""
    c = np.asarray(candidates, np.int64)
    s = np.asarray(scores, np.float64)
    n_users, n = c.shape
    out = np.zeros((n_users, n, len(FEATURES)))
    if not n or not n_users:
        return out
    lengths = np.array([len(h) for h in histories])
    width = max(int(lengths.max()), 1)
    mask = np.arange(width)[None, :] < lengths[:, None]  # [U, L] real history entries
    h = np.zeros((n_users, width), np.int64)
    t = np.zeros((n_users, width))
    h[mask] = np.concatenate([np.asarray(x, np.int64) for x in histories]) if lengths.sum() else []
    t[mask] = np.concatenate([np.asarray(x, np.float64) for x in times]) if lengths.sum() else []
    top = np.maximum(s[:, :1], 1e-9)
    pop = ctx.pop[c]
    out[:, :, 0] = np.arange(n)  # rank, score_rel, score_gap, pop, hist: FEATURES' first five
    out[:, :, 1] = s / top
    out[:, :, 2] = (s[:, :1] - s) / top
    out[:, :, 3] = pop
    out[:, :, 4] = lengths[:, None]
    warm_users = lengths > 0
    if not warm_users.any():
        return out
    m3 = mask[:, None, :]  # [U, 1, L]
    n_hist = np.maximum(lengths, 1)[:, None]
    codes = ctx.codes  # [items, 3]: landlord, neighbourhood, room type; -1 unknown
    cc = codes[c][:, :, None, :]  # [U, C, 1, 3]
    same = ((cc == codes[h][:, None, :, :]) & (cc >= 0) & m3[..., None]).sum(2)  # [U, C, 3]
    out[:, :, _SAME] = same
    out[:, :, _SAME[2]] /= n_hist
    la, lb = ctx.lat[c][:, :, None], ctx.lat[h][:, None, :]
    hav = np.sin((la - lb) / 2) ** 2 + ctx.cos_lat[c][:, :, None] * ctx.cos_lat[h][:, None, :] \
        * np.sin((ctx.lon[c][:, :, None] - ctx.lon[h][:, None, :]) / 2) ** 2
    dist = 2 * EARTH_KM * np.arcsin(np.sqrt(np.clip(hav, 0.0, 1.0)))
    known = np.isfinite(dist) & m3  # pairs where either side has no location are left out; none known: 0
    n_known = known.sum(2)
    out[:, :, _DIST[0]] = np.where(n_known > 0, np.where(known, dist, np.inf).min(2), 0.0)
    out[:, :, _DIST[1]] = np.where(known, dist, 0.0).sum(2) / np.maximum(n_known, 1)
    num = ctx.numeric  # [items, 2]: log price, accommodates; NaN unknown
    hv = num[h]  # [U, L, 2]
    seen = np.isfinite(hv) & mask[:, :, None]
    mean = np.where(seen, hv, 0.0).sum(1) / np.maximum(seen.sum(1), 1)  # [U, 2]: nanmean over the history
    d = np.abs(num[c] - mean[:, None, :]) * seen.any(1)[:, None, :]
    out[:, :, _DIFF] = d if np.isfinite(d).all() else np.nan_to_num(d)
    um = (t * mask).sum(1) / n_hist[:, 0]  # [U]
    warm = (pop > 0) & warm_users[:, None]
    tc = ctx.time_stats[c]  # [U, C, 3]: mean, last, first
    u = um[:, None]
    gaps = np.stack([np.abs(tc[:, :, 0] - u), u - tc[:, :, 1], u - tc[:, :, 2]], axis=2)
    out[:, :, _TIME] = np.where(warm[:, :, None], gaps, 0.0)
    out[:, :, _COL["u_t"]] = np.where(warm_users, um, 0.0)[:, None]
    kernel = (np.exp(-np.abs(ctx.bin_centres[None, :, None] - t[:, None, :]) / TAU_YEARS)
              * mask[:, None, :]).sum(2)  # [U, n_bins]
    dens = _rows_dot(ctx.item_hist, c.ravel(), kernel, np.repeat(np.arange(n_users), n)).reshape(n_users, n)
    out[:, :, _COL["tdens"]] = np.where(warm_users[:, None], dens / np.maximum(pop, 1.0), 0.0)
    return out


def _rows_dot(m: sp.csr_matrix, rows: np.ndarray, v: np.ndarray, v_row: np.ndarray) -> np.ndarray:
    """m[rows[i]] @ v[v_row[i]] for every i, without building the row slice (scipy's fancy indexing costs ~60 µs
    on the request path)."""
    start = m.indptr[rows]
    lengths = m.indptr[rows + 1] - start
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    if not total:
        return np.zeros(len(rows))
    offsets = ends - lengths
    flat = np.repeat(start - offsets, lengths) + np.arange(total)
    csum = np.concatenate(([0.0], np.cumsum(m.data[flat] * v[np.repeat(v_row, lengths), m.indices[flat]])))
    return csum[ends] - csum[offsets]


def _design(x: np.ndarray) -> np.ndarray:
    x = np.array(x, dtype=np.float64)
    x[:, _LOGGED] = np.log1p(np.clip(x[:, _LOGGED], 0.0, None))
    return x


@dataclass
class PairRanker:
    """Logistic regression on standardised `pair_features` (log1p first where LOGGED)."""

    weights: np.ndarray
    bias: float
    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, labels: np.ndarray, c: float = 1.0) -> PairRanker:
        """Minimise Σ log-loss + ||w||² / (2c) (scikit-learn's L2 objective) with L-BFGS in float64: the same
        data gives the same weights."""
        import torch

        z = _design(x)
        mean, scale = z.mean(0), z.std(0)
        scale = np.where(scale > 1e-12, scale, 1.0)  # a constant feature stays at 0 and its weight at 0
        xt = torch.from_numpy((z - mean) / scale)
        yt = torch.from_numpy(np.asarray(labels, np.float64))
        w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt, reduction="sum")
            loss = loss + (w @ w) / (2 * c)
            loss.backward()
            return loss

        opt.step(closure)
        return cls(w.detach().numpy().copy(), float(b.detach()), mean, scale)

    def decision(self, x: np.ndarray) -> np.ndarray:
        return ((_design(x) - self.mean) / self.scale) @ self.weights + self.bias

    def order(self, ctx: PairContext, candidates: np.ndarray, decision: np.ndarray) -> np.ndarray:
        """Positions of `candidates` in the re-ranked list: the warm ones (with training interactions) sorted by
        the ranker's decision among the warm slots; a cold one (a property nobody has interacted with yet)
        keeps the first stage's slot. The ranker never learned on cold properties (their count and review
        times are empty), and on Albany's cold-start split letting it place them took the hybrid's nDCG@10 from
        0.0531 to 0.0 (docs/benchmarks.md)."""
        pos = np.arange(len(candidates))
        warm = np.flatnonzero(ctx.pop[np.asarray(candidates, np.int64)] > 0)
        pos[warm] = warm[np.argsort(-decision[warm], kind="stable")]
        return pos

    def rerank(self, ctx: PairContext, history: np.ndarray, times: np.ndarray, candidates: np.ndarray,
               scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The candidates in the ranker's order (`order`). The slots keep the first stage's score values (sorted,
        as given), so a list merged by score with other sources (live properties) compares as before."""
        candidates, scores = np.asarray(candidates), np.asarray(scores)
        if len(candidates) < 2:
            return candidates, scores
        return self.rerank_batch(ctx, [history], [times], candidates[None, :], scores[None, :])[0], scores.copy()

    def rerank_lists(self, ctx: PairContext, histories: list[np.ndarray], times: list[np.ndarray],
                     candidates: list[np.ndarray], scores: list[np.ndarray], batch: int = 64) -> list[np.ndarray]:
        """`rerank` for many users whose candidate lists may differ in length (the scores keep their slots):
        lists of one length go through `rerank_batch` together, at most `batch` users a pass (bounded memory);
        a list shorter than two is returned as it is. The runtime's rank step and Hybrid.rerank_rows both call
        this."""
        out = [np.asarray(c) for c in candidates]
        groups: dict[int, list[int]] = {}
        for j, c in enumerate(out):
            if len(c) >= 2:
                groups.setdefault(len(c), []).append(j)
        for members in groups.values():
            for s in range(0, len(members), batch):
                js = members[s:s + batch]
                new = self.rerank_batch(ctx, [histories[j] for j in js], [times[j] for j in js],
                                        np.stack([out[j] for j in js]), np.stack([scores[j] for j in js]))
                for j, row in zip(js, new, strict=True):
                    out[j] = row
        return out

    def rerank_batch(self, ctx: PairContext, histories: list[np.ndarray], times: list[np.ndarray],
                     candidates: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """`rerank` for a batch of users with C candidates each ([users, C]; their scores keep their slots):
        the re-ordered candidates. One feature pass and one dot product for the whole batch."""
        x = pair_features_batch(ctx, histories, times, candidates, scores)
        d = self.decision(x.reshape(-1, x.shape[2])).reshape(candidates.shape)
        return np.stack([row[self.order(ctx, row, dr)] for row, dr in zip(candidates, d, strict=True)])

    def to_dict(self) -> dict:
        return {"features": list(FEATURES), "weights": self.weights.tolist(), "bias": self.bias,
                "mean": self.mean.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> PairRanker:
        if list(d["features"]) != list(FEATURES):
            raise ValueError(f"the ranker was learned on features {d['features']}, this code computes {FEATURES}")
        return cls(np.asarray(d["weights"]), float(d["bias"]), np.asarray(d["mean"]), np.asarray(d["scale"]))
