"""Two-stage serving graphs (retrieval.onnx → [ANN index] → ranker.onnx) against the one-graph scorer.
The ANN index on its own: tests/test_retrieval.py."""

from __future__ import annotations

import pickle

import numpy as np
import onnxruntime as ort
import pytest

from rentalml.export.bundle import write_bundle
from rentalml.runtime.bundle import Bundle, read_meta
from rentalml.runtime.retrieval import DEFAULT_BACKEND, recall_at_n
from rentalml.runtime.two_stage import TwoStage, two_stage_topk

N_USERS = 100


def _scorer_topk(b: Bundle, users: np.ndarray, k: int):
    feats = b.user_features[users] if b.user_feature_dim else None
    return b.score_histories([b.user_history[u] for u in users], k, feats)


def _two_stage(b: Bundle, users: np.ndarray, k: int, n_candidates=None, search=None):
    feats = b.user_features[users] if b.user_feature_dim else None
    return two_stage_topk(b, [b.user_history[u] for u in users], k, n_candidates, feats, search)


@pytest.fixture(scope="module")
def bundles(fit, market, tmp_path_factory):
    """hybrid (tower + item-item blend) with C = the whole catalogue and in ANN mode; collaborative tower."""
    root = tmp_path_factory.mktemp("two_stage")
    hybrid = fit("hybrid", beta=5.0)
    n = len(hybrid.item_ids)
    return {
        "full": write_bundle(hybrid, market, root / "full", quantize=False, drift_reference=False,
                             n_candidates=n, ann_min_items=10**9),
        "ann": write_bundle(hybrid, market, root / "ann", quantize=False, drift_reference=False,
                            n_candidates=n, ann_min_items=0),
        "collaborative": write_bundle(fit("collaborative"), market, root / "collab", quantize=False,
                                      drift_reference=False, n_candidates=n, ann_min_items=10**9),
        "itemitem": write_bundle(fit("itemitem"), market, root / "ii", quantize=False, drift_reference=False),
    }


def test_graph_interfaces(bundles):
    meta = read_meta(bundles["full"])["two_stage"]
    assert meta["mode"] == "brute_force" and meta["ann_index"] is None
    ret = ort.InferenceSession(str(bundles["full"] / "retrieval.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in ret.get_inputs()] == ["history", "user_features"]
    assert [o.name for o in ret.get_outputs()] == ["candidates", "candidate_scores"]
    rank = ort.InferenceSession(str(bundles["full"] / "ranker.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in rank.get_inputs()] == ["history", "candidates", "user_features"]
    assert [o.name for o in rank.get_outputs()] == ["indices", "scores"]
    ann = read_meta(bundles["ann"])["two_stage"]
    assert ann["mode"] == "ann" and ann["ann"]["backend"] == DEFAULT_BACKEND
    assert ann["ann_index"] == ann["ann"]["files"][0] and (bundles["ann"] / ann["ann_index"]).exists()
    ret = ort.InferenceSession(str(bundles["ann"] / "retrieval.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in ret.get_outputs()] == ["user_embedding"]
    # models without a two-tower part keep the one-graph scorer only
    assert "two_stage" not in read_meta(bundles["itemitem"])
    assert not (bundles["itemitem"] / "retrieval.onnx").exists()


@pytest.mark.parametrize("key", ["full", "collaborative", "ann"])
def test_candidates_covering_the_catalogue_give_the_scorer_topk(bundles, key):
    """N ≥ catalogue: retrieval + ranker == scorer.onnx (the ranker re-scores with tower + beta · item-item).
    In ANN mode with an exhaustive search (every list probed) the index is exact, so the same holds."""
    b = Bundle(bundles[key])
    users = np.arange(N_USERS)
    ref_idx, ref_sc = _scorer_topk(b, users, 10)
    idx, sc = _two_stage(b, users, 10, search="exhaustive" if key == "ann" else None)
    assert idx.shape == sc.shape == (N_USERS, 10) and idx.dtype == np.int64 and sc.dtype == np.float32
    np.testing.assert_allclose(sc, ref_sc, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(idx, ref_idx)
    for u, row in zip(users, idx, strict=True):
        assert not set(row) & set(b.user_history[u])


def test_fewer_candidates_recall_against_the_full_scorer(bundles):
    b = Bundle(bundles["full"])
    users = np.arange(N_USERS)
    ref_idx, _ = _scorer_topk(b, users, 10)
    recalls = {}
    for c in (20, 50, 100, b.n_items):
        idx, sc = _two_stage(b, users, 10, n_candidates=c)
        assert (np.diff(sc, axis=1) <= 0).all()
        recalls[c] = recall_at_n(idx, ref_idx)
    print(f"\ntwo-stage recall@10 vs the full scorer ({b.n_items} properties, hybrid beta=5): "
          + ", ".join(f"C={c}: {r:.3f}" for c, r in recalls.items()))
    assert recalls[b.n_items] == 1.0
    assert recalls[20] <= recalls[50] <= recalls[100] <= 1.0
    assert recalls[100] >= 0.8


def test_ann_default_probe_recall(bundles):
    b = Bundle(bundles["ann"])
    users = np.arange(N_USERS)
    ref_idx, _ = _scorer_topk(b, users, 10)
    idx, _ = _two_stage(b, users, 10)
    r = recall_at_n(idx, ref_idx)
    print(f"\nANN-mode two-stage recall@10 vs full scorer at the default search setting: {r:.3f}")
    assert r >= 0.5


def test_two_stage_pickle_and_bad_input(bundles):
    b = Bundle(bundles["full"])
    assert b.has_two_stage and not Bundle(bundles["itemitem"]).has_two_stage
    users = np.arange(5)
    hist = [b.user_history[u] for u in users]
    ts = TwoStage(b.path)
    a = ts.topk(hist, 7, user_features=b.user_features[users])
    clone = pickle.loads(pickle.dumps(ts))
    assert clone._sessions == {}  # sessions are rebuilt per process
    c = clone.topk(hist, 7, user_features=b.user_features[users])
    np.testing.assert_array_equal(a[0], c[0])
    with pytest.raises(ValueError, match="n_candidates"):
        TwoStage(bundles["full"]).topk(hist, 10, n_candidates=b.n_items + 1)
    with pytest.raises(ValueError, match="two-stage"):
        TwoStage(bundles["itemitem"])
