"""MLflow tracking + registry (real MLflow, sqlite under tmp_path): champion/challenger aliases, lineage, bundles."""

from __future__ import annotations

import json
import os

import pytest

from rentalml.config import Settings
from rentalml.registry import mlflow_registry as reg
from rentalml.runtime.bundle import Bundle
from rentalml.runtime.pipeline import Pipeline
from rentalml.training.workflow import train_and_register

PARAMS = {"epochs": 10, "neighbours": 32}
VIEWS = ["user_activity", "property_stats"]


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    home = tmp_path_factory.mktemp("rentalml-home")
    cwd = os.getcwd()
    os.chdir(home)  # nothing MLflow writes may land in the repository
    try:
        yield Settings(home=home, mlflow_tracking_uri=f"sqlite:///{home}/mlflow.db", model_name="test-recommender")
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def history(market, settings):
    """Register collaborative (first), popularity (worse), hybrid (better); aliases recorded after each."""
    steps = []
    for model in ("collaborative", "popularity", "hybrid"):
        res = train_and_register(market, model, "random-75-25", 10, 42, dict(PARAMS), settings=settings,
                                 feature_views=VIEWS)
        steps.append({"result": res, "champion": reg.alias_version("champion", settings=settings),
                      "challenger": reg.alias_version("challenger", settings=settings)})
    return steps


@pytest.fixture(scope="module")
def client(settings, history):
    return reg.configure(settings)


def test_first_version_becomes_champion(history):
    first = history[0]
    r = first["result"]["registry"]
    assert r["version"] == "1" and r["promoted"] and r["alias"] == "champion"
    assert r["champion_before"] is None and r["champion_version_before"] is None
    assert first["champion"] == "1" and first["challenger"] is None


def test_worse_model_becomes_challenger(history):
    first, second = history[0]["result"], history[1]["result"]
    r = second["registry"]
    assert second["metrics"]["ndcg@10"] < first["metrics"]["ndcg@10"]
    assert r["version"] == "2" and not r["promoted"] and r["alias"] == "challenger"
    assert r["candidate"] == pytest.approx(second["metrics"]["ndcg@10"])
    assert r["champion_before"] == pytest.approx(first["metrics"]["ndcg@10"])
    assert r["champion_version_before"] == "1"
    assert history[1]["champion"] == "1" and history[1]["challenger"] == "2"


def test_better_model_takes_champion(history):
    first, third = history[0]["result"], history[2]["result"]
    r = third["registry"]
    assert third["metrics"]["ndcg@10"] > first["metrics"]["ndcg@10"]
    assert r["version"] == "3" and r["promoted"] and r["alias"] == "champion"
    assert r["champion_version_before"] == "1"
    assert history[2]["champion"] == "3" and history[2]["challenger"] == "2"


def test_run_params_metrics_lineage_and_artifacts(history, client, market):
    res = history[2]["result"]
    run = client.get_run(res["run_id"])
    p, m, tags = run.data.params, run.data.metrics, run.data.tags
    assert p["model_type"] == "hybrid" and p["seed"] == "42" and p["k"] == "10"
    assert p["neighbours"] == "32" and "beta" in p and "epochs" in p
    for key in ("ndcg_at_10", "recall_at_10", "precision_at_10", "map_at_10", "coverage", "fit_seconds"):
        assert key in m, key
    assert m["ndcg_at_10"] == pytest.approx(res["metrics"]["ndcg@10"])
    assert not any("@" in key for key in m)
    assert tags["model_type"] == "hybrid"
    assert tags["lineage.data_snapshot"] == market.snapshot_hash() == res["data_snapshot"]
    assert tags["lineage.dataset"] == "synthetic" and tags["lineage.protocol"] == "random-75-25"
    assert json.loads(tags["lineage.feature_views"]) == VIEWS
    assert tags["lineage.code_version"]
    bundle = {a.path for a in client.list_artifacts(res["run_id"], "bundle")}
    assert {"bundle/scorer.onnx", "bundle/scorer.int8.onnx", "bundle/bundle.json", "bundle/users.parquet"} <= bundle
    report = {a.path for a in client.list_artifacts(res["run_id"], "report")}
    assert {"report/report.html", "report/report.json"} <= report


def test_versions_use_aliases_never_stages(history, client, settings):
    versions = client.search_model_versions(f"name='{settings.model_name}'")
    assert sorted(str(v.version) for v in versions) == ["1", "2", "3"]
    assert {v.current_stage for v in versions} <= {"None", None}
    model = client.get_registered_model(settings.model_name)
    assert {a: str(v) for a, v in model.aliases.items()} == {"champion": "3", "challenger": "2"}
    v2 = client.get_model_version(settings.model_name, "2")
    assert float(v2.tags["ndcg_at_10"]) == pytest.approx(history[1]["result"]["metrics"]["ndcg@10"])
    assert v2.run_id == history[1]["result"]["run_id"]


def test_fetch_champion_bundle_carries_registry_version(history, settings):
    path = reg.fetch_bundle("champion", settings=settings)
    assert path == settings.home_dir / "bundles" / settings.model_name / "3"
    meta = json.loads((path / "bundle.json").read_text())
    assert meta["model_version"] == "3" and meta["model_type"] == "hybrid"
    assert meta["registry"] == {"name": settings.model_name, "version": "3",
                                "run_id": history[2]["result"]["run_id"]}
    assert meta["feature_views"] == VIEWS
    b = Bundle(path)
    assert b.model_version == "3"
    recs = Pipeline(b).run([str(b.user_index[0]), "never-seen-user"], 5)
    assert recs.sources == ["model", "cold_start"] and recs.property_ids.shape == (2, 5)
    # an explicit version, and a second fetch reuses the download
    v1 = reg.fetch_bundle(version="1", settings=settings)
    assert json.loads((v1 / "bundle.json").read_text())["model_version"] == "1"
    assert reg.fetch_bundle("champion", settings=settings) == path


def test_fetch_unknown_alias_raises(settings, history):
    with pytest.raises(LookupError, match="no model version"):
        reg.fetch_bundle("staging", settings=settings)


def test_alias_helpers(settings, history):
    reg.set_alias("shadow", "1", settings=settings)
    assert reg.alias_version("shadow", settings=settings) == "1"
    reg.delete_alias("shadow", settings=settings)
    assert reg.alias_version("shadow", settings=settings) is None
