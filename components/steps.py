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
    from rentalml.data.loaders import ingest_parquet, load_dataset

    streamed = ingest_parquet(source, out_dir)  # parquet: record batches, never one frame
    if streamed is not None:
        return streamed
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
    report = v.validate_dir(dataset_dir, v.load_reference(ref_dir), psi_error=psi_error)  # DuckDB, no frame
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
    from rentalml.data.dataset import link_interactions, load_feature_tables, save_feature_tables
    from rentalml.data.features import FeatureEncoder

    feast_views: list[str] = []
    if get_settings().feast.training:  # Feast reads the interactions (offline tables, the snapshot's end)
        from rentalml.features.store import dataset_with_features

        ds, feast_views = dataset_with_features(_load(dataset_dir))
        items, users = ds.items, ds.users
    else:  # only the small tables are read
        items, users = load_feature_tables(dataset_dir)
    # the interactions are not changed here: the file is carried over (hard link or copy), not re-written
    link_interactions(dataset_dir, out_dir)
    save_feature_tables(out_dir, items, users)
    views, encoders = list(feast_views), {}
    for view, table in (("property_features", items), ("user_features", users)):
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
         base_params: dict | None = None, *, dataset_uri: str = "", run_name: str = "",
         image: str = IMAGE, cluster: bool | None = None, api=None, poll_s: float = 30.0) -> dict:
    """Optuna over the shared search space on a validation split of the protocol's train part; trials=0
    keeps the defaults. Returns {"best_params", "best_value", "default_value", "trials"}.

    In the cluster (a pod, or cluster=True) the same search runs as a Katib Experiment (multivariate TPE,
    TrainJob trials on `image`) over the step's own dataset artifact (`dataset_uri`, read with the
    object-store credentials from the rentalml-object-store Secret); the step waits for it and returns the
    best trial (status.currentOptimalTrial)."""
    if trials <= 0:
        return {"best_params": {}, "best_value": None, "default_value": None, "trials": 0}
    from rentalml.training import jobs

    if (jobs.in_cluster() if cluster is None else cluster) and model == "hybrid":
        from rentalml.training import katib

        if not jobs.is_remote(dataset_uri):
            raise ValueError(f"Katib trials need the dataset in the object store, got {dataset_uri!r}")
        name = jobs.job_name(run_name or "rentalml", "tune")
        res = katib.run_experiment(name, dataset_uri, trials=trials, seed=seed, image=image, api=api,
                                   poll_s=poll_s)
        print(res, flush=True)
        return {"best_params": res["best_params"], "best_value": res["best_value"], "default_value": None,
                "trials": res["trials"], "experiment": res["experiment"]}
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
          eval_model_path: str | Path, model_path: str | Path, *, num_nodes: int = 1, dataset_uri: str = "",
          output_uri: str = "", run_name: str = "", image: str = IMAGE, cluster: bool | None = None, api=None,
          poll_s: float = 15.0) -> dict:
    """Fit on the protocol's train split (validation carve-out, early stopping; `eval_model`, what evaluate
    scores), then refit on every interaction with the selected parameters (`model`, what ships).

    num_nodes > 1 (the two-tower `hybrid` network): data-parallel with the distributed entrypoint, which does
    the same split fit and refit (--refit-all). In the cluster the step submits a Kubeflow Trainer TrainJob
    (num_nodes nodes, one GPU each, `image`) on its dataset artifact (`dataset_uri`) and waits; the job
    writes both models under `output_uri` and the step copies them to its outputs. Locally it runs torchrun
    with num_nodes processes."""
    from rentalml.evaluation.protocols import split
    from rentalml.training.trainer import fit_model

    t0 = time.perf_counter()
    if num_nodes > 1 and model == "hybrid":
        return _train_distributed(dataset_dir, protocol, seed, clean_params(params), eval_model_path, model_path,
                                  num_nodes=num_nodes, dataset_uri=dataset_uri, output_uri=output_uri,
                                  run_name=run_name, image=image, cluster=cluster, api=api, poll_s=poll_s, t0=t0)
    ds = _load(dataset_dir)
    train_pairs, _ = split(ds.interactions, protocol, seed)
    on_split = fit_model(model, ds, train_pairs, params=clean_params(params), seed=seed)
    final = fit_model(model, ds, None, params=on_split.params, seed=seed, valid_frac=0.0)
    for fitted, path in ((on_split, eval_model_path), (final, model_path)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            pickle.dump(fitted, fh)
    return {"params": {k: v for k, v in final.params.items() if isinstance(v, (int, float, str, bool))},
            "fit_seconds": round(time.perf_counter() - t0, 2)}


def _train_distributed(dataset_dir, protocol, seed, params, eval_model_path, model_path, *, num_nodes, dataset_uri,
                       output_uri, run_name, image, cluster, api, poll_s, t0) -> dict:
    import subprocess
    import sys
    import tempfile

    from rentalml.training import distributed, jobs

    flags = {f.name for f in distributed.PARAM_FIELDS}
    args = [f"--protocol={protocol}", f"--seed={seed}", "--model=hybrid", "--refit-all", "--no-test",
            *(f"--{k.replace('_', '-')}={v}" for k, v in sorted(params.items()) if k in flags)]
    if jobs.in_cluster() if cluster is None else cluster:
        if not (jobs.is_remote(dataset_uri) and jobs.is_remote(output_uri)):
            raise ValueError(f"a TrainJob reads and writes the object store, got {dataset_uri!r}, {output_uri!r}")
        name = jobs.job_name(run_name or "rentalml", "train")
        # a restarted node resumes from rank 0's checkpoint on the shared volume (rentalml-checkpoints)
        jobs.run_trainjob(name, [f"--data={dataset_uri}", f"--output={output_uri}",
                                 f"--checkpoint-dir={jobs.CHECKPOINT_MOUNT}/{name}", *args], image=image,
                          num_nodes=num_nodes, api=api, poll_s=poll_s)
        out = Path(tempfile.mkdtemp(prefix="rentalml-trainjob-"))
        jobs.download(output_uri, out)
    else:
        out = Path(tempfile.mkdtemp(prefix="rentalml-torchrun-"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_nodes}",
               "-m", jobs.ENTRYPOINT_MODULE, f"--data={dataset_dir}", f"--output={out}", "--device=cpu", *args]
        subprocess.run(cmd, check=True)
    for name, path in (("eval_model.pkl", eval_model_path), ("model.pkl", model_path)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / name, path)
    final = load_fitted(model_path)
    return {"params": {k: v for k, v in final.params.items() if isinstance(v, (int, float, str, bool))},
            "fit_seconds": round(time.perf_counter() - t0, 2), "num_nodes": num_nodes}


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
    metrics = run_eval(fitted, test, k, max_users=get_settings().train.eval_users, seed=seed)
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

    from rentalml.export.bundle import write_bundle
    from rentalml.runtime.bundle import Bundle

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
    from rentalml.registry import mlflow_registry as reg
    from rentalml.runtime.bundle import read_meta

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


# ------------------------------------------------------------------------------------------ publish
@timed_step("publish")
def publish(*, version: str, bundle_dir: str | Path, mode: str, isvc_name: str, namespace: str,
            storage_uri: str = "", triton_gpu: bool = False) -> dict:
    """Write the Triton repository of the live versions (the one serving now and `version`) to the predictor's
    storageUri, and its python-backend twin beside it. mode "kserve": the storageUri and the serving version come
    from the InferenceService in the cluster (`storage_uri` overrides the former); other modes publish only to an
    explicit `storage_uri`. `triton_gpu`: the cluster configs run on the GPU (KIND_GPU + TensorRT; the prod
    overlay's weekly run sets it)."""
    from rentalml.components import publish as p

    if mode == "kserve":
        target = p.live_target(isvc_name, namespace or None)
        uri, serving = storage_uri or target["storage_uri"], target["serving_version"]
    elif storage_uri:
        uri, serving = storage_uri, None
    else:
        return {"published": False, "reason": f"deploy mode {mode!r} without a storage_uri"}
    return {"published": True, **p.publish(version=version, bundle_dir=bundle_dir, storage_uri=uri,
                                           serving_version=serving, gpu=bool(triton_gpu))}


# ------------------------------------------------------------------------------------------ deploy
def deploy(*, version: str, mode: str, canary_percent: int, isvc_name: str, namespace: str,
           manifest_path: str | Path, apply: bool = True, start_local_server: bool = False,
           model_uri: str = "", image: str = "") -> dict:
    """mode "kserve": JSON-Patch the InferenceService the manifests own (predictor revision holding the live
    versions, then the transformer's champion/challenger arms with `canary_percent` % of users on the new
    version); mode "local": restart the local `rentalml serve` (started by an earlier deploy) with the new
    version, or start one when asked; mode "none": record the plan only. `model_uri`/`image`: unused (kept for
    callers of the older signature)."""
    from rentalml.components import deploy as d

    from rentalml.kserve import deploy_version

    if mode == "kserve":
        res = deploy_version(isvc_name, version=version, canary_percent=canary_percent,
                               namespace=namespace or None) if apply else {"applied": False}
        d.write_manifest({"mode": mode, "version": str(version), **res}, manifest_path)
        return {"mode": mode, **{k: v for k, v in res.items() if k != "patches"}}
    d.write_manifest({"mode": mode, "version": str(version), "canary_percent": canary_percent}, manifest_path)
    if mode == "local":
        from rentalml.registry.mlflow_registry import fetch_bundle

        bundle = fetch_bundle(version=version)
        return {"mode": mode, **d.LocalServer().deploy(bundle, version, start=start_local_server)}
    if mode == "none":
        return {"mode": mode, "applied": False}
    raise ValueError(f"deploy mode must be kserve, local or none (got {mode!r})")


def copy_tree(src: str | Path, dst: str | Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)
