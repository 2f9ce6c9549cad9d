"""Probe for issue #14's MovieLens bar (hybrid >= EASE + 2 %): sessions as extra pseudo-users of EASE.
ml-latest-small, random-75-25 (the harness's `random_split`), k 10. Each user's training pairs in time order are
cut into sessions, either runs of L consecutive pairs (`--runs`) or at a time gap (`--gaps`, seconds), and EASE is
solved on (XᵀX + σ·SᵀS) / (1 + σ) + λI, λ the L2 the 5-seed benchmark's EASE chose per seed (`L2`). Scored on
TEST: the best setting is an upper bound; what ships (runs of 20, σ from {0, 2} on validation, in the sparse
item-item model: models.itemitem, data.dataset.session_matrix) is chosen on validation. Recorded in
docs/benchmarks.md ("Levers tried").

    python benchmarks/session_probe.py --seeds 1,3 --runs 10,20,40 --gaps 1800,86400 --sigma 0.25,1,2,4,8,16
Writes benchmarks/results/session_probe_movielens.json. Needs ../shared/data/movielens-latest-small.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from movielens_probe import L2, ease_from_inverse, ndcg10, ratings, split

from rentalml.data.dataset import session_matrix


def gap_sessions(tr: pd.DataFrame, item_ids, user_ids, gap: float) -> sp.csr_matrix:
    """Sessions cut where one user's consecutive pairs are more than `gap` seconds apart."""
    rows = pd.Index(user_ids).get_indexer(tr.user_id)
    cols = pd.Index(item_ids).get_indexer(tr.property_id)
    t = tr.timestamp.dt.tz_localize(None).to_numpy("datetime64[s]").astype(np.int64)
    order = np.lexsort((cols, t, rows))
    rows, cols, t = rows[order], cols[order], t[order]
    new = np.r_[True, (rows[1:] != rows[:-1]) | (np.diff(t) > gap)]
    sid = np.cumsum(new) - 1
    s = sp.csr_matrix((np.ones(len(cols), np.float32), (sid, cols)), shape=(int(sid[-1]) + 1, len(item_ids)))
    s.data[:] = 1.0
    return s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="1,3")
    ap.add_argument("--runs", default="10,20,40")
    ap.add_argument("--gaps", default="1800,86400")
    ap.add_argument("--sigma", default="0.25,1,2,4,8,16")
    a = ap.parse_args()
    torch.set_num_threads(2)
    df = ratings()
    sigmas = [float(v) for v in a.sigma.split(",")]
    res = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        tr, iidx, uidx, x, users, truth = split(df, seed)
        g = (x.T @ x).astype(np.float64)
        variants = {f"runs {r}": session_matrix(tr, iidx.to_numpy(), uidx.to_numpy(), length=int(r))
                    for r in a.runs.split(",")}
        variants |= {f"gap {g_}s": gap_sessions(tr, iidx, uidx, float(g_)) for g_ in a.gaps.split(",") if g_}
        for name, s in [("EASE", None), *variants.items()]:
            for sigma in [0.0] if s is None else sigmas:
                t0 = time.time()
                gram = g if s is None else (g + sigma * (s.T @ s).toarray()) / (1 + sigma)
                m = torch.from_numpy(gram.copy())
                m.diagonal().add_(L2[seed])
                inv = torch.cholesky_inverse(torch.linalg.cholesky(m)).numpy()
                nd = ndcg10(x[users] @ ease_from_inverse(inv), x[users], truth)
                print(f"seed {seed} {name} sigma {sigma} ndcg@10 {nd:.4f} {time.time() - t0:.0f}s", flush=True)
                res.append({"seed": seed, "sessions": name, "sigma": sigma, "ndcg@10": nd})
    out = Path(__file__).resolve().parent / "results" / "session_probe_movielens.json"
    out.write_text(json.dumps(res, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
