"""Top-k ranking metrics with binary relevance.

nDCG's ideal DCG and MAP's denominator use min(|relevant|, k); Recall@k divides by |relevant|.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

METRIC_NAMES = ("ndcg", "recall", "precision", "map")


def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Row-wise indices of the k largest scores, best first (ties broken by index)."""
    k = min(k, scores.shape[1])
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1:k]  # each row's k-th largest score
    above, tied = scores > kth, scores == kth
    # all scores above the k-th largest, then the lowest-index ties until k are taken
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
