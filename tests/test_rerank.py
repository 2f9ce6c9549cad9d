"""The learned second stage (rentalml.models.rerank): its pair features, the ranker it learns, and on Albany
that it re-orders a real first stage's candidates for the better."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from rentalml.models.rerank import FEATURES, PairContext, PairRanker, pair_features, years

F = {f: i for i, f in enumerate(FEATURES)}


def _context(times_by_item: dict[int, list[float]], n_users: int = 4):
    """Four properties: 0 and 1 share a landlord and a neighbourhood and sit 1.1 km apart; 2 is 100 km away,
    dearer and larger; 3 has no attributes."""
    items = pd.DataFrame({
        "landlord_id": ["h1", "h1", "h2", None], "neighbourhood": ["a", "a", "b", "unknown"],
        "room_type": ["entire_home", "entire_home", "private_room", None],
        "lat": [42.65, 42.66, 43.55, np.nan], "lon": [-73.75, -73.75, -73.75, np.nan],
        "price": [100.0, 110.0, 400.0, np.nan], "accommodates": [2, 2, 6, np.nan],
    }, index=pd.Index(["p0", "p1", "p2", "p3"], name="property_id"))
    rows, cols, when = [], [], []
    for i, ts in times_by_item.items():
        for u, t in enumerate(ts):
            rows.append(u), cols.append(i), when.append(t)
    times = sp.csr_matrix((when, (rows, cols)), shape=(n_users, 4))
    train = times.copy()
    train.data[:] = 1.0
    return PairContext.build(items, items.index.to_numpy(), train, times)


def test_pair_features_read_landlord_distance_price_and_time():
    ctx = _context({0: [2015.0], 1: [2015.1, 2015.2], 2: [2021.0, 2021.5]})
    x = pair_features(ctx, history=np.array([0]), times=np.array([2015.0]), candidates=np.array([1, 2, 3]),
                      scores=np.array([0.5, 0.25, 0.1]))
    assert x.shape == (3, len(FEATURES))
    np.testing.assert_allclose(x[:, F["rank"]], [0, 1, 2])
    np.testing.assert_allclose(x[:, F["score_rel"]], [1.0, 0.5, 0.2])
    np.testing.assert_allclose(x[:, F["pop"]], [2, 2, 0])
    np.testing.assert_allclose(x[:, F["same_host"]], [1, 0, 0])  # p3's unknown landlord matches nothing
    np.testing.assert_allclose(x[:, F["same_nb"]], [1, 0, 0])  # "unknown" is not a neighbourhood
    np.testing.assert_allclose(x[:, F["same_rt"]], [1, 0, 0])
    assert x[0, F["dmin"]] == pytest.approx(1.112, abs=0.01)  # 0.01° of latitude
    assert x[1, F["dmin"]] == pytest.approx(100.1, abs=0.5)
    assert x[0, F["dprice"]] == pytest.approx(np.log(110 / 100))
    assert x[2, F["dprice"]] == 0.0 and x[2, F["dacc"]] == 0.0  # unknown attributes give 0, not NaN
    # p1 was reviewed within months of the user's review, p2 six years later: p1 has the density, p2 the gap
    assert x[0, F["tdens"]] > 0.5 > 0.01 > x[1, F["tdens"]]
    assert x[1, F["dt_first"]] == pytest.approx(2015.0 - 2021.0)
    assert np.isfinite(x).all()


def test_pair_features_without_attributes_or_history():
    """MovieLens-like catalogue: no attribute columns; the side features are 0 and nothing is NaN."""
    times = sp.csr_matrix(([2000.0, 2001.0, 2002.0], ([0, 0, 1], [0, 1, 1])), shape=(2, 3))
    train = times.copy()
    train.data[:] = 1
    ctx = PairContext.build(None, np.array(["a", "b", "c"], dtype=object), train, times)
    x = pair_features(ctx, np.array([0]), np.array([2000.0]), np.array([1, 2]), np.array([1.0, 0.5]))
    assert np.isfinite(x).all()
    for f in ("same_host", "same_nb", "same_rt", "dmin", "dmean", "dprice", "dacc"):
        assert (x[:, F[f]] == 0).all(), f
    cold = pair_features(ctx, np.zeros(0, np.int64), np.zeros(0), np.array([1, 2]), np.array([1.0, 0.5]))
    assert (cold[:, F["hist"]] == 0).all() and np.isfinite(cold).all()


def test_batched_features_equal_each_user_alone():
    """The rank step computes a request batch in one pass (histories padded to the longest): each row must equal
    that user's features alone, whatever the other rows' history lengths (none, one, three)."""
    ctx = _context({0: [2015.0], 1: [2015.1, 2015.2], 2: [2021.0, 2021.5]})
    from rentalml.models.rerank import pair_features_batch

    hists = [np.array([0]), np.zeros(0, np.int64), np.array([2, 0, 1])]
    times = [np.array([2015.0]), np.zeros(0), np.array([2021.0, 2015.0, 2016.0])]
    cands = np.array([[1, 2, 3], [0, 1, 2], [3, 1, 0]])
    scores = np.array([[0.5, 0.25, 0.1], [0.9, 0.8, 0.7], [0.3, 0.2, 0.1]])
    batch = pair_features_batch(ctx, hists, times, cands, scores)
    for j in range(3):
        np.testing.assert_allclose(batch[j], pair_features(ctx, hists[j], times[j], cands[j], scores[j]),
                                   rtol=0, atol=1e-12)
    assert (batch[1, :, F["same_host"]:] == 0).all()  # no history: only the first stage's and the item's columns
    assert batch[2, 1, F["same_host"]] == 2 and batch[2, 1, F["same_rt"]] == pytest.approx(2 / 3)


def test_years_reads_zoned_and_naive_timestamps():
    got = years(pd.to_datetime(["1970-01-01T00:00:00", "2000-01-01T00:00:00+00:00"], format="ISO8601", utc=True))
    assert got[0] == 0.0 and got[1] == pytest.approx(30.0, abs=0.01)


def _planted(seed: int, n_users: int = 300, n_cand: int = 20):
    """Pairs whose label is driven by a shared landlord against the first stage's rank: the ranker must learn
    a positive weight on same_host."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n_users * n_cand, len(FEATURES)))
    x[:, F["rank"]] = np.tile(np.arange(n_cand), n_users)
    x[:, F["score_rel"]] = 1 - x[:, F["rank"]] / n_cand
    x[:, F["same_host"]] = rng.random(len(x)) < 0.1
    logit = -4 + 3 * x[:, F["same_host"]] + 1.5 * x[:, F["score_rel"]]
    y = (rng.random(len(x)) < 1 / (1 + np.exp(-logit))).astype(float)
    return x, y


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve: the chance a positive outscores a negative (Mann-Whitney, ties half)."""
    from scipy.stats import rankdata

    r = rankdata(s)
    pos = y > 0
    return float((r[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum()))


def test_ranker_learns_the_planted_signal_and_is_deterministic():
    x, y = _planted(0)
    a, b = PairRanker.fit(x, y), PairRanker.fit(x, y)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert a.weights[F["same_host"]] > 0.3 and a.weights[F["score_rel"]] > 0
    assert (a.weights[[F["tdens"], F["dmin"]]] == 0).all()  # constant columns keep weight 0
    # held-out pairs: the learned score separates positives better than the first stage's rank alone
    xt, yt = _planted(1)
    assert _auc(yt, a.decision(xt)) > _auc(yt, xt[:, F["score_rel"]]) + 0.05
    again = PairRanker.from_dict(a.to_dict())
    np.testing.assert_array_equal(again.decision(xt), a.decision(xt))


def test_rerank_moves_the_same_landlord_up_and_keeps_the_score_values(tmp_path):
    ctx = _context({0: [2015.0], 1: [2015.1], 2: [2015.2]})
    ctx.to_npz(tmp_path / "ctx.npz")
    ctx2 = PairContext.from_npz(tmp_path / "ctx.npz")
    w = np.zeros(len(FEATURES))
    w[F["same_host"]] = 5.0
    ranker = PairRanker(w, 0.0, np.zeros(len(FEATURES)), np.ones(len(FEATURES)))
    for c in (ctx, ctx2):
        cand, sc = ranker.rerank(c, np.array([0]), np.array([2015.0]), np.array([2, 1]), np.array([0.9, 0.3]))
        assert cand.tolist() == [1, 2]
        assert sc.tolist() == [0.9, 0.3]  # the values stay, in descending order
    with pytest.raises(ValueError, match="features"):
        PairRanker.from_dict({**ranker.to_dict(), "features": ["rank"]})


def test_hybrid_serves_what_it_scores_offline(market, splits, tmp_path):
    """A hybrid with a learned re-ranker (rerank=True: kept whatever its validation gain): bundle.json names it,
    and the runtime's rank step (Engine.recommend, the one serving path; and the two-graph stages) gives every
    user the list that Fitted.score_users gives offline — a list the re-rank changed for most users, so the
    equality is not the first stage's alone. rerank=False writes no re-ranker."""
    from conftest import FAST_PARAMS

    from rentalml.export.bundle import write_bundle
    from rentalml.runtime.bundle import Bundle
    from rentalml.runtime.pipeline import Engine
    from rentalml.training.trainer import fit_model

    train, _ = splits()
    fitted = fit_model("hybrid", market, train, params={**FAST_PARAMS, "rerank": True}, seed=3)
    assert fitted.params["reranked"] is True and fitted.train_times is not None
    bundle = Bundle(write_bundle(fitted, market, tmp_path / "b", quantize=False, drift_reference=False,
                                 checkpoint=False))
    assert bundle.reranker is not None and bundle.meta["rerank"]["candidates"] == 100
    users = np.arange(len(fitted.user_ids))
    seen = fitted.train[users].nonzero()
    offline = fitted.score_users(users)
    offline[seen] = -np.inf
    first = fitted.first_stage_scores(users)
    first[seen] = -np.inf
    top = np.argsort(-offline, axis=1, kind="stable")[:, :10]
    top_first = np.argsort(-first, axis=1, kind="stable")[:, :10]
    served = Engine(bundle).recommend(list(fitted.user_ids), k=10).property_ids
    want = fitted.item_ids[top]
    assert (served == want).all(), np.flatnonzero((served != want).any(1))[:5]
    assert (top != top_first).any(1).mean() > 0.5
    # the two-graph path (retrieval.onnx → ranker.onnx, C = the catalogue) re-ranks to the same lists
    from rentalml.runtime.features import Filters
    from rentalml.runtime.pipeline import Pipeline
    from rentalml.runtime.stages import LocalStages

    class TwoStageOnly(LocalStages):
        exact = False

    two = Pipeline(bundle, stages=TwoStageOnly(bundle), n_candidates=bundle.n_items).run(
        list(fitted.user_ids), 10, Filters(available_only=False)).property_ids
    assert (two == want).all(), np.flatnonzero((two != want).any(1))[:5]

    # the history's times at serving: the bundle's for training pairs, the request's now for streamed ones
    user, own, when = str(fitted.user_ids[0]), bundle.user_history[0], bundle.user_history_times[0]
    np.testing.assert_array_equal(bundle.history_times(user, own, 99.0), when)
    fresh = next(i for i in range(bundle.n_items) if i not in set(own.tolist()))
    np.testing.assert_array_equal(bundle.history_times(user, np.r_[own[1:], [fresh]], 99.0), np.r_[when[1:], 99.0])
    assert (bundle.history_times("nobody", np.array([1, 2]), 99.0) == 99.0).all()

    plain = fit_model("hybrid", market, train, params={**FAST_PARAMS, "rerank": False}, seed=3)
    assert plain.params["reranked"] is False and plain.train_times is None
    assert "rerank" not in Bundle(write_bundle(plain, market, tmp_path / "p", quantize=False,
                                               drift_reference=False, checkpoint=False)).meta


