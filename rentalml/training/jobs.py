"""Kubernetes specs that launch the data-parallel entrypoint (`rentalml.training.distributed`):

* a Kubeflow Trainer v2 `TrainJob` (trainer.kubeflow.org/v1alpha1) on the `torch-distributed` runtime: the
  runtime sets PET_NNODES/PET_NPROC_PER_NODE/PET_NODE_RANK/PET_MASTER_ADDR/PET_MASTER_PORT and `torchrun`
  reads them, so the trainer command is `torchrun -m rentalml.training.distributed ...`;
* an `MPIJob` (kubeflow.org/v2beta1, OpenMPI): the launcher runs `mpirun ... python -m
  rentalml.training.distributed ...`; ranks read OMPI_COMM_WORLD_RANK/SIZE and the rendezvous address
  (worker 0) that mpirun exports with `-x MASTER_ADDR`.

The same functions build the one-shot jobs in manifests/jobs/ (outside the default apply set) and the trial
templates of the Katib Experiments (rentalml.training.katib); `python -m rentalml.training.katib --out
manifests/jobs` regenerates them (a test checks the committed files against the code). In the cluster the
pipeline's steps create the same objects through the Kubernetes API (run_trainjob, katib.run_experiment).
"""

from __future__ import annotations

from pathlib import Path

IMAGE = "ghcr.io/rentalml/rentalml:0.1.0"
#: the CUDA build of the training image (docker/training-gpu.Dockerfile, `make images GPU=1`): the prod
#: jobs (manifests/jobs/prod) and, with `training_image`, the pipeline's TrainJob and Katib trials
GPU_IMAGE = "ghcr.io/rentalml/rentalml-gpu:0.1.0"
ENTRYPOINT_MODULE = "rentalml.training.distributed"
#: the database of record (RENTALML_DATABASE_URL from the `rentalml-database` Secret); the pipeline passes its
#: own dataset artifact instead (an s3:// or minio:// URI, read with the `rentalml-object-store` credentials)
DEFAULT_DATA = "db"
#: Kubeflow Trainer's webhook requires a domain-prefixed manager (k8s IsDomainPrefixedPath, "acme.io/foo")
MANAGER = "rentalml.io/training"
#: the Pushgateway Service of manifests/base/monitoring/pushgateway.yaml, in the stack's namespace
PUSHGATEWAY_URL = "http://rentalml-pushgateway.rentalml.svc.cluster.local:9091"
#: the image's non-root user (docker/training.Dockerfile: useradd --uid 10001 --home-dir /home/rentalml)
UID, HOME = 10001, "/home/rentalml"
SSH_PORT = 2222  # sshd as a non-root user cannot bind 22
#: Secrets → environment of every training process (optional: a cluster without the secret leaves it out)
SECRET_ENV = [("RENTALML_DATABASE_URL", "rentalml-database", "url"),
              ("AWS_ACCESS_KEY_ID", "rentalml-object-store", "access-key-id"),
              ("AWS_SECRET_ACCESS_KEY", "rentalml-object-store", "secret-access-key"),
              ("AWS_ENDPOINT_URL", "rentalml-object-store", "endpoint-url")]
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
CHECKPOINT_PVC = "rentalml-checkpoints"  # ReadWriteMany: every node mounts it, rank 0 writes it
CHECKPOINT_MOUNT = "/checkpoints"
GPU = "nvidia.com/gpu"
LABELS = {"app.kubernetes.io/part-of": "rentalml", "app.kubernetes.io/component": "training"}
TRAINER_API = "trainer.kubeflow.org/v1alpha1"
MPI_API = "kubeflow.org/v2beta1"


def training_env() -> list[dict]:
    """Environment of every training process in the cluster: where to push the ml_training_* metrics, and
    the database / object-store credentials from their Secrets."""
    return [{"name": "RENTALML_MONITOR__PUSHGATEWAY_URL", "value": PUSHGATEWAY_URL},
            *({"name": env, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
              for env, secret, key in SECRET_ENV)]


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
             num_nodes: int = 2, gpus_per_node: int = 1, labels: dict | None = None,
             env: list[dict] | None = None) -> dict:
    """Kubeflow Trainer v2 TrainJob on the torch-distributed ClusterTrainingRuntime, one GPU per node.

    The environment goes in `spec.trainer.env`: Trainer's webhook refuses env in a runtime patch of the `node`
    container (pkg/runtime/framework/plugins/jobset/jobset.go, v2.3.0)."""
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
                "env": training_env() if env is None else env,
            },
            "runtimePatches": [{
                "manager": MANAGER,
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
                    "name": "node",
                    "template": {"spec": {"template": {"spec": {
                        **pod,
                        "securityContext": POD_SECURITY,
                        "containers": [{"name": "node", "securityContext": CONTAINER_SECURITY, "volumeMounts": [
                            {"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT}]}],
                    }}}},
                }]}}},
            }],
        },
    }


