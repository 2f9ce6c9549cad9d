"""The default model: a two-tower network (ID + content) blended with the sparse item-item model.

score = two_tower(user, item) + beta · itemitem(history, item). beta is chosen on the validation holdout
(beta = 0 keeps the pure two-tower model). Both parts scale to 100k+ properties: the item-item part keeps
O(n·M) weights, the network is trained with sampled softmax on large catalogues.
"""

from __future__ import annotations

from rentalml.models.base import Recommender, TrainData, validation_ndcg
from rentalml.models.itemitem import SparseEASE
from rentalml.models.neural import NeuralParams, TwoTower

BETAS = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0)


class Hybrid(Recommender):
    name = "hybrid"

    def __init__(self, params: NeuralParams | None = None, l2: float = 200.0, neighbours: int = 256,
                 dropout: float = 0.0, beta: float | None = None, residual: bool = False, progress: bool = False,
                 **overrides):
        self.tower = TwoTower(params, name="hybrid", progress=progress, **overrides)
        self.itemitem = SparseEASE(l2=l2, neighbours=neighbours, dropout=dropout)
        self.residual = residual
        self.beta = beta

    @property
    def on_validate(self):
        return self.tower.on_validate

    @on_validate.setter
    def on_validate(self, fn) -> None:
        self.tower.on_validate = fn

    @property
    def best_val(self) -> float:
        return max(self._best_val, self.tower.best_val) if hasattr(self, "_best_val") else self.tower.best_val

    @property
    def params(self):
        return self.tower.params

    def fit(self, data: TrainData) -> Hybrid:
        self.itemitem.fit(data)
        if self.residual:
            # the network is trained on top of the item-item scores and learns their weight
            self.tower.prior = self.itemitem
            self.tower.fit(data)
            self.beta = self.tower.prior_weight
            self._best_val = self.tower.best_val
            return self
        self.tower.fit(data)
        if self.beta is None:
            self.beta = self._choose_beta(data) if data.valid is not None else 10.0
        return self

    def _choose_beta(self, data: TrainData) -> float:
        best, best_beta = -1.0, 0.0
        for beta in BETAS:
            self.beta = beta
            v = validation_ndcg(self, data.binary(), data.valid)
            if v > best:
                best, best_beta = v, beta
        self._best_val = best
        return best_beta

    def selected_params(self) -> dict:
        chosen = {**self.tower.selected_params(), **self.itemitem.selected_params()}
        return chosen if self.residual else {**chosen, "beta": self.beta}

    def score(self, users, history, user_features=None):
        if self.residual:
            return self.tower.score(users, history, user_features)  # includes beta · item-item
        ii = self.itemitem.score(users, history)
        return self.tower.score(users, history, user_features) + self.beta * ii
