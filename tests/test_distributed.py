"""Data-parallel training entrypoint: single process, torchrun (2 processes, gloo), OpenMPI variables, and a
kill -9 in the middle of a torchrun job followed by a resume from rank 0's checkpoint (small synthetic data).

The 1M-interaction 1-vs-2-process comparison is `benchmarks/distributed_training.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import crd_schema
import pytest

from rentalml.services import free_port, wait_until
from rentalml.training.distributed import build_parser, dist_env, shard
from rentalml.training.search_space import SEARCH_SPACE

DATA = "synthetic:300,150,6000,1"
ARGS = ["--data", DATA, "--epochs", "6", "--eval-every", "2", "--batch-size", "64", "--threads", "1"]
KATIB_STDOUT = re.compile(r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)")  # Katib's default filter


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT") and not k.startswith("OMPI_")}
    return {**env, "PYTHONWARNINGS": "ignore", **extra}


def _torchrun(tmp, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            "-m", "rentalml.training.distributed", *ARGS, "--result-json", str(tmp / f"{name}.json"), *extra]


def _descendants(pid: int) -> list[int]:
    """Child processes, recursively (torchrun starts its workers in their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _run(cmd: list[str], env: dict | None = None, timeout: float = 120) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("ddp")


@pytest.fixture(scope="module")
def single(work):
    out = _run([sys.executable, "-m", "rentalml.training.distributed", *ARGS,
                "--result-json", str(work / "single.json")])
    return out, json.loads((work / "single.json").read_text())


@pytest.fixture(scope="module")
def two(work):
    out = _run(_torchrun(work, "two"))
    return out, json.loads((work / "two.json").read_text())


def test_single_process_prints_katib_metrics(single):
    out, res = single
    assert res["world_size"] == 1 and res["launcher"] == "single" and res["epochs_run"] == 6
    vals = [float(m[1]) for line in out.splitlines() for m in KATIB_STDOUT.findall(line) if m[0] == "ndcg_at_10"]
    assert len(vals) == 3 and all(0 < v <= 1 for v in vals)
    assert max(vals) == pytest.approx(res["val_ndcg@10"], abs=1e-6)
    assert 0 < res["test"]["ndcg@10"] <= 1 and res["samples_per_s"] > 0
    assert re.search(r"^test_ndcg_at_10=\d\.\d+$", out, re.M)


def test_torchrun_two_processes_matches_single(single, two):
    (_, one), (out, res) = single, two
    assert res["world_size"] == 2 and res["launcher"] == "torchrun" and res["backend"] == "gloo"
    assert "per_rank_batch=32" in out
    assert res["samples"] >= one["samples"]  # every user every epoch (a shard may repeat one user as padding)
    # same global batch, gradients averaged by DDP: quality close to the single process (tiny data: 10 %)
    assert res["test"]["ndcg@10"] == pytest.approx(one["test"]["ndcg@10"], rel=0.10)


def test_kill_and_resume(work, two):
    ckpt = work / "ckpt"
    cmd = _torchrun(work, "resumed", "--checkpoint-dir", str(ckpt))
    proc = subprocess.Popen([*cmd, "--throttle", "1.0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=_env(), start_new_session=True)
    try:
        with contextlib.suppress(TimeoutError, RuntimeError):  # the assert below says what is missing
            wait_until(lambda: proc.stdout.readline().startswith("checkpoint epoch=3"), 90, interval=0, proc=proc,
                       what="the epoch-3 checkpoint line")
        assert (ckpt / "checkpoint.pt").exists()
    finally:
        for pid in [proc.pid, *_descendants(proc.pid)]:  # the launcher and both ranks, no clean-up
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    time.sleep(1.0)
    assert not (work / "resumed.json").exists()
    out = _run(cmd)
    m = re.search(r"resumed from checkpoint epoch=(\d+)", out)
    assert m and 3 <= int(m.group(1)) < 6, out
    res = json.loads((work / "resumed.json").read_text())
    ref = two[1]
    assert res["resumed_from_epoch"] == int(m.group(1)) and res["epochs_run"] == 6
    # per-epoch generators derive from (seed, epoch, rank): the resumed run is the uninterrupted run
    assert res["val_ndcg@10"] == pytest.approx(ref["val_ndcg@10"], abs=1e-6)
    assert res["test"]["ndcg@10"] == pytest.approx(ref["test"]["ndcg@10"], abs=1e-6)
    assert [h["loss"] for h in res["history"]] == pytest.approx([h["loss"] for h in ref["history"]], abs=1e-6)


def test_openmpi_variables_launch(work, two):
    """Two plain processes with OpenMPI's variables (what mpirun sets): the same run as torchrun's."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = _env(OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_LOCAL_RANK=str(rank),
                   OMPI_COMM_WORLD_LOCAL_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "rentalml.training.distributed", *ARGS,
                                       "--result-json", str(work / "mpi.json")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    res = json.loads((work / "mpi.json").read_text())
    assert res["launcher"] == "openmpi" and res["world_size"] == 2
    assert res["test"]["ndcg@10"] == pytest.approx(two[1]["test"]["ndcg@10"], abs=1e-6)


def test_dist_env_parsing():
    assert dist_env({}).world_size == 1
    e = dist_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                  "MASTER_ADDR": "node-0", "MASTER_PORT": "1234"})
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size, e.master_addr, e.master_port, e.launcher) == \
        (3, 4, 1, 2, "node-0", 1234, "torchrun")
    e = dist_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                  "OMPI_COMM_WORLD_LOCAL_SIZE": "1", "MASTER_ADDR": "job-worker-0.job"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == \
        (1, 2, 0, "job-worker-0.job", 29500, "openmpi")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):  # across nodes the rendezvous must be given
        dist_env({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "1"})


def test_sharding_is_a_partition():
    import numpy as np

    perm = np.random.default_rng(0).permutation(11)
    shards = [shard(perm, r, 3) for r in range(3)]
    assert {len(s) for s in shards} == {4}
    assert set(np.concatenate(shards)) == set(perm)


def test_every_search_space_parameter_is_an_option():
    def value(p):
        return p.choices[-1] if p.choices else int(p.high) if p.kind == "int" else p.high

    args = build_parser().parse_args([f"--{p.name.replace('_', '-')}={value(p)}" for p in SEARCH_SPACE])
    for p in SEARCH_SPACE:
        assert getattr(args, p.name) == pytest.approx(value(p))


# ------------------------------------------------------------------------------------------ the pipeline steps
# Katib and Trainer inside the pipeline: in the cluster the tune step creates a Katib Experiment and the train
# step (num_nodes > 1) a TrainJob, both over the step's dataset artifact in the object store. Here the object
# store is moto's S3 server and the cluster a fake Kubernetes API (rentalml.components.kubefake) that the real
# `kubernetes` client talks to: it validates what is created against the vendored upstream CRDs and moves the
# status as the operators do; its TrainJob controller runs the trainer's command with the TrainJob's env.
BUCKET = "rentalml-pipelines"
RUN = "rentalml-training-20261202-0630"
FAST = {"epochs": 2, "eval_every": 1, "dim": 32, "batch_size": 64, "negatives": 64}


@pytest.fixture(scope="module")
def object_store():
    from moto.server import ThreadedMotoServer
    from pyarrow import fs

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    creds = {"AWS_ACCESS_KEY_ID": "rentalml", "AWS_SECRET_ACCESS_KEY": "s3cret",
             "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    fs.S3FileSystem(access_key="rentalml", secret_key="s3cret", endpoint_override=f"127.0.0.1:{port}",
                    scheme="http", region="us-east-1", allow_bucket_creation=True).create_dir(BUCKET)
    saved = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)  # the step's env: kubernetes.use_secret_as_env(rentalml-object-store)
    yield creds
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="module")
def features(work, object_store):
    """The build-features artifact: on local disk (the step's dataset.path) and in the store (dataset.uri)."""
    from rentalml.components import steps

    from rentalml.training import jobs

    steps.ingest("synthetic:300,150,6000,1", work / "ingest")
    steps.build_features(work / "ingest", work / "features")
    uri = f"s3://{BUCKET}/v2/artifacts/rentalml-training/{RUN}/build-features/features"
    jobs.upload(work / "features", uri)
    return work / "features", uri


def _secret_env(env: list[dict], secrets: dict) -> dict:
    """A container's env as the kubelet resolves it (secretKeyRef from `secrets`, optional ones skipped)."""
    out = {}
    for e in env:
        if "value" in e:
            out[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            value = secrets.get(ref["name"], {}).get(ref["key"])
            if value is None and not ref.get("optional"):
                raise AssertionError(f"secret {ref} missing")
            if value is not None:
                out[e["name"]] = value
    return out


def test_tune_step_in_the_cluster_runs_a_katib_experiment(features):
    """tune(cluster) → POST an Experiment (valid against Katib v0.19.0's CRD) whose TrainJob trials read the
    dataset artifact's URI with the object-store Secret; Created → Running → Succeeded; the step returns the
    best trial of status.currentOptimalTrial, typed as the search space."""
    from rentalml.components import steps
    from rentalml.components.kubefake import FakeKubeApi, set_condition

    from rentalml.training import jobs

    local, uri = features
    reads = {"n": 0}

    def katib_controller(exp):
        reads["n"] += 1
        if reads["n"] == 1:
            set_condition(exp, "Created", "ExperimentCreated")
        elif reads["n"] == 2:
            set_condition(exp, "Running", "ExperimentRunning")
            exp["status"]["trials"] = 3
        else:
            space = {p["name"]: p for p in exp["spec"]["parameters"]}
            pick = {n: (p["feasibleSpace"]["list"][1] if "list" in p["feasibleSpace"] else p["feasibleSpace"]["max"])
                    for n, p in space.items()}
            exp["status"].update(trials=6, trialsSucceeded=6, currentOptimalTrial={
                "bestTrialName": f"{exp['metadata']['name']}-abcdefgh",
                "parameterAssignments": [{"name": n, "value": v} for n, v in pick.items()],
                "observation": {"metrics": [{"name": "ndcg_at_10", "latest": "0.29", "max": "0.31", "min": "0.1"}]}})
            set_condition(exp, "Succeeded", "ExperimentMaxTrialsReached")

    with FakeKubeApi(controllers={"experiments": katib_controller}, validate=crd_schema.errors) as k8s:
        res = steps.tune(local, "hybrid", "random-75-25", 42, 6, {"epochs": 2}, dataset_uri=uri, run_name=RUN,
                         cluster=True, api=k8s.api(), poll_s=0.01)
        calls = list(k8s.calls)
        (exp,) = k8s.objects.values()
    assert res["best_value"] == 0.31 and res["trials"] == 6
    assert res["best_params"] == {"lr": 0.01, "dim": 128, "layers": 2, "negatives": 1024, "weight_decay": 0.0001,
                                  "batch_size": 256, "input_dropout": 0.7}
    assert exp["metadata"]["name"] == jobs.job_name(RUN, "tune") and exp["metadata"]["namespace"] == "rentalml"
    trial = exp["spec"]["trialTemplate"]["trialSpec"]
    assert f"--data={uri}" in trial["spec"]["trainer"]["args"]
    assert not any(a.startswith("--checkpoint-dir") for a in trial["spec"]["trainer"]["args"])
    env = _secret_env(trial["spec"]["trainer"]["env"], {"rentalml-object-store": {
        "access-key-id": "k", "secret-access-key": "s", "endpoint-url": "http://minio:9000"}})
    assert env["AWS_ACCESS_KEY_ID"] == "k" and env["RENTALML_MONITOR__PUSHGATEWAY_URL"] == jobs.PUSHGATEWAY_URL
    assert exp["spec"]["maxTrialCount"] == 6 and exp["spec"]["parallelTrialCount"] == 3
    assert calls[0] == ("create", "kubeflow.org", "experiments", "rentalml", exp["metadata"]["name"])
    assert {c[:3] for c in calls} == {("create", "kubeflow.org", "experiments"), ("get", "kubeflow.org", "experiments")}


def test_tune_step_fails_with_the_experiment(features):
    from rentalml.components import steps
    from rentalml.components.kubefake import FakeKubeApi, set_condition

    from rentalml.training import jobs

    local, uri = features
    failed = {"experiments": lambda e: set_condition(e, "Failed", "ExperimentFailed", "3 trials failed")}
    with FakeKubeApi(controllers=failed, validate=crd_schema.errors) as k8s, \
            pytest.raises(jobs.JobFailed, match="3 trials failed"):
        steps.tune(local, "hybrid", "random-75-25", 42, 6, {}, dataset_uri=uri, run_name=RUN, cluster=True,
                   api=k8s.api(), poll_s=0.01)


def test_train_step_in_the_cluster_submits_a_trainjob(work, features, object_store):
    """train(num_nodes=2, cluster) → POST a TrainJob (valid against Trainer v2.3.0's CRD, domain-prefixed
    manager); the fake controller runs its trainer (the distributed entrypoint, one process) with the
    TrainJob's env, where the object-store credentials come from the Secret, then reports Complete; the step
    copies the split fit and the all-data refit the job wrote to the store into its outputs, which the
    evaluate step scores."""
    from rentalml.components import steps
    from rentalml.components.kubefake import FakeKubeApi, set_condition

    from rentalml.training import jobs
    from rentalml.training.trainer import Fitted

    local, uri = features
    secrets = {"rentalml-object-store": {"access-key-id": object_store["AWS_ACCESS_KEY_ID"],
                                         "secret-access-key": object_store["AWS_SECRET_ACCESS_KEY"],
                                         "endpoint-url": object_store["AWS_ENDPOINT_URL"]}}
    ran = []

    def trainer_controller(tj):
        if tj.get("status", {}).get("conditions"):
            return
        t = tj["spec"]["trainer"]
        assert t["command"][:2] == ["torchrun", "-m"]  # the torch runtime's launcher; one process here
        env = {k: v for k, v in _env().items() if not k.startswith("AWS_")}  # only what the TrainJob passes
        env.update(_secret_env(t["env"], secrets), RENTALML_MONITOR__PUSHGATEWAY_URL="")
        pvc = work / "pvc"  # the rentalml-checkpoints volume the runtime patch mounts at /checkpoints
        mounts = [m for r in tj["spec"]["runtimePatches"] for j in r["trainingRuntimeSpec"]["template"]["spec"][
            "replicatedJobs"] for c in j["template"]["spec"]["template"]["spec"]["containers"]
            for m in c.get("volumeMounts", [])]
        assert {"name": "checkpoints", "mountPath": jobs.CHECKPOINT_MOUNT} in mounts
        args = [a.replace(f"={jobs.CHECKPOINT_MOUNT}/", f"={pvc}/") for a in t["args"]]
        res = subprocess.run([sys.executable, "-m", t["command"][2], *args, "--threads=1"],
                             capture_output=True, text=True, env=env, timeout=300)
        ran.append(res)
        set_condition(tj, "Complete" if res.returncode == 0 else "Failed", "JobsCompleted", res.stderr[-500:])

    out_uri = f"s3://{BUCKET}/v2/artifacts/rentalml-training/{RUN}/train/trainjob"
    with FakeKubeApi(controllers={"trainjobs": trainer_controller}, validate=crd_schema.errors) as k8s:
        res = steps.train(local, "hybrid", "random-75-25", 42, FAST, work / "eval.pkl", work / "model.pkl",
                          num_nodes=2, dataset_uri=uri, output_uri=out_uri, run_name=RUN, cluster=True,
                          api=k8s.api(), poll_s=0.01)
        (tj,) = k8s.objects.values()
        calls = {c[:3] for c in k8s.calls}
    assert ran and ran[0].returncode == 0, ran[0].stderr[-2000:]
    assert tj["spec"]["trainer"]["numNodes"] == 2 and tj["spec"]["runtimePatches"][0]["manager"] == jobs.MANAGER
    assert f"--data={uri}" in tj["spec"]["trainer"]["args"] and f"--output={out_uri}" in tj["spec"]["trainer"]["args"]
    assert calls == {("create", "trainer.kubeflow.org", "trainjobs"), ("get", "trainer.kubeflow.org", "trainjobs")}
    assert (work / "pvc" / jobs.job_name(RUN, "train") / "checkpoint.pt").exists()
    ev, final = steps.load_fitted(work / "eval.pkl"), steps.load_fitted(work / "model.pkl")
    assert isinstance(ev, Fitted) and isinstance(final, Fitted)
    assert final.train.nnz > ev.train.nnz  # the refit saw every interaction, the eval model the train split
    assert res["num_nodes"] == 2 and res["params"]["dim"] == 32
    scores = steps.evaluate(local, work / "eval.pkl", "random-75-25", 42, 10, work / "eval-report")
    assert 0.0 < scores["ndcg@10"] <= 1.0


def test_train_step_locally_runs_torchrun(work, features):
    """The same step off the cluster with num_nodes=2: torchrun with two processes on this machine."""
    from rentalml.components import steps

    local, _ = features
    res = steps.train(local, "hybrid", "random-75-25", 42, FAST, work / "l-eval.pkl", work / "l-model.pkl",
                      num_nodes=2, cluster=False)
    assert res["num_nodes"] == 2
    assert steps.load_fitted(work / "l-model.pkl").train.nnz > steps.load_fitted(work / "l-eval.pkl").train.nnz


def test_fake_api_refuses_what_the_cluster_refuses():
    """The fake is strict where the API server and Trainer's webhook are: an unknown field (the CRD) and a
    manager without a domain (the webhook) are refused, so a passing create above means an admitted one."""
    from kubernetes.client.exceptions import ApiException
    from rentalml.components.kubefake import FakeKubeApi

    from rentalml.training import jobs

    typo = jobs.trainjob("t1")
    typo["spec"]["trainer"]["numNode"] = 2
    old = jobs.trainjob("t2")
    old["spec"]["runtimePatches"][0]["manager"] = "rentalml"
    with FakeKubeApi(validate=crd_schema.errors) as k8s:
        api = k8s.api()
        for body, code, text in ((typo, 422, "numNode"), (old, 403, "domain-prefixed")):
            with pytest.raises(ApiException) as err:
                jobs.create_and_wait(api, jobs.TRAINJOB_API, "rentalml", body, success="Complete", poll_s=0.01)
            assert err.value.status == code and text in err.value.body
        group, version, plural = jobs.TRAINJOB_API
        api.create_namespaced_custom_object(group, version, "rentalml", plural, jobs.trainjob("t3"))
        with pytest.raises(ApiException) as err:  # a second create of a one-shot job
            api.create_namespaced_custom_object(group, version, "rentalml", plural, jobs.trainjob("t3"))
        assert err.value.status == 409
