"""The generated Triton model repository: configs parsed as Triton's ModelConfig (tritonclient's proto),
checked against the ONNX graphs, and the graphs run by ONNX Runtime with exactly the configs' dims."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from rentalml.export.bundle import Bundle, write_bundle
from rentalml.export.onnx_export import pad_histories
from rentalml.export.triton import (
    ENSEMBLE,
    RANKER,
    RETRIEVAL,
    SCORER,
    ensemble_reference,
    load_config,
    validate_triton_repo,
    write_triton_repo,
)


@pytest.fixture(scope="module")
def bundles(fit, market, tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    hybrid = fit("hybrid", beta=5.0)
    return {
        "brute": write_bundle(hybrid, market, root / "brute", quantize=False, drift_reference=False,
                              n_candidates=50, ann_min_items=10**9),
        "ann": write_bundle(hybrid, market, root / "ann", quantize=False, drift_reference=False,
                            n_candidates=50, ann_min_items=0),
        "itemitem": write_bundle(fit("itemitem"), market, root / "ii", quantize=False, drift_reference=False),
    }


def test_cpu_repository_layout_and_configs(bundles, tmp_path):
    repo = write_triton_repo(bundles["brute"], tmp_path / "repo", max_batch_size=32, instances=2, k=20)
    assert sorted(p.name for p in repo.iterdir()) == sorted([SCORER, RETRIEVAL, RANKER, ENSEMBLE])
    for name in (SCORER, RETRIEVAL, RANKER):
        assert (repo / name / "1" / "model.onnx").exists()
        cfg = load_config(repo / name / "config.pbtxt")
        assert cfg.name == name and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 32
        assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 32]
        assert cfg.dynamic_batching.max_queue_delay_microseconds > 0
        assert [(g.kind, g.count) for g in cfg.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 2)]
        assert not cfg.optimization.execution_accelerators.gpu_execution_accelerator
    n_feat = Bundle(bundles["brute"]).user_feature_dim
    scorer = load_config(repo / SCORER / "config.pbtxt")
    assert [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in scorer.input] == [
        ("history", "TYPE_INT64", [256]), ("user_features", "TYPE_FP32", [n_feat])]
    assert [(t.name, list(t.dims)) for t in scorer.output] == [("indices", [20]), ("scores", [20])]
    ranker = load_config(repo / RANKER / "config.pbtxt")
    assert [(t.name, list(t.dims)) for t in ranker.input] == [("history", [256]), ("candidates", [50]),
                                                              ("user_features", [n_feat])]
    ens = load_config(repo / ENSEMBLE / "config.pbtxt")
    assert ens.platform == "ensemble"
    assert [s.model_name for s in ens.ensemble_scheduling.step] == [RETRIEVAL, RANKER]
    assert validate_triton_repo(repo) == []


def test_gpu_repository_uses_tensorrt_fp16(bundles, tmp_path):
    repo = write_triton_repo(bundles["brute"], tmp_path / "repo", gpu=True)
    for name in (SCORER, RETRIEVAL, RANKER):
        cfg = load_config(repo / name / "config.pbtxt")
        assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
        (acc,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
        assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP16"
    assert validate_triton_repo(repo) == []


def test_repository_graphs_agree_with_the_bundle(bundles, tmp_path):
    """rental-scorer (k baked) == the bundle scorer's top-k; the ensemble's steps == two_stage_topk."""
    repo = write_triton_repo(bundles["brute"], tmp_path / "repo", k=10)
    b = Bundle(bundles["brute"])
    users = np.arange(40)
    hist = pad_histories([b.user_history[u] for u in users], b.n_items, b.history_len)
    feats = b.user_features[users]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(repo / SCORER / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    idx, sc = sess.run(None, {"history": hist, "user_features": feats})
    ref_idx, ref_sc = b.score_histories([b.user_history[u] for u in users], 10, feats)
    np.testing.assert_array_equal(idx, ref_idx)
    e_idx, e_sc = ensemble_reference(repo, hist, feats)
    t_idx, t_sc = b.score_histories_two_stage([b.user_history[u] for u in users], 50, feats)
    np.testing.assert_array_equal(e_idx, t_idx)
    np.testing.assert_allclose(e_sc, t_sc, rtol=1e-5)


def test_ann_and_itemitem_repositories(bundles, tmp_path):
    repo = write_triton_repo(bundles["ann"], tmp_path / "ann")
    assert not (repo / ENSEMBLE).exists()  # the IVF search runs in the transformer between the two models
    ret = load_config(repo / RETRIEVAL / "config.pbtxt")
    assert [t.name for t in ret.output] == ["user_embedding"]
    assert validate_triton_repo(repo) == []
    repo = write_triton_repo(bundles["itemitem"], tmp_path / "ii")
    assert [p.name for p in repo.iterdir()] == [SCORER]
    assert validate_triton_repo(repo) == []


def test_validation_catches_mismatches(bundles, tmp_path):
    repo = write_triton_repo(bundles["brute"], tmp_path / "repo")
    cfg_path = repo / RANKER / "config.pbtxt"
    good = cfg_path.read_text()
    cfg_path.write_text(good.replace('{ name: "candidates" data_type: TYPE_INT64',
                                     '{ name: "candidates" data_type: TYPE_INT32'))
    errs = validate_triton_repo(repo)
    assert any("rental-ranker.candidates" in e and "TYPE_INT32" in e for e in errs), errs
    assert any("rental-two-stage" in e and "candidates" in e for e in errs), errs
    cfg_path.write_text(good.replace('dims: [ 256 ]', 'dims: [ 128 ]', 1))
    errs = validate_triton_repo(repo)
    assert any("rental-ranker.history" in e and "dims" in e for e in errs), errs
    cfg_path.write_text(good.replace("max_batch_size", "max_batch_sise"))
    assert any("rental-ranker/config.pbtxt" in e for e in validate_triton_repo(repo))
    msg = text_format.Parse(good, model_config_pb2.ModelConfig())
    assert msg.name == RANKER


def test_cli_export_with_triton(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RENTALML_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "rentalml.cli", "export", "--data", "synthetic:150,80,2000", "--model",
           "hybrid", "--params", json.dumps({"epochs": 2, "neighbours": 16}), "--out", str(tmp_path / "bundle"),
           "--triton", str(tmp_path / "triton")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert doc["validated"] and doc["models"] == sorted([SCORER, RETRIEVAL, RANKER, ENSEMBLE])
    assert validate_triton_repo(tmp_path / "triton") == []
    bad = subprocess.run([sys.executable, "-m", "rentalml.cli", "triton-repo", "--bundle", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "t2")], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode != 0 and "bundle.json" in bad.stderr
