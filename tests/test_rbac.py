"""RBAC for every API call the code makes in the cluster, and multi-user Kubeflow Pipelines.

* API_CALLS is the table of every Kubernetes API call (and every Kubeflow Pipelines API call, which multi-user
  KFP authorizes with a SubjectAccessReview on pipelines.kubeflow.org resources: kubeflow/pipelines 2.16.0
  backend/src/apiserver/server/{pipeline,pipeline_upload,experiment,run,job}_server.go, resource_manager
  IsAuthorized) with its verb, API group, resource, namespace, the service accounts that make it and where in
  the code. A static scan of components/, pipelines/, rentalml/, inference/ and streaming/ finds every call
  site of the Kubernetes and KFP clients and fails on one the table does not list, so the table grows with
  the code.
* Each call is checked against the rendered Roles/ClusterRoles/RoleBindings (plus the ClusterRoles Kubeflow
  installs that we bind to) with Kubernetes RBAC semantics (kubernetes/kubernetes v1.32.0
  plugin/pkg/auth/authorizer/rbac/rbac.go RuleAllows and pkg/apis/rbac/v1/evaluation_helpers.go VerbMatches /
  APIGroupMatches / ResourceMatches / ResourceNameMatches; subjects as in
  staging/src/k8s.io/apiserver/pkg/authentication/serviceaccount/util.go: user
  `system:serviceaccount:<ns>:<name>`, groups `system:serviceaccounts`, `system:serviceaccounts:<ns>`).
* Multi-user KFP: `rentalml pipeline submit` through the kfp 2.17.3 client against a loopback server that
  records the requests: every call that takes a namespace carries the profile's; the CronJobs pass it; the
  submitting service account is bound to kubeflow-pipelines-edit; the profile (not our kustomization) owns
  the namespace.
"""

from __future__ import annotations

import ast
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml
from test_platform_serving import by_kind, render_targets

ROOT = Path(__file__).resolve().parents[1]
NS = "rentalml"
SCANNED = ("components", "pipelines", "rentalml", "inference", "streaming")
#: the run's service account in multi-user KFP (the API server's default pipeline runner there) and ours
RUNNERS = ("default-editor", "rentalml-pipeline")


@dataclass(frozen=True)
class ApiCall:
    verbs: tuple[str, ...]
    group: str
    resource: str
    service_accounts: tuple[str, ...]
    code: tuple[str, ...]  # "path:function" of each call site
    why: str
    namespace: str = NS


KSERVE, KATIB, TRAINER, KFP = "serving.kserve.io", "kubeflow.org", "trainer.kubeflow.org", "pipelines.kubeflow.org"