def test_hybrid_reranker_lifts_albany():
    """Through the harness's own fit and evaluation (Albany, users >= 2 reviews, seed 1): the hybrid learns the
    re-ranker on its validation holdout, keeps it there, and lifts test nDCG@10 by more than 0.01 over its own
    first stage (issue #14's 0.26 bar is the 5-seed mean: docs/benchmarks.md)."""
    from rentalml.data.loaders import load_airbnb, shared_data_dir
    from rentalml.evaluation.evaluate import evaluate
    from rentalml.evaluation.protocols import split
    from rentalml.training.trainer import fit_model

    base = shared_data_dir()
    if base is None or not (base / "airbnb-albany").is_dir():
        pytest.skip(f"../shared/data/airbnb-albany not present (shared_data_dir() = {base})")
    ds = load_airbnb(min_user_reviews=2)
    train, test = split(ds.interactions, "random-75-25", 1)
    with_rr = fit_model("hybrid", ds, train, seed=1)
    assert with_rr.params["reranked"] is True  # chosen on validation, out of fold, over RERANK_MIN_GAIN
    without = dataclasses.replace(with_rr, train_times=None)  # the same blend, its first stage alone
    a, b = evaluate(with_rr, test, 10)["ndcg@10"], evaluate(without, test, 10)["ndcg@10"]
    print(f"hybrid nDCG@10 with the re-ranker {a:.4f}, without {b:.4f}")
    assert a > b + 0.01, (a, b)
