"""Istio authorization matrix: every flow the system needs, evaluated over the Istio AuthorizationPolicies that
apply to it in a Kubeflow 26.03 cluster, and the unrelated ones refused.

The profile namespace is in the mesh: the Profile controller labels it `istio-injection: enabled` and creates the
ALLOW policy `ns-owner-access-istio` (kubeflow/kubeflow v1.10.0, the Profiles image Kubeflow 26.03 installs:
components/profile-controller/controllers/profile_controller.go, Reconcile and getAuthorizationPolicy; the
header `kubeflow-userid` and an empty prefix from kubeflow/manifests 26.03
applications/profiles/upstream/manager/kustomization.yaml). Kubeflow also installs `global-deny-all` in the
mesh root namespace (common/istio/istio-install/base/deny_all_authorizationpolicy.yaml). So, unlike the
NetworkPolicies (tests/test_network_policy.py), the sidecar of every pod here refuses what no ALLOW rule admits.

The evaluator follows Istio 1.29.0 (Kubeflow 26.03's Istio) and its reference
https://istio.io/v1.29/docs/reference/config/security/authorization-policy/:

* the policies of a workload are those of the root namespace (istio-system) and of its own namespace whose
  `selector` matches its labels (none = every workload): pilot/pkg/model/authorization.go
  ListAuthorizationPolicies;
* CUSTOM, then DENY, then ALLOW (pilot/pkg/security/authz/builder/builder.go build): a matching DENY refuses;
  with no ALLOW policy the request passes; otherwise some ALLOW policy must match. A policy matches when one of
  its rules does; a policy without rules (`spec: {}`) matches nothing, so as an ALLOW it allows nothing; `{}` as
  a rule matches everything;
* a rule: any `from` source AND any `to` operation AND every `when` condition; inside a source/operation every
  field set must match (values OR'ed), `not*` fields must not; matches are exact, prefix `x*`, suffix `*x` or
  presence `*`;
* `source.namespaces` / `principals` come from the peer's mTLS certificate (model/generator.go
  srcNamespaceGenerator, principalAuthenticated): a source without a sidecar has none, so those fields never
  match it and `notPrincipals: ["*"]` does;
* on TCP traffic an ALLOW rule with HTTP-only fields (methods, paths, hosts, request headers, request
  principals) never matches; in a DENY rule those fields are dropped (model/model.go checkError);
* a pod without a sidecar enforces nothing. A pod has one when its namespace is labelled
  `istio-injection: enabled` unless the label or annotation `sidecar.istio.io/inject` is "false" (the label wins:
  pkg/kube/inject/inject.go injectRequired).

Who has a sidecar (the facts the flows depend on): KFP's pipeline pods do not (kubeflow/pipelines 2.17.0
backend/src/apiserver/template/v2_template.go sets sidecar.istio.io/inject=false on every template); Katib's
suggestion pods do not (kubeflow/katib v0.19.0 pkg/controller.v1beta1/util/labels.go); neither do Katib's
controller and db-manager (kubeflow/manifests 26.03 applications/katib/upstream/components/*); knative-serving
and kubeflow are injected (common/knative/knative-serving/base/patches/namespace-injection.yaml,
common/kubeflow-namespace/base/kubeflow/namespace.yaml); Prometheus (kube-prometheus-stack in `monitoring`) and
the Strimzi operator run outside the mesh; the Kafka pods take the labels of the rendered Kafka's pod template.
Istio's gateways carry their service accounts' identities (common/istio/cluster-local-gateway/base).
Kubeflow's policies for the pods of the namespace `kubeflow` that our flows reach are copied below from
kubeflow/manifests 26.03 (applications/pipeline/upstream/base/installs/multi-user/istio-authorization-config.yaml,
.../third-party/seaweedfs/istio/istio-authorization-policy.yaml, .../metadata/options/istio/...).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from test_network_policy import DENIED, NS, REQUIRED, cluster, reachable
from test_platform_serving import _matches, by_kind, render_targets

ROOT = Path(__file__).resolve().parents[1]
MESH_ROOT = "istio-system"
USERID_HEADER = "kubeflow-userid"  # kubeflow/manifests 26.03 applications/profiles/upstream/manager/kustomization.yaml
INJECT = "sidecar.istio.io/inject"


def ns_owner_access_istio(profile: dict) -> dict:
    """The AuthorizationPolicy the Profile controller creates in the profile's namespace (kubeflow/kubeflow
    v1.10.0 profile_controller.go getAuthorizationPolicy / updateIstioAuthorizationPolicy, with Kubeflow 26.03's
    USERID_HEADER=kubeflow-userid, USERID_PREFIX="" and default principals)."""
    return {"apiVersion": "security.istio.io/v1beta1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "ns-owner-access-istio", "namespace": profile["metadata"]["name"]},
            "spec": {"action": "ALLOW", "rules": [
                {"when": [{"key": f"request.headers[{USERID_HEADER}]", "values": [profile["spec"]["owner"]["name"]]}],
                 "from": [{"source": {"principals": [
                     "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account",
                     "cluster.local/ns/kubeflow/sa/ml-pipeline-ui"]}}]},
                {"when": [{"key": "source.namespace", "values": [profile["metadata"]["name"]]}]},
                {"to": [{"operation": {"paths": ["/healthz", "/metrics", "/wait-for-drain"]}}]},
                {"from": [{"source": {"principals": [
                    "cluster.local/ns/kubeflow/sa/notebook-controller-service-account"]}}],
                 "to": [{"operation": {"methods": ["GET"], "paths": ["*/api/kernels"]}}]},
            ]}}


#: kubeflow/manifests 26.03: the mesh-wide deny and Kubeflow's policies on the `kubeflow` pods our flows reach
KUBEFLOW_AUTHZ = list(yaml.safe_load_all("""
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: global-deny-all, namespace: istio-system}
spec: {}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: ml-pipeline, namespace: kubeflow}
spec:
  selector: {matchLabels: {app: ml-pipeline}}
  rules:
  - from:
    - source:
        principals:
        - cluster.local/ns/kubeflow/sa/ml-pipeline
        - cluster.local/ns/kubeflow/sa/ml-pipeline-ui
        - cluster.local/ns/kubeflow/sa/ml-pipeline-persistenceagent
        - cluster.local/ns/kubeflow/sa/ml-pipeline-scheduledworkflow
        - cluster.local/ns/kubeflow/sa/ml-pipeline-viewer-crd-service-account
        - cluster.local/ns/kubeflow/sa/kubeflow-pipelines-cache
  - when:
    - key: request.headers[kubeflow-userid]
      notValues: ['*']
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: seaweedfs-service, namespace: kubeflow}
spec:
  action: ALLOW
  selector: {matchLabels: {app: seaweedfs}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/kubeflow/sa/ml-pipeline]}}]
  - from: [{source: {principals: [cluster.local/ns/kubeflow/sa/ml-pipeline-ui]}}]
  - {}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: metadata-grpc-service, namespace: kubeflow}
