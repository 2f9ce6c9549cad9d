"""Synthetic generator and data loaders."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from rentalml.data.dataset import Dataset
from rentalml.data.generator import generate_marketplace, write_marketplace
from rentalml.data.loaders import (
    _parse_price,
    load_airbnb,
    load_csv,
    load_dataset,
    load_movielens,
    shared_data_dir,
)
from rentalml.schema import EVENT_WEIGHTS, INTERACTION_COLUMNS, PROPERTY_COLUMNS, USER_COLUMNS


@pytest.fixture(scope="module")
def market() -> Dataset:
    return generate_marketplace(n_users=1500, n_properties=800, n_events=30_000, seed=7)


def _city(area: str) -> str:
    return area.rsplit("-n", 1)[0]


# ------------------------------------------------------------------ generator
def test_same_seed_same_data_different_seed_differs():
    a = generate_marketplace(300, 150, 3000, seed=1)
    b = generate_marketplace(300, 150, 3000, seed=1)
    c = generate_marketplace(300, 150, 3000, seed=2)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.items, b.items)
    pd.testing.assert_frame_equal(a.users, b.users)
    assert a.snapshot_hash() == b.snapshot_hash() != c.snapshot_hash()
    assert not a.items["price"].equals(c.items["price"])


def test_schema_columns_and_dtypes(market: Dataset):
    df, items, users = market.interactions, market.items, market.users
    assert market.name == "synthetic"
    assert list(df.columns) == INTERACTION_COLUMNS
    assert len(df) == 30_000 and df["event_id"].is_unique
    assert str(df["timestamp"].dt.tz) == "UTC"
    assert (df["timestamp"].max() - df["timestamp"].min()) <= pd.Timedelta(days=90)
    assert set(df["event_type"]) <= set(EVENT_WEIGHTS)
    assert (df["weight"] == df["event_type"].map(EVENT_WEIGHTS)).all()
    assert df["session_id"].notna().all()
    assert [items.index.name, *items.columns] == PROPERTY_COLUMNS
    assert [users.index.name, *users.columns] == USER_COLUMNS
    assert items.index[0] == "p_000001" and users.index[0] == "u_000001"
    assert set(df["property_id"]) <= set(items.index) and set(df["user_id"]) <= set(users.index)
    assert items["price"].dtype == float and (items["price"] > 0).all()
    assert items["bedrooms"].between(0, 5).all() and pd.api.types.is_integer_dtype(items["bedrooms"])
    assert set(items["property_type"]) <= {"apartment", "house", "studio", "townhouse", "condo"}
    assert set(items["room_type"]) <= {"entire_home", "private_room", "shared_room"}
    assert items["city"].nunique() == 5
    assert items["pets_allowed"].dtype == bool
    assert all(isinstance(a, list) for a in items["amenities"])
    assert str(items["listed_at"].dt.tz) == "UTC"
    assert users["preferred_areas"].map(len).between(1, 3).all()
    assert (users["budget"] > 0).all() and (users["household_size"] >= 1).all()


def test_prices_follow_size_and_city(market: Dataset):
    items = market.items
    by_beds = items[items["room_type"] == "entire_home"].groupby("bedrooms")["price"].median()
    assert by_beds.is_monotonic_increasing
    city_med = items.groupby("city")["price"].median()
    assert city_med.max() / city_med.min() > 1.15


def test_every_user_active_and_heavy_tailed(market: Dataset):
    counts = market.interactions["user_id"].value_counts()
    assert len(counts) == 1500 and counts.min() >= 3
    assert counts.max() > 5 * counts.median()


def test_funnel_ordering(market: Dataset):
    df = market.interactions
    n = df["event_type"].value_counts()
    assert n["view"] > n["save"] > n["inquiry"] > n["application"] > n["lease"] > 0
    assert n["view"] / len(df) > 0.6
    assert df[df["event_type"] == "lease"].groupby("user_id").size().max() == 1
    # a save follows a view of the same property by the same user
    first = df.groupby(["user_id", "property_id", "event_type"])["timestamp"].min().unstack()
    saved = first[first["save"].notna()]
    assert (saved["view"] <= saved["save"]).mean() > 0.95


def test_interactions_concentrate_in_preferred_areas(market: Dataset):
    df = market.interactions
    city = market.items["city"].reindex(df["property_id"]).to_numpy()
    areas = market.users["preferred_areas"].reindex(df["user_id"])
    in_pref = np.array([c in {_city(a) for a in aa} for c, aa in zip(city, areas, strict=True)])
    share = pd.Series(in_pref).groupby(df["user_id"].to_numpy()).mean()
    assert in_pref.mean() > 0.5
    assert (share > 0.5).mean() > 0.9


def test_city_heuristic_beats_popularity(market: Dataset):
    df = market.interactions.sort_values("timestamp", kind="stable")
    last = df.groupby("user_id").tail(1)
    train = df.drop(last.index)
    pop = train["property_id"].value_counts()
    top_global = set(pop.index[:10])
    city_of = market.items["city"]
    ranked = pop.index.to_series().groupby(city_of.reindex(pop.index).to_numpy()).apply(list)
    hits_pop = hits_city = 0
    for user, item in zip(last["user_id"], last["property_id"], strict=True):
        cities = {_city(a) for a in market.users.at[user, "preferred_areas"]}
        cand = sorted((i for c in cities for i in ranked.get(c, [])[:10]), key=lambda i: -pop[i])[:10]
        hits_pop += item in top_global
        hits_city += item in set(cand)
    assert hits_city > 2 * hits_pop
    assert hits_city / len(last) > 0.1


def test_generator_rejects_too_few_events():
    with pytest.raises(ValueError, match="n_events"):
        generate_marketplace(n_users=100, n_properties=10, n_events=200)


def test_custom_cities():
    d = generate_marketplace(50, 40, 300, cities=["Boston", "Atlantis"])
    assert set(d.items["city"]) == {"Boston", "Atlantis"}
    d = generate_marketplace(50, 40, 300, cities={"X": (10.0, 10.0, 2.0), "Y": (11.0, 11.0)})
    assert set(d.items["city"]) == {"X", "Y"}


def test_scale_smoke():
    t = time.perf_counter()
    d = generate_marketplace(n_users=20_000, n_properties=5_000, n_events=200_000, seed=3)
    elapsed = time.perf_counter() - t
    assert len(d.interactions) == 200_000
    assert elapsed < 15, f"generation took {elapsed:.1f}s"


def test_write_and_load_roundtrip(tmp_path, market: Dataset):
    out = write_marketplace(market, tmp_path / "synth")
    assert {p.name for p in out.iterdir()} >= {"interactions.parquet", "properties.parquet", "users.parquet"}
    back = load_dataset(str(out))
    assert back.snapshot_hash() == market.snapshot_hash()
    assert isinstance(back.items["amenities"].iloc[0], list | np.ndarray)
    assert len(back.users) == len(market.users)


def test_load_dataset_synthetic_spec():
    d = load_dataset("synthetic:100,50,400,5")
    assert d.name == "synthetic" and len(d.interactions) == 400 and d.meta["seed"] == 5
    with pytest.raises(ValueError):
        load_dataset("no-such-dataset")


# ------------------------------------------------------------------ CSV loaders
def test_load_csv_generic(tmp_path):
    p = tmp_path / "events.csv"
    p.write_text("user_id,item_id,timestamp,weight\n1,a,2024-01-01T10:00:00Z,2\n2,b,2024-01-02,\n")
    f = tmp_path / "items.csv"
    f.write_text("item_id,price,city\na,1000,X\nb,2000,Y\n")
    d = load_csv(p, f)
    df = d.interactions
    assert list(df["property_id"]) == ["a", "b"] and list(df["user_id"]) == ["1", "2"]
    assert list(df["weight"]) == [2.0, 1.0]
    assert df["timestamp"].iloc[1] == pd.Timestamp("2024-01-02", tz="UTC")
    assert d.items.loc["b", "price"] == 2000 and d.items.index.dtype == object
    assert d.name == "events"


def test_load_csv_unix_seconds_without_weight(tmp_path):
    p = tmp_path / "e.csv"
    p.write_text("user_id,item_id,timestamp\nu,7,0\nu,8,86400\n")
    df = load_csv(p).interactions
    assert list(df["weight"]) == [1.0, 1.0]
    assert df["timestamp"].iloc[1] == pd.Timestamp("1970-01-02", tz="UTC")


def test_load_csv_movielens_headers(tmp_path):
    p = tmp_path / "ratings.csv"
    p.write_text("userId,movieId,rating,timestamp\n1,10,4.5,964982703\n1,11,1.0,964982704\n")
    df = load_csv(p).interactions
    assert list(df["property_id"]) == ["10", "11"]
    assert list(df["weight"]) == [1.0, 1.0] and list(df["rating"]) == [4.5, 1.0]


def test_load_csv_missing_column(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("user_id,timestamp\n1,0\n")
    with pytest.raises(ValueError, match="item_id"):
        load_csv(p)
    f = tmp_path / "items.csv"
    f.write_text("sku,price\na,1\n")
    ok = tmp_path / "ok.csv"
    ok.write_text("user_id,item_id,timestamp\n1,a,0\n")
    with pytest.raises(ValueError, match="item_id"):
        load_csv(ok, f)


def test_load_dataset_csv_path(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("user_id,item_id,timestamp\n1,a,0\n")
    assert len(load_dataset(str(p)).interactions) == 1


def test_parse_price():
    out = _parse_price(pd.Series(["$1,234.00", "$70.00", None, "abc"]))
    assert out.iloc[0] == 1234.0 and out.iloc[1] == 70.0 and out.iloc[2:].isna().all()


# ------------------------------------------------------------------ shared real data
def _shared(name: str):
    base = shared_data_dir()
    if base is None or not (base / name).is_dir():
        pytest.skip(f"../shared/data/{name} not present (shared_data_dir() = {base})")
    return base / name


def test_load_movielens():
    d = load_movielens(_shared("movielens-latest-small"))
    df = d.interactions
    assert len(df) > 90_000 and (df["weight"] == 1.0).all() and "rating" in df
    assert set(df["property_id"]) <= set(d.items.index)  # ratings of unknown movies are dropped
    assert d.summary()["users"] == df["user_id"].nunique() and d.meta["dropped_unknown_items"] >= 0
    assert d.items.loc["1", "genres"][0] == "Adventure"
    assert d.items.loc["1", "year"] == 1995
    assert load_dataset("movielens").summary() == d.summary()


def test_load_airbnb():
    d = load_airbnb(_shared("airbnb-albany"))
    items, df = d.items, d.interactions
    assert items.loc["2992450", "price"] == 70.0
    assert items["price"].dtype == float and (items["price"] > 0).all() and items["price"].notna().all()
    assert items["bathrooms"].notna().all() and items["bedrooms"].notna().all()
    assert (items["city"] == "Albany").all() and "accommodates" in items
    assert set(items["room_type"]) <= {"entire_home", "private_room", "shared_room", "hotel_room"}
    assert "wifi" in items.loc["2992450", "amenities"]
    assert set(df["property_id"]) <= set(items.index)
    assert (df["event_type"] == "lease").all() and (df["weight"] == 1.0).all()
    assert df["event_id"].str.startswith("r_").all() and df["event_id"].is_unique
    two = load_airbnb(_shared("airbnb-albany"), min_user_reviews=2)
    assert two.interactions["user_id"].value_counts().min() >= 2
    assert len(two.interactions) < len(df)
