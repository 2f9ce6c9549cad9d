"""Probe for issue #14's MovieLens bar (hybrid >= EASE + 2 %): the dropout penalty of DLAE / EDLAE (Steck,
"Autoencoders that don't overfit towards the identity", NeurIPS 2020) on EASE; ml-latest-small, random-75-25 (the
harness's `random_split`), k 10, seeds 1-5. With G = XᵀX, Λ = λI + p/(1-p)·diag(G) and P = (G + Λ)⁻¹:
  DLAE          B = I - PΛ
  EASE + drop   B = -P / diag(P), zero diagonal (p = 0: EASE)
λ is the L2 the 5-seed benchmark's EASE chose per seed (`L2`), times each --lamx. Scored on TEST: the best setting
is an upper bound. Recorded in docs/benchmarks.md ("Levers tried"): +0.3 % at best, dropped.

    python benchmarks/dlae_probe.py --seeds 1,2,3,4,5 --p 0.1,0.25,0.5 --lamx 1,0.25
Writes benchmarks/results/dlae_probe_movielens.json. Needs ../shared/data/movielens-latest-small.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from movielens_probe import L2, ease_from_inverse, ndcg10, ratings, ridge_inverse, split_matrix


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="1,2,3,4,5")
    ap.add_argument("--p", default="0.1,0.25,0.5")
    ap.add_argument("--lamx", default="1,0.25")
    a = ap.parse_args()
    torch.set_num_threads(2)
    df = ratings()
    res = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        x, users, truth = split_matrix(df, seed)
        diag = x.sum(0).astype(np.float64)  # diag(XᵀX) of a 0/1 matrix
        settings = [(0.0, 1.0)] + [(float(p), float(m)) for p in a.p.split(",") for m in a.lamx.split(",")]
        for p, m in settings:
            t0 = time.time()
            lam = L2[seed] * m + p / (1 - p) * diag
            inv = ridge_inverse(x, lam)
            b_ease = ease_from_inverse(inv)
            ease = ndcg10(x[users] @ b_ease, x[users], truth)
            b_dlae = -inv * lam[None, :]
            b_dlae[np.diag_indices_from(b_dlae)] += 1.0  # I - PΛ
            dlae = ndcg10(x[users] @ b_dlae, x[users], truth) if p > 0 else ease
            print(f"seed {seed} p {p} lamx {m} ease+drop {ease:.4f} dlae {dlae:.4f} {time.time() - t0:.0f}s",
                  flush=True)
            res.append({"seed": seed, "p": p, "lamx": m, "ease": ease, "dlae": dlae})
    out = Path(__file__).resolve().parent / "results" / "dlae_probe_movielens.json"
    out.write_text(json.dumps(res, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
