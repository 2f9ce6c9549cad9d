"""A Kubernetes API server for the custom resources the pipeline's steps create (tests only).

It speaks the API server's REST protocol on 127.0.0.1, so the real `kubernetes` client talks to it unchanged:
`POST /apis/<group>/<version>/namespaces/<ns>/<plural>` creates (201; 409 AlreadyExists for a taken name;
422 Invalid when the body does not validate against the vendored upstream CRD under tests/crds/, unknown
fields included), `GET .../<plural>/<name>` reads (404 when absent). A `controller` per plural moves the
stored object's status forward on each read, as the operator would, and may do the work (run the trainer).
Every call is recorded as (verb, group, resource, namespace, name) for the RBAC check.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

CRDS = Path(__file__).resolve().parent / "crds"
PATH = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/?]+)"
                  r"(?:/(?P<name>[^/?]+))?")


class FakeKubernetes:
    def __init__(self, controllers: dict | None = None):
        self.objects: dict[tuple, dict] = {}
        self.calls: list[tuple] = []
        self.controllers = controllers or {}
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # noqa: N802
                m = PATH.match(self.path)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                self._send(*fake.create(m["group"], m["version"], m["ns"], m["plural"], body))

            def do_GET(self):  # noqa: N802
                m = PATH.match(self.path)
                self._send(*fake.get(m["group"], m["version"], m["ns"], m["plural"], m["name"]))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def api(self):
        """CustomObjectsApi of the real client, pointed at this server."""
        from kubernetes import client

        cfg = client.Configuration(host=self.url)
        return client.CustomObjectsApi(client.ApiClient(cfg))

    @staticmethod
    def _status(code: int, reason: str, message: str) -> tuple[int, dict]:
        return code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                      "message": message, "code": code}

    def create(self, group, version, ns, plural, body):
        self.calls.append(("create", group, plural, ns, body.get("metadata", {}).get("name")))
        if body.get("apiVersion") != f"{group}/{version}":
            return self._status(400, "BadRequest", f"apiVersion {body.get('apiVersion')} on {group}/{version}")
        errors = crd_errors(body)
        if errors:
            return self._status(422, "Invalid", "; ".join(errors))
        denied = admission_errors(body)
        if denied:
            return self._status(403, "Forbidden", f"admission webhook denied the request: {'; '.join(denied)}")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        meta.update(namespace=ns, uid=str(uuid.uuid4()), resourceVersion="1",
                    creationTimestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        key = (group, ns, plural, meta["name"])
        with self.lock:
            if key in self.objects:
                return self._status(409, "AlreadyExists", f'{plural} "{meta["name"]}" already exists')
            self.objects[key] = obj
        return 201, obj

    def get(self, group, version, ns, plural, name):
        self.calls.append(("get", group, plural, ns, name))
        key = (group, ns, plural, name)
        with self.lock:
            obj = self.objects.get(key)
            if obj is None:
                return self._status(404, "NotFound", f'{plural} "{name}" not found')
            if plural in self.controllers:
                self.controllers[plural](obj)
            return 200, copy.deepcopy(obj)


def admission_errors(doc: dict) -> list[str]:
    """Kubeflow Trainer v2.3.0's validating webhook for a TrainJob (pkg/webhooks/trainjob_webhook.go →
    pkg/runtime/framework/plugins/jobset/jobset.go): every runtime patch's manager must pass apimachinery's
    IsDomainPrefixedPath, and no runtime patch may set env on the `node` container."""
    if doc.get("kind") != "TrainJob":
        return []
    errors = []
    label = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
    for patch in doc.get("spec", {}).get("runtimePatches", []):
        host, sep, path = patch.get("manager", "").partition("/")
        if not (sep and host and path and re.fullmatch(rf"{label}(\.{label})*", host)
                and re.fullmatch(r"[A-Za-z0-9/\-._~%!$&'()*+,;=:]+", path)):
            errors.append(f"spec.runtimePatches.manager: Invalid value: {patch.get('manager')!r}: must be a "
                          f"domain-prefixed path (such as \"acme.io/foo\")")
        spec = (patch.get("trainingRuntimeSpec") or {}).get("template", {}).get("spec", {})
        for rjob in spec.get("replicatedJobs", []):
            pod = rjob.get("template", {}).get("spec", {}).get("template", {}).get("spec", {})
            if any(c["name"] == "node" and c.get("env") for c in pod.get("containers", [])):
                errors.append("spec.runtimePatches: must not have envs for the node container")
    return errors


def set_condition(obj: dict, kind: str, reason: str = "", message: str = "") -> None:
    conds = obj.setdefault("status", {}).setdefault("conditions", [])
    for c in conds:
        if c["type"] != kind and c["status"] == "True" and kind in ("Succeeded", "Complete", "Failed"):
            c["status"] = "False"
    conds.append({"type": kind, "status": "True", "reason": reason, "message": message,
                  "lastTransitionTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")})


CRD_FILES = {"TrainJob": "trainer/trainjob.yaml", "Experiment": "katib/experiment.yaml",
             "MPIJob": "mpi-operator/mpijob.yaml"}


def crd_errors(doc: dict) -> list[str]:
    """Schema errors of an object against its vendored CRD, unknown fields included (the API server prunes
    them silently: a typo would be lost, not refused)."""
    import jsonschema

    path = CRDS / CRD_FILES[doc["kind"]]
    if not path.exists():
        pytest.skip(f"{path} not vendored")
    schema = yaml.safe_load(path.read_text())["openAPIV3Schema"]
    errors = [f"{e.message} at {list(e.path)}"
              for e in jsonschema.Draft7Validator(_no_formats(schema)).iter_errors(doc)]

    def unknown(obj, sch, where):
        if sch.get("x-kubernetes-preserve-unknown-fields") or not isinstance(obj, dict):
            if isinstance(obj, list) and "items" in sch:
                for i, x in enumerate(obj):
                    unknown(x, sch["items"], f"{where}[{i}]")
            return
        props = sch.get("properties")
        if props is None:
            return
        for k, v in obj.items():
            if k not in props:
                errors.append(f"unknown field {where}.{k}")
            elif where == "" and k == "metadata":
                continue
            else:
                unknown(v, props[k], f"{where}.{k}")

    unknown(doc, schema, "")
    return errors


def _no_formats(schema):
    """int-or-string and quantity formats are Kubernetes', not JSON Schema's: keep types, drop formats."""
    if isinstance(schema, dict):
        out = {k: _no_formats(v) for k, v in schema.items() if k not in ("format", "x-kubernetes-validations")}
        if schema.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        return out
    if isinstance(schema, list):
        return [_no_formats(s) for s in schema]
    return schema


