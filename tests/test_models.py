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


# side information (collective EASE: Jeunen, Van Balen, Goethals, "Closed-form models for collaborative
# filtering with side-information", RecSys 2020): the item-item Gram matrix becomes XᵀX + α·TTᵀ


def test_side_information_links_items_that_share_a_value():
    import pandas as pd

    from rentalml.data.features import side_information

    items = pd.DataFrame({
        "landlord_id": ["a", "a", "b", None, "c"],
        "neighbourhood": ["x", "unknown", "x", "y", "z"],
        "lat": [42.650, 42.651, 42.700, 42.800, np.nan], "lon": [-73.75, -73.75, -73.60, -73.50, -73.7],
    }, index=pd.Index(["p0", "p1", "p2", "p3", "p4"], name="property_id"))
    t = side_information(items, np.array(["p0", "p1", "p2", "p3", "p4"], dtype=object)).toarray()
    links = t @ t.T
    assert links[0, 1] == 2  # same landlord and the same 1 km cell ("unknown" neighbourhood links nothing)
    assert links[0, 2] == 1  # same neighbourhood only
    assert links[1, 2] == 0
    assert links[3].sum() == links[3, 3] == 0 and links[4].sum() == 0  # only values that no other item has
    assert t.shape[1] == 3  # landlord a, neighbourhood x, one shared cell: singletons are dropped
    assert side_information(items[[]], items.index.to_numpy()) is None
    assert side_information(None, items.index.to_numpy()) is None


def _side_data():
    # items 0-2 co-occur; items 3-5 co-occur; item 6 has one user of its own and co-occurs with nothing; it shares
    # a landlord with items 0-2 (so each group is a clique of the augmented Gram matrix)
    rng = np.random.default_rng(1)
    x = np.zeros((201, 7), dtype=np.float32)
    x[:100, :3] = rng.random((100, 3)) < 0.5
    x[100:200, 3:6] = rng.random((100, 3)) < 0.5
    x[200, 6] = 1
    side = sp.csr_matrix(np.array([[1], [1], [1], [0], [0], [0], [1]], dtype=np.float32))
    return TrainData(sp.csr_matrix(x), item_side=side)


def test_sparse_ease_with_side_information_is_collective_ease():
    data = _side_data()
    x = data.matrix.toarray().astype(np.float64)
    t = data.item_side.toarray().astype(np.float64)
    n = data.n_items
    model = SparseEASE(l2=10.0, neighbours=n - 1, side=2.0).fit(data)
    # the closed form on the augmented Gram (all neighbours, every pair linked here by co-occurrence or side)
    p = np.linalg.inv(x.T @ x + 2.0 * t @ t.T + 10.0 * np.eye(n))
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0)
    w = model.W.toarray()
    linked = (x.T @ x + t @ t.T) > 0
    np.fill_diagonal(linked, False)
    np.testing.assert_allclose(w[linked], b[linked], atol=1e-5)
    # the landlord link alone makes item 6 a neighbour of item 0: a user of item 0 now gets a score for item 6
    # (the closed form on the augmented Gram matrix is exact here: each linked group is a clique)
    assert w[0, 6] > 0 and w[6, 0] > 0
    plain = SparseEASE(l2=10.0, neighbours=n - 1, side=0.0).fit(data)
    assert plain.W[0, 6] == 0 and plain.W[6, 0] == 0
    assert plain.selected_params() == {"l2": 10.0, "side": 0.0}


def test_side_weight_is_chosen_on_validation_and_absent_without_side_information():
    data = _side_data()
    # validation: the users of item 0 held out item 6 (the landlord's other listing; none of them has it in train)
    valid = sp.lil_matrix(data.matrix.shape, dtype=np.float32)
    for u in np.flatnonzero(data.matrix[:, 0].toarray().ravel())[:20]:
        valid[u, 6] = 1
    data.valid = valid.tocsr()
    chosen = SparseEASE(neighbours=6).fit(data)
    assert chosen.side in SparseEASE.SIDE_GRID  # side information wins where the held-out item is only linked by it
    without = SparseEASE(neighbours=6).fit(TrainData(data.matrix, valid=data.valid))
    assert without.side is None and "side" not in without.selected_params()
    assert without.W[0, 6] == 0


# sessions: the runs of each user's time-ordered pairs (data.dataset.session_matrix) as extra pseudo-users of the
# item-item model; the Gram matrix becomes (XᵀX + σ·SᵀS) / (1 + σ)


