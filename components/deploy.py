"""Deployment targets of the pipeline's deploy step.

* KServe: the `rental-recommender` InferenceService is owned by the manifests (`kubectl apply -k`): the
  transformer (`rentalml serve --role transformer`, its env, mounts, probes and auth) in front of a Triton
  predictor on the Triton repository at the predictor's `storageUri`. The publish step has written the new
  version's folders into that repository (rentalml.components.publish). Deploy patches only what a new version
  changes, with a JSON Patch (RFC 6902, `application/json-patch+json`) of exact paths, in this order:
  1. predictor: the annotation `rentalml.io/model-versions` (the live versions; a pod-template change, so
     Knative rolls a new predictor revision whose storage initializer downloads the repository holding them) and
     `canaryTrafficPercent: 100` (Knative never splits model versions: defect 13); then it waits until that
     revision is ready;
  2. transformer: the env entries RENTALML_SERVE__CHAMPION_VERSION / _CHALLENGER_VERSION / _CHALLENGER_PERCENT,
     one entry each, guarded by `test` ops on the container and env names. The transformer picks the arm
     (sticky per user) and calls the Triton models of exactly that arm's version.
  Never a merge patch of a component: JSON merge patch (RFC 7386, what
  `CustomObjectsApi.patch_namespaced_custom_object` sends: its Content-Type is fixed to
  `application/merge-patch+json` in kubernetes-client 30.1.0) replaces every list it names, so patching a
  component replaced `containers` and silently dropped the env (auth off), mounts and probes; strategic merge
  is not served for custom resources.
  Kubernetes API calls (RBAC, Role rentalml-deployer): get and patch on serving.kserve.io/inferenceservices.
  The patching itself is a core contract, `rentalml.kserve` (`deploy_version`, the JSON Patch builders, the
  env names of the arms, `API_CALLS`), which `rentalml ab promote|rollback --cluster` uses too.
* Local: a `rentalml serve` process started by an earlier deploy (pid and ports under
  $RENTALML_HOME/serving/local-server.json) is stopped and restarted on the new version's bundle.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rentalml.config import get_settings
from rentalml.services import free_port, wait_until


def write_manifest(doc, path: str | Path) -> Path:
    """The deploy record (plan and the JSON Patches sent) as YAML: the step's manifest artifact."""
    import yaml

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(copy.deepcopy(doc), sort_keys=False))
    return p


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
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not _alive(pid), timeout, interval=0.2, what=f"local server {pid} to exit")
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

        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, self.ready_timeout, interval=0.5, proc=proc,
                   what=f"the local server's /v2/health/ready (log: {self.dir / 'local-server.log'})")

    def deploy(self, bundle: Path, version: str, start: bool = False) -> dict:
        """Restart a running local server on `bundle` (same ports); start one only when `start`."""
        current = self.state()
        record = {"version": str(version), "bundle": str(bundle)}
        if current is None and not start:
            (self.dir).mkdir(parents=True, exist_ok=True)
            (self.dir / "deployed.json").write_text(json.dumps(record, indent=2))
            return {**record, "server": "not running", "hint": f"rentalml serve --bundle {bundle}"}
        s = get_settings()
        http_port = current["http_port"] if current else s.serve.http_port or free_port()
        grpc_port = current["grpc_port"] if current else s.serve.grpc_port or free_port()
        if current is not None:
            self.stop(current)
        st = self.start(bundle, version, http_port, grpc_port)
        (self.dir / "deployed.json").write_text(json.dumps(record, indent=2))
        return {**record, "server": "restarted" if current else "started", "pid": st["pid"],
                "previous_version": current["version"] if current else None,
                "http_port": http_port, "grpc_port": grpc_port}
