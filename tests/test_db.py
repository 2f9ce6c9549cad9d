"""The database of record on SQLite and a real PostgreSQL: Alembic schema and indexes, idempotent seeding, the
Dataset round trip, incremental writes, ingest from the database (loader and pipeline step) and the CLI."""

from __future__ import annotations

import json
import uuid

import pandas as pd
import pytest
import sqlalchemy as sa
from rentalml.components import steps
from typer.testing import CliRunner

from rentalml.cli import app
from rentalml.config import get_settings
from rentalml.data.dataset import Dataset
from rentalml.data.generator import generate_marketplace
from rentalml.data.loaders import load_dataset
from rentalml.db import models as m
from rentalml.db import store
from rentalml.schema import Interaction

INDEXES = {
    "interactions": {("user_id", "timestamp"), ("property_id", "timestamp"), ("timestamp",)},
    "properties": {("city", "price"), ("available", "listed_at"), ("updated_at",)},
}


@pytest.fixture(scope="module")
def small():
    return generate_marketplace(n_users=200, n_properties=100, n_events=3000, seed=3)


def fresh_pg_database(postgres_url: str, password: str | None = None) -> tuple[str, callable]:
    """A new, empty database on the session's PostgreSQL server: (URL, drop)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    url = sa.engine.make_url(postgres_url).set(database=name, password=password)
    return url.render_as_string(hide_password=False), drop


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'records.db'}"
        return
    url, drop = fresh_pg_database(request.getfixturevalue("postgres_url"))
    yield url
    drop()


@pytest.fixture
def pg_url(postgres_url):
    url, drop = fresh_pg_database(postgres_url, password="s3cret")  # trust auth: the password is ignored
    yield url
    drop()


@pytest.fixture
def db_settings(monkeypatch, tmp_path):
    """Settings from the environment, as in a container: RENTALML_DATABASE_URL set by `use(url)`."""
    monkeypatch.setenv("RENTALML_HOME", str(tmp_path / "home"))

    def use(url: str) -> None:
        monkeypatch.setenv("RENTALML_DATABASE_URL", url)
        get_settings.cache_clear()

    yield use
    get_settings.cache_clear()


def assert_same(a: Dataset, b: Dataset) -> None:
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.items, b.items)
    pd.testing.assert_frame_equal(a.users, b.users)
    assert a.snapshot_hash() == b.snapshot_hash()


# ------------------------------------------------------------------------------------------ schema
def test_init_creates_tables_indexes_and_matches_the_models(db_url):
    assert store.init_db(db_url) == store.head_revision() == "0001"
    assert store.init_db(db_url) == "0001"  # upgrading an up-to-date schema is a no-op
    eng = sa.create_engine(db_url)
    try:
        insp = sa.inspect(eng)
        assert {"properties", "users", "interactions", "alembic_version"} <= set(insp.get_table_names())
        for table, expected in INDEXES.items():
            got = {tuple(ix["column_names"]) for ix in insp.get_indexes(table)}
            assert expected <= got, (table, got)
        uniques = {tuple(u["column_names"]) for u in insp.get_unique_constraints("interactions")}
        assert ("event_id",) in uniques
        assert insp.get_pk_constraint("properties")["constrained_columns"] == ["property_id"]
        # the migration and the declarative models describe the same schema
        from alembic.autogenerate import compare_metadata
        from alembic.runtime.migration import MigrationContext

        with eng.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), m.metadata)
        assert diff == []
    finally:
        eng.dispose()


# ------------------------------------------------------------------------------------------ seed + round trip
def test_seed_is_idempotent_and_round_trips(db_url, small):
    first = store.seed(db_url, small)
    assert first == {"properties": 100, "users": 200, "interactions": 3000}
    counts = store.stats(db_url)["rows"]
    assert store.seed(db_url, small, chunk=700) == {"properties": 0, "users": 0, "interactions": 0}
    assert store.stats(db_url)["rows"] == counts == {"properties": 100, "users": 200, "interactions": 3000}
    back = store.load_from_db(db_url)
    assert_same(back, small)  # ids, order, dtypes (lists, bools, dates, UTC timestamps) all survive
    assert isinstance(back.items["amenities"].iloc[0], list) and back.items["pets_allowed"].dtype == bool
    assert str(back.interactions["timestamp"].dtype) == "datetime64[ns, UTC]"


def test_any_dataset_round_trips_through_extra_columns(tmp_path):
    """A source without event ids (MovieLens-like) and with its own columns: deterministic ids keep seeding
    idempotent, `extra` gives the columns back."""
    inter = pd.DataFrame({"user_id": ["1", "1", "2", "2"], "property_id": ["10", "10", "10", "11"],
                          "timestamp": pd.to_datetime([1, 1, 5, 9], unit="s", utc=True),
                          "weight": 1.0, "rating": [4.5, 4.5, 3.0, 5.0]})
    items = pd.DataFrame({"property_id": ["10", "11"], "title": ["A", "B"], "genres": [["x", "y"], []]})
    ds = Dataset(inter, items, name="ml")
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert store.seed(url, ds)["interactions"] == 4  # the repeated rating is a second event
    assert store.seed(url, ds)["interactions"] == 0
    back = store.load_from_db(url)
    assert back.interactions["event_id"].is_unique
    pd.testing.assert_frame_equal(back.interactions.drop(columns=["event_id"]), ds.interactions)
    pd.testing.assert_frame_equal(back.items, ds.items)
    assert back.users is None  # no users table rows: no user features


def test_bad_rows_name_the_field_and_write_nothing(tmp_path, small):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    bad = small.subset(small.interactions)
    bad.items = small.items.assign(price=small.items["price"].astype(object))
    bad.items.iloc[5, bad.items.columns.get_loc("price")] = "twelve hundred"
    with pytest.raises(ValueError, match="price"):
        store.seed(url, bad)
    assert store.stats(url)["rows"] == {"interactions": 0, "properties": 0, "users": 0}


# ------------------------------------------------------------------------------------------ incremental writes
def test_incremental_writes_for_the_stream_processor(pg_url, small):
    store.seed(pg_url, small)
    eng = store.create_engine(pg_url)  # a long-running writer keeps one engine
    try:
        events = [Interaction(event_id="live-1", event_type="save", user_id="u_new", property_id="p_000001",
                              timestamp="2024-06-01T12:00:00+02:00"),
                  {"event_id": "live-2", "event_type": "view", "user_id": "u_000001", "property_id": "p_000002",
                   "timestamp": "2024-06-01T11:00:00Z"}]
        assert store.insert_interactions(eng, events) == 2
        assert store.insert_interactions(eng, events) == 0  # redelivered: no duplicates
        assert store.insert_interactions(eng, small.interactions.head(50)) == 0
        store.upsert_property(eng, "p_000001", {"price": 999.0}, available=False)  # updated, then delisted
        store.upsert_property(eng, "p_zzz", {"price": 1500, "city": "Boston", "amenities": ["gym"]})  # listed
        with pytest.raises(ValueError, match="colour"):
            store.upsert_property(eng, "p_zzz", {"colour": "red"})
        with pytest.raises(ValueError, match="bedrooms"):
            store.upsert_property(eng, "p_zzz", {"bedrooms": "two"})
        with eng.connect() as conn:
            row = conn.execute(sa.select(m.properties).where(m.properties.c.property_id == "p_000001")).one()
        assert row.price == 999.0 and row.available is False and row.city == small.items.loc["p_000001", "city"]
    finally:
        eng.dispose()
    back = store.load_from_db(pg_url)
    assert len(back.interactions) == 3002 and len(back.items) == 101
    live = back.interactions.set_index("event_id").loc["live-1"]
    assert live["weight"] == 2.0 and live["timestamp"] == pd.Timestamp("2024-06-01T10:00:00Z")
    assert back.items.loc["p_zzz", "amenities"] == ["gym"]
    since = store.load_from_db(pg_url, since="2024-03-01T00:00:00Z")
    expected = int((small.interactions["timestamp"] >= pd.Timestamp("2024-03-01", tz="UTC")).sum()) + 2
    assert len(since.interactions) == expected and since.meta["since"].startswith("2024-03-01")


# ------------------------------------------------------------------------------------------ ingest
def test_ingest_from_the_postgres_database_of_record(pg_url, small, tmp_path, db_settings):
    store.seed(pg_url, small)
    # a URL spec, as the pipeline's ingest step gets it: the same data, no password in the lineage
    info = steps.ingest(pg_url, tmp_path / "out")
    assert info["interactions"] == 3000 and info["snapshot"] == small.snapshot_hash()
    assert "s3cret" not in json.dumps(info) and "***" in info["source"]
    assert_same(Dataset.load(tmp_path / "out"), small)
    # "db": the database of record from the settings (RENTALML_DATABASE_URL from a secret in the cluster)
    db_settings(pg_url)
    ds = load_dataset("db")
    assert ds.name == "db" and ds.snapshot_hash() == small.snapshot_hash()
    assert steps.ingest("db", tmp_path / "out2")["snapshot"] == small.snapshot_hash()
    assert load_dataset("sql:SELECT * FROM interactions WHERE event_type = 'lease'").interactions[
        "event_type"].eq("lease").all()


# ------------------------------------------------------------------------------------------ CLI
def test_cli_db_init_seed_stats_on_postgres(pg_url):
    runner = CliRunner()
    res = runner.invoke(app, ["db", "init", "--url", pg_url])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["revision"] == "0001" and "s3cret" not in res.output
    for _ in range(2):  # seeding twice leaves the same rows
        res = runner.invoke(app, ["db", "seed", "--url", pg_url, "--dataset", "synthetic:60,30,500,7"])
        assert res.exit_code == 0, res.output
        out = json.loads(res.output)
        assert out["rows"] == {"interactions": 500, "properties": 30, "users": 60}
    assert out["inserted"] == {"interactions": 0, "properties": 0, "users": 0}
    res = runner.invoke(app, ["db", "stats", "--url", pg_url])
    assert res.exit_code == 0 and json.loads(res.output)["revision"] == "0001"
