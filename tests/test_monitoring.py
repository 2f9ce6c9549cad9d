"""Drift monitoring: the bundle carries its training reference; a shifted batch is detected by PSI and KS with
the features named, the drift gauges are exported, and `rentalml monitor drift` triggers a real (kfp.local)
retraining run that registers a new model version; unshifted data triggers nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from rentalml.data.dataset import Dataset
from rentalml.data.generator import generate_marketplace
from rentalml.monitoring import drift as d
from rentalml.runtime.bundle import Bundle


@pytest.fixture(scope="module")
def bundle_dir(hybrid_bundle_dir):
    return hybrid_bundle_dir


def test_bundle_carries_the_training_reference(bundle_dir, market):
    ref = d.load_reference(bundle_dir)
    assert ref["snapshot"] == market.snapshot_hash()
    feats = ref["features"]
    assert {"properties.price", "properties.city", "interactions.event_type", "score.top1",
            "score.mean_top10"} <= set(feats)
    assert feats["properties.price"]["kind"] == "numeric" and len(feats["properties.price"]["sample"]) > 100
    assert len(feats["score.top1"]["sample"]) == min(d.SCORE_USERS, market.interactions["user_id"].nunique())


def test_same_distribution_is_not_drift(bundle_dir):
    # a fresh draw of the same market process (another seed) is not drift
    other = generate_marketplace(n_users=400, n_properties=200, n_events=8000, seed=1)
    rep = d.check_drift(d.load_reference(bundle_dir), other, Bundle(bundle_dir), plots=False)
    assert not rep.over_threshold, [(f.feature, f.reason) for f in rep.drifted]
    assert all(f.psi < 0.1 for f in rep.features if f.feature.startswith("properties."))


def test_shifted_batch_is_detected_with_psi_and_ks(bundle_dir, shifted_batch, tmp_path):
    rep = d.check_drift(d.load_reference(bundle_dir), shifted_batch, Bundle(bundle_dir))
    drifted = {f.feature: f for f in rep.drifted}
    assert {"properties.price", "properties.bedrooms", "interactions.event_type"} <= set(drifted)
    price = drifted["properties.price"]
    assert price.psi > 0.25 and price.ks > 0.2 and price.ks_pvalue < 1e-6
    assert "PSI" in price.reason and "KS" in price.reason
    paths = d.write_report(rep, tmp_path / "report")
    doc = json.loads(paths["json"].read_text())
    assert doc["over_threshold"] and "properties.price" in doc["drifted"]
    assert paths["html"].read_text().count("data:image/png;base64,") == len(rep.features)
    d.export_metrics(rep, tmp_path / "drift.prom")
    prom = (tmp_path / "drift.prom").read_text()
    assert 'ml_feature_drift_psi{feature="properties.price"}' in prom and "ml_feature_drift_detected 1.0" in prom


def test_too_few_values_are_not_judged(bundle_dir, market):
    tiny = Dataset(market.interactions.head(20), market.items, market.users, name="tiny")
    rep = d.check_drift(d.load_reference(bundle_dir), tiny, None, plots=False)
    assert not rep.over_threshold and any("not judged" in f.reason for f in rep.features)


def _cli(args, home, cwd, timeout=600):
    env = {**os.environ, "RENTALML_HOME": str(home), "RENTALML_MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
           "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rentalml.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def test_unshifted_data_triggers_no_retraining(bundle_dir, market, tmp_path):
    """`rentalml monitor drift --retrain local` on unshifted data: no drift, no pipeline run, the gauge at 0."""
    home = tmp_path / "home"
    same = tmp_path / "same"
    market.save(same)
    res = _cli(["monitor", "drift", "--current", str(same), "--bundle", str(bundle_dir), "--window-days", "0",
                "--out", str(tmp_path / "r0"), "--retrain", "local", "--fail-on-drift"], home, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "r0" / "summary.json").read_text())["retraining"] is None
    assert "ml_feature_drift_detected 0.0" in (home / "monitoring" / "drift.prom").read_text()
    assert not (home / "kfp-local").exists() and not (home / "mlflow.db").exists()


def test_drift_injection_triggers_a_retraining_run(drift_retraining):
    """End to end (the session's `drift_retraining`): `rentalml monitor drift` on a shifted batch exports the
    gauges, writes the report and runs the training pipeline (kfp.local) on the new data, which registers a
    model version in the (empty) registry; --fail-on-drift exits 3 for CronJobs."""
    res, out, home, batch = drift_retraining.result, drift_retraining.out, drift_retraining.home, drift_retraining.batch
    assert res.returncode == 3, res.stdout[-3000:] + res.stderr[-3000:]  # drift → non-zero for CronJobs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["over_threshold"] and "properties.price" in summary["drifted"]
    run = summary["retraining"]
    assert run["returncode"] == 0 and run["command"][3:6] == ["pipeline", "run", "--local"]
    assert str(batch) in run["command"]
    assert "ml_feature_drift_detected 1.0" in (home / "monitoring" / "drift.prom").read_text()

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=drift_retraining.tracking_uri)
    versions = client.search_model_versions("name='rental-recommender'")
    assert len(versions) == 1  # the retraining run registered a model trained on the shifted batch
    run_tags = client.get_run(versions[0].run_id).data.tags
    assert run_tags["lineage.data_snapshot"] == Dataset.load(batch).snapshot_hash()
    assert pd.notna(versions[0].version)


def test_pipeline_steps_push_training_metrics(pushgateway_url, market, tmp_path, monkeypatch):
    """The pipeline steps push ml_training_* (the training dashboard, the stale-training alert) to a real
    Pushgateway, and keep a textfile copy locally."""
    import httpx
    from rentalml.components import steps

    from rentalml.config import get_settings

    monkeypatch.setenv("RENTALML_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RENTALML_MONITOR__PUSHGATEWAY_URL", pushgateway_url)
    get_settings.cache_clear()
    try:
        data = tmp_path / "data"
        market.save(data)
        res = steps.train(data, "popularity", "random-75-25", 42, {}, tmp_path / "eval.pkl", tmp_path / "model.pkl")
        assert res["params"] is not None
        metrics = steps.evaluate(data, tmp_path / "eval.pkl", "random-75-25", 42, 10, tmp_path / "report")
        from rentalml.monitoring.training_metrics import push

        push("register", success=True)
    finally:
        get_settings.cache_clear()
    text = httpx.get(f"{pushgateway_url}/metrics").text
    assert 'ml_training_step_duration_seconds{instance="",job="rentalml-training",step="train"}' in text
    assert 'step="evaluate"' in text
    line = next(x for x in text.splitlines() if x.startswith("ml_training_ndcg_at_10{"))
    assert 'model="popularity"' in line and float(line.rsplit(" ", 1)[1]) == pytest.approx(metrics["ndcg@10"])
    assert "ml_training_last_success_timestamp_seconds{" in text
    assert (tmp_path / "home" / "monitoring" / "training-train-duration.prom").exists()
