"""Pipeline steps without KFP: ingest sources (parquet, SQL), data validation and drift, the champion gate,
and the deploy targets (InferenceService canary patch against a fake API, local server restart)."""

from __future__ import annotations

import json
import os
import sys
import time

import pandas as pd
import pytest
import sqlalchemy as sa
from rentalml.components import deploy as d
from rentalml.components import steps

from rentalml.data import validation as v
from rentalml.data.generator import generate_marketplace
from rentalml.data.loaders import load_dataset, load_sql


@pytest.fixture(scope="module")
def small():
    return generate_marketplace(n_users=200, n_properties=100, n_events=3000, seed=1)


# ------------------------------------------------------------------------------------------ ingest
def test_ingest_parquet_file(tmp_path, small):
    path = tmp_path / "events.parquet"
    small.interactions[["user_id", "property_id", "timestamp", "weight"]].to_parquet(path)
    info = steps.ingest(str(path), tmp_path / "out")
    assert info["interactions"] == len(small.interactions) and len(info["snapshot"]) == 16
    assert (tmp_path / "out" / "interactions.parquet").exists()


def test_ingest_sql(tmp_path, small):
    url = f"sqlite:///{tmp_path / 'records.db'}"
    engine = sa.create_engine(url)
    inter = small.interactions[["user_id", "property_id", "timestamp", "weight", "event_type"]].copy()
    inter["timestamp"] = inter["timestamp"].astype("int64") // 10**9
    inter.to_sql("interactions", engine, index=False)
    small.items.reset_index()[["property_id", "price", "bedrooms", "city"]].to_sql("properties", engine, index=False)
    engine.dispose()
    ds = load_sql("interactions", url=url)
    assert len(ds.interactions) == len(small.interactions) and ds.items is not None
    assert set(ds.items.columns) == {"price", "bedrooms", "city"}
    assert "records.db" in ds.meta["source"]
    q = load_sql("SELECT * FROM interactions WHERE event_type = 'view'", url=url)
    assert 0 < len(q.interactions) < len(ds.interactions)
    # `sql:<table>` reads the database of record from the settings (a Kubernetes secret in the cluster)
    from rentalml.config import get_settings

    os.environ["RENTALML_DATABASE_URL"] = url
    get_settings.cache_clear()
    try:
        assert load_dataset("sql:interactions").snapshot_hash() == ds.snapshot_hash()
    finally:
        del os.environ["RENTALML_DATABASE_URL"]
        get_settings.cache_clear()


# ------------------------------------------------------------------------------------------ validate
def test_validate_accepts_then_measures_drift(tmp_path, small):
    ds_dir = small.save(tmp_path / "ds")
    ref = tmp_path / "ref"
    res = steps.validate(ds_dir, tmp_path / "report.html", reference_dir=ref)
    assert res["ok"] and res["reference_snapshot"] == "" and (ref / "accepted.json").exists()
    assert "Data validation: passed" in (tmp_path / "report.html").read_text()
    res = steps.validate(ds_dir, tmp_path / "report2.html", reference_dir=ref)  # same data: no drift
    assert res["max_psi"] == pytest.approx(0.0, abs=1e-9) and res["reference_snapshot"] == small.snapshot_hash()


def test_validate_fails_on_drift_with_a_readable_report(tmp_path, small):
    ref = tmp_path / "ref"
    steps.validate(small.save(tmp_path / "a"), tmp_path / "a.html", reference_dir=ref)
    drifted = small.subset(small.interactions)
    drifted.items = drifted.items.assign(price=drifted.items["price"] * 3)  # rents tripled: a broken feed
    with pytest.raises(steps.DataValidationError) as exc:
        steps.validate(drifted.save(tmp_path / "b"), tmp_path / "b.html", reference_dir=ref)
    text = str(exc.value)
    assert "data validation FAILED" in text and "[FAIL] drift properties.price: PSI" in text
    assert "FAILED" in (tmp_path / "b.html").read_text()
    assert json.loads((ref / "accepted.json").read_text())["snapshot"] == small.snapshot_hash()  # not accepted


def test_validate_schema_errors(small):
    df = small.interactions.copy()
    df.loc[:4, "user_id"] = ""
    df.loc[5:9, "weight"] = -1.0
    df.loc[10:11, "event_type"] = "click"
    df.loc[12, "timestamp"] = pd.Timestamp("2100-01-01", tz="UTC")
    report = v.validate(small.subset(df))
    failed = {c.name for c in report.errors}
    assert {"user_id", "weight", "event_type", "timestamp"} <= failed and not report.ok
    assert "5 empty/null user ids" in report.text()
    assert not v.validate(small.subset(df.head(50))).ok  # too few rows


