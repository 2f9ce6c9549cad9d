"""Sparse linear item-item model: EASE restricted to each item's top-M co-occurring neighbours.

EASE (Steck 2019) solves, for every target item j, a ridge regression of column j on all other item
columns; the closed form needs a dense n × n inverse. Restricting item j's regressors to its M most
co-occurring items gives an independent M × M ridge system per item, so memory is O(n·M) and the model
scales to 100k+ properties (batched solves in torch). When every item co-occurs with its M = n − 1 neighbours it
is exactly EASE.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from rentalml.models.base import L2SelectedModel, TrainData

DENSE_GRAM_LIMIT = 20_000  # items; above this the Gram matrix stays sparse


def cooccurrence_topk(x: sp.csr_matrix, m: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For every item, its top-m co-occurring items (self excluded): (indices [n, m] with -1 padding, counts)."""
    n = x.shape[1]
    m = max(1, min(m, n - 1))
    xt = x.T.tocsr()
    xc = x.tocsc()
    idx = np.full((n, m), -1, dtype=np.int64)
    val = np.zeros((n, m), dtype=np.float32)
    for start in range(0, n, block):
        stop = min(n, start + block)
        g = (xt[start:stop] @ xc).toarray().astype(np.float32)  # [b, n]
        g[np.arange(stop - start), np.arange(start, stop)] = 0.0
        part = np.argpartition(-g, m - 1, axis=1)[:, :m]
        pv = np.take_along_axis(g, part, axis=1)
        order = np.argsort(-pv, axis=1, kind="stable")
        part = np.take_along_axis(part, order, axis=1)
        pv = np.take_along_axis(pv, order, axis=1)
        part[pv <= 0] = -1
        idx[start:stop], val[start:stop] = part, np.where(pv > 0, pv, 0.0)
    return idx, val


class SparseEASE(L2SelectedModel):
    name = "itemitem"

    def __init__(self, l2: float = 200.0, neighbours: int = 256, block: int = 256, dropout: float = 0.0,
                 max_out_degree: int | None = None):
        # every source item keeps at most max_out_degree targets (default 2·neighbours) so the ONNX graph can
        # scatter-add a fixed-width row per history item
        self.max_out_degree = max_out_degree or 2 * neighbours
        self.l2 = l2
        self.dropout = dropout  # > 0: denoising (EDLAE-style) penalty p/(1-p)·diag(G) added to the ridge
        self.neighbours = neighbours
        self.block = block

    L2_GRID = (100.0, 200.0, 400.0)

    def _solve(self, data: TrainData) -> SparseEASE:
        x = data.binary()
        n = x.shape[1]
        nbr, _ = cooccurrence_topk(x, self.neighbours)
        m = nbr.shape[1]
        gram = (x.T @ x).tocsr().astype(np.float32)
        dense = torch.from_numpy(gram.toarray()) if n <= DENSE_GRAM_LIMIT else None
        weights = np.zeros((n, m), dtype=np.float32)
        eye = torch.eye(m, dtype=torch.float64) * self.l2
        for start in range(0, n, self.block):
            stop = min(n, start + self.block)
            nb = torch.from_numpy(nbr[start:stop])
            valid = nb >= 0
            safe = nb.clamp(min=0)
            if dense is not None:
                gnn = dense[safe[:, :, None], safe[:, None, :]].double()
                rhs = dense[safe, torch.arange(start, stop)[:, None]].double()
            else:
                gnn = torch.zeros((stop - start, m, m), dtype=torch.float64)
                rhs = torch.zeros((stop - start, m), dtype=torch.float64)
                for r, j in enumerate(range(start, stop)):
                    s = nbr[j].clip(min=0)
                    gnn[r] = torch.from_numpy(gram[s][:, s].toarray())
                    rhs[r] = torch.from_numpy(gram[s, j].toarray().ravel())
            mask = (valid[:, :, None] & valid[:, None, :]).double()
            gnn = gnn * mask
            if self.dropout > 0:
                diag = torch.diagonal(gnn, dim1=1, dim2=2)
                gnn = gnn + torch.diag_embed(diag * (self.dropout / (1.0 - self.dropout)))
            gnn = gnn + eye
            rhs = rhs * valid.double()
            w = torch.linalg.solve(gnn, rhs[:, :, None])[:, :, 0]
            weights[start:stop] = (w * valid).float().numpy()
        # item j's score for a user = sum over history items i of W[i, j] (W[i, j] = weight of i in j's system)
        rows = nbr.ravel()
        cols = np.repeat(np.arange(n), m)
        keep = rows >= 0
        w = sp.csr_matrix((weights.ravel()[keep], (rows[keep], cols[keep])), shape=(n, n), dtype=np.float32)
        self.out_idx, self.out_w = self._prune_rows(w, self.max_out_degree)
        r = np.repeat(np.arange(n), self.out_idx.shape[1])
        ok = self.out_idx.ravel() < n
        self.W = sp.csr_matrix((self.out_w.ravel()[ok], (r[ok], self.out_idx.ravel()[ok])), shape=(n, n),
                               dtype=np.float32)
        return self

    @staticmethod
    def _prune_rows(w: sp.csr_matrix, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Fixed-width rows of W (largest |weight| first), padded with target n / weight 0."""
        n = w.shape[0]
        width = max(1, min(width, int(np.diff(w.indptr).max()) if w.nnz else 1))
        idx = np.full((n, width), n, dtype=np.int64)
        val = np.zeros((n, width), dtype=np.float32)
        for i in range(n):
            a, b = w.indptr[i], w.indptr[i + 1]
            cols, vals = w.indices[a:b], w.data[a:b]
            if b - a > width:
                top = np.argpartition(-np.abs(vals), width - 1)[:width]
                cols, vals = cols[top], vals[top]
            idx[i, : len(cols)] = cols
            val[i, : len(cols)] = vals
        return idx, val

    def score(self, users, history, user_features=None):
        h = history.copy()
        h.data[:] = 1.0
        return np.asarray((h @ self.W).todense(), dtype=np.float32)
