"""A loopback stand-in for the Kubernetes API server's custom-resource endpoints, so the real `kubernetes`
client (a kubeconfig, or `CustomObjectsApi` from `api()`) runs unchanged against it: the local cluster
(`rentalml pipeline local-cluster`: deploy/publish patching the rendered InferenceService) and the tests (the
tune and train steps creating Katib Experiments and TrainJobs) use this one implementation.

What it implements, per upstream:
* create (POST `/apis/<group>/<version>/namespaces/<ns>/<plural>`): the body's apiVersion must be the path's
  (400 BadRequest); `validate` (an object → its errors, e.g. the vendored CRD schema the tests hold) refusing
  is 422 Invalid; a validating admission webhook refusing is 403 Forbidden "admission webhook ... denied the
  request" (Kubeflow Trainer's TrainJob webhook by default, `trainjob_webhook`); a taken name is 409
  AlreadyExists; `generateName` gets a random suffix; the server sets namespace, uid, resourceVersion,
  creationTimestamp and generation 1.
* read (GET `.../<plural>/<name>`, 404 NotFound when absent): a `controllers[plural]` function is run on the
  stored object first, moving its status forward as the operator would (and it may do the work).
* PATCH by Content-Type, as the apiserver does for custom resources
  (kubernetes/kubernetes staging/src/k8s.io/apiserver/pkg/endpoints/handlers/patch.go and
  staging/src/k8s.io/apiextensions-apiserver/pkg/apiserver/customresource_handler.go; the docs page
  "Update API Objects in Place Using kubectl patch": "Strategic merge patch is not supported for custom
  resources"):
  - `application/json-patch+json`: RFC 6902 (the `jsonpatch` library); a failed `test` or a bad path → 422;
  - `application/merge-patch+json`: RFC 7386 (the `json-merge-patch` library): maps merge, a list in the patch
    replaces the whole list, null deletes;
  - `application/strategic-merge-patch+json` → 415 Unsupported Media Type (custom resources);
  - `application/apply-patch+yaml` (server-side apply) → 415 here: not implemented by this stand-in.
  The result must keep metadata.name, namespace, uid, apiVersion and kind (422 Invalid: immutable) and pass
  `validate` and the webhooks as a create does; resourceVersion goes up on every write.
* metadata.generation bumps when the spec changes. KServe/Knative's status is simulated for InferenceServices:
  a component whose spec changed (other than canaryTrafficPercent, a traffic-only field) gets a new revision, at
  once ready (`ready=False` keeps new revisions not ready, to test waiting).
It serves only GET, POST (create) and PATCH of namespaced custom objects; every request is recorded (`requests`,
and `calls` as (verb, group, plural, namespace, name) for the RBAC checks).
"""

from __future__ import annotations

import copy
import json
import re
import threading
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_PATH = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/?]+)"
                   r"(?:/(?P<name>[^/?]+))?")
TRAFFIC_ONLY = {"canaryTrafficPercent"}
KSERVE = ("serving.kserve.io", "inferenceservices")
JSON_PATCH, MERGE_PATCH = "application/json-patch+json", "application/merge-patch+json"
VERBS = {"GET": "get", "POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}
#: metadata the server owns or that names the object: a patch may not change it
IMMUTABLE_METADATA = ("name", "namespace", "uid")
#: metadata only the server writes
SERVER_METADATA = ("uid", "resourceVersion", "generation", "creationTimestamp", "managedFields", "selfLink")

Check = Callable[[dict], list[str]]


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
            "message": message}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------------ webhooks
def trainjob_webhook(doc: dict) -> list[str]:
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
    """Append a True condition to status.conditions, as an operator does (a terminal one turns the other
    terminal conditions False): for `controllers`."""
    conds = obj.setdefault("status", {}).setdefault("conditions", [])
    for c in conds:
        if c["type"] != kind and c["status"] == "True" and kind in ("Succeeded", "Complete", "Failed"):
            c["status"] = "False"
    conds.append({"type": kind, "status": "True", "reason": reason, "message": message,
                  "lastTransitionTime": _now()})