#: Every API call of the code in the cluster. Add a row with each new call (test_every_client_call_is_in_the_table
#: finds unlisted call sites).
API_CALLS = [
    # deploy/publish steps (pipeline pods) and `rentalml ab promote|rollback --cluster`
    ApiCall(("get",), KSERVE, "inferenceservices", RUNNERS, ("rentalml/kserve.py:get_isvc",),
            "deploy, publish (live_target) and ab promote/rollback read the InferenceService; deploy polls it "
            "until the predictor revision is ready"),
    ApiCall(("patch",), KSERVE, "inferenceservices", RUNNERS, ("rentalml/kserve.py:json_patch",),
            "deploy: JSON Patch of the predictor's versions and the transformer's arms; ab promote/rollback: "
            "the transformer's arms"),
    # tune step in cluster mode: a Katib Experiment; train step with num_nodes > 1: a TrainJob
    ApiCall(("create", "get", "list", "watch"), KATIB, "experiments", RUNNERS,
            ("rentalml/training/jobs.py:create_and_wait", "rentalml/training/jobs.py:finished"),
            "tune step: create the Experiment and poll it to Succeeded (rentalml/training/katib.py "
            "run_experiment); list/watch for the kubeflow SDK's waiters"),
    ApiCall(("create", "get", "list", "watch"), TRAINER, "trainjobs", RUNNERS,
            ("rentalml/training/jobs.py:create_and_wait", "rentalml/training/jobs.py:finished"),
            "train step (num_nodes > 1): create the TrainJob and poll it to Complete (jobs.py run_trainjob)"),
    # `rentalml pipeline submit` (weekly CronJob, drift CronJob via `monitor drift --retrain kfp`): KFP API
    ApiCall(("list",), KFP, "pipelines", ("rentalml-pipeline",), ("pipelines/cli.py:_pipeline_id",),
            "find rentalml-training in the profile"),
    ApiCall(("create", "list"), KFP, "pipelines", ("rentalml-pipeline",), ("pipelines/cli.py:_submit",),
            "upload the pipeline or a new version (resource pipelines, pipeline_upload_server.go), list versions"),
    ApiCall(("list", "create"), KFP, "experiments", ("rentalml-pipeline",), ("pipelines/cli.py:_submit",),
            "find or create the experiment (kfp Client.create_experiment)"),
    ApiCall(("create",), KFP, "runs", ("rentalml-pipeline",), ("pipelines/cli.py:_submit",), "start the run"),
    ApiCall(("create",), KFP, "jobs", ("rentalml-pipeline",), ("pipelines/cli.py:_submit",),
            "submit --schedule: a recurring run"),
]

#: ClusterRoles that Kubeflow installs and our RoleBindings reference, with their aggregated rules flattened:
#: kubeflow/pipelines 2.16.0 manifests/kustomize/base/installs/multi-user/view-edit-cluster-roles.yaml
#: (kubeflow-pipelines-edit aggregates aggregate-to-kubeflow-pipelines-edit and, through
#: kubeflow-pipelines-view, aggregate-to-kubeflow-pipelines-view)
UPSTREAM_CLUSTER_ROLES = {
    "kubeflow-pipelines-edit": [
        {"apiGroups": [KFP], "resources": ["pipelines", "pipelineversions"], "verbs": ["create", "delete", "update"]},
        {"apiGroups": [KFP], "resources": ["experiments"], "verbs": ["archive", "create", "delete", "unarchive"]},
        {"apiGroups": [KFP], "resources": ["runs"],
         "verbs": ["archive", "create", "delete", "retry", "terminate", "unarchive", "reportMetrics", "readArtifact"]},
        {"apiGroups": [KFP], "resources": ["jobs"], "verbs": ["create", "delete", "disable", "enable"]},
        {"apiGroups": ["kubeflow.org"], "resources": ["scheduledworkflows"], "verbs": ["*"]},
        {"apiGroups": ["argoproj.io"], "resources": ["cronworkflows", "cronworkflows/finalizers", "workflows",
                                                     "workflows/finalizers", "workfloweventbindings",
                                                     "workflowtemplates", "workflowtaskresults"], "verbs": ["*"]},
        {"apiGroups": [KFP], "resources": ["pipelines", "pipelineversions", "experiments", "jobs"],
         "verbs": ["get", "list"]},
        {"apiGroups": [KFP], "resources": ["runs"], "verbs": ["get", "list", "readArtifact"]},
        {"apiGroups": ["kubeflow.org"], "resources": ["viewers"], "verbs": ["create", "get", "delete"]},
        {"apiGroups": [KFP], "resources": ["visualizations"], "verbs": ["create"]},
    ],
}


# --- RBAC semantics ------------------------------------------------------------------------------------------------

def _rule_allows(rule: dict, verb: str, group: str, resource: str, name: str | None = None) -> bool:
    """rbac.go RuleAllows (resource requests): verb, API group, resource (`*`, `res/sub`, `*/sub`) and, when the
    rule lists resourceNames, the object's name (never matched by create/list/watch, which name none)."""
    verbs, groups, resources = rule.get("verbs", []), rule.get("apiGroups", []), rule.get("resources", [])
    if not ("*" in verbs or verb in verbs) or not ("*" in groups or group in groups):
        return False
    res, _, sub = resource.partition("/")
    if not ("*" in resources or resource in resources or (sub and f"*/{sub}" in resources)):
        return False
    names = rule.get("resourceNames") or []
    return not names or (name is not None and name in names)


