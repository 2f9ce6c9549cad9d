"""Local hyperparameter search with Optuna (multivariate TPE + median pruning) on a validation split."""

from __future__ import annotations

import logging
from dataclasses import asdict

import pandas as pd

from rentalml.data.dataset import Dataset
from rentalml.models.neural import NeuralParams
from rentalml.training.search_space import SEARCH_SPACE, suggest
from rentalml.training.trainer import fit_model


def tune(name: str, dataset: Dataset, train: pd.DataFrame | None = None, trials: int = 8, seed: int = 42,
         base_params: dict | None = None, timeout: float | None = None) -> dict:
    """Search the shared space; the objective is validation nDCG@10 on a split carved from `train` only.

    Returns {"best_params", "best_value", "default_value", "trials": [...]}; the defaults' score is also
    recorded in the study as a known point (not listed in "trials"), so the sampler learns from it.
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
    known = _default_point(base)
    if known is not None:  # the sampler learns from the defaults' score too (it is measured anyway)
        study.add_trial(optuna.trial.create_trial(
            params=known, distributions={p.name: p.distribution() for p in SEARCH_SPACE}, value=default_value,
            user_attrs={"defaults": True}))
    study.optimize(lambda t: run(suggest(t), t), n_trials=trials, timeout=timeout)
    best_params, best_value = study.best_params, study.best_value
    if best_value < default_value or study.best_trial.user_attrs.get("defaults"):  # never worse than the defaults
        best_params, best_value = {}, default_value
    return {"best_params": best_params, "best_value": best_value, "default_value": default_value,
            "trials": [{"number": t.number, "value": t.value, "state": t.state.name, "params": t.params}
                       for t in study.trials if not t.user_attrs.get("defaults")]}


def _default_point(base: dict) -> dict | None:
    """The default parameters as a point of the search space (a zero weight decay becomes the space's lower
    bound, 1e-9: the same model); None when a default lies outside the space."""
    defaults = {**asdict(NeuralParams()), **base}
    point = {}
    for p in SEARCH_SPACE:
        v = defaults.get(p.name)
        if p.name == "weight_decay" and v == 0:
            v = p.low
        if v is None or not p.contains(v):
            return None
        point[p.name] = v
    return point
