"""Platform rules of the serving and monitoring manifests, as the platforms' own code applies them.

Each test names the upstream file it encodes. Pinned releases (the versions Kubeflow manifests 26.03 ships,
github.com/kubeflow/manifests README "Kubeflow components"):

* Knative Serving knative-v1.21.1 — the field masks of pkg/apis/serving/fieldmask.go with the defaults of
  pkg/apis/config/features.go (all `kubernetes.podspec-*` flags Disabled; Kubeflow's
  common/knative/knative-serving/base/upstream/serving-core.yaml leaves config-features at its `_example`),
  the port names of pkg/apis/serving/k8s_validation.go and the `user-port` rename of
  pkg/reconciler/revision/resources/deploy.go;
* KServe v0.16.0 — pkg/apis/serving/v1beta1/transformer_custom.go (CustomTransformer.GetContainer appends
  --model_name, --predictor_host, --http_port and `--workers <containerConcurrency>`), component.go
  (ComponentExtensionSpec: the fields that are not pod fields), pkg/constants/constants.go (pod labels);
* kube-prometheus-stack 88.5.3 — charts/kube-prometheus-stack/values.yaml and
  templates/prometheus/prometheus.yaml (monitors and rules selected by the Helm release's label).
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"root": ".", "dev": "manifests/overlays/dev", "prod": "manifests/overlays/prod"}


def render_targets(dest: Path) -> dict[str, list[dict]]:
    """`kubectl kustomize` of root, dev and prod in a copy of the tree whose local secret files are the
    committed examples (as tests/test_manifests.py renders them)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (CI installs it: .ci/run)")
    shutil.copy(ROOT / "kustomization.yaml", dest)
    shutil.copytree(ROOT / "manifests", dest / "manifests", ignore=shutil.ignore_patterns("*.env"))
    for example in (dest / "manifests" / "components" / "local-secrets").glob("*.env.example"):
        shutil.copy(example, example.with_suffix(""))
    out = {}
    for name, rel in TARGETS.items():
        res = subprocess.run([kubectl, "kustomize", str(dest / rel)], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, f"kubectl kustomize {rel} failed:\n{res.stderr}"
        out[name] = [d for d in yaml.safe_load_all(res.stdout) if d]
    return out


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    return render_targets(tmp_path_factory.mktemp("kustomize"))


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


# --- Knative's field masks (knative-v1.21.1 pkg/apis/serving/fieldmask.go), config-features defaults -------------

#: PodSpecMask: always allowed; every other pod field needs a feature flag that is Disabled by default
#: (affinity, topologySpreadConstraints, hostAliases, nodeSelector, runtimeClassName, tolerations,
#: securityContext, shareProcessNamespace, priorityClassName, schedulerName, initContainers, dnsPolicy,
#: dnsConfig, hostIPC, hostPID, hostNetwork) or is never allowed (restartPolicy, nodeName, ...).
KNATIVE_POD_FIELDS = {"serviceAccountName", "containers", "volumes", "imagePullSecrets", "enableServiceLinks",
                      "automountServiceAccountToken"}
#: ContainerMask
KNATIVE_CONTAINER_FIELDS = {"name", "args", "command", "env", "workingDir", "envFrom", "image", "imagePullPolicy",
                            "livenessProbe", "ports", "readinessProbe", "resources", "securityContext",
                            "startupProbe", "terminationMessagePath", "terminationMessagePolicy", "volumeMounts"}
#: SecurityContextMask (container level; `privileged` only as false; capabilities.add needs
#: containerspec-addcapabilities)
KNATIVE_CONTAINER_SC_FIELDS = {"capabilities", "readOnlyRootFilesystem", "runAsUser", "runAsGroup", "runAsNonRoot",
                               "allowPrivilegeEscalation", "seccompProfile", "privileged"}
#: VolumeSourceMask: secret, configMap, projected; emptyDir (kubernetes.podspec-emptydir: Enabled by default)
KNATIVE_VOLUME_SOURCES = {"secret", "configMap", "projected", "emptyDir"}
#: k8s_validation.go validPortNames (the user container's first port)
KNATIVE_PORT_NAMES = {"", "h2c", "http1"}
#: v1.UserPortName (pkg/apis/serving/v1/revision_helpers.go), set by resources.buildContainerPorts
KNATIVE_USER_PORT_NAME = "user-port"


def knative_disallowed(pod: dict, where: str) -> list[str]:
    """What Knative's webhook rejects in a Revision's pod spec with config-features at its defaults
    (apis.CheckDisallowedFields over the masks): the paths of "must not set the field(s)" errors, and
    invalid port names."""
    errs = [f"{where}.{k}" for k in pod if k not in KNATIVE_POD_FIELDS]
    if pod.get("automountServiceAccountToken") is True:
        errs.append(f"{where}.automountServiceAccountToken (only false is allowed)")
    for v in pod.get("volumes", []):
        errs += [f"{where}.volumes[{v['name']}].{k}" for k in v if k not in KNATIVE_VOLUME_SOURCES | {"name"}]
    for i, c in enumerate(pod.get("containers", [])):
        cw = f"{where}.containers[{i}]"
        errs += [f"{cw}.{k}" for k in c if k not in KNATIVE_CONTAINER_FIELDS]
        sc = c.get("securityContext", {})
        errs += [f"{cw}.securityContext.{k}" for k in sc if k not in KNATIVE_CONTAINER_SC_FIELDS]
        if sc.get("privileged") is True:
            errs.append(f"{cw}.securityContext.privileged (only false is allowed)")
        if sc.get("capabilities", {}).get("add"):
            errs.append(f"{cw}.securityContext.capabilities.add")
        for m in c.get("volumeMounts", []):
            if "mountPropagation" in m:
                errs.append(f"{cw}.volumeMounts[{m['name']}].mountPropagation")
        ports = c.get("ports", [])
        if i == 0 and ports:
            if ports[0].get("name", "") not in KNATIVE_PORT_NAMES:
                errs.append(f"{cw}.ports[0].name {ports[0]['name']!r}: must be empty, 'h2c' or 'http1'")
            if len(ports) > 1:
                errs.append(f"{cw}.ports: more than one port")
    return errs


# --- what KServe hands Knative (KServe v0.16.0 pkg/apis/serving/v1beta1) ------------------------------------------

#: ComponentExtensionSpec (component.go) and the predictor's own non-pod fields (predictor.go)
KSERVE_EXTENSION_FIELDS = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType",
                           "autoScaling", "containerConcurrency", "timeout", "canaryTrafficPercent", "logger",
                           "batcher", "labels", "annotations", "deploymentStrategy"}
