"""`rentalml optimize`: every variant is produced, runs, is measured, and a broken one is not deployable."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from rentalml.export.bundle import write_bundle
from rentalml.export.optimize import holdout_from_dataset, holdout_leave_last, optimize_bundle, prune_magnitude
from rentalml.runtime.bundle import Bundle

FIELDS = {"variant", "file", "size_mb", "gzip_mb", "latency_ms_b1", "latency_ms_b64", "ndcg_at_10", "ndcg_delta",
          "ndcg_rel_drop", "top10_overlap", "deployable", "note"}


@pytest.fixture(scope="module")
def bundle_dir(fit, market, tmp_path_factory):
    return write_bundle(fit("hybrid", beta=5.0), market, tmp_path_factory.mktemp("opt") / "b", quantize=False,
                        drift_reference=False)


@pytest.fixture(scope="module")
def report(bundle_dir, splits, tmp_path_factory):
    _, test = splits("random-75-25")
    hold = holdout_from_dataset(Bundle(bundle_dir), test)
    out = tmp_path_factory.mktemp("opt") / "out"
    return out, optimize_bundle(bundle_dir, out, max_ndcg_drop=0.02, holdout=hold, prune_sparsities=(0.5, 0.99),
                                repeats=3)


def test_all_variants_and_table(report):
    out, rep = report
    rows = {r["variant"]: r for r in rep["variants"]}
    assert list(rows) == ["fp32", "int8-dynamic", "int8-static", "pruned-50", "pruned-99", "ort", "tensorrt"]
    for name, r in rows.items():
        assert set(r) == FIELDS
        if name == "tensorrt":  # no TensorRT on the CI machine: an explicit row, never deployable
            assert r["note"].startswith("skipped") and r["deployable"] is False
            continue
        assert (out / r["file"]).exists() and r["size_mb"] > 0
        assert r["latency_ms_b1"] > 0 and r["latency_ms_b64"] > 0
        assert 0 <= r["ndcg_at_10"] <= 1 and 0 <= r["top10_overlap"] <= 1
    assert rows["fp32"]["ndcg_delta"] == 0 and rows["fp32"]["top10_overlap"] == 1 and rows["fp32"]["deployable"]
    assert rows["ort"]["file"].endswith(".ort") and rows["ort"]["top10_overlap"] == 1
    assert rows["int8-dynamic"]["size_mb"] < rows["fp32"]["size_mb"]
    assert rows["int8-static"]["size_mb"] < rows["fp32"]["size_mb"]
    assert rows["pruned-50"]["gzip_mb"] < rows["fp32"]["gzip_mb"]
    assert rep["holdout"]["users"] > 50 and "dataset" in rep["holdout"]["source"]
    assert json.loads((out / "optimize.json").read_text()) == rep
    md = (out / "optimize.md").read_text()
    assert md.count("\n") == len(rows) + 2 and "| pruned-99 |" in md
    print("\n" + md)


def test_a_variant_beyond_the_threshold_is_not_deployable(report):
    _, rep = report
    rows = {r["variant"]: r for r in rep["variants"]}
    bad = rows["pruned-99"]
    assert bad["ndcg_rel_drop"] > rep["max_ndcg_drop"] and bad["deployable"] is False
    for r in rep["variants"]:
        if r["ndcg_rel_drop"] is not None:
            assert r["deployable"] == (r["ndcg_rel_drop"] <= rep["max_ndcg_drop"])


def test_variants_run_like_the_scorer(report, bundle_dir):
    """The quantized/pruned/ORT files keep the scorer's interface (same inputs and outputs)."""
    out, rep = report
    ref = [i.name for i in ort.InferenceSession(str(bundle_dir / "scorer.onnx")).get_inputs()]
    for r in rep["variants"]:
        if r["file"] and r["variant"] != "tensorrt":
            sess = ort.InferenceSession(str(out / r["file"]), providers=["CPUExecutionProvider"])
            assert [i.name for i in sess.get_inputs()] == ref
            assert [o.name for o in sess.get_outputs()] == ["indices", "scores"]


def test_prune_magnitude_sparsity(bundle_dir, tmp_path):
    dst = prune_magnitude(bundle_dir / "scorer.onnx", tmp_path / "p.onnx", 0.7)
    for init in onnx.load(str(dst)).graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.ndim == 2 and w.size >= 256:
            assert (w == 0).mean() >= 0.69
    with pytest.raises(ValueError, match="sparsity"):
        prune_magnitude(bundle_dir / "scorer.onnx", tmp_path / "x.onnx", 1.0)


def test_leave_last_holdout_and_bad_input(bundle_dir, tmp_path):
    b = Bundle(bundle_dir)
    hold = holdout_leave_last(b, max_users=30)
    assert len(hold.histories) == 30 and hold.relevant.nnz == 30
    with pytest.raises(ValueError, match="max_ndcg_drop"):
        optimize_bundle(bundle_dir, tmp_path / "o", max_ndcg_drop=-1)
