"""Platform rules of the training half of the cluster path, each checked against what the platform itself does.

Pinned upstream releases (the same as the vendored CRDs under tests/crds/): Kubeflow Trainer v2.3.0, Katib
v0.19.0, mpi-operator v0.8.0, Kubernetes apimachinery v0.36 (Trainer's go.mod). Each test names the upstream
file its rule comes from. The objects checked are what a user applies (`kubectl kustomize` of the default
apply set and of manifests/jobs/*) and what the pipeline's steps create in the cluster.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import crd_schema
import pytest
import yaml

from rentalml.training import jobs, katib

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
CRDS = Path(__file__).resolve().parent / "crds"
DEFAULT_SET = {"root": ".", "dev": "manifests/overlays/dev", "prod": "manifests/overlays/prod"}
JOB_SETS = {"jobs/trainer": "manifests/jobs/trainer", "jobs/mpi": "manifests/jobs/mpi",
            "jobs/prod": "manifests/jobs/prod"}
TRAINING_KINDS = {"TrainJob", "Experiment", "MPIJob"}


def _copy_tree(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "kustomization.yaml", dest)
    shutil.copytree(MANIFESTS, dest / "manifests", ignore=shutil.ignore_patterns("*.env"))
    for example in (dest / "manifests" / "components" / "local-secrets").glob("*.env.example"):
        shutil.copy(example, example.with_suffix(""))
    return dest


def _render(tree: Path, rel: str) -> list[dict]:
    if not shutil.which("kubectl"):
        pytest.skip("kubectl not installed")
    res = subprocess.run(["kubectl", "kustomize", str(tree / rel)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"kubectl kustomize {rel}:\n{res.stderr}"
    return [d for d in yaml.safe_load_all(res.stdout) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    tree = _copy_tree(tmp_path_factory.mktemp("tree"))
    return {name: _render(tree, rel) for name, rel in {**DEFAULT_SET, **JOB_SETS}.items()}


def _training_objects(rendered) -> list[tuple[str, dict]]:
    return [(t, d) for t, docs in rendered.items() for d in docs if d["kind"] in TRAINING_KINDS]


def _trainjobs(doc: dict) -> list[dict]:
    """The TrainJobs an object creates: itself, or a Katib Experiment's trial template."""
    if doc["kind"] == "TrainJob":
        return [doc]
    trial = doc.get("spec", {}).get("trialTemplate", {}).get("trialSpec", {})
    return [trial] if doc["kind"] == "Experiment" and trial.get("kind") == "TrainJob" else []


def _mpijobs(doc: dict) -> list[tuple[str, dict]]:
    """(job name as the operator sees it, MPIJob) of an MPIJob or a Katib trial template (name
    `${trialSpec.Name}`, which Katib substitutes with the trial's name)."""
    if doc["kind"] == "MPIJob":
        return [(doc["metadata"]["name"], doc)]
    trial = doc.get("spec", {}).get("trialTemplate", {}).get("trialSpec", {})
    return [("${trialSpec.Name}", trial)] if doc["kind"] == "Experiment" and trial.get("kind") == "MPIJob" else []


def _pipeline_objects() -> list[dict]:
    """What the pipeline's tune and train steps create in the cluster (rentalml.training.katib / jobs)."""
    uri = "s3://rentalml-pipelines/v2/artifacts/rentalml-training/run/build-features/1/features"
    exp = katib.experiment("rentalml-tune-x", max_trials=6, parallel=3, data=uri)
    return [exp, jobs.trainjob("rentalml-train-x", args=[f"--data={uri}"], num_nodes=2)]


# ------------------------------------------------------------------------------------------ defect 1
def is_domain_prefixed_path(value: str) -> bool:
    """k8s.io/apimachinery/pkg/util/validation/validation.go `IsDomainPrefixedPath`: before the first "/" an
    RFC 1123 subdomain, after it one or more HTTP path characters (RFC 3986)."""
    host, sep, path = value.partition("/")
    label = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
    return bool(sep and host and path and len(host) <= 253 and re.fullmatch(rf"{label}(\.{label})*", host)
                and re.fullmatch(r"[A-Za-z0-9/\-._~%!$&'()*+,;=:]+", path))


def test_rule_domain_prefixed_path_examples():
    assert is_domain_prefixed_path("kueue.x-k8s.io/manager") and is_domain_prefixed_path(jobs.MANAGER)
    for bad in ("rentalml", "rentalml/", "/x", "Rentalml.io/x", "rentalml.io/a b"):
        assert not is_domain_prefixed_path(bad), bad
        assert jobs.domain_prefixed_path_errors(bad), bad  # the code's own check agrees


