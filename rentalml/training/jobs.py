"""Kubernetes specs that launch the data-parallel entrypoint (`rentalml.training.distributed`):

* a Kubeflow Trainer v2 `TrainJob` (trainer.kubeflow.org/v1alpha1) on the `torch-distributed` runtime: the
  runtime sets PET_NNODES/PET_NPROC_PER_NODE/PET_NODE_RANK/PET_MASTER_ADDR/PET_MASTER_PORT and `torchrun`
  reads them, so the trainer command is `torchrun -m rentalml.training.distributed ...`;
* an `MPIJob` (kubeflow.org/v2beta1, OpenMPI): the launcher runs `mpirun ... python -m
  rentalml.training.distributed ...`; ranks read OMPI_COMM_WORLD_RANK/SIZE and the rendezvous address
  (worker 0) that mpirun exports with `-x MASTER_ADDR`.

The same functions build the standalone manifests in manifests/base/training/ and the trial templates of the
Katib Experiments (rentalml.training.katib); `python -m rentalml.training.katib --out manifests/base/training`
regenerates them (a test checks the committed files against the code).
"""

from __future__ import annotations

IMAGE = "ghcr.io/rentalml/rentalml:0.1.0"
ENTRYPOINT_MODULE = "rentalml.training.distributed"
#: the 1M-interaction synthetic marketplace of benchmarks/distributed_training.py; point --data at a mounted
#: dataset directory or CSV for real data
DEFAULT_DATA = "synthetic:100000,20000,1000000"
CHECKPOINT_PVC = "rentalml-checkpoints"  # ReadWriteMany: every node mounts it, rank 0 writes it
CHECKPOINT_MOUNT = "/checkpoints"
GPU = "nvidia.com/gpu"
LABELS = {"app.kubernetes.io/part-of": "rentalml", "app.kubernetes.io/component": "training"}
TRAINER_API = "trainer.kubeflow.org/v1alpha1"
MPI_API = "kubeflow.org/v2beta1"


def entrypoint_args(run_name: str, data: str = DEFAULT_DATA, extra: list[str] | None = None) -> list[str]:
    """Arguments of the training entrypoint; checkpoints (and the result) go to the shared volume under the
    job's name, so a restarted pod of the same job resumes."""
    return [f"--data={data}", "--model=hybrid", "--epochs=30", "--eval-every=2", "--patience=6",
            f"--checkpoint-dir={CHECKPOINT_MOUNT}/{run_name}",
            f"--result-json={CHECKPOINT_MOUNT}/{run_name}/result.json",
            *(extra or [])]


def _gpu_pod_bits() -> dict:
    return {"nodeSelector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}],
            "volumes": [{"name": "checkpoints", "persistentVolumeClaim": {"claimName": CHECKPOINT_PVC}}]}


def trainjob(name: str = "rentalml-two-tower", *, args: list[str] | None = None, image: str = IMAGE,
             num_nodes: int = 2, gpus_per_node: int = 1, labels: dict | None = None) -> dict:
    """Kubeflow Trainer v2 TrainJob on the torch-distributed ClusterTrainingRuntime, one GPU per node."""
    resources = {"requests": {"cpu": "4", "memory": "16Gi", GPU: str(gpus_per_node)},
                 "limits": {"memory": "24Gi", GPU: str(gpus_per_node)}}
    pod = _gpu_pod_bits()
    return {
        "apiVersion": TRAINER_API,
        "kind": "TrainJob",
        "metadata": {"name": name, "labels": {**LABELS, **(labels or {})}},
        "spec": {
            "runtimeRef": {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                           "kind": "ClusterTrainingRuntime"},
            "trainer": {
                "image": image,
                "command": ["torchrun", "-m", ENTRYPOINT_MODULE],
                "args": args if args is not None else entrypoint_args(name),
                "numNodes": num_nodes,
                "numProcPerNode": gpus_per_node,
                "resourcesPerNode": resources,
            },
            "runtimePatches": [{
                "manager": "rentalml",
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
                    "name": "node",
                    "template": {"spec": {"template": {"spec": {
                        **pod,
                        "containers": [{"name": "node", "volumeMounts": [
                            {"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT}]}],
                    }}}},
                }]}}},
            }],
        },
    }