spec:
  action: ALLOW
  selector: {matchLabels: {component: metadata-grpc-server}}
  rules:
  - {}
"""))


# --- the evaluator ------------------------------------------------------------------------------------------------

@dataclass
class Workload:
    namespace: str
    labels: dict
    sidecar: bool
    service_account: str = "default"

    @property
    def principal(self) -> str | None:
        """The mTLS identity its requests carry; None without a sidecar (plaintext)."""
        return f"cluster.local/ns/{self.namespace}/sa/{self.service_account}" if self.sidecar else None


@dataclass
class Request:
    port: int
    protocol: str = "http"  # "http" (HTTP/1.1, HTTP/2, gRPC) or "tcp"
    method: str = "GET"
    path: str = "/"
    headers: dict = field(default_factory=dict)


def _str_match(pattern: str, value: str | None) -> bool:
    """Istio's string match: exact, prefix `x*`, suffix `*x`, `*` = present (non-empty)."""
    if value is None or value == "":
        return False
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def _field(values, not_values, value) -> bool:
    if values and not any(_str_match(p, value) for p in values):
        return False
    return not (not_values and any(_str_match(p, value) for p in not_values))


HTTP_SOURCE = {"requestPrincipals", "notRequestPrincipals"}
HTTP_OPERATION = {"methods", "notMethods", "paths", "notPaths", "hosts", "notHosts"}


