"""Training throughput of the two-tower network (samples/s = training interactions consumed per second)
on 1M synthetic interactions, single process on CPU. Writes benchmarks/results/training_throughput.json."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from rentalml.data.dataset import InteractionMatrix
from rentalml.data.generator import generate_marketplace
from rentalml.evaluation.protocols import aggregate_pairs
from rentalml.models.base import TrainData
from rentalml.models.neural import TwoTower
from rentalml.training.trainer import _features, catalogue


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--properties", type=int, default=20_000)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "training_throughput.json")
    a = ap.parse_args()
    ds = generate_marketplace(n_users=a.users, n_properties=a.properties, n_events=a.events, seed=42)
    pairs = aggregate_pairs(ds.interactions)
    items = catalogue(ds, pairs)
    users = sorted(pairs["user_id"].unique())
    _, item_x, _, user_x = _features(ds, items, users)
    m = InteractionMatrix.build(pairs, item_ids=items, user_ids=users).matrix
    results = {"events": a.events, "pairs": int(m.nnz), "users": m.shape[0], "properties": m.shape[1],
               "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or
               platform.machine(), "device": "cpu", "runs": {}}
    for name, kw in {"collaborative": {"use_content": False}, "hybrid-tower": {}}.items():
        model = TwoTower(name=name, epochs=a.epochs, **kw)
        t0 = time.perf_counter()
        model.fit(TrainData(m, item_x, user_x))
        dt = time.perf_counter() - t0
        results["runs"][name] = {"seconds": round(dt, 2), "samples": model.samples_seen,
                                 "samples_per_s": round(model.samples_seen / dt, 1),
                                 "softmax": "full" if m.shape[1] <= model.params.full_softmax_limit else "sampled"}
        print(name, results["runs"][name], flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
