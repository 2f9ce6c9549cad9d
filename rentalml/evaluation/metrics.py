"""Top-k ranking metrics with binary relevance.

nDCG's ideal DCG and MAP's denominator use min(|relevant|, k); Recall@k divides by |relevant|.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

METRIC_NAMES = ("ndcg", "recall", "precision", "map")


def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Row-wise indices of the k largest scores, best first (ties broken by index).

    torch.topk picks the k largest of each row (multi-threaded, no copy of the rows: at 512 users × 100k
    properties 0.2 s against 2.3–3 s for a numpy partition with the tie bookkeeping below). Which of several
    equal scores it keeps is unspecified, so rows whose k-th score is tied with a score it left out — common for
    popularity counts, rare for real-valued scores — are redone exactly by `_topk_exact`."""
    k = min(k, scores.shape[1])
    if k == 0 or scores.shape[0] == 0:
        return np.zeros((scores.shape[0], k), dtype=np.int64)
    import torch

    vals, idx = torch.topk(torch.from_numpy(np.ascontiguousarray(scores)), k, dim=1, sorted=False)
    vals, idx = vals.numpy(), idx.numpy()
    kth = vals.min(axis=1, keepdims=True)
    redo = np.flatnonzero((scores == kth).sum(1) > (vals == kth).sum(1))
    if len(redo):
        rows = scores[redo]
        idx[redo] = exact = _topk_exact(rows, k)
        vals[redo] = np.take_along_axis(rows, exact, axis=1)
    order = np.lexsort((idx, -vals))  # per row: score descending, then index ascending
    return np.take_along_axis(idx, order, axis=1)


def _topk_exact(scores: np.ndarray, k: int) -> np.ndarray:
    """`topk_indices` by partition: every score above the k-th largest, then the lowest-index ties."""
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1:k]  # each row's k-th largest score
    above, tied = scores > kth, scores == kth
    take = above | (tied & (np.cumsum(tied, axis=1, dtype=np.int32) <= k - above.sum(1, keepdims=True)))
    part = np.nonzero(take)[1].reshape(scores.shape[0], k)  # ascending index within each row
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def hits_matrix(top: np.ndarray, relevant: sp.csr_matrix) -> np.ndarray:
    """Boolean [B, k]: whether top[b, r] is among the relevant items of row b."""
    hits = np.zeros(top.shape, dtype=bool)
    for b in range(top.shape[0]):
        rel = relevant.indices[relevant.indptr[b]:relevant.indptr[b + 1]]
        if rel.size:
            hits[b] = np.isin(top[b], rel)
    return hits


def ranking_metrics(top: np.ndarray, relevant: sp.csr_matrix, k: int) -> dict[str, np.ndarray]:
    """Per-user metric arrays for top-k lists `top` [B, k] against relevant rows [B, n_items]."""
    top = top[:, :k]
    hits = hits_matrix(top, relevant).astype(np.float64)
    n_rel = np.diff(relevant.indptr).astype(np.float64)
    denom = np.minimum(n_rel, k)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (hits * discounts[: hits.shape[1]]).sum(1)
    idcg = np.array([discounts[: int(d)].sum() for d in denom])
    cum_hits = np.cumsum(hits, axis=1)
    prec_at = cum_hits / np.arange(1, hits.shape[1] + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "ndcg": np.where(idcg > 0, dcg / idcg, 0.0),
            "recall": np.where(n_rel > 0, hits.sum(1) / n_rel, 0.0),
            "precision": hits.sum(1) / k,
            "map": np.where(denom > 0, (prec_at * hits).sum(1) / denom, 0.0),
        }


def summarize(per_user: dict[str, list[np.ndarray]], k: int) -> dict[str, float]:
    return {f"{name}@{k}": float(np.concatenate(v).mean()) if v else 0.0 for name, v in per_user.items()}