class _HttpOnly(Exception):
    pass


def _source_ns(src: Workload) -> str | None:
    return src.namespace if src.principal else None


def _source_matches(s: dict, src: Workload, req: Request, deny: bool) -> bool:
    for key in s:
        if key not in {"principals", "notPrincipals", "namespaces", "notNamespaces"} | HTTP_SOURCE:
            raise NotImplementedError(f"source.{key}")  # ipBlocks etc.: no flow here depends on them
    if req.protocol == "tcp" and HTTP_SOURCE & set(s):
        if not deny:
            raise _HttpOnly
        s = {k: v for k, v in s.items() if k not in HTTP_SOURCE}
    return (_field(s.get("principals"), s.get("notPrincipals"), src.principal)
            and _field(s.get("namespaces"), s.get("notNamespaces"), _source_ns(src))
            and _field(s.get("requestPrincipals"), s.get("notRequestPrincipals"), None))


def _operation_matches(o: dict, req: Request, deny: bool) -> bool:
    for key in o:
        if key not in {"ports", "notPorts"} | HTTP_OPERATION:
            raise NotImplementedError(f"operation.{key}")
    if req.protocol == "tcp" and HTTP_OPERATION & set(o):
        if not deny:
            raise _HttpOnly
        o = {k: v for k, v in o.items() if k not in HTTP_OPERATION}
    host = req.headers.get(":authority")
    return (_field(o.get("ports"), o.get("notPorts"), str(req.port))
            and _field(o.get("methods"), o.get("notMethods"), req.method)
            and _field(o.get("paths"), o.get("notPaths"), req.path)
            and _field(o.get("hosts"), o.get("notHosts"), host))


def _condition_matches(c: dict, src: Workload, req: Request, deny: bool) -> bool:
    key = c["key"]
    if key.startswith("request."):
        if req.protocol == "tcp":
            if not deny:
                raise _HttpOnly
            return True
        if not key.startswith("request.headers["):
            raise NotImplementedError(key)
        value = req.headers.get(key[len("request.headers["):-1].lower())
    elif key == "source.namespace":
        value = _source_ns(src)
    elif key == "source.principal":
        value = src.principal
    elif key == "destination.port":
        value = str(req.port)
    else:
        raise NotImplementedError(key)
    return _field(c.get("values"), c.get("notValues"), value)


def _rule_matches(rule: dict, src: Workload, req: Request, deny: bool) -> bool:
    try:
        return (all(k in ("from", "to", "when") for k in rule)
                and (not rule.get("from") or any(_source_matches(f.get("source", {}), src, req, deny)
                                                 for f in rule["from"]))
                and (not rule.get("to") or any(_operation_matches(t.get("operation", {}), req, deny)
                                               for t in rule["to"]))
                and all(_condition_matches(c, src, req, deny) for c in rule.get("when") or []))
    except _HttpOnly:
        return False  # an ALLOW rule with HTTP-only fields never matches TCP traffic


def policies_for(dst: Workload, policies: list[dict]) -> list[dict]:
    out = []
    for p in policies:
        ns, sel = p["metadata"].get("namespace"), (p.get("spec") or {}).get("selector")
        if ns not in (MESH_ROOT, dst.namespace):
            continue
        if sel and not _matches(sel, dst.labels):
            continue
        out.append(p)
    return out


def decide(src: Workload, dst: Workload, req: Request, policies: list[dict]) -> tuple[bool, str]:
    """(allowed, why) for a request from `src` to the sidecar of `dst`."""
    if not dst.sidecar:
        return True, "no sidecar at the destination"
    applying = policies_for(dst, policies)
    by_action: dict[str, list[dict]] = {}
    for p in applying:
        by_action.setdefault((p.get("spec") or {}).get("action", "ALLOW"), []).append(p)
    assert "CUSTOM" not in by_action, "CUSTOM (ext_authz) policies are not evaluated here"
    for p in by_action.get("DENY", []):
        if any(_rule_matches(r, src, req, deny=True) for r in p["spec"].get("rules") or []):
            return False, f"denied by {p['metadata']['name']}"
    allow = by_action.get("ALLOW", [])
    if not allow:
        return True, "no ALLOW policy applies"
    for p in allow:
        if any(_rule_matches(r, src, req, deny=False) for r in (p.get("spec") or {}).get("rules") or []):
            return True, f"allowed by {p['metadata']['name']}"
    return False, "no ALLOW rule matches (" + ", ".join(p["metadata"]["name"] for p in allow) + ")"


