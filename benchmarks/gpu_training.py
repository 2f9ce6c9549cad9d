"""GPU training: the project's trainer and ../shared/bench/gpu_reference.py (a plain PyTorch two-tower with
in-batch softmax, bf16 autocast) in one run, on the same card (issue 14 point 5).

Throughput: the reference's sizes (1M users, 200k items, D 64; --small: 10k users, 2k items) as random ids, as
the reference draws them: every user has PER_USER random items (duplicates dropped), items carry 32 and users 16
random features (the reference's widths). The project's trainer is rentalml.models.neural.TwoTower, the hybrid
tower (ID + content item tower, history-encoded user tower, hidden 256 as the reference's MLP) with its sampled
softmax (the project's 512 shared negatives, logQ, RowAdam). Its batch is counted in training interactions (a
step takes batch // PER_USER users, each with its PER_USER positives), as the reference's batch counts pairs.
The trainer has no user table (the user tower encodes the history), so a step's cost does not depend on the
number of users: an epoch is cut to STEPS steps (the first `STEPS x users per step` users of the catalogue-size
data) and the trainer runs one warm-up epoch, then one timed epoch (its own per-epoch samples and seconds), as
the reference times 5 + 50 (--small: 5 + 10) steps. Recorded: train samples/s at the reference's batches (4,096
and 16,384; --small: 256) and the ratio project / reference at each. The reference is run as a subprocess with
the same --device/--small (and the same CPU thread count) and its JSON line is recorded whole.

Quality: validation nDCG@10 of the project's model (fit_model "hybrid", sampled softmax, seed 42, the trainer's
own 10 % per-user holdout) trained on the device and on the CPU, on a small synthetic marketplace from the
project's generator. The bar: device >= 0.99 x CPU. With --device cpu the two are one computation (run once).

The goal (issue 14): >= 0.8x the reference's samples/s at batch 4,096 on a CUDA card, quality within 1 %. A CPU
run (--device cpu --small) is a smoke run of the same code, not the bar. Writes benchmarks/results/gpu_training.json.

    python benchmarks/gpu_training.py                        # CUDA card: the reference's full sizes
    python benchmarks/gpu_training.py --device cpu --small   # smoke run anywhere (well under a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from rentalml.data.generator import generate_marketplace
from rentalml.models.base import TrainData
from rentalml.models.neural import TwoTower, resolve_device
from rentalml.training.trainer import fit_model

ROOT = Path(__file__).resolve().parents[1]
#: where the reference script is looked for: the workspace's shared folder beside the repo, or inside it
REFERENCE_PATHS = tuple(base / "shared" / "bench" / "gpu_reference.py" for base in (ROOT.parent, ROOT))
PER_USER = 8  # random items per user: a step of batch B interactions takes B // PER_USER users
STEPS = {False: 400, True: 30}  # steps per (warm-up, timed) epoch
GOAL_RATIO, GOAL_BATCH, QUALITY_TOL = 0.8, 4096, 0.01
#: the reference's sizes (gpu_reference.py: U, I, D and BATCHES)
SIZES = {False: {"users": 1_000_000, "items": 200_000, "dim": 64, "batches": (4096, 16384)},
         True: {"users": 10_000, "items": 2_000, "dim": 64, "batches": (256,)}}
#: the project's trainer at the reference's model size (the rest: NeuralParams defaults, 512 shared negatives)
TRAINER = {"softmax": "sampled", "dim": 64, "hidden": 256, "layers": 1, "epochs": 2}
#: quality: a small marketplace from the project's generator, the sampled trainer at its tuned size
QUALITY_DATA = {False: {"n_users": 10_000, "n_properties": 2_000, "n_events": 200_000},
                True: {"n_users": 400, "n_properties": 200, "n_events": 8_000}}
QUALITY_PARAMS = {False: {"softmax": "sampled", "dim": 64, "hidden": 128, "epochs": 20, "eval_every": 2,
                          "patience": 6, "sampled_batch_size": 512, "neighbours": 64},
                  True: {"softmax": "sampled", "dim": 32, "hidden": 64, "epochs": 6, "eval_every": 2,
                         "sampled_batch_size": 64, "negatives": 64, "neighbours": 32}}


def find_reference(path: Path | None = None) -> Path:
    candidates = [path] if path else list(REFERENCE_PATHS)
    for p in candidates:
        if p.is_file():
            return p
    raise FileNotFoundError(f"gpu_reference.py not found (looked at {', '.join(map(str, candidates))}); "
                            "pass --reference")


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def random_ids(users: int, items: int, seed: int = 0) -> TrainData:
    """users x items binary CSR with PER_USER random items per user, random item (32) and user (16) features."""
    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(users), PER_USER)
    cols = rng.integers(0, items, users * PER_USER)
    x = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(users, items))
    x.sum_duplicates()
    x.data[:] = 1.0
    return TrainData(x, rng.standard_normal((items, 32), dtype=np.float32),
                     rng.standard_normal((users, 16), dtype=np.float32), seed=42)


def project_throughput(data: TrainData, batch: int, device: str, steps: int) -> dict:
    """Train samples/s of the project's trainer at `batch` interactions per step: one warm-up epoch and one timed
    epoch of `steps` steps each (the first steps x users-per-step users; the item catalogue is whole)."""
    per_step = max(1, batch // PER_USER)
    n = min(data.matrix.shape[0], steps * per_step)
    sub = TrainData(data.matrix[:n], data.item_features, data.user_features[:n], seed=data.seed)
    model = TwoTower(name="hybrid", device=device, sampled_batch_size=per_step, **TRAINER)
    model.fit(sub)
    warm, timed = model.history_[0], model.history_[-1]
    steps = -(-n // per_step)
    return {"train_samples_per_s": round(timed["samples"] / timed["seconds"]), "epoch_seconds": timed["seconds"],
            "warmup_epoch_seconds": warm["seconds"], "steps_per_epoch": steps, "users_trained": n,
            "users_per_step": per_step, "samples_per_step": round(timed["samples"] / steps, 1),
            "negatives": model.params.negatives, "final_loss": round(timed["loss"], 5)}


def run_reference(reference: Path, device: str, small: bool) -> dict:
    cmd = [sys.executable, str(reference), "--device", device] + (["--small"] if small else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same CPU threads as ours
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def quality(device: str, small: bool) -> dict:
    """Validation nDCG@10 of the project's model trained on `device` and on the CPU (same data, same seed)."""
    ds = generate_marketplace(**QUALITY_DATA[small], seed=42)

    def fit(dev: str) -> dict:
        t0 = time.perf_counter()
        f = fit_model("hybrid", ds, params={**QUALITY_PARAMS[small], "device": dev}, seed=42, refit=False)
        return {"tower_val_ndcg@10": round(f.model.tower.best_val, 6), "model_val_ndcg@10": round(f.model.best_val, 6),
                "fit_seconds": round(time.perf_counter() - t0, 2)}

    cpu = fit("cpu")
    dev = cpu if device == "cpu" else fit(device)
    rel = {k: round(dev[k] / cpu[k] - 1.0, 6) for k in ("tower_val_ndcg@10", "model_val_ndcg@10")}
    return {"data": QUALITY_DATA[small], "params": QUALITY_PARAMS[small], "cpu": cpu, "device": dev,
            "relative_difference": rel, "same_run": device == "cpu",
            "within_1pct": all(v >= -QUALITY_TOL for v in rel.values())}


