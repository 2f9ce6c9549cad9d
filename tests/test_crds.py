"""Every rendered object validates against the API server's own rules: core kinds against the Kubernetes
OpenAPI schema (kubernetes-validate, strict), every custom resource against the CRD schema of the upstream
release it targets, vendored under tests/crds/ (repo, tag, commit and path in each file's header; the
"tested against" table in docs/operations.md names the releases). The semantics (structural schema,
unknown fields, int-or-string, embedded resources, nullable, defaults, formats, list types, CEL rules) are
those of the API server and kubectl's strict field validation: tests/crd_schema.py.

Rendered: the root kustomization, the dev and prod overlays (tests/test_manifests.py's `rendered` fixture),
every kustomization under manifests/jobs (the one-shot training jobs) and manifests/profile (the Kubeflow
Profile). A kind with neither a vendored CRD nor a core schema fails: nothing escapes validation. Katib's
Experiment CRD is itself free-form (`x-kubernetes-preserve-unknown-fields` on the whole object, katib v0.19.0
manifests/v1beta1/components/crd/experiment.yaml), so its trialSpec, the object Katib creates for each trial,
is validated against that object's own CRD.
"""

from __future__ import annotations

import copy
import subprocess

import crd_schema
import pytest
import yaml
from test_manifests import CORE_APIS, K8S_VERSION, MANIFESTS, _all_docs, _need, rendered  # noqa: F401

EXPECTED_KINDS = {  # every vendored CRD, with the API version our manifests must use
    "InferenceService": "serving.kserve.io/v1beta1", "ServingRuntime": "serving.kserve.io/v1alpha1",
    "Experiment": "kubeflow.org/v1beta1", "TrainJob": "trainer.kubeflow.org/v1alpha1",
    "ClusterTrainingRuntime": "trainer.kubeflow.org/v1alpha1", "MPIJob": "kubeflow.org/v2beta1",
    "Kafka": "kafka.strimzi.io/v1", "KafkaNodePool": "kafka.strimzi.io/v1", "KafkaTopic": "kafka.strimzi.io/v1",
    "KafkaUser": "kafka.strimzi.io/v1", "PodMonitor": "monitoring.coreos.com/v1",
    "ServiceMonitor": "monitoring.coreos.com/v1", "PrometheusRule": "monitoring.coreos.com/v1",
    "ExternalSecret": "external-secrets.io/v1", "AuthorizationPolicy": "security.istio.io/v1",
    "Profile": "kubeflow.org/v1",
}


