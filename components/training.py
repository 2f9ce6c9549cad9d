"""KFP v2 lightweight components of the training pipeline.

Each body imports rentalml and calls one function of rentalml.components.steps (itself a thin layer over the
core) with the paths of its typed artifacts (Dataset, Model, Metrics, HTML). In the cluster they run in the
rentalml image (IMAGE: rentalml and kfp installed, so no pip install at start-up); with
`kfp.local.SubprocessRunner(use_venv=False)` they run in the current interpreter.

Resources, retries, the GPU of the train step and the Kubernetes secrets are set where the tasks are created
(rentalml.pipelines.training).
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output
from rentalml.components.steps import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ingest(source: str, dataset: Output[Dataset]) -> NamedTuple("IngestOutputs", [("snapshot", str), ("rows", int)]):
    """Synthetic marketplace, a CSV/parquet file or directory, or `sql:<table|SELECT>` (database of record)."""
    from rentalml.components import steps

    info = steps.ingest(source, dataset.path)
    dataset.metadata.update(info)
    print(info)
    return (info["snapshot"], int(info["interactions"]))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate_data(dataset: Input[Dataset], psi_error: float, report: Output[HTML], stats: Output[Metrics]):
    """Schema + statistics + drift against the last accepted snapshot; fails the run on bad data."""
    from rentalml.components import steps

    res = steps.validate(dataset.path, report.path, psi_error=psi_error)
    for key in ("rows", "users", "properties", "warnings", "max_psi"):
        stats.log_metric(key, float(res[key]))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def build_features(dataset: Input[Dataset], features: Output[Dataset]) -> list:
    """Local feature tables (Feast later); returns the feature view names."""
    from rentalml.components import steps

    views = steps.build_features(dataset.path, features.path)
    features.metadata.update({"feature_views": views, "snapshot": dataset.metadata.get("snapshot", ""),
                              "name": dataset.metadata.get("name", "dataset")})
    return views


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tune(dataset: Input[Dataset], model: str, protocol: str, seed: int, trials: int, base_params: dict,
         training_image: str, run_name: str, tuning: Output[Metrics]) -> dict:
    """Optuna (multivariate TPE) over the shared search space; `trials=0` keeps the defaults. In the cluster:
    a Katib Experiment (TrainJob trials on `training_image`) over this dataset artifact's object-store URI."""
    from rentalml.components import steps

    res = steps.tune(dataset.path, model, protocol, seed, trials, base_params, dataset_uri=dataset.uri,
                     run_name=run_name, image=training_image)
    tuning.log_metric("trials", float(res["trials"]))
    if res["best_value"] is not None:
        if res["default_value"] is not None:
            tuning.log_metric("default_val_ndcg_at_10", float(res["default_value"]))
        tuning.log_metric("best_val_ndcg_at_10", float(res["best_value"]))
    return {**base_params, **res["best_params"]}


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(dataset: Input[Dataset], model_type: str, protocol: str, seed: int, params: dict, num_nodes: int,
          training_image: str, run_name: str, eval_model: Output[Model], model: Output[Model]) -> dict:
    """Fit on the train split (what evaluate scores), then refit on all data (what ships). num_nodes > 1:
    data-parallel (a TrainJob in the cluster, torchrun locally), the models copied back to these outputs."""
    from rentalml.components import steps

    scratch = eval_model.uri.rsplit("/", 1)[0] + "/trainjob"  # beside this task's outputs in the pipeline root
    res = steps.train(dataset.path, model_type, protocol, seed, params, eval_model.path, model.path,
                      num_nodes=num_nodes, dataset_uri=dataset.uri, output_uri=scratch, run_name=run_name,
                      image=training_image)
    for art in (eval_model, model):
        art.metadata.update({"model_type": model_type, "fit_seconds": res["fit_seconds"],
                             "num_nodes": res.get("num_nodes", 1)})
    return res["params"]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(dataset: Input[Dataset], eval_model: Input[Model], protocol: str, seed: int, k: int,
             metrics: Output[Metrics], report: Output[HTML]) -> dict:
    """Ranking metrics of the candidate on the test split, and the HTML report (plots, training curve)."""
    import os
    import shutil
    import tempfile

    from rentalml.components import steps

    work = tempfile.mkdtemp()
    scores = steps.evaluate(dataset.path, eval_model.path, protocol, seed, k, work)
    shutil.copyfile(os.path.join(work, "report.html"), report.path)
    for key, value in scores.items():
        if isinstance(value, (int, float)):
            metrics.log_metric(key.replace("@", "_at_"), float(value))
    return scores


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def champion_gate(scores: dict, k: int, margin: float) -> str:
    """"deploy" when the candidate beats the registry's champion by `margin`, else "stop"."""
    from rentalml.components import steps

    return steps.gate(scores, k, margin)["decision"]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def export(dataset: Input[Dataset], model: Input[Model], scores: dict, feature_views: list,
           bundle: Output[Model], export_metrics: Output[Metrics]):
    """Model bundle: scorer.onnx (top-k in the graph) + scorer.int8.onnx, id maps, cold-start fallback."""
    from rentalml.components import steps

    info = steps.export(dataset.path, model.path, bundle.path, scores, feature_views)
    bundle.metadata.update({"files": info["files"]})
    for key, value in info.items():
        if isinstance(value, (int, float)):
            export_metrics.log_metric(key, float(value))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(bundle: Input[Model], report: Input[HTML], features: Input[Dataset], model_type: str, params: dict,
             scores: dict, feature_views: list, snapshot: str, protocol: str, seed: int, k: int, margin: float,
             pipeline_run: str) -> NamedTuple(
                 "RegisterOutputs", [("version", str), ("alias", str), ("model_uri", str), ("run_id", str)]
             ):
    """MLflow run with lineage (data snapshot hash, feature views, code version) and a registry version."""
    import os
    import shutil
    import tempfile

    from rentalml.components import steps

    report_dir = tempfile.mkdtemp()
    shutil.copyfile(report.path, os.path.join(report_dir, "report.html"))
    name = features.metadata.get("name") or "dataset"
    res = steps.register(bundle.path, report_dir, model=model_type, params=params, metrics=scores, snapshot=snapshot,
                         dataset_name=name, feature_views=feature_views, protocol=protocol, seed=seed, k=k,
                         margin=margin, pipeline_run=pipeline_run)
    print(res)
    return (res["version"], res["alias"], res["model_uri"], res["run_id"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def publish(bundle: Input[Model], version: str, mode: str, isvc_name: str, namespace: str,
            storage_uri: str, triton_gpu: bool) -> dict:
    """The Triton repository of the live versions (serving + new) to the predictor's storageUri (s3://), and
    its python-backend twin beside it."""
    from rentalml.components import steps

    res = steps.publish(version=version, bundle_dir=bundle.path, mode=mode, isvc_name=isvc_name,
                        namespace=namespace, storage_uri=storage_uri, triton_gpu=triton_gpu)
    print(res)
    return res


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def deploy(version: str, mode: str, canary_percent: int, isvc_name: str, namespace: str,
           start_local_server: bool, manifest: Output[dsl.Artifact]) -> dict:
    """KServe: JSON-Patch the InferenceService (predictor revision with the live versions, then the
    transformer's champion/challenger arms); local: restart the local server on the new version."""
    from rentalml.components import steps

    res = steps.deploy(version=version, mode=mode, canary_percent=canary_percent, isvc_name=isvc_name,
                       namespace=namespace, manifest_path=manifest.path, start_local_server=start_local_server)
    manifest.metadata.update({k: v for k, v in res.items() if isinstance(v, (str, int, float, bool))})
    print(res)
    return res
