"""Training throughput of the two-tower network, old (full-softmax) and new (sampled) trainer side by side.

1M synthetic events (100k users, 20k properties), one epoch, single process on CPU. samples/s = training
interactions (user-property pairs) consumed per second of training (validation excluded), also per second of
the process's CPU time (less sensitive to a shared machine's load); validation nDCG@10
on a 10 % per-user holdout carved from the pairs (the trainer's own carve-out, seed 43), ≤ 3000 users.
The load average (`os.getloadavg`) before and after each run is recorded: the machine may be shared.
Writes benchmarks/results/training_throughput.json.

    python benchmarks/training_throughput.py [--only new] [--tower hybrid-tower] [--threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from rentalml.data.dataset import InteractionMatrix
from rentalml.data.generator import generate_marketplace
from rentalml.evaluation.protocols import aggregate_pairs, holdout_split
from rentalml.models.base import TrainData, validation_ndcg
from rentalml.models.neural import TwoTower
from rentalml.training.trainer import _features, catalogue

#: the old trainer runs with today's defaults (full softmax, dim 200, batch 256); the new one with the sampled
#: softmax at dim 64 (the tuned optimum on the demo marketplace, docs/benchmarks.md "Tuning"), hidden 128,
#: 1024 users per step (learning rate 8e-3) and 512 shared negatives; "old-d64" is the old trainer at the new
#: one's model size, so the trainer and the model size can be told apart.
NEW = {"softmax": "sampled", "dim": 64, "hidden": 128, "sampled_batch_size": 1024, "sampled_lr": 8e-3,
       "negatives": 512}
TRAINERS = {"old": {"softmax": "full"}, "new": NEW, "old-d64": {"softmax": "full", "dim": 64, "hidden": 128}}
TOWERS = {"collaborative": {"use_content": False}, "hybrid-tower": {}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--properties", type=int, default=20_000)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--only", choices=sorted(TRAINERS), action="append",
                    help="run only this trainer (default: old and new; old-d64 on request)")
    ap.add_argument("--tower", choices=sorted(TOWERS), action="append", help="run only this tower")
    ap.add_argument("--params", default="{}", help="JSON overrides of NeuralParams for the new trainer")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default); 1 is faster on a loaded 2-core machine")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "training_throughput.json")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    ds = generate_marketplace(n_users=a.users, n_properties=a.properties, n_events=a.events, seed=42)
    pairs = aggregate_pairs(ds.interactions)
    items = catalogue(ds, pairs)
    users = np.array(sorted(pairs["user_id"].unique()), dtype=object)
    _, item_x, _, user_x = _features(ds, items, users)
    tr, va = holdout_split(pairs, 0.1, 43)
    m = InteractionMatrix.build(tr, item_ids=items, user_ids=users).matrix
    mv = InteractionMatrix.build(va, item_ids=items, user_ids=users).matrix
    xb = m.copy()
    xb.data[:] = 1.0
    results = {"events": a.events, "pairs": int(len(pairs)), "train_pairs": int(m.nnz), "users": m.shape[0],
               "properties": m.shape[1], "epochs": a.epochs, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
               "cpu": platform.processor() or platform.machine(), "device": "cpu", "runs": {}}
    new_kw = json.loads(a.params)
    for tower in a.tower or TOWERS:
        for trainer in a.only or ("old", "new"):
            kw = {**TOWERS[tower], **TRAINERS[trainer], **(new_kw if trainer == "new" else {})}
            model = TwoTower(name=tower, epochs=a.epochs, **kw)
            load0 = os.getloadavg()[0]
            t0, c0 = time.perf_counter(), time.process_time()
            model.fit(TrainData(m, item_x, user_x, seed=42))
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            load1 = os.getloadavg()[0]
            ndcg = validation_ndcg(model, xb, mv)
            p = model.params
            results["runs"][f"{tower}/{trainer}"] = {
                "tower": tower, "trainer": trainer, "softmax": model.softmax_, "seconds": round(dt, 2),
                "cpu_seconds": round(cpu, 2), "samples": model.samples_seen,
                "samples_per_s": round(model.samples_seen / dt, 1),
                "samples_per_cpu_s": round(model.samples_seen / cpu, 1),
                "val_ndcg@10": round(ndcg, 5),
                "batch_size": p.batch_size if model.softmax_ == "full" else p.sampled_batch_size,
                "lr": p.lr if model.softmax_ == "full" else p.sampled_lr,
                "negatives": p.negatives if model.softmax_ == "sampled" else None,
                "loadavg_1m_before": round(load0, 2), "loadavg_1m_after": round(load1, 2)}
            print(f"{tower}/{trainer}", results["runs"][f"{tower}/{trainer}"], flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