def test_trainjob_runtime_patch_manager_is_domain_prefixed(rendered):
    """Kubeflow Trainer v2.3.0, pkg/runtime/framework/plugins/jobset/jobset.go `ValidateObjects`: for every
    `spec.runtimePatches[]` the admission webhook (pkg/webhooks/trainjob_webhook.go) runs
    `validation.IsDomainPrefixedPath(spec.runtimePatches.manager, ...)`, so a manager "rentalml" is denied
    (and with it every Katib trial). The same file refuses `env` in a runtime patch of the `node` container."""
    checked, problems = 0, []
    objects = [d for _, d in _training_objects(rendered)] + _pipeline_objects()
    for doc in objects:
        for tj in _trainjobs(doc):
            for patch in tj["spec"].get("runtimePatches", []):
                checked += 1
                if not is_domain_prefixed_path(patch.get("manager", "")):
                    problems.append(f"{doc['kind']}/{doc['metadata'].get('name')}: manager {patch.get('manager')!r}")
                for rjob in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
                    for c in rjob["template"]["spec"]["template"]["spec"].get("containers", []):
                        if c["name"] == "node" and c.get("env"):
                            problems.append(f"{doc['kind']}/{doc['metadata'].get('name')}: env in a node patch")
    assert checked >= 3 and not problems, problems


# ------------------------------------------------------------------------------------------ defect 11
def _crd_immutable_paths(kind_dir: str, kind: str) -> list[tuple[str, ...]]:
    """Paths under a vendored CRD's schema carrying the CEL rule `self == oldSelf` (field is immutable)."""
    doc = yaml.safe_load((CRDS / kind_dir / f"{kind.lower()}.yaml").read_text())
    out = []

    def walk(schema, path):
        for v in schema.get("x-kubernetes-validations", []):
            if v.get("rule", "").replace(" ", "") == "self==oldSelf":
                out.append(path)
        for name, sub in (schema.get("properties") or {}).items():
            walk(sub, (*path, name))
        if "items" in schema:
            walk(schema["items"], (*path, "[]"))

    walk(doc["openAPIV3Schema"], ())
    return out


def _changed(a, b, path=()) -> list[tuple[str, ...]]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [p for k in set(a) | set(b) for p in _changed(a.get(k), b.get(k), (*path, k))]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [p for x, y in zip(a, b, strict=True) for p in _changed(x, y, (*path, "[]"))]
    return [] if a == b else [path]


def _under(path, prefix) -> bool:
    return tuple(path[:len(prefix)]) == tuple(prefix)


#: kind → (rule, upstream source); a rule takes the list of changed paths and returns the refused ones
IMMUTABLE = {
    # Trainer v2.3.0 manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml (CEL `self == oldSelf` on
    # spec.runtimeRef/initializer/trainer/activeDeadlineSeconds, runtimePatches[].manager), and
    # pkg/runtime/framework/plugins/jobset/jobset.go checkRuntimePatchesImmutability: runtimePatches change
    # only while the TrainJob is suspended
    "TrainJob": lambda changed: [p for p in changed
                                 if any(_under(p, i) for i in _crd_immutable_paths("trainer", "TrainJob"))
                                 or _under(p, ("spec", "runtimePatches"))],
    # Katib v0.19.0 pkg/webhook/v1beta1/experiment/validator/validator.go ValidateExperiment(instance, oldInst):
    # "only spec.parallelTrialCount, spec.maxTrialCount and spec.maxFailedTrialCount are editable"
    "Experiment": lambda changed: [p for p in changed if _under(p, ("spec",)) and p[:2] not in {
        ("spec", "parallelTrialCount"), ("spec", "maxTrialCount"), ("spec", "maxFailedTrialCount")}],
    # Kubernetes pkg/apis/batch/validation/validation.go ValidateJobSpecUpdate: spec.template is immutable
    "Job": lambda changed: [p for p in changed if _under(p, ("spec", "template")) or _under(p, ("spec", "selector"))],
    # Kubernetes pkg/apis/apps/validation/validation.go ValidateStatefulSetUpdate: only these spec fields change
    "StatefulSet": lambda changed: [p for p in changed if _under(p, ("spec",)) and p[:2] not in {
        ("spec", k) for k in ("replicas", "ordinals", "template", "updateStrategy", "minReadySeconds",
                              "persistentVolumeClaimRetentionPolicy", "revisionHistoryLimit")}],
    # ValidateDeploymentUpdate / ValidateDaemonSetUpdate: the selector is immutable in apps/v1
    "Deployment": lambda changed: [p for p in changed if _under(p, ("spec", "selector"))],
    "DaemonSet": lambda changed: [p for p in changed if _under(p, ("spec", "selector"))],
}


