"""ONNX export parity (real ONNX Runtime), int8 quantization and the model bundle."""

from __future__ import annotations

import json
import pickle

import numpy as np
import onnxruntime as ort
import pytest
import scipy.sparse as sp

from rentalml.data.dataset import InteractionMatrix
from rentalml.evaluation.metrics import ranking_metrics
from rentalml.export.bundle import write_bundle
from rentalml.export.onnx_export import export_scorer, quantize_int8
from rentalml.runtime.bundle import FORMAT_VERSION, Bundle
from rentalml.runtime.features import Filters
from rentalml.runtime.history import pad_histories
from rentalml.runtime.pipeline import Pipeline


def _recommend(bundle, users, k):
    """The runtime's lists without business rules: the scorer's top-k, cold users from the fallback."""
    return Pipeline(bundle).run(users, k, Filters(available_only=False))

HISTORY_LEN = 256
N_USERS = 100
EXPORTS = {  # test id -> (model name, extra params)
    "hybrid": ("hybrid", {}),
    "hybrid-blend": ("hybrid", {"beta": 5.0}),
    "itemitem": ("itemitem", {}),
    "collaborative": ("collaborative", {}),
    "content": ("content", {}),
    "popularity": ("popularity", {}),
}


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(sess: ort.InferenceSession, fitted, users: np.ndarray, k: int):
    feed = {"history": pad_histories([fitted.train[u].indices for u in users], len(fitted.item_ids), HISTORY_LEN),
            "k": np.array([k], dtype=np.int64)}
    if "user_features" in {i.name for i in sess.get_inputs()}:
        feed["user_features"] = fitted.user_features[users].astype(np.float32)
    return sess.run(None, feed)


def _reference(fitted, users: np.ndarray, k: int, served: bool = False):
    """The numpy/PyTorch path: score (the model's own scores, which the graph computes; a hybrid's learned
    re-ranker runs after the graph, in the runtime's rank step, and is applied only with `served`), mask the
    user's training items, stable argsort."""
    s = (fitted.score_users(users) if served else fitted.first_stage_scores(users)).astype(np.float32)
    s[fitted.train[users].nonzero()] = -np.inf
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return top, np.take_along_axis(s, top, axis=1)


@pytest.fixture(scope="module")
def exported(fit, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    return {key: (fit(name, **extra), export_scorer(fit(name, **extra), out / f"{key}.onnx", HISTORY_LEN))
            for key, (name, extra) in EXPORTS.items()}


@pytest.mark.parametrize("key", list(EXPORTS))
def test_onnx_top10_matches_reference(exported, key):
    fitted, path = exported[key]
    sess = _session(path)
    users = np.arange(N_USERS)
    idx, scores = _run(sess, fitted, users, 10)
    ref_idx, ref_scores = _reference(fitted, users, 10)
    assert idx.shape == scores.shape == (N_USERS, 10)
    assert idx.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-4)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_graph_interface(exported):
    fitted, path = exported["hybrid"]
    sess = _session(path)
    ins = {i.name: i for i in sess.get_inputs()}
    assert list(ins) == ["history", "k", "user_features"]
    assert ins["history"].type == "tensor(int64)" and ins["user_features"].type == "tensor(float)"
    assert [o.name for o in sess.get_outputs()] == ["indices", "scores"]
    assert [i.name for i in _session(exported["popularity"][1]).get_inputs()] == ["history", "k"]


@pytest.mark.parametrize("key", ["hybrid", "popularity"])
def test_k_is_an_input(exported, key):
    fitted, path = exported[key]
    sess = _session(path)
    users = np.arange(N_USERS)
    idx5, s5 = _run(sess, fitted, users, 5)
    idx10, s10 = _run(sess, fitted, users, 10)
    assert idx5.shape == s5.shape == (N_USERS, 5)
    np.testing.assert_array_equal(idx5, idx10[:, :5])
    idx1, _ = _run(sess, fitted, users[:3], 1)
    assert idx1.shape == (3, 1)


@pytest.mark.parametrize("key", list(EXPORTS))
def test_history_items_never_recommended(exported, key):
    fitted, path = exported[key]
    n = len(fitted.item_ids)
    users = np.arange(N_USERS)
    idx, _ = _run(_session(path), fitted, users, 50)
    for u, row in zip(users, idx, strict=True):
        assert not set(row) & set(fitted.train[u].indices)
        assert len(set(row)) == len(row) and row.min() >= 0 and row.max() < n  # never the padding index


def test_new_history_needs_no_retraining(exported):
    """A history the model never saw (an unknown user) is scored in the graph like the model scores it."""
    fitted, path = exported["hybrid-blend"]
    n = len(fitted.item_ids)
    hist = np.array([[3, 17, 42] + [n] * 5], dtype=np.int64)
    uf = np.zeros((1, fitted.user_features.shape[1]), np.float32)
    idx, scores = _session(path).run(None, {"history": hist, "k": np.array([10]), "user_features": uf})
    h = sp.csr_matrix((np.ones(3, np.float32), ([0, 0, 0], [3, 17, 42])), shape=(1, n))
    s = fitted.model.score(None, h, uf)
    s[0, [3, 17, 42]] = -np.inf
    np.testing.assert_array_equal(idx[0], np.argsort(-s[0], kind="stable")[:10])
    np.testing.assert_allclose(scores[0], np.sort(s[0])[::-1][:10], rtol=1e-4, atol=1e-4)


