"""Models through the real trainer and evaluation harness on synthetic data."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from rentalml.data.dataset import InteractionMatrix
from rentalml.evaluation.evaluate import evaluate
from rentalml.evaluation.protocols import aggregate_pairs
from rentalml.models.base import TrainData
from rentalml.models.baselines import EASE
from rentalml.models.itemitem import SparseEASE
from rentalml.training.trainer import MODEL_NAMES, fit_model


@pytest.fixture(scope="module")
def random_metrics(fit, splits):
    _, test = splits("random-75-25")
    return {name: evaluate(fit(name), test, 10) for name in ("popularity", "collaborative", "hybrid")}


@pytest.fixture(scope="module")
def cold_metrics(fit, splits):
    _, test = splits("cold-start-items")
    return {name: evaluate(fit(name, "cold-start-items"), test, 10)
            for name in ("popularity", "collaborative", "content", "hybrid")}


def test_evaluation_document_shape(random_metrics, splits):
    _, test = splits("random-75-25")
    m = random_metrics["popularity"]
    for key in ("ndcg@10", "recall@10", "precision@10", "map@10", "coverage"):
        assert 0.0 <= m[key] <= 1.0
    assert m["users"] == test["user_id"].nunique()


def test_evaluation_scores_a_seeded_sample_of_test_users(fit, splits):
    _, test = splits("random-75-25")
    model, n = fit("popularity"), test["user_id"].nunique()
    full = evaluate(model, test, 10)
    a, b = (evaluate(model, test, 10, max_users=n // 3, seed=7) for _ in range(2))
    other = evaluate(model, test, 10, max_users=n // 3, seed=8)
    assert (a["users"], a["test_users"], full["users"], full["test_users"]) == (n // 3, n, n, n)
    assert a == b and a["ndcg@10"] != other["ndcg@10"]  # the sample is the seed's, and the seed matters
    assert evaluate(model, test, 10, max_users=n, seed=7) == full  # no sample when all users fit
    assert abs(a["ndcg@10"] - full["ndcg@10"]) < 0.5 * full["ndcg@10"]  # an estimate of the same quantity


def test_hybrid_and_collaborative_beat_popularity(random_metrics):
    pop = random_metrics["popularity"]["ndcg@10"]
    assert random_metrics["collaborative"]["ndcg@10"] > pop
    assert random_metrics["hybrid"]["ndcg@10"] > pop
    assert random_metrics["hybrid"]["recall@10"] > random_metrics["popularity"]["recall@10"]
    # personalised models cover far more of the catalogue than one global list
    assert random_metrics["hybrid"]["coverage"] > random_metrics["popularity"]["coverage"]


def test_cold_slice_only_counts_cold_test_items(random_metrics, cold_metrics, fit, splits):
    # random split: only the few test items with no training interaction at all are in the cold slice
    _, test = splits("random-75-25")
    fitted = fit("popularity")
    warm = set(fitted.item_ids[np.asarray(fitted.train.sum(0)).ravel() > 0])
    cold_users = test[~test["property_id"].isin(warm)]["user_id"].nunique()
    assert random_metrics["popularity"]["cold_start"]["users"] == cold_users
    assert cold_users < random_metrics["popularity"]["users"]
    # cold-start-items: every test item is cold, so the slice is the whole evaluation
    for m in cold_metrics.values():
        assert m["cold_start"]["users"] == m["users"]
        assert m["cold_start"]["ndcg@10"] == pytest.approx(m["ndcg@10"])


def test_content_models_score_never_seen_properties(cold_metrics, fit, splits):
    train, test = splits("cold-start-items")
    assert not set(test["property_id"]) & set(train["property_id"])
    pop = cold_metrics["popularity"]["cold_start"]["ndcg@10"]
    assert pop == 0.0  # a never-seen property has no popularity
    assert cold_metrics["content"]["cold_start"]["ndcg@10"] > pop
    assert cold_metrics["hybrid"]["cold_start"]["ndcg@10"] > pop
    assert cold_metrics["content"]["cold_start"]["recall@10"] > 0.1
    # the content tower gives cold properties real, distinct scores (not a constant)
    fitted = fit("content", "cold-start-items")
    cold = np.asarray(fitted.train.sum(0)).ravel() == 0
    assert cold.sum() >= len(set(test["property_id"]))
    scores = fitted.score_users(np.arange(20))
    assert np.isfinite(scores[:, cold]).all() and scores[:, cold].std() > 0


def test_same_seed_same_scores(market, splits, fit):
    train, _ = splits("random-75-25")
    users = np.arange(50)
    for name in ("collaborative", "hybrid"):
        a = fit(name)
        b = fit_model(name, market, train, params={"epochs": 10, "neighbours": 32}, seed=42)
        assert a.params == b.params
        np.testing.assert_array_equal(a.score_users(users), b.score_users(users))
    other = fit("collaborative", seed=7)
    assert not np.array_equal(fit("collaborative").score_users(users), other.score_users(users))


def _binary(x: np.ndarray) -> TrainData:
    return TrainData(sp.csr_matrix(x.astype(np.float32)))


def test_sparse_ease_with_all_neighbours_is_ease_on_dense_data():
    rng = np.random.default_rng(0)
    data = _binary(rng.random((300, 40)) < 0.3)  # every item pair co-occurs
    n = data.n_items
    ease = EASE(l2=50.0).fit(data)
    sparse = SparseEASE(l2=50.0, neighbours=n - 1).fit(data)
    np.testing.assert_allclose(sparse.W.toarray(), ease.B, atol=1e-5)
    users = np.arange(data.n_users)
    np.testing.assert_allclose(sparse.score(users, data.matrix), ease.score(users, data.matrix), atol=1e-4)
    # fewer neighbours is a different (restricted) model
    small = SparseEASE(l2=50.0, neighbours=5).fit(data)
    assert np.abs(small.W.toarray() - ease.B).max() > 1e-3
    assert (np.diff(small.W.indptr) <= small.max_out_degree).all()


def test_sparse_ease_with_all_neighbours_close_to_ease_on_marketplace(market):
    x = InteractionMatrix.build(aggregate_pairs(market.interactions)).binary()
    data = TrainData(x)
    n = data.n_items
    ease = EASE(l2=200.0).fit(data)
    sparse = SparseEASE(l2=200.0, neighbours=n - 1).fit(data)
    users = np.arange(data.n_users)
    a, b = ease.score(users, x), sparse.score(users, x)
    # items that never co-occur with the target are not regressors of SparseEASE: close, not identical
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98
    seen = x.toarray() > 0
    ta = np.argsort(-np.where(seen, -np.inf, a), axis=1, kind="stable")[:, :10]
    tb = np.argsort(-np.where(seen, -np.inf, b), axis=1, kind="stable")[:, :10]
    overlap = np.mean([len(set(p) & set(q)) / 10 for p, q in zip(ta, tb, strict=True)])
    assert overlap > 0.85


def test_ease_tunes_l2_on_validation(market, splits):
    train, test = splits("random-75-25")
    fitted = fit_model("ease", market, train, seed=42)
    assert fitted.params["l2"] in EASE.L2_GRID
    assert evaluate(fitted, test, 10)["ndcg@10"] > 0.1


def test_unknown_model_name_lists_names(market):
    with pytest.raises(ValueError) as exc:
        fit_model("transformer", market)
    msg = str(exc.value)
    assert "transformer" in msg
    for name in (*MODEL_NAMES, "ease", "itemknn", "als"):
        assert name in msg
