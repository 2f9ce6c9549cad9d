"""Evaluation protocols: how interactions are split into train and test pairs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rentalml.data.generator import generate_marketplace
from rentalml.evaluation.protocols import (
    PROTOCOLS,
    aggregate_pairs,
    cold_start_items,
    kfold,
    random_split,
    split,
    temporal_leave_last_n,
)


@pytest.fixture(scope="module")
def events() -> pd.DataFrame:
    return generate_marketplace(n_users=400, n_properties=200, n_events=8000, seed=1).interactions


def _pairs(df: pd.DataFrame) -> set[tuple[str, str]]:
    return set(zip(df["user_id"], df["property_id"], strict=True))


def _toy() -> pd.DataFrame:
    t = pd.Timestamp("2024-01-01", tz="UTC")
    rows = [  # (user, property, minutes, weight)
        ("a", "p1", 0, 1.0), ("a", "p1", 5, 2.0), ("a", "p2", 1, 1.0), ("a", "p3", 9, 1.0),
        ("b", "p1", 3, 1.0),
        ("c", "p2", 2, 1.0), ("c", "p4", 1, 1.0), ("c", "p2", 7, 3.0),
    ]
    return pd.DataFrame({"user_id": [r[0] for r in rows], "property_id": [r[1] for r in rows],
                         "timestamp": [t + pd.Timedelta(minutes=r[2]) for r in rows],
                         "weight": [r[3] for r in rows]})


# ------------------------------------------------------------------ aggregation
def test_aggregate_pairs_sums_weights_keeps_last_timestamp():
    agg = aggregate_pairs(_toy()).set_index(["user_id", "property_id"])
    assert len(agg) == 6 and agg.index.is_unique
    assert agg.loc[("a", "p1"), "weight"] == 3.0 and agg.loc[("a", "p1"), "events"] == 2
    assert agg.loc[("a", "p1"), "timestamp"] == pd.Timestamp("2024-01-01 00:05", tz="UTC")
    assert agg.loc[("c", "p2"), "weight"] == 4.0
    assert agg.loc[("c", "p2"), "timestamp"] == pd.Timestamp("2024-01-01 00:07", tz="UTC")


# ------------------------------------------------------------------ random 75/25
def test_random_split_per_user_counts(events):
    train, test = random_split(events, 0.75, seed=42)
    pairs = aggregate_pairs(events)
    n = pairs.groupby("user_id").size()
    n_train = train.groupby("user_id").size().reindex(n.index, fill_value=0)
    n_test = test.groupby("user_id").size().reindex(n.index, fill_value=0)
    expected = np.maximum(1, np.round(0.75 * n)).astype(int)
    pd.testing.assert_series_equal(n_train, expected, check_names=False)
    pd.testing.assert_series_equal(n_train + n_test, n, check_names=False)
    assert (n_train >= 1).all()
    assert set(train["user_id"]) == set(pairs["user_id"])  # every user keeps a training history
    assert len(test) > 0


def test_random_split_disjoint_and_aggregated(events):
    train, test = random_split(events, 0.75, seed=42)
    for part in (train, test):
        assert not part.duplicated(["user_id", "property_id"]).any()
    assert not (_pairs(train) & _pairs(test))
    assert _pairs(train) | _pairs(test) == _pairs(events)
    # weights are summed over repeated events of the pair
    total = events.groupby(["user_id", "property_id"])["weight"].sum()
    both = pd.concat([train, test]).set_index(["user_id", "property_id"])["weight"]
    pd.testing.assert_series_equal(both.sort_index(), total.sort_index(), check_names=False)


def test_random_split_deterministic_per_seed(events):
    a_train, a_test = random_split(events, 0.75, seed=7)
    b_train, b_test = random_split(events, 0.75, seed=7)
    pd.testing.assert_frame_equal(a_train, b_train)
    pd.testing.assert_frame_equal(a_test, b_test)
    c_train, _ = random_split(events, 0.75, seed=8)
    assert _pairs(a_train) != _pairs(c_train)
    s_train, s_test = split(events, "random-75-25", seed=7)
    pd.testing.assert_frame_equal(s_train, a_train)
    pd.testing.assert_frame_equal(s_test, a_test)


def test_random_split_single_pair_user_goes_to_train():
    train, test = random_split(_toy(), 0.75, seed=0)
    assert ("b", "p1") in _pairs(train) and "b" not in set(test["user_id"])
    # user a has 3 pairs → round(2.25) = 2 train; user c has 2 pairs → round(1.5) = 2 (numpy rounds half to even)
    assert (train["user_id"] == "a").sum() == 2 and (test["user_id"] == "a").sum() == 1
    assert (train["user_id"] == "c").sum() == 2


# ------------------------------------------------------------------ temporal leave-last-n
def test_temporal_leave_last_one_is_most_recent_pair(events):
    train, test = temporal_leave_last_n(events, 1)
    pairs = aggregate_pairs(events)
    sizes = pairs.groupby("user_id").size()
    assert set(test["user_id"]) == set(sizes[sizes > 1].index)
    assert test["user_id"].is_unique
    assert not (_pairs(train) & _pairs(test))
    assert _pairs(train) | _pairs(test) == _pairs(events)
    last_train = train.groupby("user_id")["timestamp"].max()
    t = test.set_index("user_id")["timestamp"]
    assert (t >= last_train.reindex(t.index)).all()
    assert (t == pairs.groupby("user_id")["timestamp"].max().reindex(t.index)).all()


def test_temporal_leave_last_toy_and_n2():
    train, test = temporal_leave_last_n(_toy(), 1)
    # a: p1 (last event 00:05), p2 (00:01), p3 (00:09) → p3; b has one pair → stays in train;
    # c: p2's last event (00:07) is after p4 (00:01) → p2
    assert _pairs(test) == {("a", "p3"), ("c", "p2")}
    assert ("b", "p1") in _pairs(train)
    train2, test2 = split(_toy(), "temporal-leave-last-n", n=2)
    assert _pairs(test2) == {("a", "p3"), ("a", "p1")}  # only users with more than 2 pairs
    assert _pairs(train2) == {("a", "p2"), ("b", "p1"), ("c", "p2"), ("c", "p4")}


# ------------------------------------------------------------------ cold-start items
def test_cold_start_items_never_in_train(events):
    train, test = cold_start_items(events, frac=0.1, seed=42)
    assert len(test) > 0
    assert not (set(test["property_id"]) & set(train["property_id"]))
    assert set(test["user_id"]) <= set(train["user_id"])  # test users are known users
    n_items = aggregate_pairs(events)["property_id"].nunique()
    assert set(test["property_id"]) <= set(aggregate_pairs(events)["property_id"])
    assert len(set(test["property_id"])) <= round(0.1 * n_items)
    a, b = split(events, "cold-start-items", seed=42)
    pd.testing.assert_frame_equal(a, train)
    pd.testing.assert_frame_equal(b, test)
    _, other = cold_start_items(events, frac=0.1, seed=43)
    assert set(other["property_id"]) != set(test["property_id"])


# ------------------------------------------------------------------ k-fold
def test_kfold_each_pair_in_exactly_one_test_fold(events):
    pairs = aggregate_pairs(events)
    folds = list(kfold(events, folds=4, seed=3))
    assert len(folds) == 4
    seen: dict[tuple[str, str], int] = {}
    for train, test in folds:
        assert not (_pairs(train) & _pairs(test))
        assert _pairs(train) | _pairs(test) == _pairs(pairs)
        for p in _pairs(test):
            seen[p] = seen.get(p, 0) + 1
    assert set(seen) == _pairs(pairs) and set(seen.values()) == {1}
    # per user, test folds differ in size by at most one pair (round-robin)
    sizes = np.array([t.groupby("user_id").size().reindex(pairs["user_id"].unique(), fill_value=0).to_numpy()
                      for _, t in folds])
    assert (sizes.max(0) - sizes.min(0) <= 1).all()
    again = list(kfold(events, folds=4, seed=3))
    for (a, b), (c, d) in zip(folds, again, strict=True):
        pd.testing.assert_frame_equal(a, c)
        pd.testing.assert_frame_equal(b, d)


# ------------------------------------------------------------------ dispatch
def test_unknown_protocol_lists_choices(events):
    with pytest.raises(ValueError) as exc:
        split(events, "leave-one-out")
    for name in PROTOCOLS:
        assert name in str(exc.value)