def _release_bump(tree: Path) -> None:
    """What a release does: every image tag moves (kustomizations and generated manifests) and the generated
    training objects change a parameter."""
    for p in (tree / "manifests").rglob("*.yaml"):
        text = p.read_text()
        new = re.sub(r"(ghcr\.io/rentalml/[\w-]+:)0\.1\.0", r"\g<1>0.2.0", text).replace("newTag: 0.1.0",
                                                                                          "newTag: 0.2.0")
        new = new.replace("--epochs=30", "--epochs=31")
        if new != text:
            p.write_text(new)


def test_default_apply_set_can_be_applied_again_after_a_change(tmp_path):
    """`kubectl apply -k` twice, with a release in between: no object of the default apply set (root, dev,
    prod) may change a field its API refuses to update (rules and sources in IMMUTABLE). One-shot jobs
    (TrainJob, Experiment, MPIJob) belong in manifests/jobs, created with `kubectl create -k`."""
    before_tree, after_tree = _copy_tree(tmp_path / "a"), _copy_tree(tmp_path / "b")
    _release_bump(after_tree)
    refused, compared = [], 0
    for target, rel in DEFAULT_SET.items():
        before = {(d["kind"], d["metadata"]["name"]): d for d in _render(before_tree, rel)}
        after = {(d["kind"], d["metadata"]["name"]): d for d in _render(after_tree, rel)}
        for key, old in before.items():
            if key[0] in IMMUTABLE and key in after:
                compared += 1
                refused += [f"{target} {key[0]}/{key[1]}: {'.'.join(p)}"
                            for p in IMMUTABLE[key[0]](_changed(old, after[key]))]
        one_shot = TRAINING_KINDS & {k for k, _ in before}
        refused += [f"{target}: one-shot {kind} in the default apply set" for kind in sorted(one_shot)]
    assert compared >= 3 and not refused, refused


def test_release_bump_reaches_the_one_shot_jobs(tmp_path):
    """The jobs kustomizations rewrite every image a job runs (TrainJob spec.trainer.image and the trial
    templates are not `containers[]`, so kustomize needs their paths: manifests/jobs/*/kustomizeconfig.yaml)."""
    tree = _copy_tree(tmp_path / "t")
    _release_bump(tree)
    docs = {name: _render(tree, rel) for name, rel in JOB_SETS.items()}
    for name, objects in docs.items():
        images = set(re.findall(r"image: (\S+)", yaml.safe_dump_all(objects)))
        want = (jobs.GPU_IMAGE if name == "jobs/prod" else jobs.IMAGE).replace("0.1.0", "0.2.0")
        assert images == {want}, (name, images)


# ------------------------------------------------------------------------------------------ defect 12
def _training_image_user() -> tuple[int, str]:
    """(uid, home) of the training image's USER (docker/training.Dockerfile)."""
    text = (ROOT / "docker" / "training.Dockerfile").read_text()
    uid = int(re.findall(r"^USER (\d+)", text, re.M)[-1])
    home = re.search(rf"useradd --uid {uid}\b.*?--home-dir (\S+)", text).group(1)
    return uid, home


