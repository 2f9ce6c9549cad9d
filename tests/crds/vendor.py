"""Re-vendor the upstream CRD schemas under tests/crds/ (run by hand when a pinned release changes).

    python tests/crds/vendor.py /work/.mirror [project ...]  # bare git mirrors named <owner>+<repo>/repo;
                                                              # only the named project dirs when given

Each output file keeps what validation needs of one CRD at one pinned tag: group, kind, the served version,
scope and that version's openAPIV3Schema with the documentation (`description`, `example`) removed. The file
starts with a comment header naming the repository, tag, commit and path; the rest is JSON (which is YAML).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent

# (project dir, repository, tag, path in the repository, kind, served version)
SOURCES = [
    ("kserve", "kserve/kserve", "v0.20.0", "config/crd/full/serving.kserve.io_inferenceservices.yaml",
     "InferenceService", "v1beta1"),
    ("kserve", "kserve/kserve", "v0.20.0", "config/crd/full/serving.kserve.io_servingruntimes.yaml",
     "ServingRuntime", "v1alpha1"),
    ("katib", "kubeflow/katib", "v0.19.0", "manifests/v1beta1/components/crd/experiment.yaml",
     "Experiment", "v1beta1"),
    ("trainer", "kubeflow/trainer", "v2.3.0", "manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml",
     "TrainJob", "v1alpha1"),
    ("trainer", "kubeflow/trainer", "v2.3.0",
     "manifests/base/crds/trainer.kubeflow.org_clustertrainingruntimes.yaml", "ClusterTrainingRuntime", "v1alpha1"),
    ("mpi-operator", "kubeflow/mpi-operator", "v0.8.0", "manifests/base/kubeflow.org_mpijobs.yaml",
     "MPIJob", "v2beta1"),
    ("strimzi", "strimzi/strimzi-kafka-operator", "1.2.0", "packaging/install/cluster-operator/040-Crd-kafka.yaml",
     "Kafka", "v1"),
    ("strimzi", "strimzi/strimzi-kafka-operator", "1.2.0",
     "packaging/install/cluster-operator/045-Crd-kafkanodepool.yaml", "KafkaNodePool", "v1"),
    ("strimzi", "strimzi/strimzi-kafka-operator", "1.2.0",
     "packaging/install/cluster-operator/043-Crd-kafkatopic.yaml", "KafkaTopic", "v1"),
    ("strimzi", "strimzi/strimzi-kafka-operator", "1.2.0",
     "packaging/install/cluster-operator/044-Crd-kafkauser.yaml", "KafkaUser", "v1"),
    ("prometheus-operator", "prometheus-operator/prometheus-operator", "v0.93.0",
     "example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml", "PodMonitor", "v1"),
    ("prometheus-operator", "prometheus-operator/prometheus-operator", "v0.93.0",
     "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml", "ServiceMonitor", "v1"),
    ("prometheus-operator", "prometheus-operator/prometheus-operator", "v0.93.0",
     "example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml", "PrometheusRule", "v1"),
    ("external-secrets", "external-secrets/external-secrets", "v2.9.0",
     "config/crds/bases/external-secrets.io_externalsecrets.yaml", "ExternalSecret", "v1"),
    # Istio 1.29.0 is what Kubeflow 26.03 installs (kubeflow/manifests README.md, common/istio)
    ("istio", "istio/istio", "1.29.0", "manifests/charts/base/files/crd-all.gen.yaml",
     "AuthorizationPolicy", "v1"),
    # Profiles v1.10.0 is what Kubeflow 26.03 installs (applications/profiles/upstream, image tag v1.10.0; its
    # crd/bases/kubeflow.org_profiles.yaml is this file unchanged)
    ("kubeflow", "kubeflow/kubeflow", "v1.10.0",
     "components/profile-controller/config/crd/bases/kubeflow.org_profiles.yaml", "Profile", "v1"),
]

DOC_KEYS = {"description", "example", "externalDocs"}

# CRDs whose schema is free-form (`x-kubernetes-preserve-unknown-fields` on the whole object): the typed schema
# of the Go API, from the project's generated OpenAPI document, is vendored next to it as `apiSchema`
# (kind -> (path in the same repository at the same tag, definition name)).
API_SCHEMAS = {"Experiment": ("api/openapi-spec/swagger.json", "v1beta1.Experiment")}
# Kubernetes types inside those documents, as a CRD's structural schema writes them
_K8S_TYPES = {
    "io.k8s.apimachinery.pkg.api.resource.Quantity": {"x-kubernetes-int-or-string": True},
    "io.k8s.apimachinery.pkg.util.intstr.IntOrString": {"x-kubernetes-int-or-string": True},
    "io.k8s.apimachinery.pkg.apis.meta.v1.Time": {"type": "string", "format": "date-time"},
    "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta": {"type": "object"},
    "io.k8s.apimachinery.pkg.apis.meta.v1.unstructured.Unstructured": {
        "type": "object", "x-kubernetes-embedded-resource": True, "x-kubernetes-preserve-unknown-fields": True},
}


def api_schema(document: dict, name: str) -> dict:
    """One definition of an OpenAPI v3 document as a structural schema: references inlined, documentation
    and Go zero-value `default`s dropped (the controller defaults those itself)."""
    defs = document["components"]["schemas"]

    def resolve(node):
        if isinstance(node, list):
            return [resolve(v) for v in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref") or (node["allOf"][0].get("$ref") if len(node.get("allOf", [])) == 1 else None)
        if ref:
            target = ref.rsplit("/", 1)[1]
            rest = {k: v for k, v in node.items() if k not in ("$ref", "allOf", "default") and k not in DOC_KEYS}
            return {**resolve(_K8S_TYPES.get(target, defs[target])), **resolve(rest)}
        out = {}
        for key, value in node.items():
            if key in DOC_KEYS or key == "default":
                continue
            if key == "properties":
                out[key] = {n: resolve(v) for n, v in value.items()}
            else:
                out[key] = resolve(value)
        return out

    schema = resolve(defs[name])
    schema["properties"].pop("status", None)  # written by the controller, never by us
    return schema


def strip(schema):
    """The schema without documentation; property *names* (which may be `description`) are kept."""
    if isinstance(schema, list):
        return [strip(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in DOC_KEYS:
            continue
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: strip(sub) for name, sub in value.items()}
        else:
            out[key] = strip(value)
    return out


def dedupe(schema: dict) -> dict:
    """Large subschemas that occur more than once (KServe repeats the whole PodSpec/Container schema for
    each component and framework) are stored once under `x-shared` and referenced as {"x-shared": "sN"};
    tests/crd_schema.py expands them on load, so the validated schema is the upstream one."""
    shared: dict[str, dict] = {}

    def count(node, seen):
        if isinstance(node, dict):
            key = json.dumps(node, sort_keys=True)
            if len(key) >= 1000:
                seen[key] = seen.get(key, 0) + 1
            for v in node.values():
                count(v, seen)
        elif isinstance(node, list):
            for v in node:
                count(v, seen)

    def replace(node, names):
        if isinstance(node, dict):
            key = json.dumps(node, sort_keys=True)
            if key in names:
                return {"x-shared": names[key]}
            return {k: replace(v, names) for k, v in node.items()}
        if isinstance(node, list):
            return [replace(v, names) for v in node]
        return node

    while True:  # the largest repeated subtree first, then again inside what is left
        seen: dict[str, int] = {}
        count(schema, seen)
        for v in shared.values():
            count(v, seen)
        repeated = sorted((k for k, n in seen.items() if n > 1), key=len, reverse=True)
        if not repeated:
            break
        name = f"s{len(shared)}"
        names = {repeated[0]: name}
        schema = replace(schema, names)
        shared = {k: replace(v, names) for k, v in shared.items()}
        shared[name] = replace(json.loads(repeated[0]), {})
    return {"x-shared-schemas": shared, **schema} if shared else schema


def vendor(mirrors: Path, projects: set[str] | None = None) -> None:
    for project, repo, tag, path, kind, version in SOURCES:
        if projects and project not in projects:
            continue
        git = ["git", f"--git-dir={mirrors / repo.replace('/', '+') / 'repo'}"]
        commit = subprocess.run([*git, "rev-parse", f"{tag}^{{commit}}"], capture_output=True, text=True,
                                check=True).stdout.strip()
        text = subprocess.run([*git, "show", f"{tag}:{path}"], capture_output=True, text=True, check=True).stdout
        crd = next(d for d in yaml.safe_load_all(text) if d and d.get("kind") == "CustomResourceDefinition"
                   and d["spec"]["names"]["kind"] == kind)
        ver = next(v for v in crd["spec"]["versions"] if v["name"] == version)
        assert ver["served"], (kind, version, "not served")
        body = {"group": crd["spec"]["group"], "kind": kind, "version": version, "scope": crd["spec"]["scope"],
                "served": [v["name"] for v in crd["spec"]["versions"] if v["served"]],
                "openAPIV3Schema": dedupe(strip(ver["schema"]["openAPIV3Schema"]))}
        header = (f"# {kind} {crd['spec']['group']}/{version}: vendored by tests/crds/vendor.py, do not edit.\n"
                  f"# repo: github.com/{repo}\n# tag: {tag}\n# commit: {commit}\n# path: {path}\n")
        if kind in API_SCHEMAS:
            api_path, definition = API_SCHEMAS[kind]
            document = json.loads(subprocess.run([*git, "show", f"{tag}:{api_path}"], capture_output=True,
                                                 text=True, check=True).stdout)
            body["apiSchema"] = dedupe(api_schema(document, definition))
            header += f"# api-schema: {api_path} {definition} (the CRD itself is free-form)\n"
        out = HERE / project / f"{kind.lower()}.yaml"
        out.parent.mkdir(exist_ok=True)
        out.write_text(header + json.dumps(body, separators=(",", ":"), sort_keys=False) + "\n")
        print(f"{out.relative_to(HERE)}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    vendor(Path(sys.argv[1] if len(sys.argv) > 1 else "/work/.mirror"), set(sys.argv[2:]) or None)