# ------------------------------------------------------------------------------------------ the server
class FakeKubeApi:
    def __init__(self, ready: bool = True, *, controllers: dict[str, Callable[[dict], None]] | None = None,
                 validate: Check | None = None, webhooks: Iterable[Check] = (trainjob_webhook,)):
        self.objects: dict[tuple, dict] = {}
        self.requests: list[dict] = []
        self.calls: list[tuple] = []
        self.ready = ready
        self.controllers = dict(controllers or {})
        self.validate = validate
        self.webhooks = tuple(webhooks)
        self._revisions: dict[tuple, int] = {}
        self._resource_version = 0
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None

    # -------------------------------------------------------------------- objects
    def put(self, doc: dict, namespace: str | None = None) -> dict:
        """Store an object as `kubectl apply` would create it (generation 1, first revisions ready)."""
        doc = copy.deepcopy(doc)
        group, version = doc["apiVersion"].split("/")
        plural = doc["kind"].lower() + "s"
        ns = namespace or doc["metadata"].get("namespace") or "default"
        doc["metadata"]["namespace"] = ns
        doc["metadata"]["generation"] = 1
        key = (group, ns, plural, doc["metadata"]["name"])
        with self._lock:
            doc["metadata"].setdefault("uid", str(uuid.uuid4()))
            doc["metadata"]["resourceVersion"] = self._next_version()
            self.objects[key] = doc
            self._roll(key, doc, None)
        return doc

    def get(self, group: str, namespace: str, plural: str, name: str) -> dict:
        with self._lock:
            return copy.deepcopy(self.objects[(group, namespace, plural, name)])

    def _next_version(self) -> str:
        self._resource_version += 1
        return str(self._resource_version)

    def _roll(self, key: tuple, new: dict, old: dict | None) -> None:
        """KServe/Knative: a new revision per component whose spec changed (InferenceServices only)."""
        if (key[0], key[2]) != KSERVE:
            return
        spec, before = new.get("spec") or {}, (old or {}).get("spec") or {}
        status = new.setdefault("status", {})
        comps = status.setdefault("components", {})
        for comp, body in spec.items():
            if not isinstance(body, dict):
                continue
            strip = lambda d: {k: v for k, v in (d or {}).items() if k not in TRAFFIC_ONLY}  # noqa: E731
            if old is not None and strip(body) == strip(before.get(comp)):
                continue
            n = self._revisions.get((key, comp), 0) + 1
            self._revisions[(key, comp)] = n
            rev = f"{new['metadata']['name']}-{comp}-{n:05d}"
            c = comps.setdefault(comp, {})
            c["latestCreatedRevision"] = rev
            if self.ready or old is None:
                c["latestReadyRevision"] = rev
        status["observedGeneration"] = new["metadata"]["generation"]

    def mark_ready(self) -> None:
        with self._lock:
            for doc in self.objects.values():
                for c in (doc.get("status") or {}).get("components", {}).values():
                    c["latestReadyRevision"] = c.get("latestCreatedRevision")

    def _refused(self, doc: dict) -> tuple[int, dict] | None:
        """What the API server answers to a create or update it does not admit (None: admitted). `validate`
        sees what a client writes: the server's own metadata fields and the status (the operator's, through the
        status subresource) are left out."""
        mine = {k: v for k, v in doc.items() if k != "status"}
        mine["metadata"] = {k: v for k, v in (doc.get("metadata") or {}).items() if k not in SERVER_METADATA}
        errors = self.validate(mine) if self.validate is not None else []
        if errors:
            return 422, _status(422, "Invalid", f"{doc.get('kind')} {doc['metadata'].get('name')!r} is invalid: "
                                + "; ".join(errors))
        denied = [e for hook in self.webhooks for e in hook(doc)]
        if denied:
            return 403, _status(403, "Forbidden", f"admission webhook denied the request: {'; '.join(denied)}")
        return None

    # -------------------------------------------------------------------- HTTP
    def handle(self, method: str, path: str, content_type: str, body: bytes) -> tuple[int, dict]:
        m = _PATH.match(path)
        payload = json.loads(body) if body else None
        self.requests.append({"method": method, "path": path.split("?")[0], "content_type": content_type,
                              "body": payload})
        if not m:
            return 404, _status(404, "NotFound", f"no route {path}")
        group, version, ns, plural, name = m["group"], m["version"], m["ns"], m["plural"], m["name"]
        if method == "POST" and isinstance(payload, dict):
            name = name or (payload.get("metadata") or {}).get("name")
        self.calls.append((VERBS.get(method, method.lower()), group, plural, ns, name))
        with self._lock:
            if method == "GET" and m["name"]:
                return self._get((group, ns, plural, name))
            if method == "POST" and not m["name"]:
                return self._create(group, version, ns, plural, payload)
            if method == "PATCH" and m["name"]:
                return self._patch((group, ns, plural, name), content_type.split(";")[0].strip(), payload)
        return 405, _status(405, "MethodNotAllowed", f"{method} {path}")

    def _get(self, key: tuple) -> tuple[int, dict]:
        doc = self.objects.get(key)
        if doc is None:
            return 404, _status(404, "NotFound", f'{key[2]}.{key[0]} "{key[3]}" not found')
        if key[2] in self.controllers:
            self.controllers[key[2]](doc)
        return 200, copy.deepcopy(doc)

    def _create(self, group: str, version: str, ns: str, plural: str, payload) -> tuple[int, dict]:
        if not isinstance(payload, dict):
            return 400, _status(400, "BadRequest", "the body of a create must be an object")
        if payload.get("apiVersion") != f"{group}/{version}":
            return 400, _status(400, "BadRequest", f"apiVersion {payload.get('apiVersion')} on {group}/{version}")
        doc = copy.deepcopy(payload)
        meta = doc.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        refused = self._refused(doc)
        if refused:
            return refused
        key = (group, ns, plural, meta["name"])
        if key in self.objects:
            return 409, _status(409, "AlreadyExists", f'{plural}.{group} "{meta["name"]}" already exists')
        meta.update(namespace=ns, uid=str(uuid.uuid4()), resourceVersion=self._next_version(), generation=1,
                    creationTimestamp=_now())
        self.objects[key] = doc
        self._roll(key, doc, None)
        return 201, copy.deepcopy(doc)

    def _patch(self, key: tuple, ctype: str, patch) -> tuple[int, dict]:
        import json_merge_patch
        import jsonpatch

        old = self.objects.get(key)
        if old is None:
            return 404, _status(404, "NotFound", f'{key[2]}.{key[0]} "{key[3]}" not found')
        if ctype == JSON_PATCH:
            if not isinstance(patch, list):
                return 400, _status(400, "BadRequest", "json patch must be a list of operations")
            try:
                new = jsonpatch.apply_patch(copy.deepcopy(old), patch)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                return 422, _status(422, "Invalid", f"the server rejected our request: {exc}")
        elif ctype == MERGE_PATCH:
            if not isinstance(patch, dict):
                return 400, _status(400, "BadRequest", "merge patch of a non-object replaces the object")
            new = json_merge_patch.merge(copy.deepcopy(old), patch)
        elif ctype in ("application/strategic-merge-patch+json", "application/apply-patch+yaml"):
            return 415, _status(415, "UnsupportedMediaType", "the body of the request was in an unknown format "
                                "- accepted media types include: application/json-patch+json, "
                                "application/merge-patch+json, application/apply-patch+yaml")
        else:
            return 415, _status(415, "UnsupportedMediaType", f"unknown patch type {ctype}")
        meta, old_meta = new.get("metadata") or {}, old["metadata"]
        for field in IMMUTABLE_METADATA:
            if meta.get(field) != old_meta.get(field):
                return 422, _status(422, "Invalid", f"metadata.{field} is immutable")
        for field in ("apiVersion", "kind"):
            if new.get(field) != old.get(field):
                return 422, _status(422, "Invalid", f"{field} is immutable")
        refused = self._refused(new)
        if refused:
            return refused
        if new.get("spec") != old.get("spec"):
            meta["generation"] = int(old_meta.get("generation", 1)) + 1
            new["status"] = copy.deepcopy(old.get("status") or {})
            self._roll(key, new, old)
        meta["resourceVersion"] = self._next_version()
        self.objects[key] = new
        return 200, copy.deepcopy(new)

    def start(self) -> str:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _do(self):
                n = int(self.headers.get("Content-Length") or 0)
                code, doc = api.handle(self.command, self.path, self.headers.get("Content-Type", ""),
                                       self.rfile.read(n) if n else b"")
                data = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _do

            def log_message(self, *a):  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self.url

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def api(self):
        """The real client's CustomObjectsApi pointed at this server (no kubeconfig needed)."""
        from kubernetes import client

        return client.CustomObjectsApi(client.ApiClient(client.Configuration(host=self.url)))

    def write_kubeconfig(self, path: str | Path, namespace: str = "default") -> Path:
        """A kubeconfig naming this server, for `kubernetes.config.load_kube_config()` (KUBECONFIG)."""
        import yaml

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "local",
            "clusters": [{"name": "local", "cluster": {"server": self.url}}],
            "users": [{"name": "local", "user": {"token": "local"}}],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": "local",
                                                       "namespace": namespace}}]}))
        return p

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def patches(self) -> list[dict]:
        return [r for r in self.requests if r["method"] == "PATCH"]

    def api_calls(self) -> set[tuple[str, str, str]]:
        """(verb, group, resource) of every request, for RBAC checks."""
        return {c[:3] for c in self.calls}
