"""Evaluate a fitted model on held-out pairs: ranking metrics, coverage and the cold-start slice."""

from __future__ import annotations

import numpy as np
import pandas as pd

from rentalml.data.dataset import InteractionMatrix
from rentalml.evaluation.metrics import ranking_metrics, summarize, topk_indices


def sample_test_users(test: pd.DataFrame, max_users: int | None, seed: int = 0) -> tuple[pd.DataFrame, int]:
    """The test pairs of at most `max_users` test users drawn at random (seeded; None or 0: every user), and the
    number of test users there were. Lists are still ranked over the whole catalogue: only who is scored is
    sampled, so the metrics are unbiased estimates of the full evaluation's."""
    users = np.sort(test["user_id"].unique())
    if not max_users or len(users) <= max_users:
        return test, len(users)
    chosen = np.random.default_rng(seed).choice(users, max_users, replace=False)
    return test[test["user_id"].isin(set(chosen))], len(users)


def evaluate(fitted, test: pd.DataFrame, k: int = 10, batch: int = 512, *, max_users: int | None = None,
             seed: int = 0) -> dict:
    """Metrics of `fitted` (training.Fitted) on `test` pairs; seen (train) items are excluded from lists.

    `max_users`: score a seeded random sample of that many test users (`sample_test_users`); the result says
    how many were scored (`users`) out of how many (`test_users`)."""
    test, n_test_users = sample_test_users(test, max_users, seed)
    tm = InteractionMatrix.build(test, item_ids=fitted.item_ids, user_ids=fitted.user_ids).binary()
    users = np.flatnonzero(np.diff(tm.indptr) > 0)
    train_pop = np.asarray(fitted.train.sum(0)).ravel()
    cold_items = train_pop == 0
    per_user: dict[str, list[np.ndarray]] = {m: [] for m in ("ndcg", "recall", "precision", "map")}
    cold_user: dict[str, list[np.ndarray]] = {m: [] for m in per_user}
    recommended = np.zeros(len(fitted.item_ids), dtype=bool)
    for s in range(0, len(users), batch):
        ub = users[s:s + batch]
        scores = fitted.score_users(ub)
        scores[fitted.train[ub].nonzero()] = -np.inf
        top = topk_indices(scores, k)
        recommended[top.ravel()] = True
        for name, v in ranking_metrics(top, tm[ub], k).items():
            per_user[name].append(v)
        if cold_items.any():
            rel = tm[ub].multiply(cold_items[None, :]).tocsr()
            rel.eliminate_zeros()  # multiply keeps the masked-out (warm) entries as explicit zeros
            has = np.diff(rel.indptr) > 0
            if has.any():
                for name, v in ranking_metrics(top[has], rel[has], k).items():
                    cold_user[name].append(v)
    out = summarize(per_user, k)
    out["coverage"] = float(recommended.mean())
    out["users"] = int(len(users))
    out["test_users"] = int(n_test_users)
    if any(len(v) for v in cold_user.values()):
        out["cold_start"] = {**summarize(cold_user, k), "users": int(sum(len(v) for v in cold_user["ndcg"]))}
    return out
