"""The index-space model interface shared by every recommender and by the evaluation harness."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp


@dataclass
class TrainData:
    """Training input in dense index space.

    `matrix` is users × catalogue (items with no training interactions — cold items — are zero columns);
    `item_features` [n_items, F] and `user_features` [n_users, Fu] are aligned with it when present.
    `valid` (same shape as matrix) holds a per-user validation holdout used for early stopping and
    model selection; it is never part of `matrix`. `item_side` [n_items, V] (0/1, sparse) marks which attribute
    values (landlord, neighbourhood, geo cell: data.features.side_information) each item has, for the item-item
    model's side information; None when the catalogue has none. `times` (the pattern of `matrix`, each pair's time
    in years since the epoch: models.rerank.years) and `item_table` (the property attributes, rows aligned with
    the columns) feed the hybrid's learned re-ranker (models.rerank); None where it is not considered. `sessions`
    [n_sessions, n_items] (0/1, sparse: data.dataset.session_matrix) are the runs of each user's time-ordered
    training pairs, for the item-item model's session weight; None where no history is longer than one run.
    """

    matrix: sp.csr_matrix
    item_features: np.ndarray | None = None
    user_features: np.ndarray | None = None
    valid: sp.csr_matrix | None = None
    seed: int = 42
    item_side: sp.csr_matrix | None = None
    times: sp.csr_matrix | None = None
    item_table: pd.DataFrame | None = None
    sessions: sp.csr_matrix | None = None

    @property
    def n_users(self) -> int:
        return self.matrix.shape[0]

    @property
    def n_items(self) -> int:
        return self.matrix.shape[1]

    def binary(self) -> sp.csr_matrix:
        b = self.matrix.tocsr(copy=True)
        b.data[:] = 1.0
        return b


class Recommender:
    """fit on TrainData; score users given their (binary) history rows. Seen items are masked by callers.

    A model fitted with a validation holdout reports what it selected on it (epochs, blend, L2...) via
    selected_params(); the trainer refits on all training data with those.
    """

    name = "base"

    def selected_params(self) -> dict:
        return {}

    def fit(self, data: TrainData) -> Recommender:  # pragma: no cover - interface
        raise NotImplementedError

    def score(self, users: np.ndarray, history: sp.csr_matrix,
              user_features: np.ndarray | None = None) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class L2SelectedModel(Recommender):
    """A closed-form linear model whose L2 weight is chosen on data.valid over L2_GRID (when given)."""

    L2_GRID: tuple[float, ...] = ()
    l2: float

    def fit(self, data: TrainData) -> L2SelectedModel:
        if data.valid is not None and self.L2_GRID:
            best = -1.0
            for l2 in self.L2_GRID:
                self.l2 = l2
                self._solve(data)
                v = validation_ndcg(self, data.binary(), data.valid)
                if v > best:
                    best, best_l2 = v, l2
            self.l2 = best_l2
        return self._solve(data)

    def selected_params(self) -> dict:
        return {"l2": self.l2}

    def _solve(self, data: TrainData) -> L2SelectedModel:  # pragma: no cover - interface
        raise NotImplementedError


def item_popularity(matrix: sp.csr_matrix) -> np.ndarray:
    b = matrix.tocsc(copy=True)
    b.data[:] = 1.0
    return np.asarray(b.sum(0)).ravel().astype(np.float32)


class Popularity(Recommender):
    """Global popularity (number of distinct users per property)."""

    name = "popularity"

    def fit(self, data: TrainData) -> Popularity:
        self.pop = item_popularity(data.matrix)
        return self

    def score(self, users, history, user_features=None):
        return np.broadcast_to(self.pop, (len(users), self.pop.size)).copy()


def validation_ndcg(model: Recommender, x: sp.csr_matrix, valid: sp.csr_matrix, k: int = 10,
                    max_users: int = 3000, chunk: int = 500) -> float:
    """nDCG@k of `model` on a validation holdout (train items masked), over at most max_users users."""
    from rentalml.evaluation.metrics import ranking_metrics, topk_indices

    users = np.flatnonzero(np.diff(valid.indptr) > 0)[:max_users]
    if len(users) == 0:
        raise ValueError("the validation split has no users with held-out interactions: the dataset is too small")
    out = []
    for s in range(0, len(users), chunk):  # chunks: a [users, catalogue] score block stays small at 100k items
        ub = users[s:s + chunk]
        scores = model.score(ub, x[ub])
        scores[x[ub].nonzero()] = -np.inf
        out.append(ranking_metrics(topk_indices(scores, k), valid[ub], k)["ndcg"])
    return float(np.concatenate(out).mean())