def test_mpijob_rank0_host_is_the_operator_worker_hostname(rendered):
    """mpi-operator v0.8.0 pkg/controller/mpi_job_controller.go: worker i is `workerName` = `<job>-worker-<i>`
    with `Spec.Subdomain = mpiJob.Name` ("Matches job' Service name"), so worker 0 resolves as
    `<job>-worker-0.<job>`; `<job>-worker-0.<job>-worker` does not exist."""
    seen = 0
    for _, doc in _training_objects(rendered):
        for name, mpi in _mpijobs(doc):
            seen += 1
            cmd = mpi["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]["command"]
            addr = [a.split("=", 1)[1] for a in cmd if a.startswith("MASTER_ADDR=")]
            assert addr == [f"{name}-worker-0.{name}"], (doc["metadata"].get("name"), addr)
    assert seen == 2


def test_mpijob_ssh_runs_as_the_image_user(rendered):
    """mpi-operator v0.8.0: the ssh keys are mounted at `spec.sshAuthMountPath`, default "/root/.ssh"
    (pkg/apis/kubeflow/v2beta1/default.go, setupSSHOnPod in pkg/controller/mpi_job_controller.go); a
    non-root user needs them in its own ~/.ssh and an sshd it can run itself: a port above 1023, the mounted
    key as host key, StrictModes off (examples/v2beta1/pi/pi.yaml, build/base/sshd_config). The workers run
    sshd, not the image's entrypoint, and mpirun's ssh uses the same port."""
    uid, home = _training_image_user()
    seen = 0
    for _, doc in _training_objects(rendered):
        for name, mpi in _mpijobs(doc):
            seen += 1
            spec = mpi["spec"]
            mount = spec.get("sshAuthMountPath", "/root/.ssh")
            for role, r in spec["mpiReplicaSpecs"].items():
                pod = r["template"]["spec"]
                user = pod.get("securityContext", {}).get("runAsUser", uid)
                c = pod["containers"][0]
                user = c.get("securityContext", {}).get("runAsUser", user)
                assert user == uid and uid != 0, (name, role, user)
            assert mount == f"{home}/.ssh", (name, mount)
            worker = spec["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
            cmd = worker.get("command", [])
            assert cmd and cmd[0].endswith("sshd") and "-D" in "".join(cmd), (name, cmd)
            port = int(cmd[cmd.index("-p") + 1])
            assert port > 1023
            assert f"HostKey={mount}/id_rsa" in cmd and "StrictModes=no" in cmd
            launcher = spec["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]["command"]
            rsh = launcher[launcher.index("plm_rsh_args") + 1]
            assert f"-p {port}" in rsh, rsh
            assert "--allow-run-as-root" not in launcher
    assert seen == 2


# ------------------------------------------------------------------------------------------ defect 15
def _args(doc: dict) -> list[str]:
    text = yaml.safe_dump(doc)
    return re.findall(r"--data=\S+|synthetic:[\d,]+", text)


def test_no_cluster_training_trains_on_the_synthetic_demo(rendered):
    """The TrainJob, the Katib trials, the MPIJob and the weekly run train on the database of record (or, in
    the pipeline, on its own dataset artifact), never on `synthetic:`."""
    for target, docs in rendered.items():
        for d in docs:
            assert "synthetic:" not in yaml.safe_dump(d), f"{target} {d['kind']}/{d['metadata']['name']}"
    data = [a for _, d in _training_objects(rendered) for a in _args(d)]
    assert data and set(data) == {"--data=db"}, data
    for target in DEFAULT_SET:
        cron = {d["metadata"]["name"]: d for d in rendered[target] if d["kind"] == "CronJob"}
        args = cron["rentalml-training-weekly"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0][
            "args"]
        assert args[args.index("--source") + 1] == "db", args  # not the pipeline's default DEMO_SOURCE
    for obj in _pipeline_objects():
        assert all(a.startswith("--data=s3://") for a in _args(obj)), _args(obj)
    # the database URL reaches every training process from its Secret
    for _, doc in _training_objects(rendered):
        for tj in _trainjobs(doc):
            assert {"name": "RENTALML_DATABASE_URL", "valueFrom": {"secretKeyRef": {
                "name": "rentalml-database", "key": "url", "optional": True}}} in tj["spec"]["trainer"]["env"]


# ------------------------------------------------------------------------------------------ defect 16
def _pushgateway_url() -> str:
    docs = list(yaml.safe_load_all((MANIFESTS / "base/monitoring/pushgateway.yaml").read_text()))
    svc = next(d for d in docs if d["kind"] == "Service")
    ns = yaml.safe_load((MANIFESTS / "base/kustomization.yaml").read_text())["namespace"]
    return f"http://{svc['metadata']['name']}.{ns}.svc.cluster.local:{svc['spec']['ports'][0]['port']}"


def _is_pushgateway(url: str | None) -> bool:
    """The Service's name in any DNS form that resolves from the stack's namespace, and its port."""
    from urllib.parse import urlparse

    want = urlparse(_pushgateway_url())
    svc, ns = want.hostname.split(".")[:2]
    u = urlparse(url or "")
    return (u.scheme == "http" and u.port == want.port
            and u.hostname in {svc, f"{svc}.{ns}", f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.cluster.local"})


def _env_value(env: list[dict], name: str):
    return next((e.get("value") for e in env or [] if e["name"] == name), None)


def test_every_training_workload_pushes_to_the_pushgateway(rendered):
    """ml_training_* are pushed (rentalml.monitoring.training_metrics) only when
    settings.monitor.pushgateway_url (RENTALML_MONITOR__PUSHGATEWAY_URL) is set: every training workload of the
    cluster gets the URL of the Pushgateway Service in manifests/base/monitoring/pushgateway.yaml."""
    key = "RENTALML_MONITOR__PUSHGATEWAY_URL"
    assert _is_pushgateway(jobs.PUSHGATEWAY_URL)
    seen = 0
    for target, docs in rendered.items():
        for d in docs:
            where = f"{target} {d['kind']}/{d['metadata']['name']}"
            if d["kind"] == "CronJob":
                c = d["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
                assert _is_pushgateway(_env_value(c.get("env"), key)), where
                seen += 1
            for tj in _trainjobs(d):
                assert _is_pushgateway(_env_value(tj["spec"]["trainer"].get("env"), key)), where
                seen += 1
            for _, mpi in _mpijobs(d):
                launcher = mpi["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
                assert _is_pushgateway(_env_value(launcher.get("env"), key)), where
                assert launcher["command"][launcher["command"].index(key) - 1] == "-x", where  # to every rank
                seen += 1
    assert seen >= 8
    for obj in _pipeline_objects():
        for tj in _trainjobs(obj):
            assert _is_pushgateway(_env_value(tj["spec"]["trainer"]["env"], key))


def test_every_pipeline_step_pushes_to_the_pushgateway(tmp_path):
    """The compiled pipeline (what KFP runs): every executor's container has the Pushgateway URL."""
    from kfp import compiler
    from rentalml.pipelines.training import training_pipeline

    out = tmp_path / "p.yaml"
    compiler.Compiler().compile(training_pipeline, str(out))
    ir = next(d for d in yaml.safe_load_all(out.read_text()) if "deploymentSpec" in d)
    executors = ir["deploymentSpec"]["executors"]
    assert len(executors) >= 10
    for name, ex in executors.items():
        env = ex["container"].get("env", [])
        assert _is_pushgateway(_env_value(env, "RENTALML_MONITOR__PUSHGATEWAY_URL")), name


def test_cluster_objects_validate_against_the_vendored_crds(rendered):
    """Every training object (and what the pipeline creates) against the upstream CRD schemas in tests/crds
    (tests/crds/vendor.py names the tag and path of each)."""
    errors = []
    for doc in [d for _, d in _training_objects(rendered)] + _pipeline_objects():
        errors += [f"{doc['kind']}/{doc['metadata'].get('name')}: {e}" for e in crd_schema.errors(doc)]
        for _, mpi in _mpijobs(doc):
            if mpi is not doc:
                errors += [f"trial MPIJob: {e}" for e in crd_schema.errors({**mpi, "metadata": {"name": "t"}})]
        for tj in _trainjobs(doc):
            if tj is not doc:
                errors += [f"trial TrainJob: {e}" for e in crd_schema.errors({**tj, "metadata": {"name": "t"}})]
    assert not errors, "\n".join(errors)


def test_crd_check_catches_a_typo():
    doc = copy.deepcopy(jobs.trainjob())
    doc["spec"]["trainer"]["numNode"] = doc["spec"]["trainer"].pop("numNodes")
    assert any("numNode" in e for e in crd_schema.errors(doc))


def test_pipeline_tune_and_train_can_reach_their_dataset_artifact(tmp_path):
    """In the cluster the tune step's Katib trials and the train step's TrainJob read the step's dataset
    artifact from the object store: both steps get the object-store Secret as env (KFP kubernetes platform
    spec), and the run's parameters choose the nodes and the training image (the prod weekly run: GPU)."""
    from kfp import compiler
    from rentalml.pipelines.training import training_pipeline

    out = tmp_path / "p.yaml"
    compiler.Compiler().compile(training_pipeline, str(out))
    docs = list(yaml.safe_load_all(out.read_text()))
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for step in ("exec-tune", "exec-train"):
        secrets = {s["secretName"]: {m["secretKey"]: m["envVar"] for m in s["keyToEnv"]}
                   for s in platform[step].get("secretAsEnv", [])}
        assert secrets.get("rentalml-object-store", {}).get("access-key-id") == "AWS_ACCESS_KEY_ID", step
    params = docs[0]["root"]["inputDefinitions"]["parameters"]
    assert params["num_nodes"]["defaultValue"] == 1 and params["training_image"]["defaultValue"] == jobs.IMAGE
    prod = _render(_copy_tree(tmp_path / "t"), DEFAULT_SET["prod"])
    cron = next(d for d in prod if d["metadata"]["name"] == "rentalml-training-weekly")
    args = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"training_image={jobs.GPU_IMAGE}" in args
