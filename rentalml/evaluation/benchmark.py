"""`rentalml benchmark`: every model (and reference baselines) through one harness on one split."""

from __future__ import annotations

import time

import numpy as np

from rentalml.data.dataset import Dataset
from rentalml.evaluation.evaluate import evaluate
from rentalml.evaluation.protocols import split
from rentalml.training.trainer import fit_model

DEFAULT_MODELS = ("popularity", "collaborative", "content", "hybrid")


def run_benchmark(dataset: Dataset, protocol: str = "random-75-25", seed: int = 42, k: int = 10,
                  models: tuple[str, ...] | list[str] = DEFAULT_MODELS, tune_trials: int = 0,
                  params: dict | None = None, progress: bool = False, log=print) -> dict:
    """Split once, fit each model on train (tuning, if asked, on a validation split carved from train only),
    evaluate on test. Returns the benchmark JSON document."""
    train, test = split(dataset.interactions, protocol, seed)
    result = {"dataset": dataset.name, "protocol": protocol, "seed": seed, "k": k,
              "train_pairs": len(train), "test_pairs": len(test), "models": {}}
    curves = {}
    for name in models:
        t0 = time.perf_counter()
        p = dict(params or {})
        tuned = None
        if tune_trials and name in ("collaborative", "content", "hybrid"):
            from rentalml.training.tuning import tune

            tuned = tune(name, dataset, train, trials=tune_trials, seed=seed, base_params=p)
            p.update(tuned["best_params"])
        if name == "content" and (dataset.items is None or not len(dataset.items.columns)):
            log(f"skip {name}: the dataset has no item features")
            continue
        fitted = fit_model(name, dataset, train, params=p, seed=seed, progress=progress)
        fit_s = time.perf_counter() - t0
        m = evaluate(fitted, test, k)
        m["fit_seconds"] = round(fit_s, 2)
        m["params"] = {kk: v for kk, v in fitted.params.items() if isinstance(v, (int, float, str, bool))}
        if tuned:
            m["tuning"] = {"trials": tune_trials, "best_value": tuned["best_value"], "default_value":
                           tuned.get("default_value")}
        result["models"][name] = m
        curves[name] = fitted.training_curve
        log(f"{name:14s} ndcg@{k}={m[f'ndcg@{k}']:.4f} recall@{k}={m[f'recall@{k}']:.4f} "
            f"fit={fit_s:.1f}s")
    result["_curves"] = curves
    return result


SUMMARY_METRICS = ("ndcg", "recall", "precision", "map", "coverage")


def run_seeds(dataset: Dataset, seeds: list[int], protocol: str = "random-75-25", k: int = 10,
              models: tuple[str, ...] | list[str] = DEFAULT_MODELS, log=print, on_seed=None, **kw) -> dict:
    """run_benchmark once per seed (each seed its own split and model seeds), every model in the same run;
    returns the per-seed documents and, per model, mean ± sample std of each metric over the seeds.
    on_seed(document so far) is called after each seed (the CLI writes the JSON there, so a long run that is
    stopped keeps the seeds it finished)."""
    if not seeds:
        raise ValueError("--seeds needs at least one seed, e.g. 1,2,3,4,5")
    runs = {}
    for s in seeds:
        log(f"seed {s}")
        r = run_benchmark(dataset, protocol, s, k, models, log=log, **kw)
        r.pop("_curves", None)
        runs[s] = r
        if on_seed is not None:
            on_seed(_summarise(dataset, protocol, k, models, runs))
    return _summarise(dataset, protocol, k, models, runs)


def _summarise(dataset: Dataset, protocol: str, k: int, models, runs: dict) -> dict:
    seeds = list(runs)
    summary = {}
    for name in models:
        per = [runs[s]["models"][name] for s in seeds if name in runs[s]["models"]]
        if not per:
            continue
        row = {"seeds": len(per)}
        for key in [f"{m}@{k}" for m in SUMMARY_METRICS[:4]] + ["coverage", "fit_seconds"]:
            vals = np.array([m[key] for m in per if key in m], dtype=np.float64)
            if len(vals):
                row[key] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                            "values": [float(v) for v in vals]}
        summary[name] = row
    return {"dataset": dataset.name, "protocol": protocol, "k": k, "seeds": list(seeds), "summary": summary,
            "runs": {str(s): r for s, r in runs.items()}}


def format_seeds_table(result: dict) -> str:
    """Markdown table of mean ± std per model (run_seeds' document)."""
    k = result["k"]
    cols = [f"ndcg@{k}", f"recall@{k}", f"precision@{k}", f"map@{k}", "coverage", "fit_seconds"]
    lines = [f"| model (seeds {','.join(map(str, result['seeds']))}) | " + " | ".join(cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for name, row in result["summary"].items():
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append("n/a" if v is None else (f"{v['mean']:.1f} ± {v['std']:.1f}" if c == "fit_seconds"
                                                  else f"{v['mean']:.4f} ± {v['std']:.4f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