def _subject_matches(subject: dict, binding_ns: str | None, sa_ns: str, sa: str) -> bool:
    kind = subject.get("kind")
    if kind == "ServiceAccount":
        return subject.get("name") == sa and (subject.get("namespace") or binding_ns) == sa_ns
    if kind == "User":
        return subject.get("name") == f"system:serviceaccount:{sa_ns}:{sa}"
    if kind == "Group":
        return subject.get("name") in ("system:serviceaccounts", f"system:serviceaccounts:{sa_ns}",
                                       "system:authenticated")
    return False


def allowed(docs: list[dict], sa: str, verb: str, group: str, resource: str, namespace: str,
            sa_ns: str = NS) -> list[str]:
    """The bindings that allow `sa` the request in `namespace` (empty: denied). Roles resolve in the binding's
    namespace; ClusterRoles from the rendered objects, else the upstream ones above."""
    roles = {(d["metadata"].get("namespace"), d["metadata"]["name"]): d.get("rules") or []
             for d in docs if d["kind"] == "Role"}
    cluster_roles = dict(UPSTREAM_CLUSTER_ROLES)
    cluster_roles.update({d["metadata"]["name"]: d.get("rules") or [] for d in docs if d["kind"] == "ClusterRole"})
    hits = []
    for b in docs:
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        b_ns = b["metadata"].get("namespace") if b["kind"] == "RoleBinding" else None
        if b_ns is not None and b_ns != namespace:
            continue
        if not any(_subject_matches(s, b_ns, sa_ns, sa) for s in b.get("subjects") or []):
            continue
        ref = b["roleRef"]
        rules = roles.get((b_ns, ref["name"]), []) if ref["kind"] == "Role" else cluster_roles.get(ref["name"], [])
        if any(_rule_allows(r, verb, group, resource) for r in rules):
            hits.append(f"{b['kind']}/{b['metadata']['name']}")
    return hits


