"""Local hyperparameter search with Optuna (multivariate TPE + median pruning) on a validation split."""

from __future__ import annotations

import logging

import pandas as pd

from rentalml.data.dataset import Dataset
from rentalml.training.search_space import suggest
from rentalml.training.trainer import fit_model


def tune(name: str, dataset: Dataset, train: pd.DataFrame | None = None, trials: int = 8, seed: int = 42,
         base_params: dict | None = None, timeout: float | None = None) -> dict:
    """Search the shared space; the objective is validation nDCG@10 on a split carved from `train` only.

    Returns {"best_params", "best_value", "default_value", "trials": [...]}.
    """
    import optuna

    optuna.logging.set_verbosity(logging.WARNING)
    base = dict(base_params or {})

    def run(params: dict, trial=None) -> float:
        def hook(epoch: int, value: float) -> None:
            if trial is not None:
                trial.report(value, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()

        fitted = fit_model(name, dataset, train, params={**base, **params}, seed=seed, refit=False,
                           on_validate=hook)
        return float(getattr(fitted.model, "best_val", 0.0))

    default_value = run({})
    sampler = optuna.samplers.TPESampler(multivariate=True, seed=seed, n_startup_trials=max(2, trials // 3))
    study = optuna.create_study(direction="maximize", sampler=sampler,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=10))
    study.optimize(lambda t: run(suggest(t), t), n_trials=trials, timeout=timeout)
    best_params, best_value = study.best_params, study.best_value
    if best_value < default_value:  # never return worse than the defaults
        best_params, best_value = {}, default_value
    return {"best_params": best_params, "best_value": best_value, "default_value": default_value,
            "trials": [{"number": t.number, "value": t.value, "state": t.state.name, "params": t.params}
                       for t in study.trials]}