def test_int8_quantized_scorer(exported, splits, tmp_path):
    fitted, path = exported["hybrid-blend"]
    q = quantize_int8(path, tmp_path / "scorer.int8.onnx")
    assert q.exists() and q.stat().st_size < path.stat().st_size
    users = np.arange(N_USERS)
    fp32, _ = _run(_session(path), fitted, users, 10)
    int8, int8_scores = _run(_session(q), fitted, users, 10)
    assert int8.shape == (N_USERS, 10) and np.isfinite(int8_scores).all()
    overlap = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(fp32, int8, strict=True)]))
    _, test = splits("random-75-25")
    rel = InteractionMatrix.build(test, item_ids=fitted.item_ids, user_ids=fitted.user_ids).binary()[users]
    has = np.diff(rel.indptr) > 0
    ndcg_fp32 = float(ranking_metrics(fp32[has], rel[has], 10)["ndcg"].mean())
    ndcg_int8 = float(ranking_metrics(int8[has], rel[has], 10)["ndcg"].mean())
    print(f"\nint8 vs fp32 on {N_USERS} users: top-10 overlap {overlap:.3f}, "
          f"ndcg@10 fp32 {ndcg_fp32:.4f} int8 {ndcg_int8:.4f} delta {ndcg_int8 - ndcg_fp32:+.4f}")
    assert overlap > 0.5


# ------------------------------------------------------------------ bundle
@pytest.fixture(scope="module")
def bundle_dir(fit, market, tmp_path_factory):
    fitted = fit("hybrid", beta=5.0)
    return write_bundle(fitted, market, tmp_path_factory.mktemp("bundle") / "b", model_name="test-recommender",
                        model_version="3", metrics={"ndcg@10": 0.25},
                        feature_views=["user_activity", "property_stats"])


def test_bundle_files_and_contract_fields(bundle_dir, fit, market):
    names = {p.name for p in bundle_dir.iterdir()}
    assert {"bundle.json", "scorer.onnx", "scorer.int8.onnx", "users.parquet", "properties.parquet",
            "popularity.parquet", "item_vectors.npy", "encoders.json"} <= names
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    for key in ("format_version", "model_name", "model_version", "created_at", "data_snapshot", "feature_views",
                "metrics", "code_version"):
        assert key in meta, key
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["model_name"] == "test-recommender" and meta["model_version"] == "3"
    assert meta["data_snapshot"] == market.snapshot_hash()
    assert meta["feature_views"] == ["user_activity", "property_stats"]
    assert meta["metrics"] == {"ndcg@10": 0.25}
    assert meta["code_version"] and meta["created_at"]
    fitted = fit("hybrid", beta=5.0)
    assert meta["graph"]["n_items"] == len(fitted.item_ids)
    assert meta["graph"]["user_feature_dim"] == fitted.user_features.shape[1]


def test_bundle_recommends_known_and_unknown_users(bundle_dir, fit):
    fitted = fit("hybrid", beta=5.0)
    b = Bundle(bundle_dir)
    known = [str(u) for u in fitted.user_ids[:20]]
    recs = _recommend(b, [*known, "nobody-knows-me"], 10)
    assert recs.sources == ["model"] * 20 + ["cold_start"]
    assert recs.property_ids.shape == recs.scores.shape == (21, 10)
    assert all(p != "" for p in recs.property_ids.ravel())
    item_pos = {p: i for i, p in enumerate(fitted.item_ids)}
    ref_idx, _ = _reference(fitted, np.arange(20), 10, served=True)
    for r, u in enumerate(range(20)):
        got = [item_pos[p] for p in recs.property_ids[r]]
        assert not set(got) & set(fitted.train[u].indices)  # history never recommended
        assert len(set(got) & set(ref_idx[r])) >= 9  # same model as the in-memory one
        assert b.known(known[r]) and set(b.history_of(known[r])) == set(fitted.train[u].indices)
    # the unknown user gets the global popularity fallback
    pop = np.asarray(fitted.train.sum(0)).ravel()
    top_pop = fitted.item_ids[np.argsort(-pop, kind="stable")[:10]]
    assert list(recs.property_ids[-1]) == list(top_pop)
    assert not b.known("nobody-knows-me")


def test_bundle_int8_and_pickle(bundle_dir):
    b = Bundle(bundle_dir)
    users = [str(u) for u in b.user_index[:5]]
    before = _recommend(b, users, 7)
    clone = pickle.loads(pickle.dumps(b))
    assert clone._session is None
    after = _recommend(clone, users, 7)
    np.testing.assert_array_equal(before.property_ids, after.property_ids)
    np.testing.assert_allclose(before.scores, after.scores)
    q = Bundle(bundle_dir, int8=True)
    rq = _recommend(q, users, 7)
    assert rq.property_ids.shape == (5, 7) and rq.sources == ["model"] * 5
    assert not np.array_equal(rq.scores, before.scores)  # the quantized graph is the one that ran
    assert len(set(rq.property_ids[0]) & set(before.property_ids[0])) >= 4


def test_hybrid_cold_properties_borrow_content_neighbours_in_graph(fit, tmp_path):
    """Under cold-start-items, never-seen properties get the item-item score of their nearest interacted
    property in content space (shrunk): same in ONNX as in PyTorch, and cold properties reach top-10 lists."""
    fitted = fit("hybrid", "cold-start-items")
    model = fitted.model
    cold = np.flatnonzero(np.asarray(fitted.train.sum(0)).ravel() == 0)
    assert len(cold) > 0
    assert (model.proxy[cold] != cold).all() and (model.proxy_w[cold] < 1).all()
    warm = np.setdiff1d(np.arange(len(fitted.item_ids)), cold)
    assert (model.proxy[warm] == warm).all() and (model.proxy_w[warm] == 1).all()
    path = export_scorer(fitted, tmp_path / "cold.onnx", HISTORY_LEN)
    users = np.arange(N_USERS)
    idx, scores = _run(_session(path), fitted, users, 10)
    ref_idx, ref_scores = _reference(fitted, users, 10)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-4)
    assert np.isin(idx, cold).any()
