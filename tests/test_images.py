"""The images of `make images` (docker/build.sh: rootful podman, no registry), run the way the rendered root
kustomization (`kubectl kustomize .`, what `kubectl apply -k .` deploys) runs them.

Each container takes from its rendered manifest: image, command/args, env, the effective securityContext (pod
level merged under container level: runAsUser/runAsGroup, readOnlyRootFilesystem, capabilities,
allowPrivilegeEscalation), every volumeMount (emptyDir -> tmpfs, a Secret or projected volume -> a read-only
directory the test fills) and the memory limit. What a cluster supplies and a laptop cannot is substituted, and
only that: Secret values, the in-cluster service addresses (-> loopback services on the host network: Tansu for
Kafka, redis-server, PostgreSQL, real Triton), Kafka's SASL/SCRAM listener (Tansu: PLAINTEXT), and the listen
ports a pod would have to itself (-> free ports, since the containers share the host's network). What is added is
named where it is added (the transformer's bundle, the training run's arguments and its output directory).

Images are (re)built by the session fixture through docker/build.sh, a cache hit unless the sources changed; CI
builds them cold first (`make images` in .ci/run). No podman: skipped, a failure under RENTALML_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from kafka_helpers import read_topic

from rentalml import services

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "docker" / "build.sh"
REQUIRE = os.environ.get("RENTALML_REQUIRE_SERVICES") == "1"
JWT_SECRET = "image-test-secret-of-at-least-32-bytes!!"
NAMESPACE = "rentalml"


def _missing(msg: str):
    if REQUIRE:
        pytest.fail(msg)
    pytest.skip(msg)


def _start(kind: str, **kw) -> services.Service:
    try:
        return getattr(services, f"start_{kind}")(**kw)
    except services.ServiceUnavailable as exc:
        _missing(f"required service missing: {exc}")


# --- the rendered manifests ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> list[dict]:
    """`kubectl kustomize .` of a copy of the tree with the committed example secret files in place."""
    kubectl = shutil.which("kubectl") or _missing("kubectl is not installed (CI installs it: .ci/run)")
    tree = tmp_path_factory.mktemp("tree")
    shutil.copy(ROOT / "kustomization.yaml", tree)
    shutil.copytree(ROOT / "manifests", tree / "manifests", ignore=shutil.ignore_patterns("*.env"))
    for example in (tree / "manifests" / "components" / "local-secrets").glob("*.env.example"):
        shutil.copy(example, example.with_suffix(""))
    res = subprocess.run([kubectl, "kustomize", str(tree)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def _obj(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert found, f"{kind}/{name} is not in the rendered root kustomization"
    return found[0]


def _pod_spec(obj: dict) -> dict:
    spec = obj["spec"]
    if obj["kind"] == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]["spec"]
    if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
        return spec["template"]["spec"]
    raise AssertionError(f"no pod template in {obj['kind']}")


# --- podman ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def podman() -> dict:
    """The environment for podman (the project's CONTAINERS_CONF), after docker/build.sh has brought the three
    images up to date with the sources (a cache hit when nothing changed)."""
    if shutil.which("podman") is None:
        _missing("podman is not installed (`make images` installs it: podman buildah debootstrap runc)")
    conf = subprocess.run([str(BUILD), "conf"], capture_output=True, text=True, timeout=600)
    assert conf.returncode == 0, conf.stderr
    env = {**os.environ, "CONTAINERS_CONF": conf.stdout.strip()}
    if os.environ.get("RENTALML_IMAGES_BUILD") == "0":  # test the images as they are (e.g. while one builds)
        return env
    t0 = time.monotonic()
    res = subprocess.run([str(BUILD), "training", "serving", "streaming"], env=env, capture_output=True,
                         text=True, timeout=3600)
    assert res.returncode == 0, f"docker/build.sh failed:\n{res.stderr[-6000:]}"
    print(f"images up to date in {time.monotonic() - t0:.0f}s")
    return env


def _podman(env: dict, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert res.returncode == 0, f"podman {' '.join(args[:3])}...: {res.stderr[-3000:]}"
    return res


def _readable_dir(files: dict[str, str | bytes] | None = None, mode: int = 0o755) -> Path:
    """A host directory the container's non-root user can read (pytest's tmp dirs are 0700, root's): files 0644,
    as Kubernetes writes Secret volumes (defaultMode 0644)."""
    d = Path(tempfile.mkdtemp(prefix="rentalml-image-test-"))
    d.chmod(mode)
    for name, content in (files or {}).items():
        p = d / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        p.chmod(0o644)
    return d


def _memory(q: str) -> str:
    units = {"Ki": "k", "Mi": "m", "Gi": "g"}
    for suffix, unit in units.items():
        if q.endswith(suffix):
            return q[: -len(suffix)] + unit
    return q


def run_args(pod: dict, container: dict, *, secrets: dict[tuple[str, str], str], env_override: dict[str, str],
             volumes: dict[str, Path], args: list[str] | None = None, extra_mounts: list[str] = (),
             memory_limit: bool = True) -> list[str]:
    """`podman run` arguments for one container of a rendered pod spec (see the module docstring)."""
    sc = {**(pod.get("securityContext") or {}), **(container.get("securityContext") or {})}
    out = ["--pull=never", "--network=host", "--init=false"]
    if "runAsUser" in sc:
        out += ["--user", f"{sc['runAsUser']}:{sc.get('runAsGroup', sc['runAsUser'])}"]
    if sc.get("readOnlyRootFilesystem"):
        out += ["--read-only", "--read-only-tmpfs=false"]  # podman would otherwise add tmpfs on /tmp, /run ...
    if "ALL" in (sc.get("capabilities") or {}).get("drop", []):
        out.append("--cap-drop=all")
    if sc.get("allowPrivilegeEscalation") is False:
        out += ["--security-opt", "no-new-privileges"]
    limit = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    if limit and memory_limit:
        out += ["--memory", _memory(limit)]
    pod_volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for m in container.get("volumeMounts", []):
        vol = pod_volumes[m["name"]]
        if "emptyDir" in vol:
            out += ["--mount", f"type=tmpfs,destination={m['mountPath']},tmpfs-mode=1777"]
        elif "secret" in vol or "projected" in vol or "configMap" in vol:
            assert m["name"] in volumes, f"the test supplies no content for volume {m['name']}"
            out += ["-v", f"{volumes[m['name']]}:{m['mountPath']}:{'ro' if m.get('readOnly') else 'rw'}"]
        else:
            raise AssertionError(f"volume kind of {m['name']} not handled here: {sorted(vol)}")
    for m in extra_mounts:
        out += ["-v", m]
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
        else:
            if "fieldRef" in e["valueFrom"]:  # the downward API: only the namespace is used here
                assert e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace", e
                env[e["name"]] = NAMESPACE
                continue
            ref = e["valueFrom"]["secretKeyRef"]
            key = (ref["name"], ref["key"])
            assert key in secrets, f"env {e['name']}: the test supplies no value for Secret {key}"
            env[e["name"]] = secrets[key]
    env.update(env_override)
    for k, v in env.items():
        out += ["-e", f"{k}={v}"]
    if container.get("workingDir"):
        out += ["-w", container["workingDir"]]
    if container.get("command"):
        out += ["--entrypoint", json.dumps(container["command"])]
    out.append(container["image"])
    out += args if args is not None else list(container.get("args", []))
    return out


@contextlib.contextmanager
def container(env: dict, argv: list[str]):
    """`podman run -d ARGV`; yields the id; logs on the way out; removed (by id) whatever happens."""
    name = f"rentalml-test-{uuid.uuid4().hex[:8]}"
    cid = _podman(env, "run", "-d", "--name", name, *argv).stdout.strip()
    try:
        yield cid
    finally:
        _podman(env, "rm", "-f", "-t", "5", cid, check=False, timeout=60)


def logs(env: dict, cid: str) -> str:
    res = _podman(env, "logs", cid, check=False)
    return (res.stdout + res.stderr)[-5000:]


def running(env: dict, cid: str) -> bool:
    res = _podman(env, "inspect", "--format", "{{.State.Running}}", cid, check=False)
    return res.stdout.strip() == "true"


def _wait_http(env: dict, cid: str, url: str, timeout: float = 180.0, **kw) -> httpx.Response:
    def answered() -> httpx.Response | None:
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.get(url, timeout=2, **kw)
            if r.status_code == 200:
                return r
        assert running(env, cid), f"the container exited:\n{logs(env, cid)}"
        return None

    try:
        return services.wait_until(answered, timeout, interval=0.5, what=f"{url} to answer 200")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}:\n{logs(env, cid)}") from None


# --- shared loopback services (own instances: the images read whole topics and the default key prefixes) ---------
@pytest.fixture(scope="module")
def backends():
    started = []
    try:
        for kind in ("tansu", "redis", "postgres"):
            started.append(_start(kind))
        tansu, redis, pg = started
        yield {"kafka": tansu.url, "redis": redis.url, "database": pg.url}
    finally:
        for svc in reversed(started):
            svc.stop()


def _secrets(b: dict) -> dict[tuple[str, str], str]:
    """The values of the Secrets the containers read (in the cluster: components/local-secrets or ESO)."""
    return {("rentalml-redis", "url"): b["redis"], ("rentalml-database", "url"): b["database"],
            ("rentalml-database", "feast-registry-url"): b["database"],
            ("rentalml-serving", "password"): "unused", ("rentalml-stream", "password"): "unused"}


def _kafka_loopback(b: dict) -> dict[str, str]:
    # Tansu has no SCRAM listener: PLAINTEXT on loopback (SASL config: tests/test_streaming.py client config test)
    return {"RENTALML_KAFKA__BOOTSTRAP_SERVERS": b["kafka"], "RENTALML_KAFKA__SECURITY_PROTOCOL": "PLAINTEXT"}


def _image_user(env: dict, image: str) -> str:
    return _podman(env, "image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip()


# --- the training image: the weekly CronJob's container running a small local pipeline -------------------------
def test_training_image_runs_a_local_pipeline_as_the_cronjob_runs(podman, rendered):
    """The training image with the CronJob rentalml-training-weekly's pod (user, read-only root, /tmp emptyDir,
    projected KFP token, env) runs `rentalml pipeline run --local` on tiny synthetic data: every step of the DAG
    in the image (kfp.local subprocesses), a bundle exported and registered in a file MLflow under /tmp.
    Also: the image's torch is the CPU build (no CUDA wheels) and its user is the manifest's."""
    cron = _obj(rendered, "CronJob", "rentalml-training-weekly")
    pod = _pod_spec(cron)
    (c,) = [c for c in pod["containers"] if c["name"] == "submit"]
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    assert _image_user(podman, c["image"]).split(":")[0] == str(pod["securityContext"]["runAsUser"])
    torch = _podman(podman, "run", "--rm", "--pull=never", "--network=none", "--entrypoint", "python", c["image"],
                    "-c", "import torch, importlib.metadata as m; print(torch.__version__, torch.version.cuda, "
                    "sorted(d.metadata['Name'] for d in m.distributions() if d.metadata['Name'].startswith("
                    "'nvidia')))").stdout.split(None, 2)
    assert torch[:2] == ["2.13.0+cpu", "None"] and torch[2].strip() == "[]", torch

    gateway = _start("pushgateway")  # the manifest's in-cluster Pushgateway, on loopback
    out = _readable_dir(mode=0o777)  # added: where the run summary lands (a PVC would do it in a cluster)
    token = _readable_dir({"token": "not-a-real-token"})
    params = json.dumps({"epochs": 3, "eval_every": 3, "neighbours": 16, "dim": 16, "hidden": 16})
    args = ["pipeline", "run", "--local", "--source", "synthetic:200,100,3000,3", "--params", params,
            "--deploy-mode", "none", "--json", "/tmp/out/summary.json"]
    argv = run_args(pod, c, secrets={}, volumes={"kfp-token": token}, args=args,
                    env_override={"RENTALML_MLFLOW_TRACKING_URI": "sqlite:////tmp/rentalml/mlflow.db",
                                  "RENTALML_MONITOR__PUSHGATEWAY_URL": gateway.url, "PYTHONWARNINGS": "ignore"},
                    extra_mounts=[f"{out}:/tmp/out:rw"],
                    # the CronJob's 512Mi is for `submit`; a local run is every step's pod in one container
                    memory_limit=False)
    try:
        with container(podman, argv) as cid:
            res = _podman(podman, "wait", cid, timeout=600)
            text = logs(podman, cid)
            assert res.stdout.strip() == "0", text
        doc = json.loads((out / "summary.json").read_text())
        tasks = {row["task"] for row in doc["artifacts"]}
        assert {"ingest", "validate-data", "build-features", "train", "evaluate", "export"} <= tasks
        assert doc["gate"] == "deploy" and doc["registered"]["alias"] == "champion"
        assert any(r["output"] == "bundle" and r["uri"].startswith("/tmp/") for r in doc["artifacts"])
        # the steps pushed their ml_training_* metrics from inside the image
        pushed = httpx.get(f"{gateway.url}/metrics", timeout=5).text
        durations = {x.labels.get("step"): x.value for x in _samples(pushed, "ml_training_step_duration_seconds")}
        assert {"train", "evaluate"} <= set(durations) and all(v > 0 for v in durations.values()), durations
        assert _samples(pushed, "ml_training_last_success_timestamp_seconds")
    finally:
        gateway.stop()
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(token, ignore_errors=True)


# --- the streaming image: the stream-processor Deployment against Tansu -----------------------------------------
def _send(bootstrap: str, partitions: int, records: list[tuple[str, bytes, bytes]]) -> None:
    from rentalml.config import Settings
    from rentalml.kafka import ensure_topics, producer

    s = Settings(kafka={"bootstrap_servers": bootstrap, "partitions": partitions})
    ensure_topics(s)  # Strimzi's KafkaTopics in the cluster
    prod = producer(s)
    for f in [prod.send(t, key=k, value=v) for t, k, v in records]:
        f.get(timeout=30)
    prod.close()


def _samples(text: str, name: str) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    return [x for fam in text_string_to_metric_families(text) for x in fam.samples if x.name == name]


def _metric(text: str, name: str, **labels) -> float:
    return next((x.value for x in _samples(text, name) if x.labels == labels), 0.0)


def test_streaming_image_processes_and_dead_letters_as_the_deployment_runs(podman, rendered, backends):
    """The streaming image with the stream-processor Deployment's pod (user 10001, read-only root, /tmp emptyDir,
    its args and env) against Tansu: listings and interactions are processed into processed_data and the
    Feast online store (Redis, SQL registry on PostgreSQL), the malformed record goes to dead_letter with its
    reason, /metrics (the probes' port) counts both."""
    dep = _obj(rendered, "Deployment", "rentalml-stream-processor")
    pod = _pod_spec(dep)
    (c,) = pod["containers"]
    assert _image_user(podman, c["image"]).split(":")[0] == str(pod["securityContext"]["runAsUser"])
    port = services.free_port()  # the pod's own :9100, as a free port on the shared host network
    args = [str(port) if a == str(c["ports"][0]["containerPort"]) else a for a in c["args"]]
    assert args != c["args"], "the metrics port is no longer an argument: update the port substitution"
    tag = uuid.uuid4().hex[:6]
    now = datetime.now(UTC).replace(microsecond=0)
    listing = {"event_id": f"{tag}-l1", "event_type": "listed", "property_id": f"p_{tag}",
               "timestamp": (now - timedelta(minutes=30)).isoformat(),
               "attributes": {"price": 1500.0, "bedrooms": 2, "bathrooms": 1.0, "city": "Boston", "lat": 42.36,
                              "lon": -71.06, "property_type": "apartment"}}
    views = [{"event_id": f"{tag}-e{i}", "event_type": "view", "user_id": f"u_{tag}", "property_id": f"p_{tag}",
              "timestamp": (now - timedelta(minutes=10 - i)).isoformat(), "session_id": None, "variant": None}
             for i in range(3)]
    bad = f'{{"event_id": "{tag}-bad", "event_type": "teleport"}}'.encode()
    partitions = int(next(e["value"] for e in c["env"] if e["name"] == "RENTALML_KAFKA__PARTITIONS"))
    _send(backends["kafka"], partitions,
          [("property_data", listing["property_id"].encode(), json.dumps(listing).encode()),
           *[("user_interactions", v["user_id"].encode(), json.dumps(v).encode()) for v in views],
           ("user_interactions", f"u_{tag}".encode(), bad)])
    argv = run_args(pod, c, secrets=_secrets(backends), volumes={}, args=args,
                    env_override=_kafka_loopback(backends))
    with container(podman, argv) as cid:
        probe = c["readinessProbe"]["httpGet"]["path"]
        seen: dict = {}

        def counted() -> bool:
            seen["scrape"] = _wait_http(podman, cid, f"http://127.0.0.1:{port}{probe}").text
            seen["done"], seen["dead"] = (_metric(seen["scrape"], "ml_stream_events_total", topic="user_interactions",
                                                  outcome=outcome) for outcome in ("processed", "dead_letter"))
            return seen["done"] >= 3 and seen["dead"] >= 1

        try:
            services.wait_until(counted, 180, interval=1, what="3 events processed and 1 dead-lettered")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}: processed {seen.get('done')}, dead-lettered {seen.get('dead')}:\n"
                                 f"{logs(podman, cid)}") from None
        scrape = seen["scrape"]
        assert _metric(scrape, "ml_stream_events_total", topic="property_data", outcome="processed") == 1
        _podman(podman, "stop", "-t", "30", cid, timeout=60)  # SIGTERM: finish the batch, commit, exit 0
        state = _podman(podman, "inspect", "--format", "{{.State.ExitCode}}", cid).stdout.strip()
        assert state == "0", logs(podman, cid)
    dlq = [d for d in read_topic(backends["kafka"], "dead_letter", idle_s=1.5) if tag in d["payload"]]
    assert len(dlq) == 1 and dlq[0]["reason"].startswith("invalid event: field 'event_type'"), dlq
    processed = {d["event_id"] for d in read_topic(backends["kafka"], "processed_data", idle_s=1.5)}
    assert {f"{tag}-l1", f"{tag}-e0", f"{tag}-e1", f"{tag}-e2"} <= processed
    # the features it pushed, read back on the host through the same Feast store (Redis + SQL registry)
    from rentalml.config import Settings
    from rentalml.features.store import online_features, open_store

    store = open_store(Settings(redis_url=backends["redis"], home=Path(tempfile.mkdtemp()),
                                feast={"registry_url": backends["database"],
                                       "repo_path": str(ROOT / "feature_repo")}))
    on = online_features(store, property_ids=[f"p_{tag}"]).set_index("property_id")
    assert on.loc[f"p_{tag}", "views_7d"] == 3 and on.loc[f"p_{tag}", "price"] == 1500.0


