"""The generated Triton model repository: versioned layout (Triton versions = MLflow versions), configs built and
parsed as Triton's ModelConfig (tritonclient's proto), checked against the ONNX graphs, the graphs run by ONNX
Runtime with exactly the configs' dims, and the python-backend twin that real Triton runs in tests.

Triton's repository rules used here (triton-inference-server/server r24.10 = Triton 2.51, the nvidia-pytriton
0.7.0 binary; docs/user_guide/model_repository.md): numeric version sub-folders, `version_policy` deciding which
are served; docs/user_guide/model_configuration.md for instance_group / dynamic_batching / version_policy;
docs/user_guide/optimization.md ("ONNX with TensorRT Optimization (ORT-TRT)") for the gpu_execution_accelerator
`tensorrt` with `precision_mode` FP16. Object stores have no folders, only keys: an empty version folder does not
survive an upload (issue 11, defect 9).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2

from rentalml.export.bundle import write_bundle
from rentalml.export.triton import (
    ENSEMBLE,
    MARKER,
    RANKER,
    RETRIEVAL,
    SCORER,
    compare_twin,
    ensemble_reference,
    load_config,
    triton_version,
    twin_dir,
    validate_triton_repo,
    versions,
    write_config,
    write_python_twin,
    write_triton_repo,
)
from rentalml.runtime.bundle import Bundle
from rentalml.runtime.history import pad_histories
from rentalml.runtime.two_stage import two_stage_topk

KIND_CPU, KIND_GPU = model_config_pb2.ModelInstanceGroup.KIND_CPU, model_config_pb2.ModelInstanceGroup.KIND_GPU


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
    repo = write_triton_repo(bundles["brute"], tmp_path / "repo", max_batch_size=32, instances=2, k=20, gpu=False)
    assert sorted(p.name for p in repo.iterdir()) == sorted([SCORER, RETRIEVAL, RANKER, ENSEMBLE])
    for name in (SCORER, RETRIEVAL, RANKER):
        assert (repo / name / "1" / "model.onnx").exists() and (repo / name / "1" / MARKER).exists()
        cfg = load_config(repo / name / "config.pbtxt")
        assert cfg.name == name and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 32
        assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 32]
        assert cfg.dynamic_batching.max_queue_delay_microseconds > 0
        assert [(g.kind, g.count) for g in cfg.instance_group] == [(KIND_CPU, 2)]
        assert not cfg.optimization.execution_accelerators.gpu_execution_accelerator
        assert cfg.version_policy.WhichOneof("policy_choice") == "all"  # every published version is served
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
    assert [(s.model_name, s.model_version) for s in ens.ensemble_scheduling.step] == [(RETRIEVAL, 1), (RANKER, 1)]
    assert validate_triton_repo(repo) == []


def test_gpu_repository_uses_tensorrt_fp16(bundles, tmp_path):
    repo = write_triton_repo(bundles["brute"], tmp_path / "repo", gpu=True)
    for name in (SCORER, RETRIEVAL, RANKER):
        cfg = load_config(repo / name / "config.pbtxt")
        assert cfg.instance_group[0].kind == KIND_GPU
        (acc,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
        assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP16"
    assert validate_triton_repo(repo) == []


def test_gpu_export_follows_the_settings(bundles, tmp_path, monkeypatch):
    """Defect 14 (export half): the pipeline's export step calls write_triton_repo without arguments, so the
    GPU choice must come from the settings the prod overlay sets (RENTALML_EXPORT__TRITON_GPU=true)."""
    from rentalml.config import get_settings

    monkeypatch.setenv("RENTALML_EXPORT__TRITON_GPU", "true")
    get_settings.cache_clear()
    try:
        repo = write_triton_repo(bundles["brute"], tmp_path / "gpu")
    finally:
        monkeypatch.delenv("RENTALML_EXPORT__TRITON_GPU")
        get_settings.cache_clear()
    for name in (SCORER, RETRIEVAL, RANKER):
        cfg = load_config(repo / name / "config.pbtxt")
        assert cfg.instance_group[0].kind == KIND_GPU
        assert cfg.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
    cpu = write_triton_repo(bundles["brute"], tmp_path / "cpu")
    assert load_config(cpu / RANKER / "config.pbtxt").instance_group[0].kind == KIND_CPU


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
    t_idx, t_sc = two_stage_topk(b, [b.user_history[u] for u in users], 50, user_features=feats)
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
    good = load_config(cfg_path)
    bad = model_config_pb2.ModelConfig()
    bad.CopyFrom(good)
    next(t for t in bad.input if t.name == "candidates").data_type = model_config_pb2.TYPE_INT32
    write_config(bad, cfg_path)
    errs = validate_triton_repo(repo)
    assert any("rental-ranker.candidates" in e and "TYPE_INT32" in e for e in errs), errs
    assert any("rental-two-stage" in e and "candidates" in e for e in errs), errs
    bad.CopyFrom(good)
    bad.input[0].dims[0] = 128
    write_config(bad, cfg_path)
    errs = validate_triton_repo(repo)
    assert any("rental-ranker.history" in e and "dims" in e for e in errs), errs
    cfg_path.write_text(cfg_path.read_text().replace("max_batch_size", "max_batch_sise"))
    assert any("rental-ranker/config.pbtxt" in e for e in validate_triton_repo(repo))
    write_config(good, cfg_path)
    ens = load_config(repo / ENSEMBLE / "config.pbtxt")
    ens.ensemble_scheduling.step[1].model_version = 9
    write_config(ens, repo / ENSEMBLE / "config.pbtxt")
    assert any("pins version 9" in e for e in validate_triton_repo(repo, run=False))


def _object_store_round_trip(repo, dest):
    """What an upload to S3/GCS and KServe's storage initializer's download keep: the files (keys), nothing else
    (a folder exists only as the prefix of a key)."""
    for f in repo.rglob("*"):
        if f.is_file():
            (dest / f.relative_to(repo)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest / f.relative_to(repo))
    return dest


def test_versions_accumulate_and_markers_survive_an_object_store(bundles, tmp_path):
    """Defect 9: the ensemble's version folder held no file, so the repository published to an object store
    lost it and Triton found no version of rental-two-stage. Every version folder now holds the marker; one
    repository serves every published version."""
    repo = write_triton_repo(bundles["brute"], tmp_path / "repo", version=3)
    repo = write_triton_repo(bundles["brute"], repo, version=7)
    for name in (SCORER, RETRIEVAL, RANKER):
        assert versions(repo / name) == [3, 7]
    assert versions(repo / ENSEMBLE) == [7]  # the ensemble pins its steps: only the newest version
    assert [s.model_version for s in load_config(repo / ENSEMBLE / "config.pbtxt").ensemble_scheduling.step] == [7, 7]
    marker = json.loads((repo / ENSEMBLE / "7" / MARKER).read_text())
    assert marker["model"] == ENSEMBLE and marker["version"] == 7
    uploaded = _object_store_round_trip(repo, tmp_path / "downloaded")
    for name in (SCORER, RETRIEVAL, RANKER, ENSEMBLE):
        assert versions(uploaded / name) == versions(repo / name), name
    assert validate_triton_repo(uploaded, run=False) == []
    (uploaded / ENSEMBLE / "7" / MARKER).unlink()
    assert any(MARKER in e for e in validate_triton_repo(uploaded, run=False))
    # a twin of the downloaded repository has the same versions too
    twin = write_python_twin(repo)
    assert all(versions(twin / n) == versions(repo / n) for n in (SCORER, RETRIEVAL, RANKER, ENSEMBLE))


def test_version_numbers_come_from_the_registry(bundles, tmp_path):
    meta = json.loads((bundles["brute"] / "bundle.json").read_text())
    assert triton_version(meta) == 1  # unregistered bundle (model_version "0")
    assert triton_version({**meta, "model_version": "12", "registry": {"version": "12"}}) == 12
    assert triton_version(meta, 5) == 5
    with pytest.raises(ValueError):
        triton_version(meta, "0")
    reg = tmp_path / "registered"
    shutil.copytree(bundles["brute"], reg)
    (reg / "bundle.json").write_text(json.dumps({**meta, "model_version": "4",
                                                 "registry": {"name": "rental-recommender", "version": "4"}}))
    repo = write_triton_repo(reg, tmp_path / "repo")
    assert versions(repo / RANKER) == [4]


def test_a_version_may_not_change_the_tensors(bundles, tmp_path):
    """One config.pbtxt serves every version of a model: a version with other widths is refused."""
    repo = write_triton_repo(bundles["brute"], tmp_path / "repo", version=1, k=20)
    with pytest.raises(ValueError, match="rental-scorer"):
        write_triton_repo(bundles["brute"], repo, version=2, k=10)
    assert versions(repo / SCORER) == [1] and not any(p.name.startswith(".") for p in repo.iterdir())
    write_triton_repo(bundles["brute"], repo, version=2, k=10, replace=True)
    assert versions(repo / SCORER) == [2] and versions(repo / RANKER) == [2]


def test_python_twin_matches_its_cluster_config(bundles, tmp_path):
    """The twin that real Triton runs in tests is the cluster repository but for the backend: names, dtypes, dims,
    max_batch_size, dynamic batching, version policy, ensemble steps and versions equal (parsed as ModelConfig)."""
    repo = write_triton_repo(bundles["brute"], tmp_path / "repo", version=2, gpu=True)
    repo = write_triton_repo(bundles["brute"], repo, version=5, gpu=True)
    twin = write_python_twin(repo)
    assert twin == twin_dir(repo) == tmp_path / "repo-python"
    for name in (SCORER, RETRIEVAL, RANKER, ENSEMBLE):
        a, b = load_config(repo / name / "config.pbtxt"), load_config(twin / name / "config.pbtxt")
        assert a.name == b.name == name
        assert [(t.name, t.data_type, list(t.dims)) for t in a.input] == \
            [(t.name, t.data_type, list(t.dims)) for t in b.input]
        assert [(t.name, t.data_type, list(t.dims)) for t in a.output] == \
            [(t.name, t.data_type, list(t.dims)) for t in b.output]
        assert a.max_batch_size == b.max_batch_size and a.dynamic_batching == b.dynamic_batching
        assert a.version_policy == b.version_policy
        assert versions(repo / name) == versions(twin / name)
        if name != ENSEMBLE:
            assert b.backend == "python" and not b.platform
            assert [g.kind for g in b.instance_group] == [KIND_CPU]  # no GPU in the test Triton
            assert not b.optimization.execution_accelerators.gpu_execution_accelerator
            for v in versions(twin / name):
                assert (twin / name / str(v) / "model.py").exists()
                assert (twin / name / str(v) / "model.onnx").read_bytes() == \
                    (repo / name / str(v) / "model.onnx").read_bytes()
        else:
            assert a.ensemble_scheduling == b.ensemble_scheduling
    assert compare_twin(repo, twin) == []
    cfg = load_config(twin / RANKER / "config.pbtxt")
    cfg.max_batch_size = 8
    write_config(cfg, twin / RANKER / "config.pbtxt")
    assert any("max_batch_size" in e for e in compare_twin(repo, twin))


def test_cli_export_with_triton(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RENTALML_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "rentalml.cli", "export", "--data", "synthetic:150,80,2000", "--model",
           "hybrid", "--params", json.dumps({"epochs": 2, "neighbours": 16}), "--out", str(tmp_path / "bundle"),
           "--triton", str(tmp_path / "triton"), "--version", "4"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert doc["validated"] and doc["models"] == sorted([SCORER, RETRIEVAL, RANKER, ENSEMBLE])
    assert doc["version"] == 4 and doc["gpu"] is False and doc["python_twin"] == str(tmp_path / "triton-python")
    assert json.loads((tmp_path / "bundle" / "bundle.json").read_text())["model_version"] == "4"
    assert validate_triton_repo(tmp_path / "triton") == []
    assert compare_twin(tmp_path / "triton", tmp_path / "triton-python") == []
    gpu = subprocess.run([sys.executable, "-m", "rentalml.cli", "triton-repo", "--bundle", str(tmp_path / "bundle"),
                          "--out", str(tmp_path / "triton"), "--gpu", "--version", "5", "--replace"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert gpu.returncode == 0, gpu.stderr[-3000:]
    assert json.loads(gpu.stdout.strip().splitlines()[-1])["gpu"] is True
    assert versions(tmp_path / "triton" / RANKER) == [5]
    assert load_config(tmp_path / "triton" / RANKER / "config.pbtxt").instance_group[0].kind == KIND_GPU
    bad = subprocess.run([sys.executable, "-m", "rentalml.cli", "triton-repo", "--bundle", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "t2")], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode != 0 and "bundle.json" in bad.stderr