PREDICTOR_FIELDS = {"model", "workerSpec", "storageUris", "sklearn", "xgboost", "tensorflow", "pytorch", "triton",
                    "onnx", "huggingface", "pmml", "lightgbm", "paddle"}
#: ModelSpec / PredictorExtensionSpec fields that are not container fields
MODEL_FIELDS = {"modelFormat", "runtime", "storageUri", "runtimeVersion", "protocolVersion", "storage"}
#: ServingRuntimePodSpec (v1alpha1/servingruntime_types.go) fields that land on the pod
RUNTIME_POD_FIELDS = {"volumes", "nodeSelector", "affinity", "tolerations", "imagePullSecrets", "hostIPC"}


def merge_container(base: dict, override: dict) -> dict:
    """KServe merges the model's container over the runtime's (strategic merge: maps merged, the model wins)."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_container(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def knative_pod_specs(docs: list[dict]) -> dict[str, dict]:
    """component -> the pod spec of the Knative Service template KServe builds for it (Serverless mode)."""
    runtimes = by_kind(docs, "ServingRuntime")
    out = {}
    for name, isvc in by_kind(docs, "InferenceService").items():
        for comp, spec in isvc["spec"].items():
            pod = {k: copy.deepcopy(v) for k, v in spec.items()
                   if k not in KSERVE_EXTENSION_FIELDS | PREDICTOR_FIELDS}
            if "model" in spec:
                runtime = runtimes[spec["model"]["runtime"]]["spec"]
                model_container = {k: v for k, v in spec["model"].items() if k not in MODEL_FIELDS}
                pod["containers"] = [merge_container(runtime["containers"][0], model_container)]
                for k in RUNTIME_POD_FIELDS & set(runtime):
                    pod.setdefault(k, copy.deepcopy(runtime[k]))
            out[f"{name}/{comp}"] = pod
    return out


def test_knative_accepts_every_inference_service_component_with_default_feature_flags(rendered):
    """Knative's field mask, flags off (knative/serving knative-v1.21.1 pkg/apis/serving/fieldmask.go
    PodSpecMask / PodSecurityContextMask / ContainerMask / SecurityContextMask, k8s_validation.go
    validateContainerPorts; defaults pkg/apis/config/features.go): KServe v0.16.0 copies each component's
    pod fields (and a ServingRuntime's nodeSelector/tolerations/affinity) into the Knative Service, whose
    webhook rejects a pod-level securityContext, nodeSelector or tolerations — the InferenceService never
    becomes Ready. Checked on every component of root, dev and prod (prod adds the GPU)."""
    problems = []
    for target, docs in rendered.items():
        pods = knative_pod_specs(docs)
        assert {"rental-recommender/transformer", "rental-recommender/predictor"} <= set(pods), target
        for where, pod in pods.items():
            problems += [f"{target}: {e}" for e in knative_disallowed(pod, where)]
    assert not problems, "Knative would reject (must not set the field(s)):\n" + "\n".join(problems)


def test_knative_mask_rejects_pod_level_fields_and_keeps_containers_non_root(rendered):
    """The mask itself (knative-v1.21.1 fieldmask.go): a pod-level securityContext, nodeSelector and
    tolerations are errors with the default flags, the container-level securityContext is not. And the
    hardening moved to container level is still there: every container Knative runs is non-root with
    RuntimeDefault seccomp and no privilege escalation."""
    pod = {"serviceAccountName": "sa", "securityContext": {"runAsNonRoot": True},
           "nodeSelector": {"nvidia.com/gpu.present": "true"},
           "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
           "containers": [{"name": "c", "image": "i", "ports": [{"name": "metrics", "containerPort": 8080}],
                           "securityContext": {"runAsNonRoot": True, "seLinuxOptions": {}}}]}
    errs = knative_disallowed(pod, "p")
    assert {"p.securityContext", "p.nodeSelector", "p.tolerations",
            "p.containers[0].securityContext.seLinuxOptions"} <= set(errs)
    assert any("ports[0].name 'metrics'" in e for e in errs)
    for target, docs in rendered.items():
        for where, pod in knative_pod_specs(docs).items():
            for c in pod["containers"]:
                sc = c.get("securityContext", {})
                assert sc.get("runAsNonRoot") is True and sc.get("runAsUser") not in (None, 0), (target, where)
                assert sc.get("allowPrivilegeEscalation") is False and "ALL" in sc["capabilities"]["drop"]
                assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", (target, where)


def test_prod_places_triton_on_gpu_nodes_without_masked_fields(rendered):
    """GPU scheduling that works with Knative's flags off (fieldmask.go PodSpecMask): the predictor's
    container requests `nvidia.com/gpu` (only nodes advertising it fit; Kubernetes' ExtendedResourceToleration
    admission plugin tolerates the matching `nvidia.com/gpu` taint), and neither the InferenceService nor the
    ServingRuntime carries nodeSelector/tolerations/affinity."""
    prod = knative_pod_specs(rendered["prod"])["rental-recommender/predictor"]
    res = prod["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "1"
    for target, docs in rendered.items():
        for where, pod in knative_pod_specs(docs).items():
            assert not {"nodeSelector", "tolerations", "affinity"} & set(pod), (target, where)


# --- user-port and kube-prometheus-stack's selectors ----------------------------------------------------------

#: KServe v0.16.0 pkg/constants/constants.go: the labels KServe puts on a component's pods
KSERVE_POD_LABELS = {"serving.kserve.io/inferenceservice", "component"}
#: kube-prometheus-stack's Helm release name assumed by the manifests (docs/operations.md)
PROMETHEUS_RELEASE = "kube-prometheus-stack"


def knative_revision_pod(isvc_name: str, comp: str, pod: dict) -> dict:
    """The pod Knative's revision reconciler runs (knative-v1.21.1 pkg/reconciler/revision/resources/deploy.go
    makeServingContainer/buildContainerPorts): the user container's ports become one port named `user-port`
    with the first declared containerPort (8080 when none); KServe labels the pod with the
    InferenceService and component."""
    pod = copy.deepcopy(pod)
    user = pod["containers"][0]
    port = (user.get("ports") or [{}])[0].get("containerPort", 8080)
    user["ports"] = [{"name": KNATIVE_USER_PORT_NAME, "containerPort": port}]
    labels = {"serving.kserve.io/inferenceservice": isvc_name, "component": comp}
    return {"metadata": {"labels": labels}, "spec": pod}


def _matches(selector: dict, labels: dict) -> bool:
    ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
    for e in selector.get("matchExpressions", []):
        has, val = e["key"] in labels, labels.get(e["key"])
        op = e["operator"]
        ok &= {"In": has and val in e.get("values", []), "NotIn": not has or val not in e.get("values", []),
               "Exists": has, "DoesNotExist": not has}[op]
    return ok


def test_podmonitor_scrapes_the_port_name_knative_gives_the_transformer(rendered):
    """Knative renames the user container's port to `user-port` in the revision's pods
    (knative-v1.21.1 pkg/reconciler/revision/resources/deploy.go buildContainerPorts, v1.UserPortName in
    pkg/apis/serving/v1/revision_helpers.go); a PodMonitor's `port` names a port of the pod
    (prometheus-operator PodMetricsEndpoint.port), so `http1` would match nothing and no serving metric is
    scraped."""
    for target, docs in rendered.items():
        pods = {where: knative_revision_pod(*where.split("/"), pod) for where, pod in knative_pod_specs(docs).items()}
        monitors = by_kind(docs, "PodMonitor")
        assert monitors, target
        for name, pm in monitors.items():
            selected = [w for w, p in pods.items() if _matches(pm["spec"]["selector"], p["metadata"]["labels"])]
            assert selected == ["rental-recommender/transformer"], (target, name, selected)
            port_names = {p["name"] for c in pods[selected[0]]["spec"]["containers"] for p in c.get("ports", [])}
            for ep in pm["spec"]["podMetricsEndpoints"]:
                assert ep["port"] in port_names, (target, name, ep["port"], port_names)


def test_servicemonitors_name_ports_of_the_services_they_select(rendered):
    """prometheus-operator Endpoint.port names a port of the selected Service: each ServiceMonitor selects
    one of our Services and scrapes a port that Service has."""
    for target, docs in rendered.items():
        services = by_kind(docs, "Service")
        for name, sm in by_kind(docs, "ServiceMonitor").items():
            hit = [s for s in services.values() if _matches(sm["spec"]["selector"], s["metadata"].get("labels", {}))]
            assert len(hit) == 1, (target, name, [s["metadata"]["name"] for s in hit])
            names = {p.get("name") for p in hit[0]["spec"]["ports"]}
            for ep in sm["spec"]["endpoints"]:
                assert ep["port"] in names, (target, name, ep["port"], names)


def kube_prometheus_stack_selector(kind: str, values: dict | None = None) -> dict:
    """The selector kube-prometheus-stack's Prometheus gets for `kind` (charts/kube-prometheus-stack
    88.5.3 templates/prometheus/prometheus.yaml): the explicit selector if set, else with
    ...SelectorNilUsesHelmValues (true in values.yaml) `release: <Release.Name>`, else everything."""
    key = {"PodMonitor": "podMonitor", "ServiceMonitor": "serviceMonitor", "PrometheusRule": "rule"}[kind]
    values = {f"{key}Selector": {}, f"{key}SelectorNilUsesHelmValues": True, **(values or {})}
    if values[f"{key}Selector"]:
        return values[f"{key}Selector"]
    if values[f"{key}SelectorNilUsesHelmValues"]:
        return {"matchLabels": {"release": PROMETHEUS_RELEASE}}
    return {}


def test_monitors_and_rules_are_selected_by_kube_prometheus_stack_defaults(rendered):
    """kube-prometheus-stack (prometheus-community/helm-charts kube-prometheus-stack-88.5.3,
    charts/kube-prometheus-stack/values.yaml podMonitorSelectorNilUsesHelmValues /
    serviceMonitorSelectorNilUsesHelmValues / ruleSelectorNilUsesHelmValues: true, and
    templates/prometheus/prometheus.yaml) selects only PodMonitors, ServiceMonitors and PrometheusRules
    labelled with its Helm release; without the label nothing is scraped and no alert is loaded."""
    for target, docs in rendered.items():
        objs = [d for d in docs if d["kind"] in ("PodMonitor", "ServiceMonitor", "PrometheusRule")]
        assert {d["kind"] for d in objs} == {"PodMonitor", "ServiceMonitor", "PrometheusRule"}, target
        for d in objs:
            sel = kube_prometheus_stack_selector(d["kind"])
            assert _matches(sel, d["metadata"].get("labels", {})), (target, d["kind"], d["metadata"]["name"])
    assert kube_prometheus_stack_selector("PodMonitor", {"podMonitorSelectorNilUsesHelmValues": False}) == {}


# --- KServe's --workers on the custom transformer --------------------------------------------------------------

def kserve_transformer_args(isvc: dict) -> list[str]:
    """CustomTransformer.GetContainer (kserve v0.16.0 pkg/apis/serving/v1beta1/transformer_custom.go): append
    each of --model_name, --predictor_host, --http_port and `--workers <containerConcurrency>` unless an
    argument already starts with it (pkg/utils/collections.go IncludesArg: equal or prefix)."""
    t = isvc["spec"]["transformer"]
    args = list(t["containers"][0].get("args", []))
    name, ns = isvc["metadata"]["name"], isvc["metadata"].get("namespace", "rentalml")

    def includes(flag):
        return any(a == flag or a.startswith(flag) for a in args)

    for flag, value in (("--model_name", name), ("--predictor_host", f"{name}-predictor.{ns}"),
                        ("--http_port", "8080")):
        if not includes(flag):
            args += [flag, value]
    if not includes("--workers") and t.get("containerConcurrency") is not None:
        args += ["--workers", str(t["containerConcurrency"])]
    return args


def serve_processes(args: list[str]) -> int:
    """Processes `rentalml serve` starts for these arguments, parsed by its own CLI: with --workers N > 1,
    N spawned REST workers plus the main (gRPC) process (inference/server.py); else one."""
    import typer

    from rentalml.cli import app

    cmd = typer.main.get_command(app)
    assert args[0] == "serve"
    ctx = cmd.commands["serve"].make_context("serve", list(args[1:]))
    workers = ctx.params["workers"]
    return workers if workers == 1 else workers + 1


def _quantity(q: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    return float(m.group(1)) * units.get(m.group(2), 1)


@pytest.fixture(scope="module")
def serve_process_floor_bytes() -> int:
    """Peak RSS of one process that only imports what every `rentalml serve` process imports (KServe, the
    serving code, ONNX Runtime), before any model or cache: a lower bound per process."""
    code = ("import kserve, onnxruntime, rentalml.inference.server, rentalml.inference.cli, resource; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")  # KiB on Linux
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024


def test_kserve_injected_workers_fit_the_transformer_pod(rendered, serve_process_floor_bytes):
    """KServe appends `--workers <containerConcurrency>` to a custom transformer's args unless one is given
    (kserve v0.16.0 pkg/apis/serving/v1beta1/transformer_custom.go GetContainer; pkg/constants/constants.go
    ArgumentWorkers). With containerConcurrency 32 `rentalml serve` would start 32 REST processes + 1 in a
    pod limited to 2Gi. The effective args, parsed by the real CLI, must give no more processes than the
    pod's CPUs (requests; the GIL-bound processes beyond that only contend) and fit its memory limit at
    the measured per-process floor."""
    assert serve_process_floor_bytes > 50 * 2**20  # the measurement is real (KServe + ONNX Runtime imported)
    for target, docs in rendered.items():
        isvc = by_kind(docs, "InferenceService")["rental-recommender"]
        args = kserve_transformer_args(isvc)
        procs = serve_processes(args)
        res = isvc["spec"]["transformer"]["containers"][0]["resources"]
        cpus = max(1, math.ceil(_quantity(res["requests"]["cpu"])))
        mem = _quantity(res["limits"]["memory"])
        assert procs <= cpus, f"{target}: {procs} serve processes for {cpus} CPU(s): {args}"
        assert procs * serve_process_floor_bytes < mem, (
            f"{target}: {procs} processes x {serve_process_floor_bytes / 2**20:.0f} MiB > limit {mem / 2**20:.0f} MiB")
    # the rule itself: without an explicit --workers KServe's value wins
    bare = {"metadata": {"name": "m"}, "spec": {"transformer": {"containerConcurrency": 32,
                                                                "containers": [{"args": ["serve"]}]}}}
    assert kserve_transformer_args(bare)[-2:] == ["--workers", "32"] and serve_processes(
        kserve_transformer_args(bare)) == 33
    given = {**bare, "spec": {"transformer": {**bare["spec"]["transformer"],
                                              "containers": [{"args": ["serve", "--workers=2"]}]}}}
    assert json.dumps(kserve_transformer_args(given)).count("--workers") == 1