def test_session_matrix_cuts_each_history_in_time_order():
    import pandas as pd

    from rentalml.data.dataset import session_matrix

    pairs = pd.DataFrame({"user_id": ["a"] * 5 + ["b"] * 2, "property_id": ["p1", "p2", "p3", "p4", "p5", "p1", "p2"],
                          "timestamp": pd.to_datetime([50, 40, 30, 20, 10, 1, 2], unit="s", utc=True)})
    items, users = np.array(["p1", "p2", "p3", "p4", "p5"], dtype=object), np.array(["a", "b"], dtype=object)
    s = session_matrix(pairs, items, users, length=2).toarray()
    # a's pairs in time order are p5, p4, p3, p2, p1 (not the row order): runs {p5, p4}, {p3, p2}, {p1}; b: one run
    np.testing.assert_array_equal(s, [[0, 0, 0, 1, 1], [0, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    assert session_matrix(pairs, items, users, length=5) is None  # every run would be a whole history
    np.testing.assert_array_equal(session_matrix(pairs, items, users, length=5, always=True).toarray(),
                                  [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])  # a window's runs, appended to earlier ones
    assert session_matrix(pairs.drop(columns="timestamp"), items, users, length=2) is None


def _session_data(n_users=60, clusters=8, size=5, per=3, sessions=3, seed=0):
    # each user has `sessions` runs of `per` items, each run drawn from one random cluster of `size` items; across a
    # history the clusters are unrelated, so whole-history co-occurrence mixes clusters that runs keep apart.
    # Validation holds out the 4th item of one run.
    rng = np.random.default_rng(seed)
    n = clusters * size
    x = np.zeros((n_users, n), dtype=np.float32)
    valid = np.zeros_like(x)
    runs = []
    for u in range(n_users):
        held = rng.integers(sessions)
        for r in range(sessions):
            items = rng.integers(clusters) * size + rng.choice(size, per + 1, replace=False)
            if r == held:
                valid[u, items[-1]] = 1
            x[u, items[:per]] = 1
            runs.append(items[:per])
    x[valid > 0] = 0
    rows = np.repeat(np.arange(len(runs)), per)
    s = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, np.concatenate(runs))), shape=(len(runs), n))
    s.data[:] = 1.0
    return TrainData(sp.csr_matrix(x), valid=sp.csr_matrix(valid), sessions=s)


def test_sparse_ease_with_sessions_solves_the_normalised_gram():
    data = _session_data(n_users=400)
    data.valid = None
    x, s = data.matrix.toarray().astype(np.float64), data.sessions.toarray().astype(np.float64)
    n = data.n_items
    model = SparseEASE(l2=10.0, neighbours=n - 1, session=2.0).fit(data)
    p = np.linalg.inv((x.T @ x + 2.0 * s.T @ s) / 3.0 + 10.0 * np.eye(n))
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0)
    w = model.W.toarray()
    linked = (x.T @ x) > 0
    np.fill_diagonal(linked, False)
    assert linked.sum() == n * (n - 1)  # every pair is a neighbour: the sparse solve is the closed form
    np.testing.assert_allclose(w[linked], b[linked], atol=1e-5)
    plain = SparseEASE(l2=10.0, neighbours=n - 1, session=0.0).fit(data)
    assert np.abs(plain.W.toarray() - w).max() > 1e-3
    assert plain.selected_params() == {"l2": 10.0, "session": 0.0}


def test_session_weight_is_chosen_on_validation_and_absent_without_sessions():
    from rentalml.models.base import validation_ndcg

    data = _session_data(n_users=40, seed=2)  # few users: whole histories alone leave clusters blurred
    chosen = SparseEASE(neighbours=20).fit(data)
    without = SparseEASE(neighbours=20).fit(TrainData(data.matrix, valid=data.valid))
    assert chosen.session in SparseEASE.SESSION_GRID and without.session is None
    assert "session" not in without.selected_params()
    x = data.binary()
    assert validation_ndcg(chosen, x, data.valid) > validation_ndcg(without, x, data.valid) + 0.02