# --- the serving image: the InferenceService's transformer in front of real Triton --------------------------------
def _kserve_transformer_args(isvc: dict, predictor_host: str, http_port: int) -> list[str]:
    """The args KServe gives the custom transformer container: its own, then each of --model_name <isvc name>,
    --predictor_host, --http_port and `--workers <containerConcurrency>` unless an arg already starts with it
    (CustomTransformer.GetContainer, kserve v0.16.0 pkg/apis/serving/v1beta1/transformer_custom.go, with
    pkg/utils IncludesArg). The host and port are the loopback ones here (KServe: <name>-predictor.<ns>, 8080)."""
    t = isvc["spec"]["transformer"]
    args = list(t["containers"][0].get("args", []))

    def includes(flag: str) -> bool:
        return any(a == flag or a.startswith(flag) for a in args)

    for flag, value in (("--model_name", isvc["metadata"]["name"]), ("--predictor_host", predictor_host),
                        ("--http_port", str(http_port))):
        if not includes(flag):
            args += [flag, value]
    if not includes("--workers") and t.get("containerConcurrency") is not None:
        args += ["--workers", str(t["containerConcurrency"])]
    return args


@pytest.fixture(scope="module")
def triton(rendered, hybrid_bundle_dir, tmp_path_factory):
    """Real Triton (nvidia-pytriton's tritonserver) with the ServingRuntime's args, on the python-backend twin
    of the bundle's Triton repository."""
    from rentalml.export.triton import write_python_twin, write_triton_repo

    runtime = _obj(rendered, "ServingRuntime", "kserve-tritonserver")
    repo = write_triton_repo(hybrid_bundle_dir, tmp_path_factory.mktemp("triton") / "models")
    twin = write_python_twin(repo)
    try:
        svc = services.start_triton(twin, args=runtime["spec"]["containers"][0]["args"])
    except services.ServiceUnavailable as exc:
        if "pip" in str(exc) or "not installed" in str(exc):
            _missing(f"Triton: {exc}")
        raise
    yield svc
    svc.stop()


