"""Reference baselines measured by the same harness: EASE (Steck 2019), item-kNN, implicit ALS.

EASE keeps a dense item × item matrix: it is a baseline for benchmarks, not a servable default.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from rentalml.models.base import L2SelectedModel, Recommender, TrainData


class EASE(L2SelectedModel):
    name = "ease"

    # wide enough that the baseline's choice is not on an edge (Albany's was 1600, the old upper end)
    L2_GRID = (25.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1600.0, 3200.0, 6400.0)

    def __init__(self, l2: float = 200.0):
        self.l2 = l2

    def _solve(self, data: TrainData) -> EASE:
        x = data.binary()
        g = torch.from_numpy((x.T @ x).toarray().astype(np.float64))
        g.diagonal().add_(self.l2)
        p = torch.linalg.inv(g)
        b = p / (-p.diagonal())
        b.diagonal().zero_()
        self.B = b.to(torch.float32).numpy()
        return self

    def score(self, users, history, user_features=None):
        h = history.copy()
        h.data[:] = 1.0
        return np.asarray(h @ self.B, dtype=np.float32)


class ItemKNN(Recommender):
    """Cosine item-item with the top-`neighbours` kept per item (sparse)."""

    name = "itemknn"

    def __init__(self, neighbours: int = 100, shrink: float = 10.0):
        self.neighbours = neighbours
        self.shrink = shrink

    def fit(self, data: TrainData) -> ItemKNN:
        from rentalml.models.itemitem import cooccurrence_topk

        x = data.binary()
        norms = np.sqrt(np.asarray(x.sum(0)).ravel())
        idx, val = cooccurrence_topk(x, self.neighbours)
        denom = norms[:, None] * norms[np.maximum(idx, 0)] + self.shrink
        sim = np.where(idx >= 0, val / np.maximum(denom, 1e-9), 0.0)
        rows = np.repeat(np.arange(x.shape[1]), idx.shape[1])
        keep = idx.ravel() >= 0
        self.W = sp.csr_matrix((sim.ravel()[keep], (rows[keep], idx.ravel()[keep])),
                               shape=(x.shape[1], x.shape[1]), dtype=np.float32)
        return self

    def score(self, users, history, user_features=None):
        h = history.copy()
        h.data[:] = 1.0
        return np.asarray((h @ self.W).todense(), dtype=np.float32)


class ImplicitALS(Recommender):
    """implicit's ALS (a dev/benchmark dependency)."""

    name = "als"

    def __init__(self, factors: int = 64, iterations: int = 20, regularization: float = 0.01, seed: int = 42):
        self.kw = dict(factors=factors, iterations=iterations, regularization=regularization, random_state=seed)

    def fit(self, data: TrainData) -> ImplicitALS:
        from implicit.cpu.als import AlternatingLeastSquares

        self.model = AlternatingLeastSquares(**self.kw)
        self.model.fit(data.binary(), show_progress=False)
        return self

    def score(self, users, history, user_features=None):
        return np.asarray(self.model.user_factors[users] @ self.model.item_factors.T, dtype=np.float32)
