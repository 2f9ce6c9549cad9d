"""What each pipeline step does, as plain functions over local paths (no KFP types here).

The KFP components (rentalml.components.training) are thin wrappers that pass artifact paths to these; each
function is itself a thin call into the core (data loaders and validation, trainer, tuning, evaluation,
export, MLflow registry). Settings (MLflow URI, state dir, database URL) come from rentalml.config, i.e. from
RENTALML_* environment variables that the cluster fills from Kubernetes secrets.
"""

from __future__ import annotations

import json
import pickle
import shutil
import time
from pathlib import Path

from rentalml.config import get_settings
from rentalml.monitoring.training_metrics import push as push_training_metrics
from rentalml.monitoring.training_metrics import timed_step

#: the demo marketplace of `make demo` (users, properties, events, seed)
DEMO_SOURCE = "synthetic:2000,1000,50000,42"
#: the image the components (and the served model) run in: rentalml with kfp installed
IMAGE = "ghcr.io/rentalml/rentalml:0.1.0"


def _load(path: str | Path):
    from rentalml.data.dataset import Dataset

    return Dataset.load(path)


def clean_params(params: dict | None) -> dict:
    """KFP passes dict parameters through a protobuf Struct, where every number is a float: give integral
    values back their int type (epochs, neighbours, dim... index arrays and size tensors)."""
    return {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in (params or {}).items()}


def _write_json(path: str | Path, doc) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2, default=str))


# ------------------------------------------------------------------------------------------ ingest
@timed_step("ingest")
def ingest(source: str, out_dir: str | Path) -> dict:
    """Load the source (synthetic[:u,p,e,seed] | CSV | parquet file or dir | `db`, the database of record from
    the settings | sql:<table or SELECT> | a database URL) and save it as parquet tables. Returns the summary
    with the content hash (`snapshot`); `source` in it never shows a password."""
    from rentalml.data.loaders import load_dataset

    ds = load_dataset(source)
    ds.save(out_dir)
    return {**ds.summary(), "snapshot": ds.snapshot_hash(), "source": ds.meta.get("source", source)}


# ------------------------------------------------------------------------------------------ validate
class DataValidationError(RuntimeError):
    """Bad data: the message is the readable validation report."""


@timed_step("validate")
def validate(dataset_dir: str | Path, report_html: str | Path, *, reference_dir: str | Path | None = None,
             psi_error: float = 0.25, accept: bool = True) -> dict:
    """Schema + statistics + drift against the last accepted snapshot (under $RENTALML_HOME/validation by
    default). Writes the HTML report; raises DataValidationError with the text report on bad data; on success
    the snapshot's statistics become the accepted reference (accept=True)."""
    from rentalml.data import validation as v

    ref_dir = Path(reference_dir) if reference_dir else get_settings().home_dir / "validation"
    ds = _load(dataset_dir)
    report = v.validate(ds, v.load_reference(ref_dir), psi_error=psi_error)
    Path(report_html).parent.mkdir(parents=True, exist_ok=True)
    Path(report_html).write_text(report.html())
    print(report.text(), flush=True)
    if not report.ok:
        raise DataValidationError(report.text())
    if accept:
        v.accept(report, ref_dir)
    return {"ok": report.ok, "warnings": len(report.warnings), "max_psi": max(report.drift.values(), default=0.0),
            "reference_snapshot": report.reference_snapshot or "", "rows": report.stats["rows"],
            "users": report.stats["users"], "properties": report.stats["properties"]}


# ------------------------------------------------------------------------------------------ features
@timed_step("build_features")
def build_features(dataset_dir: str | Path, out_dir: str | Path) -> list[str]:
    """The property and user tables the encoders use, written next to the interactions with their encoder
    description. With `feast.training` set, the property attributes come from the Feast store, point in time at
    the snapshot's end (offline tables rebuilt, definitions applied, online store refreshed), and the Feast views
    lead the returned names as `view:version`. Returns the feature view names (lineage)."""
    from rentalml.data.features import FeatureEncoder

    ds = _load(dataset_dir)
    feast_views: list[str] = []
    if get_settings().feast.training:
        from rentalml.features.store import dataset_with_features

        ds, feast_views = dataset_with_features(ds)
    ds.save(out_dir)
    views, encoders = list(feast_views), {}
    for view, table in (("property_features", ds.items), ("user_features", ds.users)):
        if table is not None and len(table.columns):
            enc = FeatureEncoder.fit(table)
            if enc.dim:
                views.append(view)
                encoders[view] = {"dim": int(enc.dim), "rows": int(len(table)), "encoder": enc.to_dict()}
    _write_json(Path(out_dir) / "features.json", {"views": views, "source": "feast" if feast_views else "local",
                                                  "encoders": encoders})
    return views


