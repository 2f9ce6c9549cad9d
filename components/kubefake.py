"""A loopback stand-in for the Kubernetes API server's custom-resource endpoints, with the API server's patch
semantics, so deploy/publish run through the real kubernetes client (kubeconfig and all) against it.

What it implements, per upstream:
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
* metadata.generation bumps when the spec changes; KServe/Knative's status is simulated: a component whose
  spec changed (other than canaryTrafficPercent, a traffic-only field) gets a new revision, at once ready
  (`ready=False` keeps new revisions not ready, to test waiting).
It serves only GET, POST (create) and PATCH of namespaced custom objects; every request is recorded.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_PATH = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)"
                   r"(?:/(?P<name>[^/?]+))?")
TRAFFIC_ONLY = {"canaryTrafficPercent"}


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
            "message": message}


class FakeKubeApi:
    def __init__(self, ready: bool = True):
        self.objects: dict[tuple, dict] = {}
        self.requests: list[dict] = []
        self.ready = ready
        self._revisions: dict[tuple, int] = {}
        self._lock = threading.Lock()
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
            self.objects[key] = doc
            self._roll(key, doc, None)
        return doc

    def get(self, group: str, namespace: str, plural: str, name: str) -> dict:
        return copy.deepcopy(self.objects[(group, namespace, plural, name)])

    def _roll(self, key: tuple, new: dict, old: dict | None) -> None:
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

    # -------------------------------------------------------------------- HTTP
    def handle(self, method: str, path: str, content_type: str, body: bytes) -> tuple[int, dict]:
        m = _PATH.match(path)
        payload = json.loads(body) if body else None
        self.requests.append({"method": method, "path": path.split("?")[0], "content_type": content_type,
                              "body": payload})
        if not m:
            return 404, _status(404, "NotFound", f"no route {path}")
        group, ns, plural, name = m["group"], m["ns"], m["plural"], m["name"]
        with self._lock:
            if method == "GET" and name:
                doc = self.objects.get((group, ns, plural, name))
                if doc is None:
                    return 404, _status(404, "NotFound", f'{plural}.{group} "{name}" not found')
                return 200, copy.deepcopy(doc)
            if method == "POST" and not name:
                key = (group, ns, plural, payload["metadata"]["name"])
                if key in self.objects:
                    return 409, _status(409, "AlreadyExists", f"{key[3]} already exists")
                payload["metadata"].update(namespace=ns, generation=1)
                self.objects[key] = payload
                self._roll(key, payload, None)
                return 201, copy.deepcopy(payload)
            if method == "PATCH" and name:
                return self._patch((group, ns, plural, name), content_type.split(";")[0].strip(), payload)
        return 405, _status(405, "MethodNotAllowed", f"{method} {path}")

    def _patch(self, key: tuple, ctype: str, patch) -> tuple[int, dict]:
        import json_merge_patch
        import jsonpatch

        old = self.objects.get(key)
        if old is None:
            return 404, _status(404, "NotFound", f'{key[2]}.{key[0]} "{key[3]}" not found')
        if ctype == "application/json-patch+json":
            if not isinstance(patch, list):
                return 400, _status(400, "BadRequest", "json patch must be a list of operations")
            try:
                new = jsonpatch.apply_patch(copy.deepcopy(old), patch)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                return 422, _status(422, "Invalid", f"the server rejected our request: {exc}")
        elif ctype == "application/merge-patch+json":
            if not isinstance(patch, dict):
                return 400, _status(400, "BadRequest", "merge patch of a non-object replaces the object")
            new = json_merge_patch.merge(copy.deepcopy(old), patch)
        elif ctype in ("application/strategic-merge-patch+json", "application/apply-patch+yaml"):
            return 415, _status(415, "UnsupportedMediaType", "the body of the request was in an unknown format "
                                "- accepted media types include: application/json-patch+json, "
                                "application/merge-patch+json, application/apply-patch+yaml")
        else:
            return 415, _status(415, "UnsupportedMediaType", f"unknown patch type {ctype}")
        if new["metadata"].get("name") != old["metadata"]["name"]:
            return 422, _status(422, "Invalid", "metadata.name is immutable")
        if new.get("spec") != old.get("spec"):
            new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
            new["status"] = copy.deepcopy(old.get("status") or {})
            self._roll(key, new, old)
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
        verbs = {"GET": "get", "POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}
        out = set()
        for r in self.requests:
            m = _PATH.match(r["path"])
            if m:
                out.add((verbs[r["method"]], m["group"], m["plural"]))
        return out
