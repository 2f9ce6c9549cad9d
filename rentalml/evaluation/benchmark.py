"""`rentalml benchmark`: every model (and reference baselines) through one harness on one split."""

from __future__ import annotations

import time

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