# ------------------------------------------------------------------------------------------ tune
@timed_step("tune")
def tune(dataset_dir: str | Path, model: str, protocol: str, seed: int, trials: int,
         base_params: dict | None = None) -> dict:
    """Optuna over the shared search space on a validation split of the protocol's train part; trials=0
    keeps the defaults. Returns {"best_params", "best_value", "default_value", "trials"}."""
    if trials <= 0:
        return {"best_params": {}, "best_value": None, "default_value": None, "trials": 0}
    from rentalml.evaluation.protocols import split
    from rentalml.training.tuning import tune as run_tune

    ds = _load(dataset_dir)
    train, _ = split(ds.interactions, protocol, seed)
    res = run_tune(model, ds, train, trials=trials, seed=seed, base_params=clean_params(base_params))
    return {"best_params": res["best_params"], "best_value": res["best_value"],
            "default_value": res["default_value"], "trials": len(res["trials"])}


# ------------------------------------------------------------------------------------------ train
@timed_step("train")
def train(dataset_dir: str | Path, model: str, protocol: str, seed: int, params: dict,
          eval_model_path: str | Path, model_path: str | Path) -> dict:
    """Fit on the protocol's train split (validation carve-out, early stopping; `eval_model`, what evaluate
    scores), then refit on every interaction with the selected parameters (`model`, what ships)."""
    from rentalml.evaluation.protocols import split
    from rentalml.training.trainer import fit_model

    ds = _load(dataset_dir)
    t0 = time.perf_counter()
    train_pairs, _ = split(ds.interactions, protocol, seed)
    on_split = fit_model(model, ds, train_pairs, params=clean_params(params), seed=seed)
    final = fit_model(model, ds, None, params=on_split.params, seed=seed, valid_frac=0.0)
    for fitted, path in ((on_split, eval_model_path), (final, model_path)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            pickle.dump(fitted, fh)
    return {"params": {k: v for k, v in final.params.items() if isinstance(v, (int, float, str, bool))},
            "fit_seconds": round(time.perf_counter() - t0, 2)}


def load_fitted(path: str | Path):
    with open(path, "rb") as fh:
        return pickle.load(fh)


# ------------------------------------------------------------------------------------------ evaluate + gate
def champion_metric(metric: str = "ndcg_at_10") -> tuple[str | None, float | None]:
    """(version, gate metric) of the current champion in the registry, (None, None) when there is none."""
    from rentalml.registry import mlflow_registry as reg

    version = reg.alias_version("champion")
    if version is None:
        return None, None
    client = reg.configure()
    mv = client.get_model_version(get_settings().model_name, version)
    return version, client.get_run(mv.run_id).data.metrics.get(metric)


@timed_step("evaluate")
def evaluate(dataset_dir: str | Path, eval_model_path: str | Path, protocol: str, seed: int, k: int,
             report_dir: str | Path) -> dict:
    """Metrics of the candidate on the protocol's test split (core evaluator) and the HTML report."""
    from rentalml.evaluation.evaluate import evaluate as run_eval
    from rentalml.evaluation.protocols import split
    from rentalml.evaluation.report import write_report

    ds = _load(dataset_dir)
    fitted = load_fitted(eval_model_path)
    _, test = split(ds.interactions, protocol, seed)
    metrics = run_eval(fitted, test, k)
    metrics["fit_seconds"] = round(fitted.fit_seconds, 2)
    curves = {fitted.name: fitted.training_curve}
    write_report({"dataset": ds.name, "protocol": protocol, "k": k, "seed": seed, "models": {fitted.name: metrics}},
                 report_dir, curves)
    if f"ndcg@{k}" in metrics:
        push_training_metrics("evaluate", ndcg_at_10=float(metrics[f"ndcg@{k}"]), model=fitted.name)
    return metrics


def gate(metrics: dict, k: int, margin: float) -> dict:
    """The champion gate: "deploy" only when the candidate's nDCG@k beats the current champion's gate metric
    by more than `margin` (or there is no champion yet); otherwise "stop" and the pipeline ends before
    deploy. The registry applies the same rule when it moves the champion alias."""
    from rentalml.registry.mlflow_registry import metric_key

    key = metric_key(f"ndcg@{k}")
    candidate = float(metrics[f"ndcg@{k}"])
    champ_version, champ = champion_metric(key)
    passed = champ is None or candidate > champ + margin
    res = {"metric": key, "candidate": candidate, "champion": champ, "champion_version": champ_version,
           "margin": margin, "decision": "deploy" if passed else "stop"}
    print(f"gate: candidate {key}={candidate:.5f} vs champion "
          f"{'none' if champ is None else f'v{champ_version} {champ:.5f}'} + margin {margin} -> {res['decision']}",
          flush=True)
    return res


# ------------------------------------------------------------------------------------------ export
@timed_step("export")
def export(dataset_dir: str | Path, model_path: str | Path, bundle_dir: str | Path, metrics: dict,
           feature_views: list[str], sample_users: int = 200, k: int = 10) -> dict:
    """The model bundle: scorer.onnx (top-k in the graph) and the int8-quantized variant, id maps, cold-start
    fallback. Also measures the int8 variant against fp32 (top-k overlap, ms/batch) on a sample of users."""
    import numpy as np

    from rentalml.export.bundle import Bundle, write_bundle

    ds = _load(dataset_dir)
    fitted = load_fitted(model_path)
    out = write_bundle(fitted, ds, bundle_dir, model_name=get_settings().model_name, metrics=metrics,
                       feature_views=feature_views)
    from rentalml.export.triton import write_triton_repo

    # the Triton model repository the cluster's predictor serves (the InferenceService's storageUri)
    repo = write_triton_repo(out, Path(out) / "triton")
    info = {"files": sorted(p.name for p in Path(out).iterdir()),
            "scorer_onnx_bytes": (Path(out) / "scorer.onnx").stat().st_size,
            "triton_models": sorted(p.name for p in repo.iterdir() if p.is_dir())}
    int8 = Path(out) / "scorer.int8.onnx"
    if int8.exists():
        info["scorer_int8_bytes"] = int8.stat().st_size
        b32, b8 = Bundle(out), Bundle(out, int8=True)
        hist = [h for h in b32.user_history if len(h)][:sample_users]
        if hist:
            timing = {}
            for name, b in (("fp32", b32), ("int8", b8)):
                b.score_histories(hist[:2], k)  # session warm-up
                t0 = time.perf_counter()
                timing[name] = b.score_histories(hist, k)[0]
                info[f"{name}_ms_per_{len(hist)}_users"] = round(1000 * (time.perf_counter() - t0), 2)
            overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(timing["fp32"], timing["int8"], strict=True)])
            info[f"int8_top{k}_overlap"] = round(float(overlap), 4)
    return info


