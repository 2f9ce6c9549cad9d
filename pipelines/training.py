"""The training pipeline (KFP v2):

    ingest → validate → build features → tune → train → evaluate → champion gate → export → register
    → publish + deploy (only when the gate passed)

The gate: the candidate's test nDCG@k must beat the current champion's by `margin`; otherwise the run still
registers the version (as challenger, with its metrics and lineage) and stops before deploy. The gate runs
before register, which moves the champion alias by the same rule.

Every task sets CPU/memory requests and limits and retries with back-off; train asks for one GPU
(accelerator limit, node selector and toleration through kfp-kubernetes). MLflow, object-store and database
credentials come from Kubernetes secrets as environment variables (`optional`: a cluster without auth
leaves keys out); nothing secret is a literal or a pipeline parameter. The validate step keeps the accepted
data snapshot on the `rentalml-state` volume (RENTALML_HOME) so drift is measured across runs.
"""

import sys

from kfp import dsl, kubernetes
from kfp.dsl.pipeline_task import PipelineTask
from rentalml.components import training as c
from rentalml.components.steps import DEMO_SOURCE, IMAGE

from rentalml.training.jobs import PUSHGATEWAY_URL

PIPELINE_NAME = "rentalml-training"
GPU = "nvidia.com/gpu"
STATE_PVC, STATE_DIR = "rentalml-state", "/var/lib/rentalml"
MLFLOW_SECRET = {"name": "rentalml-mlflow", "keys": {"tracking-uri": "RENTALML_MLFLOW_TRACKING_URI",
                                                     "username": "MLFLOW_TRACKING_USERNAME",
                                                     "password": "MLFLOW_TRACKING_PASSWORD"}}
OBJECT_STORE_SECRET = {"name": "rentalml-object-store", "keys": {"access-key-id": "AWS_ACCESS_KEY_ID",
                                                                 "secret-access-key": "AWS_SECRET_ACCESS_KEY",
                                                                 "endpoint-url": "MLFLOW_S3_ENDPOINT_URL"}}
DATABASE_SECRET = {"name": "rentalml-database", "keys": {"url": "RENTALML_DATABASE_URL"}}
#: per step: cpu request, memory request, cpu limit, memory limit, retries
RESOURCES = {
    "ingest": ("500m", "1Gi", "2", "4Gi", 3),
    "validate": ("500m", "1Gi", "1", "2Gi", 2),
    "features": ("500m", "1Gi", "1", "2Gi", 2),
    "tune": ("2", "4Gi", "4", "8Gi", 1),
    "train": ("2", "8Gi", "8", "16Gi", 2),
    "evaluate": ("1", "2Gi", "2", "4Gi", 2),
    "gate": ("250m", "512Mi", "1", "1Gi", 3),
    "export": ("1", "2Gi", "2", "4Gi", 2),
    "register": ("250m", "512Mi", "1", "1Gi", 3),
    "publish": ("250m", "512Mi", "1", "1Gi", 3),
    "deploy": ("250m", "512Mi", "1", "1Gi", 3),
}


_NOT_A_CONTAINER = ("{} can only be used on single-step components, not pipelines used as components, or special "
                    "components like importers.")


def _ensure_container_spec_exists(self: PipelineTask) -> None:
    """kfp's check, without its cost: kfp 2.17.3 names the caller for this error with `inspect.stack()[1][3]`,
    computed before the check and on every call. `inspect.stack` reads the source context of every frame on the
    stack, and each of those goes through `inspect.getmodule`, a scan of all of `sys.modules`; the pipeline calls
    the check 70 times (every `set_cpu_request`, `set_env_variable`, ...). In a process that has imported torch,
    Feast and MLflow (3,107 modules: a test worker, a notebook) building the pipeline took 15.8 CPU-s, 14.5 of
    them in `getmodule`; with this check 0.39 (1.6 in a fresh process either way; docs/architecture.md "Test
    time"). Same condition, same message: the caller's name is read from its frame, and only when the error is
    raised."""
    if self.container_spec is None:
        raise ValueError(_NOT_A_CONTAINER.format(sys._getframe(1).f_code.co_name))


def _install_fast_container_check() -> bool:
    """Replace kfp's check where it is the slow one (it calls `inspect.stack`); a kfp that fixed it is left alone."""
    names = PipelineTask._ensure_container_spec_exists.__code__.co_names
    if "stack" in names and "inspect" in names:
        PipelineTask._ensure_container_spec_exists = _ensure_container_spec_exists
        return True
    return PipelineTask._ensure_container_spec_exists is _ensure_container_spec_exists


FAST_CONTAINER_CHECK = _install_fast_container_check()


def _configure(task: dsl.PipelineTask, step: str, *secrets: dict, retries: bool = True) -> dsl.PipelineTask:
    cpu, mem, cpu_limit, mem_limit, n_retries = RESOURCES[step]
    task.set_display_name(step)
    task.set_cpu_request(cpu).set_memory_request(mem).set_cpu_limit(cpu_limit).set_memory_limit(mem_limit)
    if retries:
        task.set_retry(num_retries=n_retries, backoff_duration="30s", backoff_factor=2.0,
                       backoff_max_duration="600s")
    task.set_caching_options(False)  # a training run reads fresh data and the registry's current champion
    if retries:  # in the cluster: as many torch/OpenMP threads as the CPU limit, not the node's core count
        task.set_env_variable("OMP_NUM_THREADS", cpu_limit)
        # ml_training_* (step durations, nDCG, last success) go to the stack's Pushgateway
        task.set_env_variable("RENTALML_MONITOR__PUSHGATEWAY_URL", PUSHGATEWAY_URL)
    for s in secrets:
        kubernetes.use_secret_as_env(task, secret_name=s["name"], secret_key_to_env=s["keys"], optional=True)
    return task


