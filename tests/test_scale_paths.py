"""The scale paths of the item-item model give the same answers as the small-catalogue ones."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

import rentalml.models.itemitem as ii
from rentalml.models.base import TrainData


def _data(seed: int = 0, users: int = 400, items: int = 120) -> TrainData:
    rng = np.random.default_rng(seed)
    x = (rng.random((users, items)) < 0.05).astype(np.float32)
    x[:, :10] += rng.random((users, 10)) < 0.2  # a popular head, so neighbour lists are full
    x = sp.csr_matrix(np.minimum(x, 1.0))
    valid = sp.csr_matrix((rng.random((users, items)) < 0.01).astype(np.float32))
    return TrainData(x, valid=valid)


def test_cooccurrence_topk_matches_a_dense_ranking():
    data = _data()
    x = data.binary()
    idx, val = ii.cooccurrence_topk(x, 8, block=7)  # odd block size: crosses block edges
    g = (x.T @ x).toarray()
    np.fill_diagonal(g, 0)
    for j in range(g.shape[0]):
        order = sorted(range(g.shape[1]), key=lambda c: (-g[j, c], c))
        want = [c for c in order if g[j, c] > 0][:8]
        got = [c for c in idx[j] if c >= 0]
        assert got == want
        np.testing.assert_allclose(val[j, : len(want)], g[j, want])


def test_sparse_gram_path_equals_dense_path(monkeypatch):
    data = _data(1)
    dense = ii.SparseEASE(neighbours=16).fit(data)
    monkeypatch.setattr(ii, "DENSE_GRAM_LIMIT", 0)
    sparse = ii.SparseEASE(neighbours=16).fit(data)
    assert sparse.l2 == dense.l2
    np.testing.assert_allclose(sparse.W.toarray(), dense.W.toarray(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(sparse.out_idx, dense.out_idx)


def test_grid_selection_equals_one_solve_per_l2():
    data = _data(2)
    chosen = ii.SparseEASE(neighbours=16).fit(data)
    again = ii.SparseEASE(l2=chosen.l2, neighbours=16).fit(TrainData(data.matrix))
    np.testing.assert_allclose(chosen.W.toarray(), again.W.toarray(), rtol=1e-6)
    assert chosen.out_idx.shape[1] <= 32


def test_the_scale_profile_applies_at_scale_and_keeps_the_selected_model(monkeypatch):
    from rentalml.data.generator import generate_marketplace
    from rentalml.training import trainer

    ds = generate_marketplace(300, 120, 3000, seed=3)
    fits = []
    orig = ii.SparseEASE.fit
    monkeypatch.setattr(ii.SparseEASE, "fit", lambda self, data: fits.append(self.neighbours) or orig(self, data))
    small = trainer.fit_model("hybrid", ds, params={"epochs": 1})
    assert fits == [256, 256] and "neighbours" not in small.params  # below the threshold: selection + refit
    fits.clear()
    monkeypatch.setattr(trainer, "SCALE_MIN_ROWS", 100)
    big = trainer.fit_model("hybrid", ds, params={"epochs": 1})
    assert fits == [64]  # one fit: the validation-selected model is kept; 64 neighbours
    assert big.params["softmax"] == "sampled" and big.params["epochs"] == 1  # caller's value wins
    assert big.model.tower.params.dim == trainer.SCALE_DEFAULTS["dim"]