def mpijob(name: str = "rentalml-two-tower-mpi", *, args: list[str] | None = None, image: str = IMAGE,
           workers: int = 2, gpus_per_worker: int = 1, labels: dict | None = None) -> dict:
    """MPIJob v2beta1 (OpenMPI) running the same entrypoint: one rank per worker, rank 0 on worker 0."""
    # mpi-operator v2: worker pods are <job>-worker-<i> in the headless service <job>-worker
    master = f"{name}-worker-0.{name}-worker"
    mpirun = ["mpirun", "--allow-run-as-root", "-np", str(workers * gpus_per_worker), "-bind-to", "none",
              "-map-by", "slot", "-x", f"MASTER_ADDR={master}", "-x", "MASTER_PORT=29500",
              "python", "-m", ENTRYPOINT_MODULE]
    pod = _gpu_pod_bits()
    worker_resources = {"requests": {"cpu": "4", "memory": "16Gi", GPU: str(gpus_per_worker)},
                        "limits": {"memory": "24Gi", GPU: str(gpus_per_worker)}}
    return {
        "apiVersion": MPI_API,
        "kind": "MPIJob",
        "metadata": {"name": name, "labels": {**LABELS, **(labels or {})}},
        "spec": {
            "slotsPerWorker": gpus_per_worker,
            "mpiImplementation": "OpenMPI",
            "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": 3},
            "mpiReplicaSpecs": {
                "Launcher": {
                    "replicas": 1,
                    "restartPolicy": "OnFailure",
                    "template": {"spec": {"containers": [{
                        "name": "launcher",
                        "image": image,
                        "command": mpirun,
                        "args": args if args is not None else entrypoint_args(name),
                        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
                    }]}},
                },
                "Worker": {
                    "replicas": workers,
                    "restartPolicy": "OnFailure",
                    "template": {"spec": {
                        **pod,
                        "containers": [{
                            "name": "worker",
                            "image": image,
                            "resources": worker_resources,
                            "volumeMounts": [{"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT}],
                        }],
                    }},
                },
            },
        },
    }


def validate_trainjob(doc: dict) -> list[str]:
    """Problems of a TrainJob: the Kubeflow SDK's Trainer API models (kubeflow_trainer_api) must accept it and
    keep every field (the models ignore unknown keys, so a round trip that drops one is a typo)."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    errors = []
    if doc.get("apiVersion") != TRAINER_API or doc.get("kind") != "TrainJob":
        errors.append(f"not a {TRAINER_API} TrainJob")
    try:
        model = TrainerV1alpha1TrainJob.from_dict(doc)
    except Exception as exc:  # pydantic ValidationError
        return [*errors, f"TrainJob does not validate: {exc}"]
    errors += [f"TrainJob: unknown or dropped field {p}" for p in dropped_fields(doc, model.to_dict())]
    trainer = doc.get("spec", {}).get("trainer", {})
    if "-m" not in trainer.get("command", []) or ENTRYPOINT_MODULE not in trainer.get("command", []):
        errors.append("the trainer does not run the training entrypoint")
    return errors


def validate_mpijob(doc: dict) -> list[str]:
    """Structural checks of an MPIJob v2beta1 (the Kubeflow SDK has no MPIJob models)."""
    errors = []
    if doc.get("apiVersion") != MPI_API or doc.get("kind") != "MPIJob":
        errors.append(f"not a {MPI_API} MPIJob")
    spec = doc.get("spec", {})
    if spec.get("mpiImplementation") not in ("OpenMPI", "Intel", "MPICH"):
        errors.append("spec.mpiImplementation must be OpenMPI, Intel or MPICH")
    replicas = spec.get("mpiReplicaSpecs", {})
    if set(replicas) != {"Launcher", "Worker"}:
        errors.append("spec.mpiReplicaSpecs needs exactly Launcher and Worker")
        return errors
    if replicas["Launcher"].get("replicas") != 1:
        errors.append("exactly one launcher")
    launcher = replicas["Launcher"]["template"]["spec"]["containers"][0]
    if ENTRYPOINT_MODULE not in launcher.get("command", []) + launcher.get("args", []):
        errors.append("the launcher does not run the training entrypoint")
    np_ = launcher["command"][launcher["command"].index("-np") + 1] if "-np" in launcher.get("command", []) else None
    if np_ is not None and int(np_) != replicas["Worker"]["replicas"] * spec.get("slotsPerWorker", 1):
        errors.append("mpirun -np differs from workers × slotsPerWorker")
    for role, r in replicas.items():
        if r.get("restartPolicy") not in (None, "Always", "OnFailure", "Never", "ExitCode"):
            errors.append(f"{role}: bad restartPolicy")
    return errors


def dropped_fields(original, roundtrip, path: str = "") -> list[str]:
    """Paths present in `original` but missing from `roundtrip` (what a pydantic model silently ignored)."""
    if isinstance(original, dict):
        if not isinstance(roundtrip, dict):
            return [path or "/"]
        out = []
        for k, v in original.items():
            if k not in roundtrip:
                out.append(f"{path}/{k}")
            else:
                out += dropped_fields(v, roundtrip[k], f"{path}/{k}")
        return out
    if isinstance(original, list):
        if not isinstance(roundtrip, list) or len(roundtrip) != len(original):
            return [path]
        return [p for i, (a, b) in enumerate(zip(original, roundtrip, strict=True))
                for p in dropped_fields(a, b, f"{path}[{i}]")]
    return []