@pytest.fixture(scope="module")
def jobs_rendered() -> dict[str, list[dict]]:
    """The kustomizations under manifests/jobs (created with `kubectl create -k`, not in the apply set) and
    manifests/profile (the Profile a Kubeflow admin applies first)."""
    out = {}
    for k in sorted(MANIFESTS.glob("jobs/**/kustomization.yaml")) + [MANIFESTS / "profile" / "kustomization.yaml"]:
        res = subprocess.run([_need("kubectl"), "kustomize", str(k.parent)], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0, f"kubectl kustomize {k.parent} failed:\n{res.stderr}"
        out[str(k.parent.relative_to(MANIFESTS))] = [d for d in yaml.safe_load_all(res.stdout) if d]
    return out


@pytest.fixture(scope="module")
def all_docs(rendered, jobs_rendered) -> list[tuple[str, dict]]:  # noqa: F811
    return _all_docs({**rendered, **jobs_rendered})


def _embedded(doc: dict) -> list[tuple[str, dict]]:
    """Objects another controller creates from a template inside `doc`. Katib: one per trial, named as the
    trial, `<suggestion name = experiment>-<8 random characters>` (katib v0.19.0
    pkg/controller.v1beta1/suggestion/suggestionclient/suggestionclient.go; the trial job gets the trial's name,
    pkg/controller.v1beta1/experiment/experiment_controller_util.go)."""
    if doc["kind"] == "Experiment":
        trial = copy.deepcopy(doc["spec"].get("trialTemplate", {}).get("trialSpec"))
        if trial:
            trial.setdefault("metadata", {})["name"] = f"{doc['metadata']['name']}-x7k2m9qp"
            return [("spec.trialTemplate.trialSpec", trial)]
    return []


def test_vendored_crds_are_pinned_and_complete():
    crds = crd_schema.crds()
    assert {c.kind: c.api_version for c in crds.values()} == EXPECTED_KINDS
    for crd in crds.values():
        assert {"repo", "tag", "commit", "path"} <= set(crd.source), crd.file
        assert len(crd.source["commit"]) == 40 and crd.version in crd.served
    strimzi = [c for c in crds.values() if c.group == "kafka.strimzi.io"]
    assert all(c.served == ["v1"] and c.source["tag"] == "1.2.0" for c in strimzi)  # Strimzi 1.x: v1 only


def test_every_rendered_object_validates_against_its_schema(all_docs):
    import kubernetes_validate

    errors, kinds = [], set()
    crd_schema.UNEVALUATED.clear()
    crd_schema.EVALUATED.clear()
    for target, d in all_docs:
        where = f"{target} {d['kind']}/{d['metadata'].get('name')}"
        if d["apiVersion"] in CORE_APIS:
            try:
                kubernetes_validate.validate(d, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{where}: {exc.message} at {list(exc.path)}")
            continue
        kinds.add(d["kind"])
        errors += [f"{where}: {e}" for e in crd_schema.errors(d)]
        for path, obj in _embedded(d):
            errors += [f"{where} {path}: {e}" for e in crd_schema.errors(obj, embedded=True)]
    assert not errors, "\n".join(errors)
    # every kind we ship is seen (a CRD nobody renders would be a stale pin)
    assert kinds >= set(EXPECTED_KINDS) - {"ClusterTrainingRuntime"}, set(EXPECTED_KINDS) - kinds
    # the CEL rules on our objects ran; any rule cel-python cannot evaluate is named here
    assert crd_schema.EVALUATED, "no x-kubernetes-validations rule applied to any object"
    assert not crd_schema.UNEVALUATED, crd_schema.UNEVALUATED


def test_nothing_escapes_validation(all_docs):
    for target, d in all_docs:
        assert d["apiVersion"] in CORE_APIS or crd_schema.crd_for(d) is not None, \
            f"{target}: nothing validates {d['apiVersion']} {d['kind']}"
    assert crd_schema.errors({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})


def _pick(all_docs, kind):
    return copy.deepcopy(next(d for _, d in all_docs if d["kind"] == kind))


def test_the_validator_catches_errors(all_docs):
    """Mutations of rendered objects that the API server (kubectl apply, strict field validation) rejects."""
    isvc = _pick(all_docs, "InferenceService")
    isvc["spec"]["predictor"]["model"]["storageURI"] = isvc["spec"]["predictor"]["model"].pop("storageUri")
    isvc["spec"]["transformer"]["minReplicas"] = "2"
    del isvc["spec"]["transformer"]["containers"][0]["name"]
    text = "\n".join(crd_schema.errors(isvc))
    assert "'storageURI' was unexpected" in text  # unknown field
    assert "minReplicas: '2' is not of type 'integer'" in text  # wrong type
    assert "'name' is a required property" in text  # required (the core Container inside the CRD)

    topic = _pick(all_docs, "KafkaTopic")
    topic["apiVersion"] = "kafka.strimzi.io/v1beta2"  # Strimzi 1.x no longer serves it
    assert "not served" in "\n".join(crd_schema.errors(topic))
    topic["apiVersion"] = "kafka.strimzi.io/v1"
    topic["spec"]["partitons"] = topic["spec"].pop("partitions")
    assert any("partitons" in e for e in crd_schema.errors(topic))

    user = _pick(all_docs, "KafkaUser")
    user["spec"]["authorization"]["acls"][0]["operation"] = "Read"  # removed in v1 (Strimzi 0.49 CHANGELOG)
    user["spec"]["authorization"]["acls"][0]["operations"] = ["Reed"]  # enum
    text = "\n".join(crd_schema.errors(user))
    assert "'operation' was unexpected" in text and "'Reed' is not one of" in text

    kafka = _pick(all_docs, "Kafka")  # a CEL rule of the Kafka CRD: jmxPrometheusExporter needs valueFrom
    del kafka["spec"]["kafka"]["metricsConfig"]["valueFrom"]
    assert any("x-kubernetes-validations" in e for e in crd_schema.errors(kafka))

    rule = _pick(all_docs, "PrometheusRule")
    rule["spec"]["groups"][0]["rules"][0]["for"] = "10 minutes"  # pattern of a Prometheus duration
    assert crd_schema.errors(rule)

    monitor = _pick(all_docs, "PodMonitor")
    monitor["spec"]["podMetricsEndpoints"][0]["port"] = 9100  # a port *name* (string) in v1
    assert crd_schema.errors(monitor)

    exp = _pick(all_docs, "Experiment")  # a free-form CRD: checked against Katib's Go API schema
    exp["spec"]["maxTrialCount"] = "12"
    exp["spec"]["objective"]["objectiveMetricNames"] = exp["spec"]["objective"].pop("objectiveMetricName", ["x"])
    text = "\n".join(crd_schema.errors(exp))
    assert "maxTrialCount: '12' is not of type 'integer'" in text and "'objectiveMetricNames' was unexpected" in text

    es = _pick(all_docs, "ExternalSecret")
    es["spec"]["refreshInterval"] = 60
    assert crd_schema.errors(es)

    authz = _pick(all_docs, "AuthorizationPolicy")  # Istio 1.29.0: a typo'd source field, a bad action
    authz["spec"]["rules"][0]["from"][0]["source"]["namespace"] = ["kubeflow"]
    authz["spec"]["action"] = "PERMIT"
    text = "\n".join(crd_schema.errors(authz))
    assert "'namespace' was unexpected" in text and "'PERMIT' is not one of" in text

    profile = _pick(all_docs, "Profile")  # kubeflow/kubeflow v1.10.0 Profile
    profile["spec"]["owner"]["user"] = profile["spec"]["owner"].pop("name")
    assert any("'user' was unexpected" in e for e in crd_schema.errors(profile))


def test_int_or_string_embedded_and_nullable_follow_the_api_server():
    """Structural-schema keywords on a small schema, as apiextensions-apiserver reads them."""
    schema = {"type": "object", "properties": {
        "port": {"x-kubernetes-int-or-string": True},
        "tmpl": {"type": "object", "x-kubernetes-embedded-resource": True,
                 "x-kubernetes-preserve-unknown-fields": True},
        "opt": {"type": "string", "nullable": True},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "closed": {"type": "object"},
        "items": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                  "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
        "size": {"type": "integer", "format": "int32", "default": 1,
                 "x-kubernetes-validations": [{"rule": "self >= 1", "message": "at least one"}]}}}
    v = crd_schema.Validator(crd_schema.to_json_schema(schema, root=True), format_checker=crd_schema.FORMATS)

    def errs(doc):
        return [e.message for e in v.iter_errors(crd_schema.apply_defaults(
            {"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "x"}, **doc}, schema))]

    assert errs({"port": 80}) == [] and errs({"port": "http"}) == [] and errs({"port": 1.5})
    assert errs({"tmpl": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {}}}) == []
    assert errs({"opt": None}) == [] and errs({"free": {"a": {"b": 1}}}) == [] and errs({"closed": {"a": 1}})
    assert errs({"items": [{"name": "a"}, {"name": "a"}]}) and errs({"size": 2**40})
    assert errs({"size": 0}) == ["x-kubernetes-validations: at least one (rule: self >= 1)"]
    assert errs({}) == []  # defaulted to 1 before the rule runs
    assert errs({"metadata": {"name": "x", "labls": {}}})  # the root metadata is an ObjectMeta
