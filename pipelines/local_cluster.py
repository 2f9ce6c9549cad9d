"""The serving half of the cluster, run on this machine from the rendered dev overlay: `rentalml pipeline
local-cluster`, `make cluster-local`, tests/test_local_cluster.py.

Read from `kubectl kustomize manifests/overlays/dev` (committed example secrets), never configured twice:
* S3: moto's server stands in for the object store at the secrets' endpoint (`rentalml-object-store`
  endpoint-url, and the `rentalml-kserve-s3` secret's `serving.kserve.io/s3-endpoint` annotation);
* MLflow: the rendered Deployment's command, args ($(VAR) expanded from its env and secrets) and env, with
  `--serve-artifacts` to its s3:// destination on moto; host/port substituted, loopback added to
  --allowed-hosts; backend store SQLite instead of the rendered PostgreSQL URL (stated in the result);
* the Kubernetes API: rentalml.components.kubefake holding the rendered InferenceService, with the API
  server's patch semantics; the pipeline's publish/deploy steps reach it through KUBECONFIG;
* training: `rentalml pipeline run --local --deploy-mode kserve` (kfp.local SubprocessRunner) with the step
  env the pipeline maps from the secrets (pipelines.training MLFLOW_SECRET / OBJECT_STORE_SECRET);
* the predictor pod: KServe's storage initializer (kserve-storage `Storage.download_files`, what the init
  container runs) fetches `storageUri` with the env KServe builds from the ServiceAccount's S3 secret; Triton
  (rentalml.services.start_triton) runs the downloaded python twin with the ServingRuntime's args;
* the transformer pod: the *patched* InferenceService's container (command, args, env with secrets resolved,
  mounts mapped to local folders, service hosts rewritten to loopback) plus the args KServe adds
  (`--model_name`, `--predictor_host`, `--http_port`, `--workers` when absent), Redis and Kafka (Tansu) on
  loopback.
Local substitutions, all listed in the result's `substitutions`: SQLite backend store; Tansu without SASL
(PLAINTEXT: it has no SCRAM); candidate features from the bundle instead of the Feast online store (no
PostgreSQL registry / materialization here); `--workers` capped to `max_workers`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rentalml.components import rendered as r
from rentalml.components.kubefake import FakeKubeApi
from rentalml.pipelines.training import MLFLOW_SECRET, OBJECT_STORE_SECRET

from rentalml.services import Service, free_port, start_tansu, stop_process, wait_port, wait_until

ISVC = "rental-recommender"
BIN = Path(sys.executable).parent


class LocalClusterError(RuntimeError):
    pass


def _run_logged(cmd: list[str], env: dict, log: Path, timeout: float, cwd: Path | None = None) -> None:
    with open(log, "ab") as fh:
        res = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, cwd=cwd)
    if res.returncode != 0:
        raise LocalClusterError(f"{' '.join(cmd[:6])}… exited with {res.returncode}:\n{_tail(log)}")


def _tail(path: Path, n: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _popen(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    fh = open(log, "ab")  # noqa: SIM115 - owned by the child
    return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def _wait_http(url: str, proc: subprocess.Popen | None, timeout: float, log: Path | None = None,
               headers: dict | None = None) -> None:
    import httpx

    def ok() -> bool:
        try:
            return httpx.get(url, timeout=2.0, headers=headers).status_code == 200
        except httpx.HTTPError:  # not yet listening / answering
            return False

    try:
        wait_until(ok, timeout, interval=0.3, proc=proc, what=f"{url} answering 200")
    except (RuntimeError, TimeoutError) as exc:
        raise LocalClusterError(f"{exc}\n{_tail(log) if log else ''}") from exc


def base_env() -> dict:
    """This process's environment without the settings the cluster's objects provide."""
    drop = ("RENTALML_", "AWS_", "MLFLOW_", "KUBECONFIG", "S3_", "KUBERNETES_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen
    log: Path
    port: int

    def stop(self) -> None:
        stop_process(self.proc, timeout=15)


@dataclass
class LocalCluster:
    workdir: Path
    overlay: str = "dev"
    source: str = "synthetic:240,120,4000,5"
    model: str = "hybrid"
    params: dict = field(default_factory=lambda: {"epochs": 3, "eval_every": 3, "neighbours": 16, "dim": 16,
                                                  "hidden": 16})
    max_workers: int = 1
    docs: list = field(default_factory=list)
    substitutions: list = field(default_factory=list)
    _stops: list = field(default_factory=list)

    # ------------------------------------------------------------------ rendered objects
    def render(self) -> None:
        self.docs = r.render(self.overlay, workdir=self.workdir / "render")
        self.isvc = r.find(self.docs, "InferenceService", ISVC)
        self.ns = self.isvc["metadata"].get("namespace") or "default"
        self.runtime = r.find(self.docs, "ServingRuntime", self.isvc["spec"]["predictor"]["model"]["runtime"])
        self.mlflow = r.find(self.docs, "Deployment", "rentalml-mlflow")

    def secret(self, name: str) -> dict:
        return r.secret_data(self.docs, name)

    def env_of(self, container: dict, extra_secrets: dict | None = None) -> dict:
        """A container's env with secretKeyRef values from the rendered Secrets (or `extra_secrets` for those
        an operator creates, e.g. Strimzi's KafkaUser secret)."""
        out = {}
        for e in container.get("env", []):
            if "value" in e:
                out[e["name"]] = str(e["value"])
                continue
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref is None:
                continue
            try:
                data = self.secret(ref["name"])
            except KeyError:
                data = (extra_secrets or {}).get(ref["name"], {})
            if ref["key"] in data:
                out[e["name"]] = data[ref["key"]]
            elif not ref.get("optional"):
                raise LocalClusterError(f"secret {ref['name']} has no key {ref['key']} ({e['name']})")
        return out

    @staticmethod
    def expand(arg: str, env: dict) -> str:
        """Kubernetes' $(VAR) expansion of command/args."""
        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), arg)

    def loopback(self, value: str) -> str:
        for host, local in sorted(self.hosts.items(), key=lambda kv: -len(kv[0])):
            value = value.replace(host, local)
        return value

    def _host_names(self, name: str, port: int, local_port: int) -> None:
        for h in (name, f"{name}.{self.ns}", f"{name}.{self.ns}.svc", f"{name}.{self.ns}.svc.cluster.local"):
            self.hosts[f"{h}:{port}"] = f"127.0.0.1:{local_port}"

    # ------------------------------------------------------------------ services
    def start_s3(self) -> None:
        port = free_port()
        log = self.workdir / "moto.log"
        proc = _popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], base_env(), log)
        self._stops.append(Proc("moto", proc, log, port).stop)
        wait_port(port, timeout=60, proc=proc)
        self.s3_url = f"http://127.0.0.1:{port}"
        self.hosts: dict[str, str] = {}
        endpoint = re.sub(r"^https?://", "", self.secret("rentalml-object-store")["endpoint-url"]).rstrip("/")
        self.hosts[endpoint] = f"127.0.0.1:{port}"
        ann = r.find(self.docs, "Secret", "rentalml-kserve-s3")["metadata"].get("annotations", {})
        self.hosts[ann.get("serving.kserve.io/s3-endpoint", endpoint)] = f"127.0.0.1:{port}"

    def s3_client(self):
        import boto3

        store = self.secret("rentalml-object-store")
        return boto3.client("s3", endpoint_url=self.s3_url, region_name="us-east-1",
                            aws_access_key_id=store["access-key-id"],
                            aws_secret_access_key=store["secret-access-key"])

    def start_redis(self) -> None:
        """Redis with the password of the rendered URL (so the URL is used as it is, host rewritten)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise LocalClusterError("redis-server is not installed (Debian package redis-server)")
        url = self.secret("rentalml-redis")["url"]
        m = re.match(r"redis://(?::([^@]*)@)?([^:/]+):(\d+)", url)
        port = free_port()
        cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(self.workdir)]
        if m and m[1]:
            cmd += ["--requirepass", m[1]]
        log = self.workdir / "redis.log"
        proc = _popen(cmd, base_env(), log)
        self._stops.append(Proc("redis", proc, log, port).stop)
        wait_port(port, proc=proc)
        if m:
            self.hosts[f"{m[2]}:{m[3]}"] = f"127.0.0.1:{port}"

    def start_kafka(self) -> None:
        svc: Service = start_tansu(log=self.workdir / "tansu.log")
        self._stops.append(svc.stop)
        self.kafka = svc
        kafka = [d for d in self.docs if d.get("kind") == "Kafka"]
        for k in kafka:  # Strimzi's bootstrap Service: <cluster>-kafka-bootstrap
            self._host_names(f"{k['metadata']['name']}-kafka-bootstrap", 9092, svc.port)

    def start_mlflow(self) -> None:
        c = self.mlflow["spec"]["template"]["spec"]["containers"][0]
        env = self.env_of(c)
        env["MLFLOW_BACKEND_STORE_URI"] = f"sqlite:///{self.workdir / 'mlflow.db'}"
        self.substitutions.append("MLflow backend store: SQLite instead of the rendered PostgreSQL URL")
        env["MLFLOW_S3_ENDPOINT_URL"] = self.loopback(env["MLFLOW_S3_ENDPOINT_URL"])
        env["HOME"] = str(self.workdir / "mlflow-home")
        Path(env["HOME"]).mkdir(exist_ok=True)
        dest = env["MLFLOW_ARTIFACTS_DESTINATION"]
        bucket = re.match(r"s3://([^/]+)", dest)
        if bucket is None:
            raise LocalClusterError(f"MLflow artifacts destination is not s3://: {dest}")
        with contextlib.suppress(Exception):
            self.s3_client().create_bucket(Bucket=bucket[1])
        port = free_port()
        args = [self.expand(a, env) for a in c.get("args", [])]
        out = []
        for a in args:
            if a.startswith("--host="):
                a = "--host=127.0.0.1"
            elif a.startswith("--port="):
                a = f"--port={port}"
            elif a.startswith("--allowed-hosts="):
                a += f",127.0.0.1,127.0.0.1:{port},localhost:{port}"
            out.append(a)
        command = [str(BIN / c["command"][0]), *c["command"][1:]] if c.get("command") else [str(BIN / "mlflow")]
        log = self.workdir / "mlflow.log"
        proc = _popen([*command, *out], {**base_env(), **env}, log)
        self._stops.append(Proc("mlflow", proc, log, port).stop)
        svc = r.find(self.docs, "Service", "rentalml-mlflow")
        self._host_names("rentalml-mlflow", int(svc["spec"]["ports"][0]["port"]), port)
        self.mlflow_url = f"http://127.0.0.1:{port}"
        _wait_http(f"{self.mlflow_url}/health", proc, 180, log)

    def start_api(self) -> None:
        self.api = FakeKubeApi()
        self.api.start()
        self._stops.append(self.api.stop)
        self.api.put(self.isvc, self.ns)
        self.kubeconfig = self.api.write_kubeconfig(self.workdir / "kubeconfig", self.ns)

    def up(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.render()
        self.start_s3()
        self.start_redis()
        self.start_kafka()
        self.start_mlflow()
        self.start_api()

    def down(self) -> None:
        while self._stops:
            with contextlib.suppress(Exception):
                self._stops.pop()()

    def __enter__(self):
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc):
        self.down()

    # ------------------------------------------------------------------ the pipeline
    def step_env(self) -> dict:
        """What the pipeline's steps get from the secrets (pipelines.training), hosts on loopback."""
        env = {**base_env(), "KUBECONFIG": str(self.kubeconfig), "RENTALML_HOME": str(self.workdir / "kfp-home"),
               "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        for spec in (MLFLOW_SECRET, OBJECT_STORE_SECRET):
            data = self.secret(spec["name"])
            for key, var in spec["keys"].items():
                if key in data:
                    env[var] = self.loopback(data[key])
        return env

    def pipeline_run(self, n: int, *, canary_percent: int, margin: float = -1.0) -> dict:
        out = self.workdir / f"pipeline-{n}.json"
        cmd = [sys.executable, "-m", "rentalml.cli", "pipeline", "run", "--local", "--deploy-mode", "kserve",
               "--source", self.source, "--model", self.model, "--params", json.dumps(self.params),
               "--margin", str(margin), "--arg", f"namespace={self.ns}", "--arg", f"isvc_name={ISVC}",
               "--arg", f"canary_percent={canary_percent}", "--json", str(out)]
        _run_logged(cmd, self.step_env(), self.workdir / f"pipeline-{n}.log", timeout=900, cwd=self.workdir)
        return json.loads(out.read_text())

    def live(self) -> dict:
        return self.api.get("serving.kserve.io", self.ns, "inferenceservices", ISVC)

    # ------------------------------------------------------------------ the predictor pod
    def storage_env(self) -> dict:
        """The env KServe gives the storage initializer from the S3 secret attached to the predictor's
        ServiceAccount (kserve pkg/credentials/s3/s3_secret.go BuildSecretEnvs and utils.go BuildS3EnvVars, with
        the default inferenceservice-config key names AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY): the keys, then
        from the serving.kserve.io/s3-* annotations S3_ENDPOINT, AWS_ENDPOINT_URL (https:// unless s3-usehttps
        is "0"), S3_USE_HTTPS, S3_VERIFY_SSL, AWS_DEFAULT_REGION; endpoint host rewritten to loopback."""
        sa_name = self.isvc["spec"]["predictor"].get("serviceAccountName")
        sa = r.find(self.docs, "ServiceAccount", sa_name)
        s3 = [s["name"] for s in sa.get("secrets", [])
              if "serving.kserve.io/s3-endpoint" in (r.find(self.docs, "Secret", s["name"])["metadata"]
                                                     .get("annotations") or {})]
        if not s3:
            raise LocalClusterError(f"ServiceAccount {sa_name} has no S3 secret for the storage initializer")
        sec = r.find(self.docs, "Secret", s3[0])
        data = self.secret(s3[0])
        ann = sec["metadata"].get("annotations") or {}
        endpoint = self.loopback(ann["serving.kserve.io/s3-endpoint"])
        env = {**base_env(), "AWS_ACCESS_KEY_ID": data["AWS_ACCESS_KEY_ID"],
               "AWS_SECRET_ACCESS_KEY": data["AWS_SECRET_ACCESS_KEY"], "S3_ENDPOINT": endpoint,
               "AWS_ENDPOINT_URL": "https://" + endpoint}
        if "serving.kserve.io/s3-usehttps" in ann:
            env["S3_USE_HTTPS"] = ann["serving.kserve.io/s3-usehttps"]
            if env["S3_USE_HTTPS"] == "0":
                env["AWS_ENDPOINT_URL"] = "http://" + endpoint
        for key, var in (("s3-verifyssl", "S3_VERIFY_SSL"), ("s3-region", "AWS_DEFAULT_REGION")):
            if f"serving.kserve.io/{key}" in ann:
                env[var] = ann[f"serving.kserve.io/{key}"]
        return env

    def storage_initializer(self, uri: str, dest: Path) -> Path:
        code = ("import sys\nfrom kserve_storage import Storage\n"
                "Storage.download_files([sys.argv[1]], [sys.argv[2]])\n")
        _run_logged([sys.executable, "-c", code, uri, str(dest)], self.storage_env(),
                    self.workdir / "storage-initializer.log", timeout=300)
        return dest

    def start_predictor(self, n: int) -> dict:
        """A new predictor revision: storage initializer into a fresh /mnt/models, then Triton on the twin."""
        from rentalml.components.publish import twin_uri

        from rentalml.services import start_triton

        uri = self.live()["spec"]["predictor"]["model"]["storageUri"]
        models = self.storage_initializer(uri, self.workdir / f"predictor-{n}" / "mnt" / "models")
        twin = self.storage_initializer(twin_uri(uri), self.workdir / f"predictor-{n}" / "twin")
        args = self.runtime["spec"]["containers"][0].get("args")
        triton = start_triton(twin, args=args, log=self.workdir / f"triton-{n}.log")
        self._stops.append(triton.stop)
        self.triton = triton
        return {"storage_uri": uri, "models": models, "twin": twin, "triton": triton}

    # ------------------------------------------------------------------ the transformer pod
    def mounts(self, spec: dict, container: dict, root: Path) -> dict[str, str]:
        """Volume mounts → local folders: secret volumes filled from the rendered Secrets, emptyDirs empty."""
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        out = {}
        for m in container.get("volumeMounts", []):
            local = root / m["name"]
            local.mkdir(parents=True, exist_ok=True)
            v = vols.get(m["name"], {})
            if "secret" in v:
                for key, value in self.secret(v["secret"]["secretName"]).items():
                    (local / key).write_text(value)
            out[m["mountPath"]] = str(local)
        return out

    def start_transformer(self, n: int) -> dict:
        live = self.live()
        spec = live["spec"]["transformer"]
        c = next(x for x in spec["containers"] if x["name"] == "kserve-container")
        env = self.env_of(c, {"rentalml-serving": {"password": "local"}})
        mounts = self.mounts(spec, c, self.workdir / f"transformer-{n}")
        for k, v in list(env.items()):
            for path, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
                if v.startswith(path):
                    v = local + v[len(path):]
                    break
            env[k] = self.loopback(v)
        http_port, grpc_port = free_port(), free_port()
        env["RENTALML_SERVE__HTTP_PORT"], env["RENTALML_SERVE__GRPC_PORT"] = str(http_port), str(grpc_port)
        if env.get("RENTALML_SERVE__FEATURE_SOURCE") == "feast":
            env["RENTALML_SERVE__FEATURE_SOURCE"] = "bundle"
            self._note("transformer features: bundle instead of the Feast online store")
        if env.get("RENTALML_KAFKA__SECURITY_PROTOCOL", "").startswith("SASL"):
            env["RENTALML_KAFKA__SECURITY_PROTOCOL"] = "PLAINTEXT"
            for k in ("RENTALML_KAFKA__SASL_MECHANISM", "RENTALML_KAFKA__SASL_USERNAME",
                      "RENTALML_KAFKA__SASL_PASSWORD"):
                env.pop(k, None)
            self._note("Kafka: Tansu PLAINTEXT (no SCRAM) instead of SASL_PLAINTEXT/SCRAM-SHA-512")
        command = c.get("command") or ["rentalml"]  # the serving image's ENTRYPOINT
        command = [str(BIN / command[0]) if (BIN / command[0]).exists() else command[0], *command[1:]]
        args = [self.expand(a, env) for a in c.get("args", [])]
        # what KServe's transformer reconciler adds (each only when absent from the args)
        added = {"--model_name": live["metadata"]["name"], "--predictor_host": f"127.0.0.1:{self.triton.port}",
                 "--http_port": str(http_port)}
        if spec.get("containerConcurrency") is not None:
            added["--workers"] = str(spec["containerConcurrency"])
        for flag, value in added.items():
            if flag not in args and flag.replace("_", "-") not in args:
                args += [flag, value]
        if "--workers" in args:
            i = args.index("--workers")
            if int(args[i + 1]) > self.max_workers:
                self._note(f"--workers {args[i + 1]} capped to {self.max_workers} on this machine")
                args[i + 1] = str(self.max_workers)
        log = self.workdir / f"transformer-{n}.log"
        proc = _popen([*command, *args], {**base_env(), **env}, log)
        p = Proc("transformer", proc, log, http_port)
        self._stops.append(p.stop)
        _wait_http(f"http://127.0.0.1:{http_port}/v2/health/ready", proc, 240, log)
        return {"proc": p, "http_port": http_port, "grpc_port": grpc_port, "env": env, "args": args,
                "command": command, "jwt_secret_file": env.get("RENTALML_AUTH__JWT_SECRET_FILE")}

    def _note(self, text: str) -> None:
        if text not in self.substitutions:
            self.substitutions.append(text)


# ---------------------------------------------------------------------- requests
def token(secret: str, sub: str = "local-cluster") -> str:
    import jwt

    return jwt.encode({"sub": sub, "exp": int(time.time()) + 3600}, secret, algorithm="HS256")


def infer(kind: str, port: int, model: str, user: str, headers: dict | None) -> dict:
    """One v2 request through the transformer (tritonclient HTTP or gRPC); the answer's parameters."""
    import numpy as np

    if kind == "http":
        import tritonclient.http as mod

        client = mod.InferenceServerClient(url=f"127.0.0.1:{port}")
    else:
        import tritonclient.grpc as mod

        client = mod.InferenceServerClient(url=f"127.0.0.1:{port}")
    inp = mod.InferInput("user_id", [1], "BYTES")
    inp.set_data_from_numpy(np.array([user], dtype=object))
    if headers and kind == "grpc":  # gRPC metadata keys are lowercase
        headers = {k.lower(): str(v) for k, v in headers.items()}
    res = client.infer(model, [inp], headers=headers)
    resp = res.get_response()
    if kind == "http":
        params = dict(resp.get("parameters") or {})
    else:
        params = {k: (p.string_param or p.int64_param or p.bool_param) for k, p in resp.parameters.items()}
    params["model_version_header"] = params.get("model_version")
    client.close()
    return params


def triton_counts(triton_url: str) -> dict[tuple[str, str], int]:
    """(model, version) → inference_count of a Triton server."""
    import httpx

    stats = httpx.get(f"{triton_url}/v2/models/stats", timeout=10).json()
    return {(m["name"], str(m["version"])): int(m.get("inference_count", 0)) for m in stats.get("model_stats", [])}


def read_outcomes(bootstrap: str, timeout: float = 20.0, want: int = 1) -> list[dict]:
    """The ab_outcomes topic from the start: at least `want` events and then everything up to the end of the
    topic (a poll that returns nothing), or what arrived within `timeout`."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer("ab_outcomes", bootstrap_servers=[bootstrap], auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=None)
    out: list[dict] = []

    def drained() -> bool:
        batch = [json.loads(r.value) for records in consumer.poll(timeout_ms=500).values() for r in records]
        out.extend(batch)
        return len(out) >= want and not batch

    try:
        wait_until(drained, timeout, interval=0.0, what=f"{want} event(s) on ab_outcomes")
    except TimeoutError:
        pass  # the caller judges what arrived
    finally:
        consumer.close()
    return out


def run(workdir: Path, *, users: int = 12, canary_percent: int = 50, log=print) -> dict:
    """The whole loop; returns what happened (for the test and the command's JSON)."""
    from rentalml.data.loaders import load_dataset

    workdir = Path(workdir)
    report: dict = {"workdir": str(workdir)}
    with LocalCluster(workdir) as cl:
        log(f"up: moto {cl.s3_url}, MLflow {cl.mlflow_url}, Kafka {cl.kafka.url}, API {cl.api.url}")
        ids = [str(u) for u in load_dataset(cl.source).interactions["user_id"].drop_duplicates()[:users]]
        report["run1"] = cl.pipeline_run(1, canary_percent=canary_percent)
        log(f"pipeline 1: registered v{report['run1']['registered'].get('version')}, deploy "
            f"{json.dumps(report['run1']['deploy'])[:200]}")
        report["after1"] = cl.live()
        pred = cl.start_predictor(1)
        tr = cl.start_transformer(1)
        secret = Path(tr["jwt_secret_file"]).read_text().strip()
        auth = {"Authorization": f"Bearer {token(secret)}"}
        report["first"] = {u: {k: infer(k, tr["http_port"] if k == "http" else tr["grpc_port"], ISVC, u, auth)
                               for k in ("http", "grpc")} for u in ids[:3]}
        try:
            infer("http", tr["http_port"], ISVC, ids[0], None)
            report["unauthenticated"] = "accepted"
        except Exception as exc:  # noqa: BLE001 - tritonclient raises its own error type
            report["unauthenticated"] = f"rejected: {str(exc)[:120]}"
        tr["proc"].stop()
        pred["triton"].stop()

        report["run2"] = cl.pipeline_run(2, canary_percent=canary_percent)
        log(f"pipeline 2: registered v{report['run2']['registered'].get('version')}")
        report["after2"] = cl.live()
        pred = cl.start_predictor(2)
        tr = cl.start_transformer(2)
        before = triton_counts(pred["triton"].url)
        answers: dict[str, list] = {}
        for u in ids:
            for kind in ("http", "grpc", "http"):
                port = tr["http_port"] if kind == "http" else tr["grpc_port"]
                answers.setdefault(u, []).append((kind, infer(kind, port, ISVC, u, auth)))
        after = triton_counts(pred["triton"].url)
        report["answers"] = answers
        report["triton_delta"] = {f"{m}:{v}": after.get((m, v), 0) - before.get((m, v), 0) for (m, v) in after}
        report["outcomes"] = read_outcomes(cl.kafka.url, want=1)
        report["substitutions"] = list(cl.substitutions)
        report["rendered_isvc"] = cl.isvc
        report["transformer_env"] = {k: v for k, v in tr["env"].items() if "PASSWORD" not in k}
        report["transformer_args"] = tr["args"]
    return report


def summary(rep: dict) -> dict:
    """The short form of run()'s report: what was deployed, which version answered whom, what Triton ran."""
    env = {e["name"]: e.get("value") for e in rep["after2"]["spec"]["transformer"]["containers"][0]["env"]}
    per_version: dict[str, int] = {}
    for _user, answers in rep.get("answers", {}).items():
        v = str(answers[0][1].get("model_version"))
        per_version[v] = per_version.get(v, 0) + 1
    return {"registered": [rep["run1"]["registered"].get("version"), rep["run2"]["registered"].get("version")],
            "arms": {k: env.get(k) for k in env if k.startswith("RENTALML_SERVE__CHA")},
            "predictor_versions": rep["after2"]["spec"]["predictor"].get("annotations"),
            "users_per_version": per_version, "triton_inferences": rep.get("triton_delta"),
            "unauthenticated": rep.get("unauthenticated"), "outcome_events": len(rep.get("outcomes", [])),
            "substitutions": rep.get("substitutions")}