def mpijob(name: str = "rentalml-two-tower-mpi", *, args: list[str] | None = None, image: str = IMAGE,
           workers: int = 2, gpus_per_worker: int = 1, labels: dict | None = None,
           env: list[dict] | None = None) -> dict:
    """MPIJob v2beta1 (OpenMPI) running the same entrypoint: one rank per worker, rank 0 on worker 0.

    mpi-operator v0.8.0 (pkg/controller/mpi_job_controller.go): worker pods are `<job>-worker-<i>` with
    `subdomain: <job>` (the job's headless Service), so rank 0 is `<job>-worker-0.<job>`; the ssh keys are
    mounted at `spec.sshAuthMountPath` (default /root/.ssh, pkg/apis/kubeflow/v2beta1/default.go). The image
    runs as 10001 (home /home/rentalml), so the keys go to its ~/.ssh and the workers run sshd as that user
    on port 2222 with the mounted key as host key (examples/v2beta1/pi, build/base/sshd_config)."""
    env = training_env() if env is None else env
    ssh_dir = f"{HOME}/.ssh"
    master = f"{name}-worker-0.{name}"
    rsh = f"-p {SSH_PORT} -o ConnectionAttempts=10 -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"
    mpirun = ["mpirun", "-np", str(workers * gpus_per_worker), "-bind-to", "none", "-map-by", "slot",
              # the operator sets OMPI_MCA_plm_rsh_args after the container's env (last one wins): the
              # command line is the only place to add the port
              "--mca", "plm_rsh_args", rsh,
              "-x", f"MASTER_ADDR={master}", "-x", "MASTER_PORT=29500",
              *(x for e in env for x in ("-x", e["name"])),
              "python", "-m", ENTRYPOINT_MODULE]
    sshd = ["/usr/sbin/sshd", "-De", "-f", "/dev/null", "-p", str(SSH_PORT), "-o", "PidFile=/tmp/sshd.pid",
            "-o", f"HostKey={ssh_dir}/id_rsa", "-o", "StrictModes=no",
            "-o", f"AuthorizedKeysFile={ssh_dir}/authorized_keys"]
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
            "sshAuthMountPath": ssh_dir,
            "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": 3},
            "mpiReplicaSpecs": {
                "Launcher": {
                    "replicas": 1,
                    "restartPolicy": "OnFailure",
                    "template": {"spec": {"securityContext": POD_SECURITY, "containers": [{
                        "name": "launcher",
                        "image": image,
                        "command": mpirun,
                        "args": args if args is not None else entrypoint_args(name),
                        "env": env,
                        "securityContext": CONTAINER_SECURITY,
                        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
                    }]}},
                },
                "Worker": {
                    "replicas": workers,
                    "restartPolicy": "OnFailure",
                    "template": {"spec": {
                        **pod,
                        "securityContext": POD_SECURITY,
                        "containers": [{
                            "name": "worker",
                            "image": image,
                            "command": sshd,
                            "ports": [{"name": "ssh", "containerPort": SSH_PORT}],
                            "securityContext": CONTAINER_SECURITY,
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
    for patch in doc.get("spec", {}).get("runtimePatches", []):
        errors += [f"spec.runtimePatches[].manager: {e}" for e in domain_prefixed_path_errors(patch.get("manager", ""))]
    trainer = doc.get("spec", {}).get("trainer", {})
    if "-m" not in trainer.get("command", []) or ENTRYPOINT_MODULE not in trainer.get("command", []):
        errors.append("the trainer does not run the training entrypoint")
    return errors


def domain_prefixed_path_errors(value: str) -> list[str]:
    """k8s.io/apimachinery/pkg/util/validation IsDomainPrefixedPath, which Kubeflow Trainer's webhook applies
    to `spec.runtimePatches[].manager`: `<RFC 1123 subdomain>/<HTTP path>`, e.g. "acme.io/foo"."""
    import re

    if not value:
        return ["Required value"]
    host, sep, path = value.partition("/")
    if not sep or not host or not path:
        return [f"{value!r}: must be a domain-prefixed path (such as \"acme.io/foo\")"]
    errors = []
    label = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
    if len(host) > 253 or not re.fullmatch(rf"{label}(\.{label})*", host):
        errors.append(f"{host!r}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                      "characters, '-' or '.'")
    if not re.fullmatch(r"[A-Za-z0-9/\-._~%!$&'()*+,;=:]+", path):
        errors.append(f"{path!r}: Invalid path")
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


# ------------------------------------------------------------------------------------------ object store
#: KFP artifact URIs: s3:// (a pipeline root on S3 or an S3-compatible store) and minio:// (KFP's default root)
REMOTE_SCHEMES = ("s3://", "minio://")


def is_remote(uri: str) -> bool:
    return str(uri).startswith(REMOTE_SCHEMES)


def _s3(environ=None):
    """pyarrow's S3 filesystem with the object-store credentials the pods get from the `rentalml-object-store`
    Secret (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL; the S3 clients' own variables)."""
    import os
    from urllib.parse import urlparse

    from pyarrow import fs

    env = os.environ if environ is None else environ
    kw = {}
    if env.get("AWS_ACCESS_KEY_ID"):
        kw.update(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env.get("AWS_SECRET_ACCESS_KEY", ""))
    endpoint = env.get("AWS_ENDPOINT_URL") or env.get("MLFLOW_S3_ENDPOINT_URL")
    if endpoint:
        u = urlparse(endpoint)
        kw.update(endpoint_override=u.netloc or u.path, scheme=u.scheme or "https")
    return fs.S3FileSystem(region=env.get("AWS_DEFAULT_REGION", "us-east-1"), **kw)


def _key(uri: str) -> str:
    return str(uri).split("://", 1)[1].rstrip("/")


def download(uri: str, dest: str | Path) -> Path:
    """Copy an artifact (a file or a directory tree) from the object store to `dest`."""
    from pyarrow import fs

    s3, dest = _s3(), Path(dest)
    info = s3.get_file_info(_key(uri))
    if info.type == fs.FileType.File:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fs.copy_files(_key(uri), str(dest), source_filesystem=s3, destination_filesystem=fs.LocalFileSystem())
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    fs.copy_files(_key(uri), str(dest), source_filesystem=s3, destination_filesystem=fs.LocalFileSystem())
    return dest


def upload(src: str | Path, uri: str) -> str:
    """Copy a local file or directory tree to the object store."""
    from pyarrow import fs

    fs.copy_files(str(src), _key(uri), source_filesystem=fs.LocalFileSystem(), destination_filesystem=_s3())
    return uri


def local_dataset(spec: str, cache: str | Path | None = None) -> str:
    """A dataset spec load_dataset understands: remote artifact URIs are downloaded first."""
    import tempfile

    if not is_remote(spec):
        return spec
    return str(download(spec, Path(cache or tempfile.mkdtemp(prefix="rentalml-data-")) / "dataset"))


# ------------------------------------------------------------------------------------------ Kubernetes API
TRAINJOB_API = ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
EXPERIMENT_API = ("kubeflow.org", "v1beta1", "experiments")
SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class JobFailed(RuntimeError):
    """The TrainJob or Experiment ended Failed (or did not finish in time)."""


def in_cluster(environ=None) -> bool:
    """Inside a pod: Kubernetes sets KUBERNETES_SERVICE_HOST in every container."""
    import os

    return bool((os.environ if environ is None else environ).get("KUBERNETES_SERVICE_HOST"))


def current_namespace(default: str = "rentalml") -> str:
    """The pod's namespace (the pipeline runs in the profile namespace; its jobs go there too)."""
    try:
        return SA_NAMESPACE.read_text().strip() or default
    except OSError:
        return default


def custom_objects_api():
    """CustomObjectsApi with the pod's service account (in cluster) or the kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def condition(obj: dict, kind: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == "True"
               for c in (obj.get("status") or {}).get("conditions") or [])


def create_and_wait(api, resource: tuple[str, str, str], namespace: str, body: dict, *, success: str,
                    timeout_s: float = 24 * 3600, poll_s: float = 15.0, log=print) -> dict:
    """Create the object and poll it until its `success` condition (TrainJob: Complete, Experiment:
    Succeeded) or Failed is True; returns the final object, raises JobFailed."""
    from rentalml.services import wait_until

    group, version, plural = resource
    created = api.create_namespaced_custom_object(group, version, namespace, plural, body)
    name = created["metadata"]["name"]
    log(f"created {plural}/{name} in {namespace}")

    def finished() -> dict | None:
        obj = api.get_namespaced_custom_object(group, version, namespace, plural, name)
        if condition(obj, success):
            return obj
        if condition(obj, "Failed"):
            msg = next((c.get("message", "") for c in obj["status"]["conditions"] if c.get("type") == "Failed"), "")
            raise JobFailed(f"{plural}/{name} failed: {msg}")
        return None

    try:
        obj = wait_until(finished, timeout_s, interval=poll_s, what=f"{plural}/{name} {success}")
    except TimeoutError:
        raise JobFailed(f"{plural}/{name} did not finish in {timeout_s:.0f} s") from None
    log(f"{plural}/{name}: {success}")
    return obj


def run_trainjob(name: str, args: list[str], *, image: str = IMAGE, num_nodes: int = 2, gpus_per_node: int = 1,
                 namespace: str | None = None, api=None, poll_s: float = 15.0, timeout_s: float = 24 * 3600) -> dict:
    """Submit a TrainJob running the distributed entrypoint with `args` and wait for it (the pipeline's train
    step with num_nodes > 1). Calls: create + get trainer.kubeflow.org/v1alpha1 trainjobs."""
    body = trainjob(name, args=args, image=image, num_nodes=num_nodes, gpus_per_node=gpus_per_node)
    errors = validate_trainjob(body)
    if errors:
        raise ValueError("; ".join(errors))
    return create_and_wait(api or custom_objects_api(), TRAINJOB_API, namespace or current_namespace(), body,
                           success="Complete", poll_s=poll_s, timeout_s=timeout_s)


def job_name(run: str, step: str) -> str:
    """A short DNS-1123 name for the job a pipeline step creates, unique per pipeline run: Katib appends
    `-<8 chars>` to trial names and the JobSet/Job/Pod names add more, which must stay within 63."""
    import hashlib

    return f"rentalml-{step}-{hashlib.sha1(str(run).encode()).hexdigest()[:10]}"
