"""Probe for issue #14's Albany bar (hybrid >= 0.26 nDCG@10): a learned second stage over the first stage's
candidates, scored through the harness's own splits. The hybrid has carried it since (models/hybrid.py: learned
on its own validation holdout, warm candidates only); this probe keeps the protocol that found it, and compares
first stages and feature sets (docs/benchmarks.md, "A learned re-ranker").

Per seed: `random_split` 75/25 as `rentalml benchmark` does. The ranker learns on a holdout carved from TRAIN
(`holdout_split`, 25 %, the first stage refit without it), then the first stage is fit on the whole of train and
its top `--candidates` per test user are re-ordered by the ranker; nothing is picked on test. The first stage
is `fit_model(--first)`, the harness's own model with its own validation choices.

The ranker and its features are the core's (`rentalml.models.rerank`: `PairContext`, `pair_features`,
`PairRanker`, an L2 logistic regression, C = 1, standardised inputs, L-BFGS in float64: deterministic).
Feature sets scored side by side: all, all but `tdens` (the item's reviews near the user's times), no time.
LightGBM's lambdarank on the same features was tried on seed 1 and dropped (docs/benchmarks.md).

    python benchmarks/rerank_probe.py --first itemitem --seeds 1,2,3,4,5
    python benchmarks/rerank_probe.py --first hybrid --seeds 1,2,3,4,5
Writes benchmarks/results/rerank_probe_<first>.json. Needs ../shared/data/airbnb-albany.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from rentalml.data.dataset import InteractionMatrix
from rentalml.data.loaders import load_airbnb
from rentalml.evaluation.protocols import holdout_split, random_split
from rentalml.models.rerank import FEATURES, PairContext, PairRanker, pair_features, years
from rentalml.training.trainer import fit_model

RESULTS = Path(__file__).resolve().parent / "results"
DISC = 1 / np.log2(np.arange(2, 12))
TIME = {"dt_mean", "dt_last", "dt_first", "u_t", "tdens"}
#: feature sets scored side by side: the columns outside a set are zeroed (their weight is then 0)
SETS = {"all": set(FEATURES), "no_tdens": set(FEATURES) - {"tdens"}, "no_time": set(FEATURES) - TIME}


def ndcg10(ranked: list[np.ndarray], truth: list[set]) -> float:
    out = []
    for r, t in zip(ranked, truth, strict=True):
        rel = np.isin(r[:10], list(t))
        out.append(float((rel * DISC[: len(rel)]).sum() / DISC[: min(len(t), 10)].sum()))
    return float(np.mean(out))


def frames(ds, train: pd.DataFrame, target: pd.DataFrame, first: str, seed: int, n_cand: int):
    """Fit `first` on train; the top n_cand unseen items of every user with target pairs, their
    `pair_features` and labels. Returns (features [rows, F], labels, user of each row, candidates, truth)."""
    f = fit_model(first, ds, train, seed=seed)
    iid, uid = pd.Index(f.item_ids), pd.Index(f.user_ids)
    times = InteractionMatrix.build(train.assign(weight=years(train["timestamp"])), item_ids=f.item_ids,
                                    user_ids=f.user_ids).matrix.astype(np.float64)
    ctx = PairContext.build(ds.items, f.item_ids, f.train, times)
    tgt = target[target.user_id.isin(uid) & target.property_id.isin(iid)]
    truth_s = tgt.groupby("user_id").property_id.apply(lambda s: set(iid.get_indexer(s)))
    users = uid.get_indexer(truth_s.index)
    xs, ys, owner, cands = [], [], [], []
    for b in range(0, len(users), 512):
        ub = users[b: b + 512]
        sc = f.score_users(ub)
        sc[f.train[ub].nonzero()] = -np.inf
        top = np.argsort(-sc, axis=1, kind="stable")[:, :n_cand]
        for j, u in enumerate(ub):
            row = times[u]
            c = top[j]
            cands.append(c)
            xs.append(pair_features(ctx, row.indices, row.data, c, sc[j, c]))
            ys.append(np.isin(c, list(truth_s[uid[u]])).astype(np.float64))
            owner.append(np.full(len(c), u))
    return np.vstack(xs), np.concatenate(ys), np.concatenate(owner), cands, [truth_s[uid[u]] for u in users]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--first", default="itemitem")
    ap.add_argument("--seeds", default="1,2,3,4,5")
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--holdout", type=float, default=0.25)
    a = ap.parse_args()
    ds = load_airbnb(min_user_reviews=2)
    runs = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        t0 = time.perf_counter()
        tr, te = random_split(ds.interactions, 0.75, seed)
        tr2, va = holdout_split(tr, a.holdout, seed + 7)
        x_learn, y_learn, who, _, _ = frames(ds, tr2, va, a.first, seed, a.candidates)
        has_pos = pd.Series(y_learn).groupby(who).transform("sum").to_numpy() > 0  # users with a positive
        x_learn, y_learn = x_learn[has_pos], y_learn[has_pos]
        x_test, _, _, cands, truth = frames(ds, tr, te, a.first, seed, a.candidates)
        starts = np.r_[0, np.cumsum([len(c) for c in cands])]
        recall = [len(set(c) & t) / len(t) for c, t in zip(cands, truth, strict=True)]
        run = {"seed": seed, "first_stage": ndcg10(cands, truth), "learn_users": int(len(np.unique(who[has_pos]))),
               "test_users": len(cands), "recall_at_candidates": float(np.mean(recall))}
        for name, keep in SETS.items():
            mask = np.array([f in keep for f in FEATURES], dtype=np.float64)
            ranker = PairRanker.fit(x_learn * mask, y_learn)
            p = ranker.decision(x_test * mask)
            ranked = [c[np.argsort(-p[starts[j]: starts[j + 1]], kind="stable")] for j, c in enumerate(cands)]
            run[name] = ndcg10(ranked, truth)
            run[f"{name}_weights"] = {f: round(float(w), 3)
                                      for f, w in zip(FEATURES, ranker.weights, strict=True) if f in keep}
        run["seconds"] = round(time.perf_counter() - t0, 1)
        runs.append(run)
        print(f"seed {seed} {a.first} {run['first_stage']:.4f} → " +
              " ".join(f"{n} {run[n]:.4f}" for n in SETS) + f" ({run['seconds']} s)", flush=True)
    summary = {k: [float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs], ddof=1))
                   if len(runs) > 1 else 0.0] for k in ["first_stage", *SETS]}
    print("mean ± std", {k: f"{m:.4f} ± {s:.4f}" for k, (m, s) in summary.items()})
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"rerank_probe_{a.first}.json"
    out.write_text(json.dumps({"dataset": "airbnb-albany (users >= 2 reviews)", "protocol": "random-75-25",
                               "k": 10, "first": a.first, "candidates": a.candidates, "holdout": a.holdout,
                               "summary": summary, "runs": runs}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