def test_serving_image_is_the_inferenceservice_transformer(podman, rendered, backends, triton, hybrid_bundle_dir):
    """The serving image as the rental-recommender transformer: the rendered container's args, env (JWT auth on,
    Feast features, fold-in), securityContext and mounts (auth Secret, /tmp emptyDir), 2Gi memory limit, plus
    KServe's --model_name/--predictor_host/--http_port, in front of real Triton. Added: the bundle, mounted
    read-only (the cluster's transformer takes the registry's champion from MLflow). The readiness and liveness
    probes' paths answer; a v2 infer through tritonclient needs the JWT and equals the in-process engine."""
    import jwt
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from rentalml.config import Settings
    from rentalml.features.store import apply, open_store
    from rentalml.recommend import recommend
    from rentalml.runtime.bundle import Bundle

    isvc = _obj(rendered, "InferenceService", "rental-recommender")
    spec = isvc["spec"]["transformer"]
    (c,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["RENTALML_AUTH__ENABLED"] == "true" and c["securityContext"]["readOnlyRootFilesystem"]
    # the Feast registry and online store as the cluster has them once the stream processor applied the repo
    apply(open_store(Settings(redis_url=backends["redis"], home=Path(tempfile.mkdtemp()),
                              feast={"registry_url": backends["database"], "repo_path": str(ROOT / "feature_repo")})))
    bundle = _readable_dir()
    shutil.copytree(hybrid_bundle_dir, bundle, dirs_exist_ok=True)
    for p in bundle.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    auth_dir = next(m for m in c["volumeMounts"] if m["mountPath"] == env["RENTALML_AUTH__JWT_SECRET_FILE"]
                    .rsplit("/", 1)[0])
    auth = _readable_dir({env["RENTALML_AUTH__JWT_SECRET_FILE"].rsplit("/", 1)[1]: JWT_SECRET})
    http = services.free_port()
    args = _kserve_transformer_args(isvc, f"127.0.0.1:{triton.port}", http) + ["--bundle", "/mnt/bundle"]
    argv = run_args({"volumes": spec["volumes"]}, c, secrets=_secrets(backends), volumes={auth_dir["name"]: auth},
                    args=args, extra_mounts=[f"{bundle}:/mnt/bundle:ro"],
                    env_override={**_kafka_loopback(backends), "RENTALML_SERVE__GRPC_PORT": str(services.free_port()),
                                  "RENTALML_MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    try:
        with container(podman, argv) as cid:
            base = f"http://127.0.0.1:{http}"
            _wait_http(podman, cid, base + c["readinessProbe"]["httpGet"]["path"])
            _wait_http(podman, cid, base + c["livenessProbe"]["httpGet"]["path"])
            client = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
            assert client.is_model_ready(isvc["metadata"]["name"])
            b = Bundle(hybrid_bundle_dir)
            users = [*b.user_index[:10], "u_brand_new"]
            inp = httpclient.InferInput("user_id", [len(users)], "BYTES")
            inp.set_data_from_numpy(np.array(users, dtype=object))
            k = httpclient.InferInput("k", [1], "INT32")
            k.set_data_from_numpy(np.array([10], dtype=np.int32))
            with pytest.raises(InferenceServerException):
                client.infer(isvc["metadata"]["name"], [inp, k])  # no token: refused
            token = jwt.encode({"sub": "image-test", "exp": int(time.time()) + 600}, JWT_SECRET, algorithm="HS256")
            res = client.infer(isvc["metadata"]["name"], [inp, k], headers={"Authorization": f"Bearer {token}"})
            got = np.array([[p.decode() for p in row] for row in res.as_numpy("property_id")], dtype=object)
            assert got.shape == (len(users), 10), logs(podman, cid)
            local = recommend(b, users, 10)
            assert (got == local.property_ids).all()
            assert running(podman, cid), logs(podman, cid)
    finally:
        shutil.rmtree(bundle, ignore_errors=True)
        shutil.rmtree(auth, ignore_errors=True)
