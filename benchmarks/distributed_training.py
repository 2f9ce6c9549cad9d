"""Data-parallel training: 1 process vs `torchrun --nproc_per_node=N` on 1M synthetic interactions (CPU, gloo).

Runs `python -m rentalml.training.distributed` once per process count on the same generated marketplace, with
the same global batch and epochs, and records validation/test nDCG@10 and training throughput (samples/s =
training (user, property) pairs consumed per second, all ranks together, validation excluded).
Writes benchmarks/results/distributed_training.json.

    python benchmarks/distributed_training.py                   # 20k users, 5k properties, 1M events
    python benchmarks/distributed_training.py --order 1x1,2x1,2x1,1x1,1x2 --epochs 6

`--order` lists runs as PROCESSESxTHREADS (torch threads per process). The machine is shared, so the runs go
in an ABBA order and the summary averages repeats; the load average before/after each run is recorded. A
single process with 2 threads is measured too: on a loaded machine intra-op threads oversubscribe the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rentalml.services import free_port


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--properties", type=int, default=5_000)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--order", default="1x1,2x1,2x1,1x1,1x2",
                    help="runs as PROCESSESxTHREADS, in run order (repeats are averaged)")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--model", default="hybrid")
    ap.add_argument("--extra", default="", help="more entrypoint arguments, space separated")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "distributed_training.json")
    a = ap.parse_args()
    from rentalml.data.generator import generate_marketplace

    work = Path(tempfile.mkdtemp(prefix="rentalml-ddp-"))
    ds = generate_marketplace(n_users=a.users, n_properties=a.properties, n_events=a.events, seed=42)
    ds.save(work / "data")
    common = ["--data", str(work / "data"), "--model", a.model, "--epochs", str(a.epochs), "--eval-every", "2",
              "--patience", str(a.epochs), *a.extra.split()]
    results = {"data": {"events": a.events, "users": a.users, "properties": a.properties, **ds.summary()},
               "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "device": "cpu", "backend": "gloo", "runs": {}}
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for i, spec in enumerate(a.order.split(",")):
        n, threads = (int(x) for x in spec.split("x"))
        out = work / f"result-{i}-{spec}.json"
        tail = [*common, "--threads", str(threads), "--result-json", str(out)]
        if n == 1:
            cmd = [sys.executable, "-m", "rentalml.training.distributed", *tail]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
                   f"--master_port={free_port()}", "-m", "rentalml.training.distributed", *tail]
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            raise SystemExit(res.stdout[-3000:] + res.stderr[-3000:])
        r = json.loads(out.read_text())
        results["runs"][f"{i}:{spec}"] = {
            "processes": n, "threads_per_process": r["threads_per_process"], "epochs_run": r["epochs_run"],
            "best_epoch": r["best_epoch"], "val_ndcg@10": round(r["val_ndcg@10"], 5),
            "test_ndcg@10": round(r["test"]["ndcg@10"], 5), "test_recall@10": round(r["test"]["recall@10"], 5),
            "samples": r["samples"], "train_seconds": r["train_seconds"], "samples_per_s": r["samples_per_s"],
            "wall_seconds": round(wall, 1), "loadavg_before": [round(x, 2) for x in load0],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()], "command": " ".join(cmd[1:]),
        }
        print(i, spec, results["runs"][f"{i}:{spec}"], flush=True)
    summary: dict = {}
    for r in results["runs"].values():
        summary.setdefault(f"{r['processes']}x{r['threads_per_process']}", []).append(r)
    results["summary"] = {n: {"runs": len(rs),
                              "test_ndcg@10": round(sum(r["test_ndcg@10"] for r in rs) / len(rs), 5),
                              "val_ndcg@10": round(sum(r["val_ndcg@10"] for r in rs) / len(rs), 5),
                              "samples_per_s": round(sum(r["samples_per_s"] for r in rs) / len(rs), 1),
                              "samples_per_s_each": [r["samples_per_s"] for r in rs]}
                          for n, rs in sorted(summary.items())}
    base = results["summary"].get("1x1")
    for n, s in results["summary"].items():
        if base and n != "1x1":
            s["ndcg_rel_diff_vs_1x1"] = round((s["test_ndcg@10"] - base["test_ndcg@10"]) / base["test_ndcg@10"], 4)
            s["within_2_percent"] = abs(s["ndcg_rel_diff_vs_1x1"]) <= 0.02
            s["speedup_vs_1x1"] = round(s["samples_per_s"] / base["samples_per_s"], 3)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    main()