# ------------------------------------------------------------------------------------------ register
@timed_step("register")
def register(bundle_dir: str | Path, report_dir: str | Path | None, *, model: str, params: dict, metrics: dict,
             snapshot: str, dataset_name: str, feature_views: list[str], protocol: str, seed: int, k: int,
             margin: float, pipeline_run: str = "") -> dict:
    """MLflow run (params, metrics, lineage tags: data snapshot hash, feature views, code version, pipeline
    run; bundle and report as artifacts) and a new version of the registered model; the champion alias moves
    only when the candidate beats it by `margin` (else the version becomes the challenger)."""
    from rentalml.export.bundle import read_meta
    from rentalml.registry import mlflow_registry as reg

    s = get_settings()
    lineage = {"data_snapshot": snapshot, "dataset": dataset_name, "protocol": protocol,
               "feature_views": feature_views, "code_version": read_meta(bundle_dir)["code_version"],
               "pipeline_run": pipeline_run}
    run_id = reg.log_training_run(model_type=model, params={**clean_params(params), "seed": seed, "k": k},
                                  metrics=metrics,
                                  bundle_dir=Path(bundle_dir), report_dir=Path(report_dir) if report_dir else None,
                                  lineage=lineage, settings=s, run_name=f"pipeline-{model}")
    result = reg.register(run_id, gate_metric=reg.metric_key(f"ndcg@{k}"), margin=margin, settings=s)
    push_training_metrics("register", success=True, settings=s)
    client = reg.configure(s)
    mv = client.get_model_version(s.model_name, result["version"])
    return {**result, "run_id": run_id, "model_name": s.model_name, "model_uri": mv.source,
            "tracking_uri": s.tracking_uri}


# ------------------------------------------------------------------------------------------ deploy
def deploy(*, version: str, model_uri: str, mode: str, canary_percent: int, isvc_name: str,
           namespace: str, image: str, manifest_path: str | Path, apply: bool = True,
           start_local_server: bool = False) -> dict:
    """mode "kserve": write the InferenceService (new model version behind `canary_percent` % of traffic)
    and create/patch it in the cluster; mode "local": restart the local `rentalml serve` (started by an earlier
    deploy) with the new version, or start one when asked; mode "none": write the manifest only."""
    from rentalml.components import deploy as d

    isvc = d.inference_service(isvc_name, model_uri=model_uri, version=version, image=image,
                               canary_percent=canary_percent, namespace=namespace or None)
    d.write_manifest(isvc, manifest_path)
    if mode == "kserve":
        return {"mode": mode, **(d.apply_inference_service(isvc, canary_percent) if apply else {"applied": False})}
    if mode == "local":
        from rentalml.registry.mlflow_registry import fetch_bundle

        bundle = fetch_bundle(version=version)
        return {"mode": mode, **d.LocalServer().deploy(bundle, version, start=start_local_server)}
    if mode == "none":
        return {"mode": mode, "applied": False}
    raise ValueError(f"deploy mode must be kserve, local or none (got {mode!r})")


def copy_tree(src: str | Path, dst: str | Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)