def test_the_trainer_builds_sessions_unless_their_weight_is_zero(market, monkeypatch):
    import rentalml.training.trainer as trainer

    seen = []
    real = trainer.session_matrix
    monkeypatch.setattr(trainer, "session_matrix", lambda *a, **k: seen.append(1) or real(*a, **k))
    long = _long_histories()
    fit_model("itemitem", long, params={"session": 0.0, "neighbours": 16}, seed=1)
    assert not seen
    fitted = fit_model("itemitem", long, params={"neighbours": 16}, seed=1)
    assert seen and fitted.params["session"] in (0.0, *SparseEASE.SESSION_GRID)
    # the synthetic market's histories are shorter than one run: no sessions, no session weight chosen
    assert "session" not in fit_model("itemitem", market.subset(market.interactions.head(3000)),
                                      params={"neighbours": 16}, seed=1).params
    assert trainer.SCALE_DEFAULTS["session"] == 0.0


def _long_histories(users=40, items=60, per_user=30, seed=3):
    import pandas as pd

    from rentalml.data.dataset import Dataset

    # `users` users with `per_user` distinct properties each, one a minute: histories longer than one run of 20
    rng = np.random.default_rng(seed)
    rows = [(f"u{u}", f"p{i}", pd.Timestamp("2026-01-01", tz="UTC") + pd.Timedelta(minutes=u * 100 + j))
            for u in range(users) for j, i in enumerate(rng.choice(items, per_user, replace=False))]
    return Dataset(pd.DataFrame(rows, columns=["user_id", "property_id", "timestamp"]))


def test_finetune_refits_the_item_item_part_with_its_sessions():
    import pandas as pd

    from rentalml.data.dataset import session_matrix
    from rentalml.training.incremental import extend, finetune

    data = _long_histories()
    pairs = aggregate_pairs(data.interactions)
    late = pairs.groupby("user_id").timestamp.rank(ascending=False) <= 6  # each user's last 6 of 30
    first, window = pairs[~late], pairs[late]
    fitted = fit_model("itemitem", data.subset(first), params={"session": 2.0, "neighbours": 16}, seed=1)
    assert fitted.sessions is not None and fitted.sessions.sum() == fitted.train.sum()  # each pair in one run
    # the window: each user's last 6 pairs, plus one pair a user already had (it joins no new run)
    again = first.iloc[[0]].assign(timestamp=window.timestamp.max())
    tuned = finetune(fitted, pd.concat([window, again]))
    ext = extend(fitted, window)
    runs = sp.vstack([fitted.sessions, session_matrix(window, fitted.item_ids, ext.user_ids, always=True)]).tocsr()
    assert runs.sum() == ext.train.sum()
    expect = SparseEASE(l2=fitted.model.l2, neighbours=16, session=2.0).fit(TrainData(ext.train, sessions=runs))
    plain = SparseEASE(l2=fitted.model.l2, neighbours=16, session=2.0).fit(TrainData(ext.train))
    np.testing.assert_array_equal(tuned.model.W.toarray(), expect.W.toarray())
    assert (tuned.model.W != plain.W).nnz > 0


def test_the_scale_profile_builds_no_side_information(market, monkeypatch):
    import rentalml.training.trainer as trainer

    calls = []
    real = trainer.side_information
    monkeypatch.setattr(trainer, "side_information", lambda *a, **k: calls.append(1) or real(*a, **k))
    small = market.subset(market.interactions.head(3000))
    fit_model("itemitem", small, params={"side": 0.0, "neighbours": 16}, seed=1)
    assert not calls
    fitted = fit_model("itemitem", small, params={"neighbours": 16}, seed=1)
    assert calls and "side" in fitted.params  # the synthetic catalogue has neighbourhoods and lat/lon
    assert trainer.SCALE_DEFAULTS["side"] == 0.0


def test_finetune_refits_the_item_item_part_with_its_side_information(market):
    from rentalml.training.incremental import extend, finetune

    small = market.subset(market.interactions.head(3000))
    fitted = fit_model("itemitem", small, params={"side": 2.0, "neighbours": 16}, seed=1)
    assert fitted.item_side is not None and fitted.model.side == 2.0
    recent = aggregate_pairs(market.interactions.iloc[3000:3400])
    tuned = finetune(fitted, recent)
    ext = extend(fitted, recent)
    expect = SparseEASE(l2=fitted.model.l2, neighbours=16, side=2.0).fit(
        TrainData(ext.train, item_side=fitted.item_side))
    none = SparseEASE(l2=fitted.model.l2, neighbours=16, side=0.0).fit(TrainData(ext.train))
    np.testing.assert_array_equal(tuned.model.W.toarray(), expect.W.toarray())
    assert (tuned.model.W != none.W).nnz > 0