def test_rbac_semantics():
    """The evaluator on the rules' edge cases (evaluation_helpers.go): wildcards, subresources, resourceNames,
    a Role bound in another namespace, a ServiceAccount of another namespace, group subjects."""
    role = {"kind": "Role", "metadata": {"name": "r", "namespace": "a"},
            "rules": [{"apiGroups": ["g"], "resources": ["things"], "verbs": ["get", "patch"]},
                      {"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["*"]},
                      {"apiGroups": ["g"], "resources": ["named"], "verbs": ["get"], "resourceNames": ["x"]}]}
    bind = {"kind": "RoleBinding", "metadata": {"name": "b", "namespace": "a"},
            "roleRef": {"kind": "Role", "name": "r"}, "subjects": [{"kind": "ServiceAccount", "name": "sa",
                                                                      "namespace": "a"}]}
    docs = [role, bind]
    assert allowed(docs, "sa", "get", "g", "things", "a", sa_ns="a") == ["RoleBinding/b"]
    assert not allowed(docs, "sa", "create", "g", "things", "a", sa_ns="a")
    assert not allowed(docs, "sa", "get", "other", "things", "a", sa_ns="a")
    assert allowed(docs, "sa", "update", "any", "things/status", "a", sa_ns="a")
    assert not allowed(docs, "sa", "get", "g", "named", "a", sa_ns="a")  # a name-restricted rule
    assert not allowed(docs, "sa", "get", "g", "things", "b", sa_ns="a")  # binding in a
    assert not allowed(docs, "sa", "get", "g", "things", "a", sa_ns="b")  # SA of b
    group = {**bind, "subjects": [{"kind": "Group", "name": "system:serviceaccounts:a"}]}
    assert allowed([role, group], "anyone", "patch", "g", "things", "a", sa_ns="a")


# --- the table against the code ------------------------------------------------------------------------------------

#: Kubernetes client calls (any receiver) and kfp Client calls (receiver named *client, as the code names it)
CALL = re.compile(r"\.(?:(?:create|get|patch|list|delete|replace|read|watch)_namespaced_\w+|call_api)\(|\bWatch\(\)"
                  r"|client\.(?:upload_pipeline|upload_pipeline_version|create_experiment|get_experiment"
                  r"|list_experiments|run_pipeline|create_recurring_run|list_pipelines|list_pipeline_versions"
                  r"|get_pipeline_id|create_run_from_pipeline_\w+)\(")


def client_call_sites() -> dict[str, list[int]]:
    """`path:function` -> line numbers of every Kubernetes/KFP client call in the deployables and the core."""
    sites: dict[str, list[int]] = {}
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            if not CALL.search(text):
                continue
            funcs = [(n.lineno, n.end_lineno, n.name) for n in ast.walk(ast.parse(text))
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            for i, line in enumerate(text.splitlines(), 1):
                if CALL.search(line) and not line.lstrip().startswith("#"):
                    inner = [f for f in funcs if f[0] <= i <= f[1]]
                    name = min(inner, key=lambda f: f[1] - f[0])[2] if inner else "<module>"
                    sites.setdefault(f"{path.relative_to(ROOT)}:{name}", []).append(i)
    return sites


def test_every_client_call_is_in_the_table():
    """Every call site of CustomObjectsApi / ApiClient.call_api / a watch / the kfp Client in components/,
    pipelines/, rentalml/, inference/ and streaming/ is a row of API_CALLS (and every row still exists), so
    a new API call cannot ship without its RBAC row. The loopback stand-ins for the API server and KFP
    (components/kubefake.py) serve requests and make none."""
    sites = {k: v for k, v in client_call_sites().items() if not k.startswith("components/kubefake.py:")}
    listed = {c for row in API_CALLS for c in row.code}
    assert sites, "the scan found no client call at all"
    missing = sorted(set(sites) - listed)
    assert not missing, "API calls without an RBAC row in API_CALLS: " + ", ".join(
        f"{m} (lines {sites[m]})" for m in missing)
    stale = sorted(listed - set(sites))
    assert not stale, f"rows of API_CALLS whose call site is gone: {stale}"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    return render_targets(tmp_path_factory.mktemp("kustomize"))


def test_every_api_call_is_allowed_by_the_rendered_rbac(rendered):
    """Each row of API_CALLS, for each of its service accounts, is allowed in its namespace by the rendered
    RBAC of root, dev and prod (Kubernetes RBAC for the Kubernetes API; the same RBAC through KFP's
    SubjectAccessReview for the pipelines.kubeflow.org rows)."""
    denied = []
    for target, docs in rendered.items():
        sas = set(by_kind(docs, "ServiceAccount")) | {"default-editor"}  # the Profile controller creates it
        for row in API_CALLS:
            for sa in row.service_accounts:
                assert sa in sas, f"{target}: {sa} is not a service account of the namespace"
                for verb in row.verbs:
                    if not allowed(docs, sa, verb, row.group, row.resource, row.namespace):
                        denied.append(f"{target}: {sa} {verb} {row.group}/{row.resource} in {row.namespace} "
                                      f"({', '.join(row.code)}: {row.why})")
    assert not denied, "denied by RBAC:\n" + "\n".join(denied)


def test_rbac_table_format():
    """The table as a reviewer reads it (verb, apiGroup, resource, namespace, serviceAccount, code)."""
    lines = [f"{','.join(r.verbs):<24} {r.group:<24} {r.resource:<18} {r.namespace:<9} "
             f"{','.join(r.service_accounts):<34} {','.join(r.code)}" for r in API_CALLS]
    assert len(lines) == len(API_CALLS) and all(r.group and r.resource and r.verbs for r in API_CALLS)
    kinds = {(r.group, r.resource) for r in API_CALLS}
    assert {(KSERVE, "inferenceservices"), (KATIB, "experiments"), (TRAINER, "trainjobs"),
            (KFP, "pipelines"), (KFP, "experiments"), (KFP, "runs")} <= kinds
    print("\n".join(lines))


# --- multi-user Kubeflow Pipelines -------------------------------------------------------------------------------

class _FakeKfp:
    """A loopback KFP v2beta1 API (the paths kfp 2.17.3's generated kfp_server_api calls) that records each
    request: (method, path, query, JSON body or None, headers)."""

    def __init__(self, existing_pipeline: bool = False):
        self.requests: list[tuple[str, str, dict, dict | None, dict]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                url = urlparse(self.path)
                body = json.loads(raw) if raw and "json" in (self.headers.get("Content-Type") or "") else None
                fake.requests.append((self.command, url.path, parse_qs(url.query), body,
                                      {k.lower(): v for k, v in self.headers.items()}))
                p = url.path
                if p.endswith("/pipelines") and self.command == "GET":
                    out = {"pipelines": [{"pipeline_id": "p1", "display_name": "rentalml-training"}]} \
                        if existing_pipeline else {}
                elif p.endswith("/pipelines/upload"):
                    out = {"pipeline_id": "p1", "display_name": "rentalml-training"}
                elif p.endswith("/pipelines/upload_version"):
                    out = {"pipeline_id": "p1", "pipeline_version_id": "v2"}
                elif p.endswith("/versions"):
                    out = {"pipeline_versions": [{"pipeline_id": "p1", "pipeline_version_id": "v1"}]}
                elif p.endswith("/experiments") and self.command == "POST":
                    out = {"experiment_id": "e1", **(body or {})}
                elif p.endswith("/runs"):
                    out = {"run_id": "r1"}
                elif p.endswith("/recurringruns"):
                    out = {"recurring_run_id": "rr1"}
                else:
                    out = {}
                data = json.dumps(out).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("existing", [False, True], ids=["first-upload", "new-version"])
def test_submit_names_the_profile_namespace_in_every_kfp_call(existing, monkeypatch, tmp_path):
    """Multi-user KFP (kubeflow/pipelines 2.16.0 experiment_server.go / pipeline_upload_server.go: an
    experiment or pipeline without a namespace is rejected or becomes a shared one; ListPipelines without
    one lists only shared pipelines): `rentalml pipeline submit` through kfp 2.17.3's Client sends the
    profile namespace (from $KFP_NAMESPACE, as the CronJobs set it) when it lists and uploads the pipeline
    and lists and creates the experiment; the run belongs to that experiment; the projected service-account
    token authenticates every request."""
    from rentalml.pipelines import cli

    token = tmp_path / "token"
    token.write_text("sa-token")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))
    monkeypatch.setenv("KFP_NAMESPACE", NS)
    with _FakeKfp(existing_pipeline=existing) as kfp:
        out = cli._submit(kfp.host, {"source": "db"}, None, None, "rentalml", cli.kfp_namespace())
    assert out["namespace"] == NS and out["run_id"] == "r1"
    reqs = [(m, p.removeprefix("/apis/v2beta1"), q, b, h) for m, p, q, b, h in kfp.requests]
    by_path = {}
    for m, p, q, b, _h in reqs:
        by_path.setdefault((m, p), []).append((q, b))
    assert by_path[("GET", "/pipelines")][0][0]["namespace"] == [NS]
    if existing:
        assert ("POST", "/pipelines/upload") not in by_path
        assert ("POST", "/pipelines/upload_version") in by_path
    else:
        assert by_path[("POST", "/pipelines/upload")][0][0]["namespace"] == [NS]
    assert by_path[("GET", "/experiments")][0][0]["namespace"] == [NS]
    assert by_path[("POST", "/experiments")][0][1]["namespace"] == NS
    assert by_path[("POST", "/runs")][0][1]["experiment_id"] == "e1"
    unauthenticated = [(m, p) for m, p, q, b, h in reqs if h.get("authorization") != "Bearer sa-token"]
    assert not unauthenticated, unauthenticated


def test_kfp_namespace_resolution(monkeypatch, tmp_path):
    """--namespace wins, then $KFP_NAMESPACE, then the pod's service-account namespace file; none outside a
    pod (single-user KFP)."""
    from rentalml.pipelines import cli

    monkeypatch.delenv("KFP_NAMESPACE", raising=False)
    monkeypatch.setattr(cli, "SA_NAMESPACE", tmp_path / "missing")
    assert cli.kfp_namespace() is None
    (tmp_path / "ns").write_text("from-pod\n")
    monkeypatch.setattr(cli, "SA_NAMESPACE", tmp_path / "ns")
    assert cli.kfp_namespace() == "from-pod"
    monkeypatch.setenv("KFP_NAMESPACE", "from-env")
    assert cli.kfp_namespace() == "from-env" and cli.kfp_namespace("explicit") == "explicit"


def _cronjob_env(doc: dict) -> dict:
    c = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e for e in c.get("env", [])}