def run(device: str = "auto", small: bool = False, reference: Path | None = None, out: Path | None = None) -> dict:
    dev = resolve_device(device)
    name = "cuda" if dev.type == "cuda" else "cpu"
    ref_path = find_reference(reference)
    size = SIZES[small]
    t0, load0 = time.perf_counter(), os.getloadavg()
    data = random_ids(size["users"], size["items"])
    project = {f"b{b}": project_throughput(data, b, name, STEPS[small]) for b in size["batches"]}
    ref = run_reference(ref_path, name, small)
    ratio = {f"b{b}": round(project[f"b{b}"]["train_samples_per_s"] / ref[f"train_samples_per_s_b{b}"], 4)
             for b in size["batches"]}
    headline = GOAL_BATCH if GOAL_BATCH in size["batches"] else size["batches"][0]
    q = quality(name, small)
    bar = name == "cuda" and not small
    doc = {"device": device_name(dev), "device_type": name, "small": small, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "sizes": {"users": size["users"], "items": size["items"], "dim": size["dim"], "per_user": PER_USER,
                     "interactions": int(data.matrix.nnz), "batches": list(size["batches"])},
           "project": {"trainer": "TwoTower hybrid tower, sampled softmax", "params": TRAINER, **project},
           "reference": {"script": str(ref_path), **ref},
           "ratio": ratio, "headline_batch": headline, "ratio_at_headline": ratio[f"b{headline}"],
           "quality": q,
           "goal": {"ratio_at_b4096": GOAL_RATIO, "quality_within": QUALITY_TOL,
                    "measured": bar,
                    "met": (ratio[f"b{GOAL_BATCH}"] >= GOAL_RATIO and q["within_1pct"]) if bar else None,
                    "note": "CUDA card, full sizes: the bar" if bar else "smoke run (not a CUDA card at full sizes)"},
           "load_avg_before": [round(v, 2) for v in load0], "load_avg_after": [round(v, 2) for v in os.getloadavg()],
           "seconds": round(time.perf_counter() - t0, 1)}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    ap.add_argument("--small", action="store_true", help="the reference's tiny sizes, for a smoke run")
    ap.add_argument("--reference", type=Path, default=None, help="gpu_reference.py (default: ../shared/bench/)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_training.json")
    a = ap.parse_args(argv)
    try:
        resolve_device(a.device)
    except ValueError as exc:
        ap.error(str(exc))
    if a.threads:
        torch.set_num_threads(a.threads)
    doc = run(a.device, a.small, a.reference, a.out)
    print(json.dumps({**{k: doc[k] for k in ("device", "ratio", "goal")},
                      "quality": doc["quality"]["relative_difference"]}))


if __name__ == "__main__":
    main()
