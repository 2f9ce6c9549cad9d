"""Evaluation protocols: how interactions are split into train and test.

All splits work on (user, property) pairs: repeated events of a pair are aggregated first (weights summed,
last timestamp kept) so that one pair is never both in train and test.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

PROTOCOLS = ("random-75-25", "temporal-leave-last-n", "cold-start-items")


def aggregate_pairs(df: pd.DataFrame) -> pd.DataFrame:
    g = df.groupby(["user_id", "property_id"], sort=True, observed=True)
    out = g.agg(weight=("weight", "sum"), timestamp=("timestamp", "max"), events=("weight", "size"))
    return out.reset_index()


def _rank_within_user(users: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order rows by (user, key); return (rank of each row within its user, size of its user's group)."""
    order = np.lexsort((keys, users))
    u_sorted = users[order]
    starts = np.r_[0, np.flatnonzero(u_sorted[1:] != u_sorted[:-1]) + 1]
    sizes = np.diff(np.r_[starts, len(order)])
    rank_sorted = np.arange(len(order)) - np.repeat(starts, sizes)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = rank_sorted
    size = np.empty(len(order), dtype=np.int64)
    size[order] = np.repeat(sizes, sizes)
    return rank, size


def random_split(df: pd.DataFrame, train_frac: float = 0.75, seed: int = 42) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per user, shuffle pairs with the seed; the first round(train_frac·n) (at least 1) go to train."""
    pairs = aggregate_pairs(df)
    rng = np.random.default_rng(seed)
    users = pd.factorize(pairs["user_id"])[0]
    rank, size = _rank_within_user(users, rng.random(len(pairs)))
    n_train = np.maximum(1, np.round(train_frac * size)).astype(np.int64)
    is_train = rank < n_train
    return pairs[is_train].reset_index(drop=True), pairs[~is_train].reset_index(drop=True)


def holdout_split(df: pd.DataFrame, frac: float = 0.1, seed: int = 42) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validation carve-out for model selection: every user with at least 2 pairs holds out
    max(1, round(frac·n)) shuffled pairs (and keeps at least one), so sparse users are validated too."""
    pairs = aggregate_pairs(df)
    rng = np.random.default_rng(seed)
    users = pd.factorize(pairs["user_id"])[0]
    rank, size = _rank_within_user(users, rng.random(len(pairs)))
    n_hold = np.where(size >= 2, np.minimum(size - 1, np.maximum(1, np.round(frac * size))), 0).astype(np.int64)
    is_hold = rank < n_hold
    return pairs[~is_hold].reset_index(drop=True), pairs[is_hold].reset_index(drop=True)


def temporal_leave_last_n(df: pd.DataFrame, n: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per user, the n most recent pairs go to test (users with more than n pairs only)."""
    pairs = aggregate_pairs(df)
    users = pd.factorize(pairs["user_id"])[0]
    ts = pairs["timestamp"].astype("int64").to_numpy()
    rank, size = _rank_within_user(users, ts)
    is_test = (size > n) & (rank >= size - n)
    return pairs[~is_test].reset_index(drop=True), pairs[is_test].reset_index(drop=True)


def cold_start_items(df: pd.DataFrame, frac: float = 0.1, seed: int = 42) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A seeded fraction of properties is held out entirely: none of their interactions are in train."""
    pairs = aggregate_pairs(df)
    items = np.array(sorted(pairs["property_id"].unique()), dtype=object)
    rng = np.random.default_rng(seed)
    cold = set(rng.choice(items, size=max(1, int(round(frac * len(items)))), replace=False))
    is_cold = pairs["property_id"].isin(cold).to_numpy()
    train, test = pairs[~is_cold], pairs[is_cold]
    test = test[test["user_id"].isin(set(train["user_id"]))]
    return train.reset_index(drop=True), test.reset_index(drop=True)


def kfold(df: pd.DataFrame, folds: int = 5, seed: int = 42) -> Iterator[tuple[pd.DataFrame, pd.DataFrame]]:
    """Per-user k-fold CV: each user's shuffled pairs are dealt round-robin into folds."""
    pairs = aggregate_pairs(df)
    rng = np.random.default_rng(seed)
    users = pd.factorize(pairs["user_id"])[0]
    rank, _ = _rank_within_user(users, rng.random(len(pairs)))
    fold_of = rank % folds
    for f in range(folds):
        test_mask = fold_of == f
        yield pairs[~test_mask].reset_index(drop=True), pairs[test_mask].reset_index(drop=True)


def split(df: pd.DataFrame, protocol: str, seed: int = 42, **kw) -> tuple[pd.DataFrame, pd.DataFrame]:
    if protocol == "random-75-25":
        return random_split(df, 0.75, seed)
    if protocol.startswith("temporal-leave-last"):
        return temporal_leave_last_n(df, kw.get("n", 1))
    if protocol == "cold-start-items":
        return cold_start_items(df, kw.get("frac", 0.1), seed)
    raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
