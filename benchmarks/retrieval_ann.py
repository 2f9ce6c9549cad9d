"""ANN retrieval (rentalml.runtime.ann.IVFIndex) vs brute force on a synthetic 200k-property embedding set.

Item vectors: 64-d, drawn around 2,000 "neighbourhood" centres (items of one area/segment are alike, as the
two-tower item vectors are), plus a per-item bias (the tower's popularity term); user vectors are drawn
around the same centres. Score = <u, v> + b. Reports recall@N (N = 200, the ranker's candidate count) of the
IVF top-N against the brute-force top-N (and recall@10 of its first 10), and per-query latency (numpy, one
thread, batches of 64 queries) for several nprobe values. Writes benchmarks/results/retrieval_ann.json.

    OMP_NUM_THREADS=1 python benchmarks/retrieval_ann.py [--items 200000] [--queries 1000]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from rentalml.runtime.ann import IVFIndex, brute_force, recall_at_n

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    d, n = args.dim, args.items
    centres = rng.normal(size=(2000, d)).astype(np.float32) / np.sqrt(d) * 3
    items = (centres[rng.integers(0, len(centres), n)] + rng.normal(size=(n, d)) / np.sqrt(d)).astype(np.float32)
    bias = (0.5 * rng.normal(size=n)).astype(np.float32)
    users = (centres[rng.integers(0, len(centres), args.queries)]
             + rng.normal(size=(args.queries, d)) / np.sqrt(d)).astype(np.float32)
    q = np.hstack([users, np.ones((len(users), 1), np.float32)])

    t0 = time.perf_counter()
    exact = brute_force(users, items, bias, args.n, block=64)
    brute_ms = (time.perf_counter() - t0) * 1e3 / len(users)
    t0 = time.perf_counter()
    index = IVFIndex.build(items, bias, seed=0)
    build_s = time.perf_counter() - t0
    rows = []
    for nprobe in sorted({8, 16, index.default_nprobe, 64, 128}):
        t0 = time.perf_counter()
        approx = np.vstack([index.search(q[s:s + 64], args.n, nprobe=nprobe)[0] for s in range(0, len(q), 64)])
        ms = (time.perf_counter() - t0) * 1e3 / len(q)
        scanned = float(np.mean(np.diff(index.offsets)) * nprobe / n)
        rows.append({"nprobe": nprobe, f"recall_at_{args.n}": round(recall_at_n(approx, exact), 4),
                     "recall_at_10": round(recall_at_n(approx[:, :10], exact[:, :10]), 4),
                     "ms_per_query": round(ms, 3), "speedup_vs_brute": round(brute_ms / ms, 2),
                     "fraction_scanned": round(scanned, 4), "default": nprobe == index.default_nprobe})
    doc = {"machine": f"{platform.machine()}, 2-core CPU, no GPU; numpy, OMP_NUM_THREADS=1",
           "items": n, "dim": d, "queries": len(q), "N": args.n, "n_lists": index.n_lists,
           "build_seconds": round(build_s, 1), "brute_force_ms_per_query": round(brute_ms, 3), "ivf": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "retrieval_ann.json").write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
