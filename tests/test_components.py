"""Pipeline steps without KFP: ingest sources (parquet, SQL), data validation and drift, the champion gate,
and the publish/deploy targets (Triton repository to the object store, local server restart; the
InferenceService patch is in test_deploy_patch.py)."""

from __future__ import annotations

import json
import os
import sys

import pandas as pd
import pytest
import sqlalchemy as sa
from rentalml.components import deploy as d
from rentalml.components import steps

from rentalml.data import validation as v
from rentalml.data.generator import generate_marketplace
from rentalml.data.loaders import load_dataset, load_sql
from rentalml.services import wait_until


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


# ------------------------------------------------------------------------------------------ publish
# The InferenceService patch itself: tests/test_deploy_patch.py (fake API server with the API server's semantics).
@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server on loopback; the environment carries the endpoint and keys as the pipeline step and
    KServe's storage initializer get them."""
    from moto.server import ThreadedMotoServer

    from rentalml.services import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                 "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                 "S3_USE_HTTPS": "0", "S3_VERIFY_SSL": "0"}.items():
        monkeypatch.setenv(key, value)
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="module")
def bundle(fit, market, tmp_path_factory):
    """A small real bundle (brute-force retrieval: its ensemble's version folder is empty by nature)."""
    from rentalml.export.bundle import write_bundle

    return write_bundle(fit("hybrid"), market, tmp_path_factory.mktemp("pub") / "bundle", quantize=False,
                        drift_reference=False, n_candidates=50, ann_min_items=10**9)


def _download(uri, out):
    """KServe's storage initializer (kserve-storage, what the init container runs) fetching the storageUri."""
    from kserve_storage import Storage

    return Storage.download_files([uri], [str(out)])[0]


def test_publish_writes_the_live_versions_where_the_predictor_reads(tmp_path, s3, bundle):
    """Defect 9: the repository of the serving + new version lands at the storageUri, KServe's storage
    initializer downloads it whole (every version folder kept: kserve-storage skips 0-byte objects and object
    stores have no empty folders), the twin is beside it but not inside what the initializer fetches, and a
    version no longer live is removed."""
    from rentalml.components import publish as p

    from rentalml.export import triton as t

    uri = "s3://rentalml-models/triton/rental-recommender/champion"
    p.publish(version="1", bundle_dir=bundle, storage_uri=uri)
    res = p.publish(version="2", bundle_dir=bundle, storage_uri=uri, serving_version="1",
                    fetch_bundle=lambda v: bundle)
    assert res["versions"] == ["1", "2"] and res["cluster"]["objects"] > 0
    local = p.build_repos({"1": bundle, "2": bundle}, tmp_path / "local")
    got = tmp_path / "mnt-models"
    _download(uri, got)
    want = sorted(str(x.relative_to(local["cluster"])) for x in local["cluster"].rglob("*"))
    assert sorted(str(x.relative_to(got)) for x in got.rglob("*")) == want
    models = [m for m in got.iterdir() if m.is_dir()]
    assert all(t.versions(got / m) == [1, 2] for m in ("rental-retrieval", "rental-ranker"))  # the ensemble: V
    assert t.validate_triton_repo(got, run=False) == []
    assert not any("python" in x.name for x in got.iterdir()), "the twin leaked into /mnt/models"
    twin = tmp_path / "twin"
    _download(p.twin_uri(uri), twin)
    assert sorted(m.name for m in twin.iterdir() if m.is_dir()) == sorted(m.name for m in models)
    p.publish(version="3", bundle_dir=bundle, storage_uri=uri, serving_version="2", fetch_bundle=lambda v: bundle)
    again = tmp_path / "again"
    _download(uri, again)
    assert all(t.versions(again / m) == [2, 3] for m in ("rental-retrieval", "rental-ranker"))


def test_publish_for_the_gpu_predictor_writes_gpu_configs(tmp_path, s3, bundle):
    """Defect 14, the publish half: the prod overlay's weekly run passes triton_gpu=true, and what lands at the
    storageUri is then KIND_GPU + TensorRT for every model; the default stays on the CPU."""
    from rentalml.components import publish as p

    uri = "s3://rentalml-models/triton/rental-recommender/gpu"
    p.publish(version="1", bundle_dir=bundle, storage_uri=uri, gpu=True, twin=False)
    got = tmp_path / "mnt-models"
    _download(uri, got)
    configs = {c.parent.name: c.read_text() for c in got.glob("*/config.pbtxt")}
    numeric = {m: c for m, c in configs.items() if 'platform: "ensemble"' not in c}
    assert numeric and all("KIND_GPU" in c and "tensorrt" in c for c in numeric.values()), configs
    cpu = p.build_repos({"1": bundle}, tmp_path / "cpu", gpu=False)["cluster"]
    assert not any("KIND_GPU" in c.read_text() for c in cpu.glob("*/config.pbtxt"))


def test_publish_refuses_what_the_storage_initializer_cannot_take(tmp_path, s3, bundle):
    from rentalml.components import publish as p

    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "empty.bin").write_bytes(b"")
    with pytest.raises(p.PublishError, match="zero-byte"):
        p.upload_tree(tmp_path / "repo", "s3://rentalml-models/x/y")
    with pytest.raises(p.PublishError, match="s3://"):
        p.publish(version="1", bundle_dir=bundle, storage_uri="mlflow-artifacts:/1/abc/artifacts/bundle")


def test_model_uri_scheme_is_not_one_kserve_storage_fetches(tmp_path):
    """Defect 5b, upstream kserve-storage 0.21.0 kserve_storage/kserve_storage.py `Storage.download`: no handler
    for `mlflow-artifacts:/`, so the registry's model URI cannot be a storageUri: publish writes s3:// instead."""
    from kserve_storage import Storage

    with pytest.raises(Exception, match="Cannot recognize storage type"):
        Storage.download("mlflow-artifacts:/1/abc/artifacts/bundle", str(tmp_path / "out"))


def test_mlflow_image_has_boto3_for_its_s3_artifact_proxy():
    """Defect 5a: the MLflow Deployment runs the training image (docker/training.Dockerfile installs the
    dependencies of pyproject.toml)
    with --serve-artifacts to an s3:// destination; MLflow's S3ArtifactRepository imports boto3, which mlflow does
    not depend on, so the project's dependencies must bring it."""
    import tomllib
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    docs = list(yaml.safe_load_all((root / "manifests/base/mlflow/mlflow.yaml").read_text()))
    c = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert "--serve-artifacts" in c["args"] and env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert c["image"].startswith("ghcr.io/rentalml/rentalml:")
    assert "pyproject.toml" in (root / "docker/training.Dockerfile").read_text()
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.split(">")[0].split("=")[0].split("[")[0].strip() == "boto3" for d in deps)


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
        wait_until(lambda: not d._alive(first), 10, what=f"the first server ({first}) to exit")
        assert server.state()["version"] == "2"
    finally:
        st = server.state()
        if st:
            server.stop(st)