def test_psi():
    assert v.psi([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert v.psi([0.5, 0.5], [0.9, 0.1]) > 0.25


# ------------------------------------------------------------------------------------------ gate and params
@pytest.mark.parametrize("champion, margin, decision", [
    ((None, None), 0.0, "deploy"),
    (("3", 0.20), 0.0, "deploy"),
    (("3", 0.20), 0.01, "stop"),  # beats it, but not by the margin
    (("3", 0.25), 0.0, "stop"),
])
def test_champion_gate(monkeypatch, champion, margin, decision):
    monkeypatch.setattr(steps, "champion_metric", lambda metric: champion)
    res = steps.gate({"ndcg@10": 0.205}, 10, margin)
    assert res["decision"] == decision and res["metric"] == "ndcg_at_10"


def test_kfp_struct_params_get_their_ints_back():
    assert steps.clean_params({"epochs": 10.0, "lr": 0.002, "neighbours": 32.0, "use_ids": True}) == \
        {"epochs": 10, "lr": 0.002, "neighbours": 32, "use_ids": True}


# ------------------------------------------------------------------------------------------ deploy
class FakeApi:
    def __init__(self, exists: bool):
        self.exists, self.calls = exists, []

    def get_namespaced_custom_object(self, group, version, ns, plural, name):
        from kubernetes.client.exceptions import ApiException

        self.calls.append(("get", ns, name))
        if not self.exists:
            raise ApiException(status=404)
        return {}

    def create_namespaced_custom_object(self, group, version, ns, plural, body):
        self.calls.append(("create", ns, body))

    def patch_namespaced_custom_object(self, group, version, ns, plural, name, body):
        self.calls.append(("patch", ns, body))


def test_inference_service_canary():
    isvc = d.inference_service("rental-recommender", model_uri="s3://mlflow/7/abc/artifacts/bundle", version="7",
                               image="img:1", canary_percent=10, namespace="ml")
    tr, pred = isvc["spec"]["transformer"], isvc["spec"]["predictor"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert pred["canaryTrafficPercent"] == tr["canaryTrafficPercent"] == 10
    c = tr["containers"][0]
    assert {"name": "STORAGE_URI", "value": "s3://mlflow/7/abc/artifacts/bundle"} in c["env"]
    assert c["args"][:5] == ["serve", "--role", "transformer", "--bundle", "/mnt/models"] and "v7" in c["args"]
    assert pred["model"]["runtime"] == "kserve-tritonserver" and pred["model"]["protocolVersion"] == "v2"
    assert pred["model"]["storageUri"] == "s3://mlflow/7/abc/artifacts/bundle/triton"
    # the kserve SDK's models accept it, strictly (unknown or dropped fields fail): the manifests' checker
    from test_manifests import _kserve_errors

    assert _kserve_errors([isvc]) == [[]]

    api = FakeApi(exists=False)  # first deploy: created with all traffic
    res = d.apply_inference_service(isvc, 10, api=api)
    assert res["action"] == "created" and res["traffic_percent"] == 100
    assert not any("canaryTrafficPercent" in c for c in api.calls[-1][2]["spec"].values())
    api = FakeApi(exists=True)  # later deploys: the new version behind the canary percentage
    res = d.apply_inference_service(isvc, 10, api=api)
    assert res["action"] == "patched"
    assert {c["canaryTrafficPercent"] for c in api.calls[-1][2]["spec"].values()} == {10}


def test_local_server_restart(tmp_path):
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    server = d.LocalServer(home=tmp_path, command=sleeper)
    res = server.deploy(tmp_path / "bundle-1", "1")
    assert res["server"] == "not running" and "rentalml serve --bundle" in res["hint"]
    res = server.deploy(tmp_path / "bundle-1", "1", start=True)
    assert res["server"] == "started"
    first = res["pid"]
    try:
        res = server.deploy(tmp_path / "bundle-2", "2")  # a running server is restarted on the new version
        assert res["server"] == "restarted" and res["previous_version"] == "1" and res["pid"] != first
        deadline = time.time() + 10
        while d._alive(first) and time.time() < deadline:
            time.sleep(0.1)
        assert not d._alive(first)
        assert server.state()["version"] == "2"
    finally:
        st = server.state()
        if st:
            server.stop(st)
