"""Model optimization table and two-stage serving on a 10k-property synthetic catalogue, one run.

Synthetic marketplace 5k users / 10k properties / 100k events (seed 7); temporal-leave-last-2 split: the
bundle is fitted on the earlier pairs (hybrid, modest epochs) and each user's 2 most recent pairs are the
holdout of `rentalml optimize` (nDCG@10 of every variant on interactions the model never saw).
Also measures the two-stage path (retrieval.onnx → ranker.onnx, C = 200 candidates) against the one-graph
scorer: recall@10 of its top-10 vs the scorer's top-10, holdout nDCG@10, and latency at batch 1 / 64; and the
same with the IVF retrieval over the model's trained item vectors (the > 100k-property path, forced here).
Writes benchmarks/results/optimize.json (+ the variants under a temp dir) and prints the markdown table.

    OMP_NUM_THREADS=1 python benchmarks/optimize.py [--epochs 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rentalml.data.generator import generate_marketplace
from rentalml.evaluation.metrics import ranking_metrics
from rentalml.evaluation.protocols import temporal_leave_last_n
from rentalml.export.bundle import write_bundle
from rentalml.export.optimize import holdout_from_dataset, optimize_bundle
from rentalml.runtime.bundle import Bundle
from rentalml.runtime.retrieval import recall_at_n
from rentalml.runtime.two_stage import two_stage_topk
from rentalml.training.trainer import fit_model

RESULTS = Path(__file__).resolve().parent / "results"


def _median_ms(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ds = generate_marketplace(n_users=5000, n_properties=10_000, n_events=100_000, seed=7)
    train, test = temporal_leave_last_n(ds.interactions, 2)
    fitted = fit_model("hybrid", ds, train, params={"epochs": args.epochs, "neighbours": 64}, seed=42)
    fit_s = time.perf_counter() - t0
    work = Path(tempfile.mkdtemp(prefix="rentalml-optimize-"))
    bdir = write_bundle(fitted, ds, work / "bundle", quantize=False, drift_reference=False)
    b = Bundle(bdir)
    hold = holdout_from_dataset(b, test, max_users=2000)
    report = optimize_bundle(bdir, work / "optimized", max_ndcg_drop=0.01, holdout=hold,
                             prune_sparsities=(0.5, 0.9), repeats=args.repeats)

    # two-stage vs the one-graph scorer on the same holdout
    feats = hold.user_features
    sc_idx = np.vstack([b.score_histories(hold.histories[s:s + 256], 10, feats[s:s + 256])[0]
                        for s in range(0, len(hold.histories), 256)])
    ts_idx = np.vstack([two_stage_topk(b, hold.histories[s:s + 256], 10, None, feats[s:s + 256])[0]
                        for s in range(0, len(hold.histories), 256)])
    has = np.diff(hold.relevant.indptr) > 0
    recall_by_c = {}
    for c in (10, 20, 50, 100, 200):
        top = np.vstack([two_stage_topk(b, hold.histories[s:s + 256], 10, c, feats[s:s + 256])[0]
                         for s in range(0, len(hold.histories), 256)])
        recall_by_c[c] = round(recall_at_n(top, sc_idx), 4)
    h1, f1 = hold.histories[:1], feats[:1]
    h64, f64 = hold.histories[:64], feats[:64]
    two_stage = {
        "n_candidates": b.meta["two_stage"]["n_candidates"], "mode": b.meta["two_stage"]["mode"],
        "recall_at_10_vs_scorer": round(recall_at_n(ts_idx, sc_idx), 4),
        "recall_at_10_vs_scorer_by_candidates": recall_by_c,
        "ndcg_at_10_scorer": round(float(ranking_metrics(sc_idx[has], hold.relevant[has], 10)["ndcg"].mean()), 5),
        "ndcg_at_10_two_stage": round(float(ranking_metrics(ts_idx[has], hold.relevant[has], 10)["ndcg"].mean()), 5),
        "latency_ms": {
            "scorer_b1": round(_median_ms(lambda: b.score_histories(h1, 10, f1), args.repeats), 3),
            "two_stage_b1": round(_median_ms(lambda: two_stage_topk(b, h1, 10, None, f1), args.repeats), 3),
            "scorer_b64": round(_median_ms(lambda: b.score_histories(h64, 10, f64), args.repeats), 3),
            "two_stage_b64": round(_median_ms(lambda: two_stage_topk(b, h64, 10, None, f64), args.repeats), 3),
        },
    }
    # the same fitted model with the ANN retrieval (the default backend over its trained item vectors)
    adir = write_bundle(fitted, ds, work / "bundle_ann", quantize=False, drift_reference=False, ann_min_items=0)
    ab = Bundle(adir)
    rec = ab.meta["two_stage"]["ann"]
    ann = {"backend": rec["backend"], "params": rec["params"]}
    knob = "nprobe" if "nprobe" in rec["params"] else "ef_search"
    for value in sorted({*((4, 8) if knob == "nprobe" else (50, 100)), rec["params"][knob]}):
        top = np.vstack([two_stage_topk(ab, hold.histories[s:s + 256], 10, None, feats[s:s + 256],
                                        {knob: value})[0] for s in range(0, len(hold.histories), 256)])
        ann[f"recall_at_10_vs_scorer_{knob}_{value}"] = round(recall_at_n(top, sc_idx), 4)
        ann[f"ndcg_at_10_{knob}_{value}"] = round(float(
            ranking_metrics(top[has], hold.relevant[has], 10)["ndcg"].mean()), 5)
    ann["two_stage_ms_b1"] = round(_median_ms(lambda: two_stage_topk(ab, h1, 10, None, f1), args.repeats), 3)
    ann["two_stage_ms_b64"] = round(_median_ms(lambda: two_stage_topk(ab, h64, 10, None, f64), args.repeats), 3)
    two_stage["ann_on_trained_vectors"] = ann
    doc = {
        "machine": f"{platform.machine()}, 2-core CPU, no GPU (no GPU machine was lent to this task)",
        "dataset": "synthetic 5k users / 10k properties / 100k events, seed 7, temporal-leave-last-2",
        "model": f"hybrid, epochs={args.epochs}, neighbours=64", "fit_seconds": round(fit_s, 1),
        "optimize": report, "two_stage": two_stage,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "optimize.json").write_text(json.dumps(doc, indent=2))
    print((work / "optimized" / "optimize.md").read_text())
    print(json.dumps(two_stage, indent=2))


if __name__ == "__main__":
    main()
