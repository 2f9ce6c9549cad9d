"""The retrieval interface (rentalml.runtime.retrieval.TopK) and its backends: brute force, numpy IVF, faiss
IVF-Flat and faiss HNSW, all by inner product. Speed and recall at 100k / 1M: benchmarks/retrieval.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rentalml.runtime import retrieval
from rentalml.runtime.retrieval import BACKENDS, DEFAULT_BACKEND, make, recall_at_n

ANN = [b for b in BACKENDS if b != "brute"]


def clustered(n: int, n_queries: int, dim: int = 32, n_centres: int = 100, seed: int = 0):
    """Tower-like vectors: items around centres with varying norms and a bias column ([v, b]); queries [u, 1]."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_centres, dim)) * 3 / np.sqrt(dim)
    pop = rng.lognormal(0.0, 0.5, n)
    v = (centres[rng.integers(0, n_centres, n)] + rng.normal(size=(n, dim)) / np.sqrt(dim)) * np.sqrt(pop)[:, None]
    b = 0.3 * np.log(pop) + 0.2 * rng.normal(size=n)
    u = centres[rng.integers(0, n_centres, n_queries)] + rng.normal(size=(n_queries, dim)) / np.sqrt(dim)
    return (np.hstack([v, b[:, None]]).astype(np.float32),
            np.hstack([u, np.ones((n_queries, 1))]).astype(np.float32))


@pytest.fixture(scope="module")
def small():
    x, q = clustered(3000, 100)
    scores, ids = make("brute").index(x).query(q, 200)
    return x, q, scores, ids


@pytest.mark.parametrize("name", ANN)
def test_exhaustive_search_gives_the_brute_force_topk(small, name):
    """Every ANN backend at full probe returns exactly brute force's top-200 (same set per row, same scores,
    best first). IVF: every list scanned (nprobe = n_lists), exact by construction. HNSW: a beam as wide as
    the catalogue (ef_search = n) never fills, so the walk visits every node reachable in the graph: exact on
    this connected 3,000-node graph, which the equality checks."""
    x, q, ref_scores, ref_ids = small
    index = make(name).index(x)
    scores, ids = index.query(q, 200, "exhaustive")
    assert ids.shape == scores.shape == (100, 200) and ids.dtype == np.int64 and scores.dtype == np.float32
    for a, e in zip(ids, ref_ids, strict=True):
        assert set(a) == set(e)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()


@pytest.mark.parametrize("name", list(BACKENDS))
def test_identifiers_padding_and_a_saved_index(small, name, tmp_path):
    """Identifiers come back instead of row numbers; k beyond the catalogue pads with -1 / -inf; a saved and
    reloaded index answers the same."""
    x, q, _, ref_ids = small
    ids_of_rows = np.random.default_rng(1).permutation(len(x)).astype(np.int64) + 10_000
    index = make(name).index(x, ids_of_rows)
    scores, ids = index.query(q[:5], 50, "exhaustive")
    np.testing.assert_array_equal(np.sort(ids, 1), np.sort(ids_of_rows[ref_ids[:5, :50]], 1))
    record = index.save(tmp_path)
    assert json.loads(json.dumps(record)) == record  # it goes into bundle.json
    again = retrieval.load(tmp_path, record)
    assert type(again) is type(index) and again.search_params == index.search_params
    s2, i2 = again.query(q[:5], 50)
    s1, i1 = index.query(q[:5], 50)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2)
    tiny = make(name).index(x[:30])
    s, i = tiny.query(q[:2], 40, "exhaustive")
    assert (i[:, :30] >= 0).all() and (i[:, 30:] == -1).all() and np.isneginf(s[:, 30:]).all()


def test_default_backend_reaches_the_recall_target_at_its_default_setting():
    """The served backend at the setting bundles are written with: recall@200 ≥ 0.95 against brute force on
    20k clustered tower-like vectors (the 100k / 1M figures: benchmarks/retrieval.py)."""
    x, q = clustered(20_000, 300, n_centres=200, seed=3)
    _, exact = make("brute").index(x).query(q, 200)
    index = make(DEFAULT_BACKEND).index(x)
    _, ids = index.query(q, 200)
    r = recall_at_n(ids, exact)
    print(f"\n{DEFAULT_BACKEND} {index.build_params} {index.search_params}: recall@200 {r:.4f}")
    assert r >= 0.95


def test_bad_input_is_refused_with_a_clear_error(small):
    x, q, _, _ = small
    with pytest.raises(ValueError, match="unknown retrieval backend"):
        make("annoy")
    with pytest.raises(ValueError, match="unknown parameters"):
        make("faiss_ivf", ef_search=10)
    index = make("faiss_ivf").index(x)
    with pytest.raises(ValueError, match="dim"):
        index.query(q[:, :-1], 10)
    with pytest.raises(ValueError, match="k must be"):
        index.query(q, 0)
    with pytest.raises(ValueError, match="unknown search parameters"):
        index.query(q, 10, {"ef_search": 10})
    with pytest.raises(ValueError, match="identifiers"):
        make("brute").index(x, np.arange(3))
    with pytest.raises(RuntimeError, match="before index"):
        make("brute").query(q, 10)
    assert index.query(q[:3], 10)[1].shape == (3, 10)  # the index still answers


@pytest.mark.parametrize("configured", ["faiss_hnsw", DEFAULT_BACKEND])
def test_the_served_path_searches_the_configured_backend(fit, market, tmp_path, monkeypatch, configured):
    """export.ann_backend decides the index a bundle carries (bundle.json two_stage.ann); the runtime's Engine
    answers through that index (loaded on first use by the stages' retriever)."""
    from rentalml.config import get_settings
    from rentalml.export.bundle import write_bundle
    from rentalml.runtime import Bundle, Engine

    if configured != DEFAULT_BACKEND:
        monkeypatch.setenv("RENTALML_EXPORT__ANN_BACKEND", configured)
    get_settings.cache_clear()
    try:
        path = write_bundle(fit("hybrid"), market, tmp_path / "b", quantize=False, drift_reference=False,
                            ann_min_items=0)
    finally:
        monkeypatch.delenv("RENTALML_EXPORT__ANN_BACKEND", raising=False)
        get_settings.cache_clear()
    record = Bundle(path).meta["two_stage"]["ann"]
    assert record["backend"] == configured and (path / record["files"][0]).is_file()
    engine = Engine(Bundle(path))
    assert not engine.stages.exact and engine.stages.two_stage._index is None
    users = list(Bundle(path).user_index[:20])
    recs = engine.recommend(users, k=10)
    index = engine.stages.two_stage._index
    assert isinstance(index, retrieval.backend(configured)) and index.search_params == {
        k: v for k, v in record["params"].items() if k in index.search_params}
    assert recs.property_ids.shape == (20, 10) and (recs.property_ids != "").all()
