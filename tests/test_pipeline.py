"""The KFP training pipeline: the committed IR (golden file) matches the code and carries the cluster settings
(resources, retries, GPU, secrets from Kubernetes secrets); `rentalml pipeline run --local` runs the whole DAG
with kfp.local and leaves a registered model version with metrics and lineage; `submit` talks to a KFP client.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from rentalml.pipelines import cli as pcli
from typer.testing import CliRunner

GOLDEN = Path(pcli.__file__).resolve().parent / "training_pipeline.yaml"
STEPS = ["ingest", "validate-data", "build-features", "tune", "train", "evaluate", "champion-gate", "export",
         "register", "deploy"]


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    out = pcli.compile_pipeline(tmp_path_factory.mktemp("ir") / "pipeline.yaml")
    return out.read_text()


def normalised(text: str) -> list:
    """The IR as data, without what changes with the compiling SDK rather than the pipeline (as KFP's own compiler
    golden tests do: `sdkVersion` dropped; YAML layout and key order don't matter once parsed)."""
    docs = list(yaml.safe_load_all(text))
    for doc in docs:
        if isinstance(doc, dict):
            doc.pop("sdkVersion", None)
    return docs


def test_golden_file_matches_the_code(ir):
    assert GOLDEN.exists(), "missing golden IR: run `rentalml pipeline compile`"
    assert normalised(GOLDEN.read_text()) == normalised(ir), \
        "pipelines/training_pipeline.yaml is stale: run `rentalml pipeline compile`"


def test_golden_comparison_ignores_the_sdk_version_only(ir):
    other_sdk = ir.replace("sdkVersion: kfp-", "sdkVersion: kfp-9.9.9-was-")
    assert other_sdk != ir and normalised(other_sdk) == normalised(ir)
    changed = ir.replace("image: ghcr.io/rentalml/rentalml:0.1.0", "image: ghcr.io/rentalml/rentalml:0.1.1", 1)
    assert changed != ir and normalised(changed) != normalised(ir)


def test_building_the_pipeline_does_not_walk_the_stack(monkeypatch, tmp_path, ir):
    """kfp 2.17.3's container-spec check called `inspect.stack()` on each of its 70 calls while the pipeline is
    built: 15.8 CPU-s per build in a process holding torch, Feast and MLflow (pipelines/training.py). The pipeline
    builds without it, to the same IR, and the check still refuses what kfp refuses, with kfp's message."""
    import inspect

    from kfp import compiler, dsl
    from rentalml.pipelines import training

    def no_stack(*_a, **_k):
        raise AssertionError("inspect.stack() called while building the pipeline")

    monkeypatch.setattr(inspect, "stack", no_stack)
    assert training.FAST_CONTAINER_CHECK
    compiler.Compiler().compile(training.build(), str(tmp_path / "again.yaml"))
    assert normalised((tmp_path / "again.yaml").read_text()) == normalised(ir)

    @dsl.component
    def inner_step():  # no annotations: this module's `from __future__ import annotations` makes them strings
        pass

    @dsl.pipeline
    def inner():
        inner_step()

    refused = []

    @dsl.pipeline
    def outer():
        try:
            inner().set_cpu_request("1")
        except ValueError as exc:
            refused.append(str(exc))

    assert refused == ["set_cpu_request can only be used on single-step components, not pipelines used as "
                       "components, or special components like importers."]


def test_ir_carries_cluster_settings(ir):
    docs = list(yaml.safe_load_all(ir))
    spec, platform = docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    tasks = spec["root"]["dag"]["tasks"]
    assert set(STEPS) - {"deploy"} <= set(tasks)
    cond = tasks["condition-1"]  # deploy runs inside it, only when the gate said "deploy"
    assert "champion-gate" in cond["triggerPolicy"]["condition"] and "'deploy'" in cond["triggerPolicy"]["condition"]
    assert "deploy" in spec["components"][cond["componentRef"]["name"]]["dag"]["tasks"]
    assert "champion-gate" in tasks["register"]["dependentTasks"]  # gate before the champion alias moves
    executors = spec["deploymentSpec"]["executors"]
    for name, ex in executors.items():
        res = ex["container"]["resources"]
        assert res["cpuRequest"] > 0 and res["memoryRequest"] > 0 and res["memoryLimit"] > 0, name
        if name == "exec-train":  # the step holding the GPU runs the pipeline's training image (prod: CUDA)
            assert ex["container"]["image"] == "{{$.inputs.parameters['pipelinechannel--training_image']}}"
        else:
            assert ex["container"]["image"] == "ghcr.io/rentalml/rentalml:0.1.0"
        assert "pip install" not in " ".join(ex["container"]["command"])  # the image has rentalml and kfp
    for name, task in tasks.items():
        if name != "condition-1":
            assert task["retryPolicy"]["maxRetryCount"] >= 1, name
    gpu = executors["exec-train"]["container"]["resources"]["accelerator"]
    assert gpu["resourceType"] == "nvidia.com/gpu" and gpu["resourceCount"] == "1"
    train = platform["exec-train"]
    assert train["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert train["tolerations"][0]["key"] == "nvidia.com/gpu"
    secrets = {s["secretName"] for ex in platform.values() for s in ex.get("secretAsEnv", [])}
    assert secrets == {"rentalml-mlflow", "rentalml-object-store", "rentalml-database"}
    assert {s["secretName"] for s in platform["exec-register"]["secretAsEnv"]} >= {"rentalml-mlflow"}
    assert platform["exec-validate-data"]["pvcMount"][0]["mountPath"] == "/var/lib/rentalml"
    # no credentials as literals: no env value or parameter default looks like one
    text = ir.lower()
    for bad in ("password:", "aws_secret_access_key:", "postgresql://", "mysql://"):
        assert bad not in text


def test_local_pipeline_run(drift_retraining):
    """The whole DAG with kfp.local (small data: the session's `drift_retraining` run, `rentalml pipeline run
    --local` started by the drift monitor, read here): artifacts listed, a registered version with metrics and
    lineage, the gate passed on an empty registry, the local deploy recorded."""
    home, summary = drift_retraining.home, drift_retraining.summary
    assert drift_retraining.result.returncode == 3, drift_retraining.result.stderr[-4000:]  # 3: drift found
    stdout = (drift_retraining.out / "retraining.log").read_text()  # the pipeline run's own output
    assert "artifacts of run rentalml-training-" in stdout
    doc = json.loads(summary.read_text())
    tasks = {row["task"] for row in doc["artifacts"]}
    assert {"ingest", "validate-data", "build-features", "train", "evaluate", "export"} <= tasks
    bundle = next(Path(r["uri"]) for r in doc["artifacts"] if r["output"] == "bundle")
    assert (bundle / "scorer.onnx").exists() and (bundle / "scorer.int8.onnx").exists()
    assert doc["gate"] == "deploy" and doc["registered"]["alias"] == "champion"
    assert doc["deploy"]["mode"] == "local" and doc["deploy"]["server"] == "not running"

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=drift_retraining.tracking_uri)
    mv = client.get_model_version("rental-recommender", doc["registered"]["version"])
    run = client.get_run(mv.run_id)
    assert run.data.metrics["ndcg_at_10"] == pytest.approx(doc["scores"]["ndcg@10"])
    tags = run.data.tags
    snapshot = next(r["metadata"]["snapshot"] for r in doc["artifacts"] if r["task"] == "ingest")
    assert tags["lineage.data_snapshot"] == snapshot
    assert json.loads(tags["lineage.feature_views"]) == ["property_features", "user_features"]
    assert tags["lineage.code_version"].startswith("0.1.0")
    assert tags["lineage.pipeline_run"].startswith("rentalml-training")
    assert run.data.params["epochs"] and run.data.params["model_type"] == "hybrid"
    assert (home / "validation" / "accepted.json").exists()
    assert json.loads((home / "serving" / "deployed.json").read_text())["version"] == str(mv.version)


def test_submit_uses_the_kfp_client(monkeypatch):
    calls = []

    def obj(**kw):
        return type("O", (), kw)()

    class FakeClient:
        pipelines: dict = {}

        def list_pipelines(self, filter, namespace=None):  # noqa: A002 (kfp's keyword)
            name = json.loads(filter)["predicates"][0]["stringValue"]
            pid = self.pipelines.get(name)
            return obj(pipelines=[obj(pipeline_id=pid)] if pid else None)

        def upload_pipeline(self, package, pipeline_name, description, namespace=None):
            calls.append(("upload", yaml.safe_load_all(Path(package).read_text()).__next__()["pipelineInfo"]))
            self.pipelines[pipeline_name] = "p-1"
            return obj(pipeline_id="p-1")

        def list_pipeline_versions(self, pipeline_id):
            return obj(pipeline_versions=[obj(pipeline_version_id="v-1")])

        def upload_pipeline_version(self, package, pipeline_version_name, pipeline_id):
            calls.append(("version", pipeline_version_name, pipeline_id))
            return obj(pipeline_version_id="v-2")

        def create_experiment(self, name, namespace=None):
            return obj(experiment_id="e-1")

        def run_pipeline(self, **kw):
            calls.append(("run", kw))
            return obj(run_id="r-1")

        def create_recurring_run(self, **kw):
            calls.append(("recurring", kw))
            return obj(recurring_run_id="rr-1")

    monkeypatch.setattr(pcli, "_client", lambda host: FakeClient())
    from rentalml.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["pipeline", "submit", "--host", "http://kfp.example:8888", "--tune-trials", "8",
                              "--arg", "canary_percent=25"])
    assert res.exit_code == 0, res.output
    assert calls[0] == ("upload", {"name": "rentalml-training", "description": calls[0][1]["description"]})
    kind, kw = calls[1]
    assert kind == "run" and kw["pipeline_id"] == "p-1" and kw["version_id"] == "v-1"
    assert kw["params"] == {"tune_trials": 8, "canary_percent": 25} and kw["enable_caching"] is False
    assert json.loads(res.output)["run_id"] == "r-1"
    res = runner.invoke(app, ["pipeline", "submit", "--schedule", "weekly"], env={"KFP_HOST": "http://kfp:8888"})
    assert res.exit_code == 0, res.output
    assert calls[2][0] == "version" and calls[2][2] == "p-1"  # the pipeline exists: a new version
    kind, kw = calls[3]
    assert kind == "recurring" and kw["cron_expression"] == "0 0 3 * * 1"
    assert kw["job_name"] == "rentalml-training-weekly" and kw["version_id"] == "v-2"
    assert kw["max_concurrency"] == 1 and kw["no_catchup"] is True and kw["experiment_id"] == "e-1"
    res = runner.invoke(app, ["pipeline", "submit"], env={"KFP_HOST": ""})
    assert res.exit_code != 0 and "KFP_HOST" in res.output
