"""Top-k ranking metrics on hand-computed examples (binary relevance)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from rentalml.evaluation.metrics import hits_matrix, ranking_metrics, summarize, topk_indices


def _rel(rows: list[list[int]], n_items: int = 20) -> sp.csr_matrix:
    r = [i for i, row in enumerate(rows) for _ in row]
    c = [j for row in rows for j in row]
    return sp.csr_matrix((np.ones(len(c), np.float32), (r, c)), shape=(len(rows), n_items))


def _one(top: list[int], relevant: list[int], k: int) -> dict[str, float]:
    out = ranking_metrics(np.array([top]), _rel([relevant]), k)
    return {name: float(v[0]) for name, v in out.items()}


D = [1.0 / math.log2(r + 2) for r in range(10)]  # discount at 0-based rank r


# ------------------------------------------------------------------ hand-computed values
def test_hits_at_ranks_1_and_3_of_4_relevant():
    # top-5 = [3, 7, 1, 9, 4]; relevant = {3, 1, 11, 12}: hits at ranks 1 and 3
    m = _one([3, 7, 1, 9, 4], [3, 1, 11, 12], k=5)
    dcg = D[0] + D[2]
    idcg = D[0] + D[1] + D[2] + D[3]  # min(|rel|=4, k=5) = 4 ideal hits
    assert m["ndcg"] == pytest.approx(dcg / idcg)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["precision"] == pytest.approx(2 / 5)
    assert m["map"] == pytest.approx((1 / 1 + 2 / 3) / 4)


def test_more_relevant_than_k_uses_min_in_ideal_and_map_but_not_recall():
    # 6 relevant, k = 3, hits at ranks 2 and 3
    m = _one([0, 1, 2], [1, 2, 10, 11, 12, 13], k=3)
    assert m["ndcg"] == pytest.approx((D[1] + D[2]) / (D[0] + D[1] + D[2]))
    assert m["map"] == pytest.approx((1 / 2 + 2 / 3) / 3)  # denominator min(6, 3) = 3
    assert m["recall"] == pytest.approx(2 / 6)  # recall divides by |relevant|, not min(|rel|, k)
    assert m["precision"] == pytest.approx(2 / 3)


def test_single_relevant_item_at_rank_4():
    m = _one([5, 6, 7, 8, 9], [8], k=5)
    assert m["ndcg"] == pytest.approx(D[3] / D[0])
    assert m["ndcg"] == pytest.approx(1 / math.log2(5))
    assert m["recall"] == pytest.approx(1.0)
    assert m["precision"] == pytest.approx(1 / 5)
    assert m["map"] == pytest.approx(1 / 4)


def test_perfect_ranking_is_one():
    for k, relevant in [(5, [2, 4]), (3, [0, 1, 2]), (2, [7, 8, 9, 10])]:
        top = relevant[:k] + [j for j in range(15, 20)][: max(0, k - len(relevant))]
        m = _one(top, relevant, k)
        assert m["ndcg"] == pytest.approx(1.0)
        assert m["map"] == pytest.approx(1.0)
        if len(relevant) <= k:
            assert m["recall"] == pytest.approx(1.0)
        else:
            assert m["precision"] == pytest.approx(1.0)


def test_no_hits_and_no_relevant_are_zero():
    assert _one([0, 1, 2], [5, 6], k=3) == {"ndcg": 0.0, "recall": 0.0, "precision": 0.0, "map": 0.0}
    m = ranking_metrics(np.array([[0, 1, 2]]), _rel([[]]), 3)  # a row with nothing relevant: 0, not NaN
    assert all(float(v[0]) == 0.0 for v in m.values())


def test_top_longer_than_k_is_truncated():
    # the hit at position 4 must not count at k = 3
    m = ranking_metrics(np.array([[0, 1, 2, 3]]), _rel([[3]]), 3)
    assert float(m["ndcg"][0]) == 0.0 and float(m["recall"][0]) == 0.0


def test_batch_rows_are_independent_and_summarize_averages():
    top = np.array([[0, 1], [0, 1], [4, 5]])
    rel = _rel([[0], [1], [9]])
    m = ranking_metrics(top, rel, 2)
    np.testing.assert_allclose(m["ndcg"], [1.0, D[1] / D[0], 0.0])
    np.testing.assert_allclose(m["recall"], [1.0, 1.0, 0.0])
    np.testing.assert_allclose(m["precision"], [0.5, 0.5, 0.0])
    np.testing.assert_allclose(m["map"], [1.0, 0.5, 0.0])
    hits = hits_matrix(top, rel)
    assert hits.tolist() == [[True, False], [False, True], [False, False]]
    s = summarize({"ndcg": [m["ndcg"][:2], m["ndcg"][2:]], "recall": []}, 2)
    assert s["ndcg@2"] == pytest.approx((1.0 + D[1] / D[0]) / 3)
    assert s["recall@2"] == 0.0


# ------------------------------------------------------------------ topk_indices
def test_topk_indices_best_first():
    scores = np.array([[0.1, 0.9, 0.5, 0.7, -1.0], [3.0, 2.0, 1.0, 0.0, 4.0]])
    assert topk_indices(scores, 3).tolist() == [[1, 3, 2], [4, 0, 1]]
    assert topk_indices(scores, 10).shape == (2, 5)  # k is capped at the catalogue size
    assert topk_indices(scores, 1).tolist() == [[1], [4]]


def test_topk_indices_equals_the_exact_partition_on_ties_and_minus_infinity():
    """torch.topk's choice among equal scores is unspecified: rows tied at the k-th score must still get the
    lowest-index ties (the exact path), with integer counts (popularity), masked items and all-equal rows."""
    from rentalml.evaluation.metrics import _topk_exact

    rng = np.random.default_rng(0)
    for trial in range(120):
        b, n = int(rng.integers(1, 12)), int(rng.integers(1, 200))
        s = [rng.normal(size=(b, n)).astype(np.float32), rng.integers(0, 4, size=(b, n)).astype(np.float64),
             np.zeros((b, n), dtype=np.float32)][trial % 3]
        s[rng.random((b, n)) < 0.3] = -np.inf  # seen items, masked as evaluate does
        for k in (1, 5, 10, 300):
            assert np.array_equal(topk_indices(s, k), _topk_exact(s, min(k, n))), (trial, k)


def test_topk_indices_ties_broken_by_lower_index():
    scores = np.array([[1.0, 2.0, 2.0, 0.0, 2.0, 1.0]])
    assert topk_indices(scores, 2).tolist() == [[1, 2]]
    assert topk_indices(scores, 4).tolist() == [[1, 2, 4, 0]]
    assert topk_indices(np.zeros((1, 8)), 3).tolist() == [[0, 1, 2]]


def test_topk_indices_skips_masked_items():
    scores = np.array([[5.0, 4.0, 3.0, 2.0]])
    scores[0, [0, 2]] = -np.inf
    assert topk_indices(scores, 2).tolist() == [[1, 3]]


def test_topk_indices_equals_stable_argsort_on_random_ties():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 80))
        k = int(rng.integers(1, n + 3))
        s = rng.integers(0, 4, (3, n)).astype(np.float32)
        s[rng.random(s.shape) < 0.2] = -np.inf
        np.testing.assert_array_equal(topk_indices(s, k), np.argsort(-s, axis=1, kind="stable")[:, :min(k, n)])
