"""Feast feature store (real Feast 0.67: DuckDB offline store, SQLite and Redis online stores, file and SQL
registries): offline tables, apply/materialize, point-in-time joins, pushes, on-demand views, CLI, lineage."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from rentalml.config import Settings
from rentalml.data.features import FeatureEncoder
from rentalml.data.generator import generate_marketplace
from rentalml.features import store as fs
from rentalml.features.lineage import feature_lineage

VERSION = "2026.11.1"


@pytest.fixture(scope="module")
def small():
    return generate_marketplace(n_users=200, n_properties=100, n_events=3000, seed=3)


@pytest.fixture(scope="module")
def store(small, tmp_path_factory):
    """SQLite online store + file registry under a fresh home: tables built, applied, materialized at data end."""
    s = Settings(home=tmp_path_factory.mktemp("feast-home"))
    st = fs.open_store(s)
    fs.build_offline_tables(small, fs.data_dir(st), defs=fs.definitions(st))
    fs.apply(st)
    fs.materialize(st, fs.dataset_end(small).to_pydatetime())
    return st


def _latest(st, view: str, key: str, ident: str) -> pd.Series:
    df = pd.read_parquet(fs.data_dir(st) / f"{view}.parquet")
    return df[df[key] == ident].sort_values("event_timestamp").iloc[-1]


def test_generated_config_follows_settings(tmp_path):
    s = Settings(home=tmp_path, redis_url="redis://:s3cret@127.0.0.1:6390/2",
                 feast={"registry_url": "postgresql+psycopg://feast:pw@db:5432/feast"})
    cfg = fs.store_config(s)
    assert cfg["project"] == "rentalml" and cfg["offline_store"] == {"type": "duckdb"}
    assert cfg["online_store"] == {"type": "redis", "connection_string": "127.0.0.1:6390,socket_timeout=5.0,"
                                                    "socket_connect_timeout=5.0,retry=null,db=2,password=s3cret"}
    assert cfg["registry"]["registry_type"] == "sql" and cfg["entity_key_serialization_version"] == 3
    local = fs.store_config(Settings(home=tmp_path))
    assert local["online_store"] == {"type": "sqlite", "path": str(tmp_path.resolve() / "feast" / "online.db")}
    assert local["registry"]["path"] == str(tmp_path.resolve() / "feast" / "registry.db")
    with pytest.raises(ValueError, match="redis_url"):
        fs.store_config(Settings(home=tmp_path, feast={"online_store": "redis"}))
    st = fs.open_store(s)  # nothing is contacted before the first read/apply
    text = (tmp_path / "feast" / "repo" / "feature_store.yaml").read_text()
    assert "s3cret" not in text and ":pw@" not in text and "duckdb" in text
    assert st.config.online_store.connection_string.endswith("password=s3cret")
    # the committed repo carries no feature_store.yaml with machine paths
    assert not (fs.definitions_source(s) / "feature_store.yaml").exists()


def test_offline_tables(small, store):
    data = fs.data_dir(store)
    attrs = pd.read_parquet(data / "property_attributes.parquet")
    assert len(attrs) == len(small.items) and set(attrs["available"]) == {1}
    eng = pd.read_parquet(data / "property_engagement.parquet")
    end = fs.dataset_end(small)
    # brute force for a few (property, snapshot) rows
    inter = small.interactions
    for _, row in eng.sample(25, random_state=0).iterrows():
        ev = inter[(inter.property_id == row.property_id) & (inter.timestamp < row.event_timestamp)]
        for col, types, days in (("views_7d", ["view"], 7), ("saves_24h", ["save"], 1),
                                 ("inquiries_7d", ["inquiry"], 7)):
            n = ((ev.event_type.isin(types)) & (ev.timestamp >= row.event_timestamp - timedelta(days=days))).sum()
            assert row[col] == n, (row.property_id, row.event_timestamp, col)
        assert row.last_event_ts == ev.timestamp.max().floor("s")
    assert eng.event_timestamp.max() == end
    taste = pd.read_parquet(data / "user_taste.parquet")
    u = taste[taste.event_timestamp == end].iloc[0]
    ev = inter[(inter.user_id == u.user_id) & (inter.timestamp >= end - timedelta(days=30))]
    assert u.median_price == pytest.approx(small.items.loc[ev.property_id, "price"].median())
    assert u.n_events_7d == (ev.timestamp >= end - timedelta(days=7)).sum()


def test_views_are_registered_with_version(store):
    names = {fv.name for fv in store.list_feature_views()}
    assert names == {"property_attributes", "property_engagement", "user_taste"}
    assert {v.name for v in store.list_on_demand_feature_views()} == {"property_derived", "user_property_match"}
    assert {p.name for p in store.list_data_sources() if type(p).__name__ == "PushSource"} == {
        "property_attributes_push", "property_engagement_push", "user_taste_push"}
    assert all(fv.tags["version"] == VERSION for fv in store.list_feature_views())
    assert fs.views_used(store, ["property_attributes", "property_derived"]) == [
        f"property_attributes:{VERSION}", f"property_derived:{VERSION}"]


def test_online_equals_latest_offline(small, store):
    pids = ["p_000001", "p_000007", "p_000042"]
    online = fs.online_features(store, property_ids=pids).set_index("property_id")
    for pid in pids:
        a = _latest(store, "property_attributes", "property_id", pid)
        e = _latest(store, "property_engagement", "property_id", pid)
        for col in ("price", "bedrooms", "bathrooms", "city", "lat", "lon", "property_type", "available"):
            assert online.loc[pid, col] == a[col]
        for col in ("views_7d", "views_24h", "saves_7d", "inquiries_7d"):
            assert online.loc[pid, col] == e[col]
        # on-demand: price per bedroom (a studio counts as one bedroom)
        assert online.loc[pid, "price_per_bedroom"] == pytest.approx(a.price / max(a.bedrooms, 1))
    user = fs.online_features(store, user_ids=["u_000010"]).iloc[0]
    t = _latest(store, "user_taste", "user_id", "u_000010")
    assert user.median_price == pytest.approx(t.median_price) and user.top_city == t.top_city
    pair = fs.online_features(store, user_ids=["u_000010"], property_ids=pids)
    assert len(pair) == 3 and pair["distance_to_pref_km"].notna().all()
    unknown = fs.online_features(store, property_ids=["p_nope"]).iloc[0]
    assert pd.isna(unknown["price"])


def test_historical_row_count_and_point_in_time(small, store):
    inter = small.interactions
    entity = inter.sample(300, random_state=1)[["user_id", "property_id", "timestamp"]].rename(
        columns={"timestamp": "event_timestamp"})
    entity = pd.concat([entity, entity.head(20),  # duplicate rows and an unknown property stay
                        pd.DataFrame({"user_id": ["u_x"], "property_id": ["p_x"],
                                      "event_timestamp": [inter.timestamp.max()]})], ignore_index=True)
    frame = fs.training_frame(store, entity, ["property_attributes", "property_engagement", "user_taste",
                                              "property_derived", "user_property_match"])
    assert len(frame) == len(entity)
    assert (frame["property_id"].to_numpy() == entity["property_id"].to_numpy()).all()
    assert pd.isna(frame.iloc[-1]["price"])
    # every row's engagement = the latest snapshot at or before its time, within the view's 2-day TTL (a snapshot
    # counts only events strictly before it, so no row sees its own or any later event)
    eng = pd.read_parquet(fs.data_dir(store) / "property_engagement.parquet").sort_values("event_timestamp")
    left = frame.reset_index().sort_values("event_timestamp")
    exp = pd.merge_asof(left, eng.rename(columns={"event_timestamp": "snap"}), left_on="event_timestamp",
                        right_on="snap", by="property_id", direction="backward", tolerance=pd.Timedelta(days=2),
                        suffixes=("", "_exp")).set_index("index").sort_index()
    assert exp["snap"].notna().sum() > 100
    np.testing.assert_array_equal(frame["views_7d"].fillna(-1).to_numpy(), exp["views_7d_exp"].fillna(-1).to_numpy())
    assert (frame["last_event_ts"].dropna() < frame.loc[frame["last_event_ts"].notna(), "event_timestamp"]).all()

    # a price written after the entity timestamp is not returned; after it, it is
    pid = "p_000050"
    old = small.items.loc[pid, "price"]
    t_new = fs.dataset_end(small) + timedelta(hours=6)
    fs.push(store, "property_attributes_push", pd.DataFrame(
        {"property_id": [pid], "event_timestamp": [t_new], "price": [old + 1000.0]}), to="offline")
    ent = pd.DataFrame({"property_id": [pid, pid], "event_timestamp": [t_new - timedelta(hours=1),
                                                                       t_new + timedelta(hours=1)]})
    got = fs.training_frame(store, ent, ["property_attributes"])
    assert got["price"].tolist() == [old, old + 1000.0]
    assert got["bedrooms"].tolist() == [small.items.loc[pid, "bedrooms"]] * 2  # filled from the online values


def test_push_changes_online_value(small, store):
    pid = "p_000003"
    before = fs.online_features(store, property_ids=[pid]).iloc[0]
    n = fs.push(store, "property_attributes_push", pd.DataFrame(
        {"property_id": [pid], "event_timestamp": [pd.Timestamp.now(tz="UTC")], "price": [999.0], "available": [0],
         "ignored_extra": ["x"]}))
    after = fs.online_features(store, property_ids=[pid]).iloc[0]
    assert n == 1 and after["price"] == 999.0 and after["available"] == 0 and before["price"] != 999.0
    assert after["bedrooms"] == before["bedrooms"] and after["city"] == before["city"]
    assert after["price_per_bedroom"] == pytest.approx(999.0 / max(before["bedrooms"], 1))
    # the offline table got the row too (ONLINE_AND_OFFLINE)
    assert _latest(store, "property_attributes", "property_id", pid)["price"] == 999.0
    fs.push(store, "property_engagement_push", pd.DataFrame(
        {"property_id": [pid], "event_timestamp": [pd.Timestamp.now(tz="UTC")], "views_1h": [5], "views_24h": [9],
         "views_7d": [30], "saves_24h": [1], "saves_7d": [2], "inquiries_7d": [0], "applications_7d": [0],
         "last_event_ts": [pd.Timestamp.now(tz="UTC")]}), to="online")
    assert fs.online_features(store, property_ids=[pid]).iloc[0]["views_1h"] == 5


def test_bad_input_names_the_field(store):
    with pytest.raises(ValueError, match="event_timestamp"):
        fs.push(store, "user_taste_push", pd.DataFrame({"user_id": ["u_000001"], "median_price": [1.0]}))
    with pytest.raises(ValueError, match="unknown push source"):
        fs.push(store, "nope_push", pd.DataFrame({"user_id": ["u"]}))
    with pytest.raises(ValueError, match="median_price"):
        fs.push(store, "user_taste_push", pd.DataFrame({"user_id": ["u_000001"], "event_timestamp": [
            pd.Timestamp.now(tz="UTC")], "median_price": ["cheap"]}))
    with pytest.raises(ValueError, match="property_id"):
        fs.training_frame(store, pd.DataFrame({"event_timestamp": [pd.Timestamp.now(tz="UTC")]}),
                          ["property_attributes"])


def test_redis_online_store(small, store, redis_url, tmp_path):
    project = f"rentalml_{uuid.uuid4().hex[:8]}"  # isolates the keys from other tests on the same Redis
    s = Settings(home=tmp_path, redis_url=redis_url, feast={"project": project})
    st = fs.open_store(s)
    assert st.config.online_store.type == "redis"
    fs.build_offline_tables(small, fs.data_dir(st), defs=fs.definitions(st))
    fs.apply(st)
    fs.materialize(st, fs.dataset_end(small).to_pydatetime())
    pids = ["p_000001", "p_000007"]
    got = fs.online_features(st, property_ids=pids).set_index("property_id")
    ref = fs.online_features(store, property_ids=pids).set_index("property_id")
    for col in ("price", "bedrooms", "city", "views_7d", "price_per_bedroom"):
        assert got[col].tolist() == ref[col].tolist()
    fs.push(st, "user_taste_push", pd.DataFrame({"user_id": ["u_000002"], "event_timestamp": [
        pd.Timestamp.now(tz="UTC")], "median_price": [1234.0]}), to="online")
    assert fs.online_features(st, user_ids=["u_000002"]).iloc[0]["median_price"] == 1234.0


def test_sql_registry(postgres_url, tmp_path):
    s = Settings(home=tmp_path, feast={"registry_url": postgres_url, "project": "rentalml_sql"})
    views = fs.apply(fs.open_store(s))
    assert "property_attributes" in views
    again = fs.open_store(s)  # a second process would see the same registry
    assert again.get_feature_view("user_taste").tags["version"] == VERSION


def test_feast_attributes_feed_the_encoder(small, tmp_path):
    ds, views = fs.dataset_with_features(small, Settings(home=tmp_path), materialize_online=False)
    assert views == [f"property_attributes:{VERSION}"]
    cols = list(fs.ATTRIBUTE_COLUMNS)
    pd.testing.assert_frame_equal(ds.items[cols], small.items[cols])
    enc = FeatureEncoder.fit(small.items)
    np.testing.assert_array_equal(enc.transform(ds.items), enc.transform(small.items))


def test_pipeline_features_step_uses_feast(small, tmp_path, monkeypatch):
    from rentalml.components import steps

    from rentalml.config import get_settings

    monkeypatch.setenv("RENTALML_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RENTALML_FEAST__TRAINING", "true")
    get_settings.cache_clear()
    try:
        small.save(tmp_path / "in")
        views = steps.build_features(tmp_path / "in", tmp_path / "out")
    finally:
        get_settings.cache_clear()
    assert views == [f"property_attributes:{VERSION}", "property_features", "user_features"]
    doc = json.loads((tmp_path / "out" / "features.json").read_text())
    assert doc["source"] == "feast" and (tmp_path / "home" / "feast" / "online.db").exists()


def test_lineage_recorded_in_mlflow(small, store, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from rentalml.training.workflow import train_and_register

    assert feature_lineage(["property_attributes:1", "user_features"]) == {
        "feature_views": ["property_attributes:1", "user_features"], "features_version": "1",
        "feature_store": "feast"}
    with pytest.raises(ValueError, match="mixed"):
        feature_lineage(["a:1", "b:2"])
    monkeypatch.chdir(tmp_path)
    s = Settings(home=tmp_path, mlflow_tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", model_name="feast-test")
    views = fs.views_used(store, ["property_attributes", "property_engagement"]) + ["user_features"]
    res = train_and_register(small, "popularity", settings=s, feature_views=views)
    tags = MlflowClient(s.tracking_uri).get_run(res["run_id"]).data.tags
    assert json.loads(tags["lineage.feature_views"]) == [
        f"property_attributes:{VERSION}", f"property_engagement:{VERSION}", "user_features"]
    assert tags["lineage.features_version"] == VERSION and tags["lineage.feature_store"] == "feast"


def test_cli_apply_materialize_show(tmp_path, monkeypatch):
    from rentalml.cli import app
    from rentalml.config import get_settings

    monkeypatch.setenv("RENTALML_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RENTALML_REDIS_URL", raising=False)
    get_settings.cache_clear()
    runner = CliRunner()
    try:
        res = runner.invoke(app, ["features", "apply"])
        assert res.exit_code == 0, res.output
        doc = json.loads(res.stdout)
        assert doc["online_store"] == "sqlite" and doc["version"] == VERSION and "user_taste" in doc["views"]
        res = runner.invoke(app, ["features", "materialize", "--dataset", "synthetic:200,100,3000,3",
                                  "--end", "2030-01-01T00:00:00Z"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["rows"]["property_attributes"] == 100
        res = runner.invoke(app, ["features", "show", "--property", "p_000001"])
        assert res.exit_code == 0, res.output
        rec = json.loads(res.stdout)[0]
        assert rec["property_id"] == "p_000001" and rec["price"] > 0 and "price_per_bedroom" in rec
        res = runner.invoke(app, ["features", "show", "--user", "u_000001"])
        assert res.exit_code == 0 and "median_price" in json.loads(res.stdout)[0]
        ent = tmp_path / "entities.csv"
        pd.DataFrame({"property_id": ["p_000001", "p_000002"], "event_timestamp": ["2030-01-01T00:00:00Z"] * 2}
                     ).to_csv(ent, index=False)
        res = runner.invoke(app, ["features", "training-set", "--entities", str(ent), "--out",
                                  str(tmp_path / "ts.parquet"), "--views", "property_attributes"])
        assert res.exit_code == 0, res.output
        assert len(pd.read_parquet(tmp_path / "ts.parquet")) == 2
        res = runner.invoke(app, ["features", "show"])
        assert res.exit_code != 0 and "--user" in res.output
    finally:
        get_settings.cache_clear()
