"""The end-to-end training workflow shared by the CLI, the demo and the pipeline components:
split → fit → evaluate → (refit on everything) → bundle (ONNX, int8) → MLflow run → registry."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from rentalml.config import Settings, get_settings
from rentalml.data.dataset import Dataset
from rentalml.evaluation.evaluate import evaluate
from rentalml.evaluation.protocols import split
from rentalml.evaluation.report import write_report
from rentalml.export.bundle import write_bundle
from rentalml.runtime.bundle import read_meta
from rentalml.training.trainer import Fitted, fit_model


def train_and_evaluate(dataset: Dataset, model: str = "hybrid", protocol: str = "random-75-25", k: int = 10,
                       seed: int = 42, params: dict | None = None, refit_all: bool = True,
                       progress: bool = False) -> tuple[Fitted, dict]:
    """Fit on the protocol's train split (selection on a validation holdout, then a refit on all of train:
    the same procedure as `rentalml benchmark`, so the metrics compare) and evaluate on its test split; then
    (refit_all) refit on every interaction with the selected parameters, so the shipped model sees all data."""
    train, test = split(dataset.interactions, protocol, seed)
    fitted = fit_model(model, dataset, train, params=params, seed=seed, progress=progress)
    metrics = evaluate(fitted, test, k, max_users=get_settings().train.eval_users, seed=seed)
    metrics["fit_seconds"] = round(fitted.fit_seconds, 2)
    if refit_all:
        fitted = fit_model(model, dataset, None, params=fitted.params, seed=seed, valid_frac=0.0, progress=progress)
    return fitted, metrics


def train_and_register(dataset: Dataset, model: str = "hybrid", protocol: str = "random-75-25", k: int = 10,
                       seed: int = 42, params: dict | None = None, settings: Settings | None = None,
                       register: bool = True, margin: float = 0.0, feature_views: list[str] | None = None,
                       out_dir: str | Path | None = None, progress: bool = False) -> dict:
    from rentalml.registry import mlflow_registry as reg

    s = settings or get_settings()
    t0 = time.perf_counter()
    fitted, metrics = train_and_evaluate(dataset, model, protocol, k, seed, params, progress=progress)
    work = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="rentalml-", dir=s.home_dir))
    bundle_dir = write_bundle(fitted, dataset, work / "bundle", model_name=s.model_name, metrics=metrics,
                              feature_views=feature_views)
    report = {"dataset": dataset.name, "protocol": protocol, "k": k, "seed": seed, "models": {model: metrics}}
    curves = {model: fitted.training_curve}
    write_report(report, work / "report", curves)
    meta = read_meta(bundle_dir)  # the bundle already hashed the data and read the code version
    out = {"model": model, "metrics": metrics, "bundle": str(bundle_dir), "report": str(work / "report"),
           "data_snapshot": meta["data_snapshot"], "seconds": 0.0}
    if register:
        from rentalml.features.lineage import feature_lineage

        lineage = {"data_snapshot": meta["data_snapshot"], "dataset": dataset.name, "protocol": protocol,
                   **feature_lineage(feature_views), "code_version": meta["code_version"]}
        run_id = reg.log_training_run(model_type=model, params={**fitted.params, "seed": seed, "k": k},
                                      metrics=metrics, bundle_dir=bundle_dir, report_dir=work / "report",
                                      lineage=lineage, settings=s)
        out["run_id"] = run_id
        out["registry"] = reg.register(run_id, gate_metric=reg.metric_key(f"ndcg@{k}"), margin=margin, settings=s)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out