def build(local: bool = False):
    """The pipeline. `local=True` is for kfp.local: no retry policies (kfp.local honours them, so a
    deterministic failure would be retried with minutes of back-off) and the state directory stays the
    caller's RENTALML_HOME instead of the cluster volume."""

    def configure(task, step, *secrets):
        return _configure(task, step, *secrets, retries=not local)

    @dsl.pipeline(name=PIPELINE_NAME, description="rentalml: ingest, validate, features, tune, train, evaluate "
                  "(champion gate), export ONNX, register in MLflow, canary deploy")
    def training_pipeline(
        source: str = DEMO_SOURCE,
        model: str = "hybrid",
        protocol: str = "random-75-25",
        seed: int = 42,
        k: int = 10,
        params: dict = {"epochs": 40},  # noqa: B006 - a pipeline parameter default, compiled into the IR
        tune_trials: int = 0,
        margin: float = 0.0,
        psi_error: float = 0.25,
        deploy_mode: str = "kserve",
        canary_percent: int = 10,
        isvc_name: str = "rental-recommender",
        namespace: str = "",
        start_local_server: bool = False,
        storage_uri: str = "",
        triton_gpu: bool = False,
        num_nodes: int = 1,
        training_image: str = IMAGE,
    ):
        ing = configure(c.ingest(source=source), "ingest", DATABASE_SECRET)
        val = configure(c.validate_data(dataset=ing.outputs["dataset"], psi_error=psi_error), "validate")
        kubernetes.mount_pvc(val, pvc_name=STATE_PVC, mount_path=STATE_DIR)
        if not local:
            val.set_env_variable("RENTALML_HOME", STATE_DIR)
        feats = configure(c.build_features(dataset=ing.outputs["dataset"]), "features").after(val)
        # tune/train in the cluster create a Katib Experiment / a TrainJob over the features artifact: they read
        # it (and the TrainJob writes its models) with the object-store credentials
        tun = configure(c.tune(dataset=feats.outputs["features"], model=model, protocol=protocol, seed=seed,
                                trials=tune_trials, base_params=params, training_image=training_image,
                                run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER), "tune", OBJECT_STORE_SECRET)
        tr = configure(c.train(dataset=feats.outputs["features"], model_type=model, protocol=protocol, seed=seed,
                                params=tun.outputs["Output"], num_nodes=num_nodes, training_image=training_image,
                                run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER), "train", OBJECT_STORE_SECRET)
        # the step that holds the GPU runs the pipeline's training image (the prod overlay's weekly run passes the
        # CUDA one, ghcr.io/rentalml/rentalml-gpu): a GPU under CPU-only torch would sit idle (issue 11, defect 14)
        if not local:
            tr.set_container_image(training_image)
        tr.set_accelerator_type(GPU).set_accelerator_limit(1)
        kubernetes.add_node_selector(tr, label_key="nvidia.com/gpu.present", label_value="true")
        kubernetes.add_toleration(tr, key=GPU, operator="Exists", effect="NoSchedule")
        ev = configure(c.evaluate(dataset=feats.outputs["features"], eval_model=tr.outputs["eval_model"],
                                  protocol=protocol, seed=seed, k=k), "evaluate")
        gate = configure(c.champion_gate(scores=ev.outputs["Output"], k=k, margin=margin), "gate", MLFLOW_SECRET)
        ex = configure(c.export(dataset=feats.outputs["features"], model=tr.outputs["model"],
                                scores=ev.outputs["Output"], feature_views=feats.outputs["Output"]), "export")
        reg = configure(c.register(bundle=ex.outputs["bundle"], report=ev.outputs["report"],
                                    features=feats.outputs["features"], model_type=model, params=tr.outputs["Output"],
                                    scores=ev.outputs["Output"], feature_views=feats.outputs["Output"],
                                    snapshot=ing.outputs["snapshot"], protocol=protocol, seed=seed, k=k, margin=margin,
                                    pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER),
                         "register", MLFLOW_SECRET, OBJECT_STORE_SECRET)
        reg.after(gate)
        with dsl.If(gate.output == "deploy", name="champion-gate-passed"):
            pub = configure(c.publish(bundle=ex.outputs["bundle"], version=reg.outputs["version"], mode=deploy_mode,
                                      isvc_name=isvc_name, namespace=namespace, storage_uri=storage_uri,
                                      triton_gpu=triton_gpu),
                            "publish", MLFLOW_SECRET, OBJECT_STORE_SECRET)
            configure(c.deploy(version=reg.outputs["version"], mode=deploy_mode, canary_percent=canary_percent,
                                isvc_name=isvc_name, namespace=namespace, start_local_server=start_local_server),
                       "deploy", MLFLOW_SECRET, OBJECT_STORE_SECRET).after(pub)

    return training_pipeline


training_pipeline = build()
