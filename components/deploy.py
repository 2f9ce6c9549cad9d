"""Deployment targets of the pipeline's deploy step.

* KServe: the `rental-recommender` InferenceService is `rentalml serve --role transformer` on the version's
  bundle (KServe's storage initializer downloads STORAGE_URI, the model version's artifact URI, into
  /mnt/models) in front of a Triton predictor on the bundle's model repository (`<bundle>/triton`). A new
  version is rolled out as a canary: patching both components with `canaryTrafficPercent: N` makes KServe
  (serverless mode) send N % of the traffic to the new revisions and the rest to the last ready ones;
  promoting is a later patch to 100.
* Local: a `rentalml serve` process started by an earlier deploy (pid and ports under
  $RENTALML_HOME/serving/local-server.json) is stopped and restarted on the new version's bundle.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from rentalml.config import get_settings

ISVC_GROUP, ISVC_VERSION, ISVC_PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def inference_service(name: str, *, model_uri: str, version: str, image: str, canary_percent: int | None = None,
                      namespace: str | None = None, service_account: str = "rentalml-serving") -> dict:
    """The InferenceService of one model version: the `rentalml serve --role transformer` (ids, features,
    business filters, fold-in, cache, A/B metrics) on the version's bundle, in front of a Triton predictor on
    the bundle's model repository (`<bundle>/triton`, written by the export step). KServe's storage
    initializer downloads both (STORAGE_URI / storageUri → /mnt/models). With `canary_percent` both components
    carry canaryTrafficPercent: KServe sends that share to the new revisions."""
    meta: dict = {"name": name, "labels": {"app.kubernetes.io/part-of": "rentalml",
                                           "rentalml.io/model-version": str(version)},
                  "annotations": {"rentalml.io/model-uri": model_uri}}
    if namespace:
        meta["namespace"] = namespace
    transformer: dict = {
        "serviceAccountName": service_account,  # bound to the object-store credentials of the storage initializer
        "minReplicas": 1,
        "containers": [{
            "name": "kserve-container",
            "image": image,
            "command": ["rentalml"],
            # KServe appends --model_name, --predictor_host and --http_port
            "args": ["serve", "--role", "transformer", "--bundle", "/mnt/models", "--grpc-port", "8081",
                     "--variant", f"v{version}"],
            "env": [{"name": "STORAGE_URI", "value": model_uri},
                    {"name": "RENTALML_SERVE__FEATURE_SOURCE", "value": "feast"},
                    {"name": "RENTALML_SERVE__FOLD_IN", "value": "true"}],
            "ports": [{"containerPort": 8080, "protocol": "TCP"}],
            "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": 8080}},
            "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
        }],
    }
    predictor: dict = {
        "serviceAccountName": service_account,
        "minReplicas": 1,
        "model": {"modelFormat": {"name": "onnx"}, "runtime": "kserve-tritonserver", "protocolVersion": "v2",
                  "storageUri": f"{model_uri.rstrip('/')}/triton",
                  "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}},
    }
    if canary_percent is not None:
        transformer["canaryTrafficPercent"] = predictor["canaryTrafficPercent"] = int(canary_percent)
    return {"apiVersion": f"{ISVC_GROUP}/{ISVC_VERSION}", "kind": "InferenceService", "metadata": meta,
            "spec": {"transformer": transformer, "predictor": predictor}}


COMPONENTS = ("transformer", "predictor")


def write_manifest(doc: dict, path: str | Path) -> Path:
    import yaml

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def _namespace(doc: dict) -> str:
    ns = doc["metadata"].get("namespace")
    if ns:
        return ns
    return SA_NAMESPACE.read_text().strip() if SA_NAMESPACE.exists() else "default"


def _custom_objects_api():
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def apply_inference_service(doc: dict, canary_percent: int, api=None) -> dict:
    """Create the InferenceService (all traffic: nothing to compare with yet) or patch the existing one's
    predictor with the new model behind `canary_percent` % of the traffic."""
    from kubernetes.client.exceptions import ApiException

    api = api or _custom_objects_api()
    name, ns = doc["metadata"]["name"], _namespace(doc)
    try:
        api.get_namespaced_custom_object(ISVC_GROUP, ISVC_VERSION, ns, ISVC_PLURAL, name)
    except ApiException as exc:
        if exc.status != 404:
            raise
        first = json.loads(json.dumps(doc))
        for comp in first["spec"].values():
            comp.pop("canaryTrafficPercent", None)
        first["metadata"]["namespace"] = ns
        api.create_namespaced_custom_object(ISVC_GROUP, ISVC_VERSION, ns, ISVC_PLURAL, first)
        return {"applied": True, "action": "created", "namespace": ns, "name": name, "traffic_percent": 100}
    patch = {"metadata": {"labels": doc["metadata"]["labels"], "annotations": doc["metadata"]["annotations"]},
             "spec": {c: {**spec, "canaryTrafficPercent": int(canary_percent)} for c, spec in doc["spec"].items()}}
    api.patch_namespaced_custom_object(ISVC_GROUP, ISVC_VERSION, ns, ISVC_PLURAL, name, patch)
    return {"applied": True, "action": "patched", "namespace": ns, "name": name, "traffic_percent": canary_percent}


def set_canary_traffic(name: str, percent: int, *, namespace: str | None = None, api=None) -> dict:
    """Patch only the predictor's `canaryTrafficPercent` of an existing InferenceService: 100 promotes the
    latest revision (all traffic), 0 rolls the canary back (all traffic to the last promoted revision)."""
    if not 0 <= int(percent) <= 100:
        raise ValueError(f"percent must be between 0 and 100, got {percent}")
    api = api or _custom_objects_api()
    ns = _namespace({"metadata": {"namespace": namespace}})
    patch = {"spec": {c: {"canaryTrafficPercent": int(percent)} for c in COMPONENTS}}
    api.patch_namespaced_custom_object(ISVC_GROUP, ISVC_VERSION, ns, ISVC_PLURAL, name, patch)
    return {"applied": True, "action": "patched", "namespace": ns, "name": name, "canary_traffic_percent": int(percent)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of this process counts as gone
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


class LocalServer:
    """The local `rentalml serve` that deploy (re)starts; its state lives in serving/local-server.json."""

    def __init__(self, home: Path | None = None, command: list[str] | None = None, ready_timeout: float = 90.0):
        self.dir = (home or get_settings().home_dir) / "serving"
        self.state_file = self.dir / "local-server.json"
        self.command = command  # test hook: replaces `python -m rentalml.cli serve ...`
        self.ready_timeout = ready_timeout

    def state(self) -> dict | None:
        if not self.state_file.exists():
            return None
        st = json.loads(self.state_file.read_text())
        return st if _alive(int(st["pid"])) else None

    def stop(self, st: dict, timeout: float = 20.0) -> None:
        pid = int(st["pid"])
        try:
            os.killpg(pid, signal.SIGTERM)  # the server runs in its own session (its REST workers too)
        except ProcessLookupError:
            return
        deadline = time.time() + timeout
        while time.time() < deadline and _alive(pid):
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)

    def start(self, bundle: Path, version: str, http_port: int, grpc_port: int) -> dict:
        self.dir.mkdir(parents=True, exist_ok=True)
        cmd = self.command or [sys.executable, "-m", "rentalml.cli", "serve", "--bundle", str(bundle),
                               "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                               "--variant", f"v{version}"]
        log = open(self.dir / "local-server.log", "ab")  # noqa: SIM115 - handed to the detached server
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        st = {"pid": proc.pid, "version": str(version), "bundle": str(bundle), "http_port": http_port,
              "grpc_port": grpc_port, "started_at": time.time(), "log": str(self.dir / "local-server.log")}
        self.state_file.write_text(json.dumps(st, indent=2))
        if self.command is None:
            self._wait_ready(proc, http_port)
        return st

    def _wait_ready(self, proc: subprocess.Popen, http_port: int) -> None:
        import httpx

        deadline = time.time() + self.ready_timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"local server exited with {proc.returncode}; see {self.dir / 'local-server.log'}")
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"local server not ready after {self.ready_timeout}s")

    def deploy(self, bundle: Path, version: str, start: bool = False) -> dict:
        """Restart a running local server on `bundle` (same ports); start one only when `start`."""
        current = self.state()
        record = {"version": str(version), "bundle": str(bundle)}
        if current is None and not start:
            (self.dir).mkdir(parents=True, exist_ok=True)
            (self.dir / "deployed.json").write_text(json.dumps(record, indent=2))
            return {**record, "server": "not running", "hint": f"rentalml serve --bundle {bundle}"}
        s = get_settings()
        http_port = current["http_port"] if current else s.serve.http_port or _free_port()
        grpc_port = current["grpc_port"] if current else s.serve.grpc_port or _free_port()
        if current is not None:
            self.stop(current)
        st = self.start(bundle, version, http_port, grpc_port)
        (self.dir / "deployed.json").write_text(json.dumps(record, indent=2))
        return {**record, "server": "restarted" if current else "started", "pid": st["pid"],
                "previous_version": current["version"] if current else None,
                "http_port": http_port, "grpc_port": grpc_port}