def test_evaluator_semantics():
    """The reference's cases: no policy = allow; `spec: {}` in the root namespace denies all; an ALLOW rule `{}`
    re-opens; DENY before ALLOW; namespaces need mTLS; notPrincipals '*' = plaintext; HTTP-only fields in an ALLOW
    rule never match TCP, in a DENY rule they are dropped; a pod without a sidecar enforces nothing."""
    a = Workload("a", {"app": "web"}, True, "web")
    b_mesh, b_plain = Workload("b", {"app": "x"}, True), Workload("b", {"app": "x"}, False)
    http, tcp = Request(8080, path="/api"), Request(5432, "tcp")

    def pol(ns, spec, name="p"):
        return {"metadata": {"name": name, "namespace": ns}, "spec": spec}

    assert decide(b_mesh, a, http, [])[0]
    deny_all = pol(MESH_ROOT, {})
    assert not decide(b_mesh, a, http, [deny_all])[0]
    assert decide(b_mesh, Workload("a", {}, False), http, [deny_all])[0]
    allow_any = pol("a", {"selector": {"matchLabels": {"app": "web"}}, "rules": [{}]})
    assert decide(b_mesh, a, http, [deny_all, allow_any])[0]
    assert not decide(b_mesh, Workload("a", {"app": "db"}, True), http, [deny_all, allow_any])[0]
    deny_b = pol("a", {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["b"]}}]}]})
    assert not decide(b_mesh, a, http, [deny_all, allow_any, deny_b])[0]
    by_ns = pol("a", {"rules": [{"from": [{"source": {"namespaces": ["b"]}}]}]})
    assert decide(b_mesh, a, http, [by_ns])[0] and not decide(b_plain, a, http, [by_ns])[0]
    plain = pol("a", {"rules": [{"from": [{"source": {"notPrincipals": ["*"]}}]}]})
    assert decide(b_plain, a, http, [plain])[0] and not decide(b_mesh, a, http, [plain])[0]
    paths = pol("a", {"rules": [{"to": [{"operation": {"paths": ["/metrics", "/api/*"], "ports": ["8080"]}}]}]})
    assert decide(b_mesh, a, Request(8080, path="/api/v1"), [paths])[0]
    assert not decide(b_mesh, a, Request(8080, path="/admin"), [paths])[0]
    assert not decide(b_mesh, a, Request(8080, "tcp"), [paths])[0]  # HTTP-only field: the ALLOW rule is void
    deny_path = pol("a", {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/x"], "ports": ["5432"]}}]}]})
    assert not decide(b_mesh, a, tcp, [deny_path])[0]  # ... and dropped from a DENY rule (wider deny)
    header = pol("a", {"rules": [{"when": [{"key": "request.headers[kubeflow-userid]", "notValues": ["*"]}]}]})
    assert decide(b_mesh, a, http, [header])[0]
    assert not decide(b_mesh, a, Request(8080, headers={"kubeflow-userid": "u"}), [header])[0]


# --- the cluster ----------------------------------------------------------------------------------------------------

#: service accounts of the pods outside our manifests (their upstream manifests)
EXTERNAL_ACCOUNTS = {
    "activator": "activator", "autoscaler": "controller",  # knative-serving serving-core.yaml
    "ingress-gateway": "istio-ingressgateway-service-account",
    "local-gateway": "cluster-local-gateway-service-account",
    "ml-pipeline": "ml-pipeline", "ml-pipeline-ui": "ml-pipeline-ui", "katib-controller": "katib-controller",
    "kfp-step": "default-editor",  # multi-user KFP runs steps as the profile's default-editor
}
#: pods of ours that a controller creates without a sidecar, whatever the manifests say (see module docstring)
NO_SIDECAR = {"kfp-step": "KFP v2_template.go", "suggestion": "Katib SuggestionLabels"}
#: Kubeflow 26.03's namespaces in the mesh (namespace label istio-injection: enabled)
INJECTED_NAMESPACES = {"knative-serving", "kubeflow", "team-b"}  # team-b: an unrelated tenant, in the mesh
#: pods of `kubeflow` without a sidecar (Katib components' own annotation)
KUBEFLOW_NO_SIDECAR = {"katib-controller", "katib-db-manager"}


def _templates(docs: list[dict]) -> dict[str, dict]:
    """name -> rendered pod template (metadata + spec) of each workload and InferenceService component."""
    out = {}
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            out[d["metadata"]["name"]] = d["spec"]["template"]
        elif d["kind"] == "CronJob":
            out[d["metadata"]["name"]] = d["spec"]["jobTemplate"]["spec"]["template"]
        elif d["kind"] == "InferenceService":
            for comp in ("predictor", "transformer"):
                if comp in d["spec"]:
                    spec = d["spec"][comp]
                    out[comp] = {"metadata": {"labels": spec.get("labels", {}),
                                              "annotations": spec.get("annotations", {})},
                                 "spec": {"serviceAccountName": spec.get("serviceAccountName")}}
    kafka = next(iter(by_kind(docs, "Kafka").values()), None)
    if kafka is not None:  # Strimzi: a pool's template replaces the Kafka's (con-config-node-pools.adoc)
        pools = [p for p in by_kind(docs, "KafkaNodePool").values() if (p["spec"].get("template") or {}).get("pod")]
        pod_t = (pools[0]["spec"]["template"]["pod"] if pools
                 else (kafka["spec"]["kafka"].get("template") or {}).get("pod") or {})
        out["kafka"] = {"metadata": pod_t.get("metadata", {}), "spec": {}}
    return out


def _injected(namespace_labels: dict, meta: dict) -> bool:
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    opt = labels.get(INJECT, annotations.get(INJECT))
    if opt is not None:
        return opt == "true"
    return namespace_labels.get("istio-injection") == "enabled"


def mesh(docs: list[dict]):
    """(workloads, authorization policies in force, NetworkPolicy cluster) for one rendered target."""
    pods, np_policies, namespaces = cluster(docs)
    for n in INJECTED_NAMESPACES:
        namespaces[n]["istio-injection"] = "enabled"
    namespaces.setdefault("strimzi", {"kubernetes.io/metadata.name": "strimzi"})
    templates = _templates(docs)
    out = {}
    for name, p in pods.items():
        t = templates.get(name, {})
        meta = copy.deepcopy(t.get("metadata") or {})
        if name in NO_SIDECAR:
            meta.setdefault("labels", {})[INJECT] = "false"
        if name in KUBEFLOW_NO_SIDECAR:
            meta.setdefault("annotations", {})[INJECT] = "false"
        if name.endswith("gateway"):
            sidecar = True  # the gateway is itself an Envoy with its workload identity
        else:
            sidecar = _injected(namespaces[p.namespace], meta)
        sa = (t.get("spec") or {}).get("serviceAccountName") or EXTERNAL_ACCOUNTS.get(name, "default")
        out[name] = Workload(p.namespace, {**p.labels, **(meta.get("labels") or {})}, sidecar, sa)
    out["strimzi-operator"] = Workload("strimzi", {"name": "strimzi-cluster-operator"}, False,
                                       "strimzi-cluster-operator")
    out["unrelated-plain"] = Workload("team-b", {"app": "curl"}, False)
    profile = yaml.safe_load((ROOT / "manifests" / "profile" / "profile.yaml").read_text())
    authz = [d for d in docs if d["kind"] == "AuthorizationPolicy"]
    for d in authz:
        d.setdefault("metadata", {}).setdefault("namespace", NS)
    return out, authz + [ns_owner_access_istio(profile)] + KUBEFLOW_AUTHZ, (pods, np_policies, namespaces)


def request(src: str, dst: str, port: int) -> Request:
    """What flows over (src, dst, port) at L7: the client code and the platforms' protocols."""
    if dst in ("rentalml-redis", "rentalml-postgres") or (dst == "kafka" and port != 9404):
        return Request(port, "tcp")  # Redis, PostgreSQL, Kafka wire protocols
    if src in ("prometheus", "autoscaler"):
        return Request(port, method="GET", path="/metrics")
    if dst == "rentalml-pushgateway":  # prometheus_client push_to_gateway (PUT) / pushadd_to_gateway (POST)
        return Request(port, method="PUT" if src == "rentalml-drift-check" else "POST",
                       path="/metrics/job/rentalml-training/step/train")
    if port in (8012, 8013):
        return Request(port, method="POST", path="/v2/models/rental-recommender/infer",
                       headers={"authorization": "Bearer <jwt>"})
    if dst == "suggestion":
        return Request(port, method="POST", path="/api.v1.beta1.Suggestion/GetSuggestions")
    if dst == "rentalml-mlflow":
        return Request(port, method="POST", path="/api/2.0/mlflow/runs/create")
    if dst == "ml-pipeline":  # the KFP client with the pod's service-account token, no kubeflow-userid
        return Request(port, method="POST", path="/apis/v2beta1/runs", headers={"authorization": "Bearer <sa>"})
    return Request(port, method="POST", path="/")


#: flows that meet Istio but not the NetworkPolicies of tests/test_network_policy.py (Strimzi installs its own)
ISTIO_REQUIRED = [
    ("strimzi-operator", "kafka", 9091, "Strimzi cluster operator → brokers (replication listener, TLS)"),
    ("strimzi-operator", "kafka", 9090, "Strimzi cluster operator → KRaft controllers"),
]
#: flows Istio itself must refuse (the NetworkPolicies admit them or cannot tell them apart)
ISTIO_DENIED = [
    ("ingress-gateway", "predictor", 8012, "the gateway may reach the transformer only: Triton has no auth"),
    ("local-gateway", "predictor", 8012, "same, in-cluster callers"),
    ("unrelated", "transformer", 8012, "a mesh tenant of another namespace, even with the owner's header"),
    ("unrelated", "rentalml-mlflow", 5000, "a mesh tenant of another namespace → MLflow"),
    ("unrelated", "rentalml-pushgateway", 9091, "a mesh tenant → Pushgateway push"),
    ("activator", "rentalml-redis", 6379, "Knative's activator only to the InferenceService"),
    ("ml-pipeline-ui", "rentalml-redis", 6379, "the KFP UI only to MLflow"),
    ("ml-pipeline-ui", "transformer", 8012, "the KFP UI without the owner's header"),
]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    return render_targets(tmp_path_factory.mktemp("kustomize"))


def _istio_flows():
    return [(s, d, port, why) for s, d, port, why in REQUIRED] + ISTIO_REQUIRED


@pytest.mark.parametrize("target", ["root", "dev", "prod"])
def test_every_needed_flow_passes_istio(rendered, target):
    """Every flow of tests/test_network_policy.py's REQUIRED (and the Strimzi operator's) is accepted by the
    destination's sidecar under ns-owner-access-istio + global-deny-all + our policies. Without
    manifests/base/network/authorizationpolicies.yaml the activator, the gateways, the sidecar-less KFP steps
    (→ MLflow, → Pushgateway) and the KFP UI (→ MLflow) are refused; without the Strimzi pods' inject=false
    label the operator cannot reach the brokers."""
    pods, policies, _ = mesh(rendered[target])
    refused = []
    for s, d, port, why in _istio_flows():
        ok, reason = decide(pods[s], pods[d], request(s, d, port), policies)
        if not ok:
            refused.append(f"{s} → {d}:{port} ({why}): {reason}")
    assert not refused, f"{target}: needed flows refused by Istio:\n" + "\n".join(refused)


@pytest.mark.parametrize("target", ["root", "dev", "prod"])
def test_unrelated_flows_are_refused(rendered, target):
    """ISTIO_DENIED are refused by the sidecar itself; tests/test_network_policy.py's DENIED flows stay closed
    with both layers; and a plaintext pod of another namespace, which our policies for the sidecar-less KFP
    pods would let through the sidecar, is stopped by the NetworkPolicies (the L3 gate those rules rely on)."""
    pods, policies, (np_pods, np_policies, namespaces) = mesh(rendered[target])
    forged = {"kubeflow-userid": yaml.safe_load((ROOT / "manifests/profile/profile.yaml").read_text())[
        "spec"]["owner"]["name"]}
    open_ = []
    for s, d, port, why in ISTIO_DENIED:
        req = request(s, d, port)
        if s == "unrelated" and port == 8012:
            req.headers.update(forged)
        ok, reason = decide(pods[s], pods[d], req, policies)
        if ok:
            open_.append(f"{s} → {d}:{port} ({why}): {reason}")
    for s, d, port in DENIED:
        if decide(pods[s], pods[d], request(s, d, port), policies)[0] and \
                reachable(np_pods[s], np_pods[d], port, np_policies, namespaces):
            open_.append(f"{s} → {d}:{port}: open through both layers")
    plain = copy.copy(np_pods["unrelated"])
    for d, port in (("rentalml-mlflow", 5000), ("rentalml-pushgateway", 9091)):
        if decide(pods["unrelated-plain"], pods[d], request("unrelated-plain", d, port), policies)[0] and \
                reachable(plain, np_pods[d], port, np_policies, namespaces):
            open_.append(f"plaintext team-b pod → {d}:{port}: open through both layers")
    assert not open_, f"{target}: should be refused:\n" + "\n".join(open_)


def test_profile_defaults_alone_refuse_the_flows_our_policies_open(rendered):
    """Why authorizationpolicies.yaml exists: with only what Kubeflow installs (ns-owner-access-istio,
    global-deny-all), exactly these needed flows are refused; Prometheus, the autoscaler (/metrics) and
    katib-controller → suggestion (no sidecar) are not among them."""
    pods, policies, _ = mesh(rendered["root"])
    upstream_only = [p for p in policies if p["metadata"]["namespace"] != NS
                     or p["metadata"]["name"] == "ns-owner-access-istio"]
    refused = {(s, d, port) for s, d, port, _ in REQUIRED
               if not decide(pods[s], pods[d], request(s, d, port), upstream_only)[0]}
    assert refused == {
        ("activator", "transformer", 8012), ("activator", "predictor", 8012),
        ("local-gateway", "transformer", 8012), ("ingress-gateway", "transformer", 8012),
        ("kfp-step", "rentalml-mlflow", 5000), ("ml-pipeline-ui", "rentalml-mlflow", 5000),
        ("kfp-step", "rentalml-pushgateway", 9091),
    }, refused
    # the Kafka pods outside the mesh: with a sidecar the Strimzi operator (plaintext TCP) would be refused
    kafka = copy.copy(pods["kafka"])
    kafka.sidecar = True
    assert not pods["kafka"].sidecar
    assert not decide(pods["strimzi-operator"], kafka, request("strimzi-operator", "kafka", 9091), policies)[0]


def test_rendered_policies_are_ours_and_namespaced(rendered):
    """Every rendered AuthorizationPolicy lands in the profile namespace, selects workloads (no namespace-wide
    ALLOW that would make ns-owner-access-istio moot) and names ports, so each opening is as narrow as its flow."""
    for target, docs in rendered.items():
        authz = [d for d in docs if d["kind"] == "AuthorizationPolicy"]
        assert {d["metadata"]["name"] for d in authz} >= {
            "rental-recommender-from-knative", "rental-recommender-transformer-from-gateways",
            "mlflow-from-pipelines", "pushgateway-from-pipelines"}, target
        for d in authz:
            assert d["metadata"]["namespace"] == NS and d["spec"].get("action", "ALLOW") == "ALLOW"
            assert d["spec"]["selector"]["matchLabels"], d["metadata"]["name"]
            for rule in d["spec"]["rules"]:
                assert rule.get("from") and all(t["operation"].get("ports") for t in rule["to"]), d