def test_submitting_cronjobs_pass_their_namespace_and_may_edit_pipelines(rendered):
    """The CronJobs that submit to KFP (weekly training, drift retraining) set KFP_NAMESPACE from their own
    namespace (downward API) and run as rentalml-pipeline, which a RoleBinding gives the ClusterRole
    kubeflow-pipelines-edit (kubeflow/pipelines 2.16.0 manifests/kustomize/base/installs/multi-user/
    view-edit-cluster-roles.yaml) in the profile namespace."""
    for target, docs in rendered.items():
        crons = by_kind(docs, "CronJob")
        for name in ("rentalml-training-weekly", "rentalml-drift-check"):
            env = _cronjob_env(crons[name])
            assert "KFP_HOST" in env, (target, name)
            assert env.get("KFP_NAMESPACE", {}).get("valueFrom", {}).get("fieldRef", {}).get(
                "fieldPath") == "metadata.namespace", (target, name)
            spec = crons[name]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            assert spec["serviceAccountName"] == "rentalml-pipeline", (target, name)
        edit = [b for b in by_kind(docs, "RoleBinding").values()
                if b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                    "name": "kubeflow-pipelines-edit"}]
        assert any({"kind": "ServiceAccount", "name": "rentalml-pipeline", "namespace": NS} in b["subjects"]
                   for b in edit), target
        for verb, resource in (("create", "pipelines"), ("create", "experiments"), ("create", "runs")):
            assert allowed(docs, "rentalml-pipeline", verb, KFP, resource, NS), (target, verb, resource)


def test_the_profile_not_the_kustomization_owns_the_namespace(rendered, tmp_path):
    """Kubeflow's Profile controller creates a profile's namespace and refuses one it did not create
    (kubeflow/dashboard v2.0.0 components/profile-controller/controllers/profile_controller.go: "namespace
    already exist, but not owned by profile creator"; Kubeflow 26.03 ships the same controller as Profiles
    v1.10.0). So root, dev and prod render no Namespace, and manifests/profile renders the Profile whose
    name is the namespace every object lands in."""
    import shutil
    import subprocess

    for target, docs in rendered.items():
        assert not by_kind(docs, "Namespace"), f"{target} creates the profile's namespace"
        assert {d["metadata"].get("namespace") for d in docs} == {NS}, target
    res = subprocess.run([shutil.which("kubectl"), "kustomize", str(ROOT / "manifests" / "profile")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    [profile] = [d for d in yaml.safe_load_all(res.stdout) if d]
    assert profile["apiVersion"] == "kubeflow.org/v1" and profile["kind"] == "Profile"
    assert profile["metadata"]["name"] == NS and profile["spec"]["owner"]["kind"] == "User"
