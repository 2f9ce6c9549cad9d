"""What the MovieLens quality probes share (benchmarks/dlae_probe.py, benchmarks/vae_probe.py): the data, the
harness's random-75-25 split as a dense matrix, the per-seed EASE L2 of the 5-seed benchmark, and nDCG@10 on the
held-out pairs. Probes score on TEST to bound what a lever could give; a lever worth building is then chosen on
validation inside the model, as every shipped choice is."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import torch

from rentalml.data.loaders import load_csv, shared_data_dir
from rentalml.evaluation.protocols import random_split

L2 = {1: 100.0, 2: 100.0, 3: 400.0, 4: 400.0, 5: 400.0}  # benchmarks/results/movielens_random-75-25_seeds.json
DISC = 1 / np.log2(np.arange(2, 12))


def ratings() -> pd.DataFrame:
    base = shared_data_dir()
    if base is None:
        sys.exit("../shared/data is absent: this probe needs movielens-latest-small")
    return load_csv(base / "movielens-latest-small" / "ratings.csv").interactions


def split(df: pd.DataFrame, seed: int):
    """The harness's random-75-25 split of `seed`: the training pairs, their item and user ids (sorted: the
    matrix's columns and rows), the training matrix (users × items seen in train, 0/1, float32), the test users'
    rows and each one's held-out item indices."""
    tr, te = random_split(df, 0.75, seed)
    iidx, uidx = pd.Index(np.sort(tr.property_id.unique())), pd.Index(np.sort(tr.user_id.unique()))
    x = np.zeros((len(uidx), len(iidx)), np.float32)
    x[uidx.get_indexer(tr.user_id), iidx.get_indexer(tr.property_id)] = 1
    te = te[te.property_id.isin(iidx) & te.user_id.isin(uidx)]
    held = pd.Series(iidx.get_indexer(te.property_id)).groupby(uidx.get_indexer(te.user_id)).apply(np.asarray)
    return tr, iidx, uidx, x, held.index.to_numpy(), list(held.values)


def split_matrix(df: pd.DataFrame, seed: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """`split`'s matrix, test users and held-out items."""
    return split(df, seed)[3:]


def ridge_inverse(x: np.ndarray, lam: np.ndarray | float) -> np.ndarray:
    """(XᵀX + diag(lam))⁻¹ in float64, by Cholesky."""
    g = torch.from_numpy((x.T @ x).astype(np.float64))
    g.diagonal().add_(torch.as_tensor(lam, dtype=torch.float64))
    return torch.cholesky_inverse(torch.linalg.cholesky(g)).numpy()


def ease_from_inverse(inv: np.ndarray) -> np.ndarray:
    """EASE's weights from the ridge inverse: -P / diag(P), zero diagonal."""
    b = -inv / np.diag(inv)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


def ndcg10(scores: np.ndarray, seen: np.ndarray, truth: list[np.ndarray]) -> float:
    s = np.where(seen > 0, -np.inf, scores)
    top = np.argpartition(-s, 10, axis=1)[:, :10]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, 1), axis=1), 1)
    return float(np.mean([(np.isin(r, t) * DISC).sum() / DISC[: min(len(t), 10)].sum()
                          for r, t in zip(top, truth, strict=True)]))
