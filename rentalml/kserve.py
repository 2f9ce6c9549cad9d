"""The rental-recommender InferenceService as the code changes it: a core contract shared by the pipeline's
deploy/publish steps (rentalml.components) and `rentalml ab promote|rollback --cluster` (rentalml.inference).

The object is owned by the manifests (`kubectl apply -k`). A new version changes only what it must, with a JSON
Patch (RFC 6902, `application/json-patch+json`) of exact paths guarded by `test` ops: the predictor's
`rentalml.io/model-versions` annotation (a new revision downloads the repository holding the live versions) and
`canaryTrafficPercent: 100` (Knative never splits model versions), then the transformer's pinned arms
(RENTALML_SERVE__CHAMPION_VERSION / _CHALLENGER_VERSION / _CHALLENGER_PERCENT). Never a merge patch of a
component: JSON merge patch (what `CustomObjectsApi.patch_namespaced_custom_object` sends) replaces every list it
names and dropped the transformer's env (auth off), mounts and probes; strategic merge is not served for custom
resources. Kubernetes API calls (RBAC, Role rentalml-deployer): get and patch on
serving.kserve.io/inferenceservices (`API_CALLS`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rentalml.services import wait_until

ISVC_GROUP, ISVC_VERSION, ISVC_PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
JSON_PATCH = "application/json-patch+json"
#: the transformer's container (KServe's name for the model server container)
CONTAINER = "kserve-container"
#: predictor pod annotation listing the live model versions (a change rolls a new predictor revision)
VERSIONS_ANNOTATION = "rentalml.io/model-versions"
VERSION_LABEL = "rentalml.io/model-version"
ENV_CHAMPION = "RENTALML_SERVE__CHAMPION_VERSION"
ENV_CHALLENGER = "RENTALML_SERVE__CHALLENGER_VERSION"
ENV_PERCENT = "RENTALML_SERVE__CHALLENGER_PERCENT"
#: every Kubernetes API call this module makes, for the RBAC check: (verb, group, resource)
API_CALLS = (("get", ISVC_GROUP, ISVC_PLURAL), ("patch", ISVC_GROUP, ISVC_PLURAL))


class DeployError(RuntimeError):
    """The InferenceService cannot take the new version (missing, unexpected shape, not ready in time)."""


# ------------------------------------------------------------------------------------------ JSON Patch plan
def _ptr(*parts) -> str:
    """An RFC 6901 JSON pointer: `~` → `~0`, `/` → `~1` in each reference token."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _map_key_ops(doc: dict, path: tuple, key: str, value) -> list[dict]:
    """Set one key of a map: `add` the key when the map exists (add on an object member replaces), else add the
    map with that one key. Nothing else in the map is touched."""
    node = doc
    for p in path:
        node = node.get(p) if isinstance(node, dict) else None
        if node is None:
            return [{"op": "add", "path": _ptr(*path), "value": {key: value}}]
    return [{"op": "add", "path": _ptr(*path, key), "value": value}]


def _container_index(doc: dict, component: str, name: str = CONTAINER) -> int:
    containers = ((doc.get("spec") or {}).get(component) or {}).get("containers") or []
    for i, c in enumerate(containers):
        if c.get("name") == name:
            return i
    raise DeployError(f"InferenceService {doc['metadata'].get('name')}: no container {name!r} in spec.{component}")


def env_ops(doc: dict, component: str, env: dict[str, str], container: str = CONTAINER) -> list[dict]:
    """Set env entries of one container, each at its exact index (`test` its name first, so a concurrent change
    of the list fails the patch instead of overwriting another entry); absent ones are appended."""
    i = _container_index(doc, component, container)
    base = ("spec", component, "containers", i)
    ops: list[dict] = [{"op": "test", "path": _ptr(*base, "name"), "value": container}]
    current = doc["spec"][component]["containers"][i].get("env")
    if current is None:
        ops.append({"op": "add", "path": _ptr(*base, "env"), "value": []})
        current = []
    index = {e.get("name"): j for j, e in enumerate(current)}
    for name, value in env.items():
        entry = {"name": name, "value": str(value)}
        if name in index:
            ops += [{"op": "test", "path": _ptr(*base, "env", index[name], "name"), "value": name},
                    {"op": "replace", "path": _ptr(*base, "env", index[name]), "value": entry}]
        else:
            ops.append({"op": "add", "path": _ptr(*base, "env", "-"), "value": entry})
    return ops


def predictor_ops(doc: dict, versions: list[str], version: str) -> list[dict]:
    """The predictor's new revision: the live versions as a pod annotation, all traffic to the latest revision,
    and the object's model-version label."""
    return [*_map_key_ops(doc, ("metadata", "labels"), VERSION_LABEL, str(version)),
            *_map_key_ops(doc, ("spec", "predictor", "annotations"), VERSIONS_ANNOTATION, ",".join(versions)),
            {"op": "add", "path": "/spec/predictor/canaryTrafficPercent", "value": 100}]


def transformer_ops(doc: dict, *, champion: str, challenger: str, percent: int) -> list[dict]:
    return env_ops(doc, "transformer", {ENV_CHAMPION: champion, ENV_CHALLENGER: challenger, ENV_PERCENT: str(percent)})


def arms(version: str, previous_champion: str | None, canary_percent: int) -> dict:
    """The transformer's arms after deploying `version`: the previous champion keeps 100-p % of the users and
    the new version gets p %; with no previous champion (first deploy) the new version takes everyone."""
    version = str(version)
    if not previous_champion or str(previous_champion) == version:
        return {"champion": version, "challenger": "", "percent": 0, "versions": [version]}
    p = int(canary_percent)
    if not 0 <= p <= 100:
        raise ValueError(f"canary_percent must be between 0 and 100, got {p}")
    prev = str(previous_champion)
    return {"champion": prev, "challenger": version, "percent": p,
            "versions": sorted({prev, version}, key=lambda v: (len(v), v))}


# ------------------------------------------------------------------------------------------ API
def namespace_of(namespace: str | None) -> str:
    if namespace:
        return namespace
    return SA_NAMESPACE.read_text().strip() if SA_NAMESPACE.exists() else "default"


def custom_objects_api():
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:  # KUBECONFIG read now: the client's default location froze it at import
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
    return client.CustomObjectsApi()


def json_patch(api, namespace: str, name: str, ops: list[dict]) -> dict:
    """PATCH the InferenceService with `application/json-patch+json`. CustomObjectsApi's own patch method always
    sends `application/merge-patch+json` (kubernetes-client 30.1.0), so this goes through its ApiClient."""
    return api.api_client.call_api(
        "/apis/{group}/{version}/namespaces/{namespace}/{plural}/{name}", "PATCH",
        {"group": ISVC_GROUP, "version": ISVC_VERSION, "namespace": namespace, "plural": ISVC_PLURAL, "name": name},
        [], {"Accept": "application/json", "Content-Type": JSON_PATCH}, body=ops, post_params=[], files={},
        response_type="object", auth_settings=["BearerToken"], _return_http_data_only=True,
        collection_formats={})


def get_isvc(api, namespace: str, name: str) -> dict:
    from kubernetes.client.exceptions import ApiException

    try:
        return api.get_namespaced_custom_object(ISVC_GROUP, ISVC_VERSION, namespace, ISVC_PLURAL, name)
    except ApiException as exc:
        if exc.status == 404:
            raise DeployError(f"InferenceService {namespace}/{name} does not exist: apply the manifests first "
                              "(kubectl apply -k manifests/overlays/<env>); deploy only patches it") from exc
        raise


def component_ready(doc: dict, component: str) -> bool:
    """KServe's status of one component: the latest created revision is the ready one, for this generation."""
    status = doc.get("status") or {}
    if int(status.get("observedGeneration", -1)) < int(doc["metadata"].get("generation", 0)):
        return False
    comp = (status.get("components") or {}).get(component) or {}
    if comp.get("latestCreatedRevision"):  # Serverless: Knative revisions
        return comp["latestCreatedRevision"] == comp.get("latestReadyRevision")
    cond = {c.get("type"): c.get("status") for c in status.get("conditions") or []}  # RawDeployment: no revisions
    return cond.get(f"{component.capitalize()}Ready") == "True"


def wait_ready(api, namespace: str, name: str, component: str, timeout: float, poll: float = 5.0) -> dict:
    last: dict = {}

    def ready() -> dict | None:
        last["doc"] = doc = get_isvc(api, namespace, name)
        return doc if component_ready(doc, component) else None

    try:
        return wait_until(ready, timeout, interval=poll, what=f"{component} of {namespace}/{name} ready")
    except TimeoutError:
        status = (last.get("doc", {}).get("status") or {}).get("components", {})
        raise DeployError(f"InferenceService {namespace}/{name}: {component} not ready after {timeout:.0f}s "
                          f"(status: {json.dumps(status)})") from None


def deploy_version(name: str, *, version: str, canary_percent: int, previous_champion: str | None = None,
                   namespace: str | None = None, api=None, ready_timeout: float = 900.0, poll: float = 5.0) -> dict:
    """Roll `version` out on the InferenceService: predictor revision with the live versions first (and wait for
    it), then the transformer's arms. The champion arm is `previous_champion`, by default the version serving
    now (the object's `rentalml.io/model-version` label, absent before the first deploy). Returns the plan and
    the JSON Patches sent."""
    api = api or custom_objects_api()
    ns = namespace_of(namespace)
    live = get_isvc(api, ns, name)
    if previous_champion is None:
        previous_champion = (live["metadata"].get("labels") or {}).get(VERSION_LABEL)
    plan = arms(version, previous_champion, canary_percent)
    pred = predictor_ops(live, plan["versions"], version)
    json_patch(api, ns, name, pred)
    if ready_timeout > 0:
        live = wait_ready(api, ns, name, "predictor", ready_timeout, poll)
    else:
        live = get_isvc(api, ns, name)
    trans = transformer_ops(live, champion=plan["champion"], challenger=plan["challenger"], percent=plan["percent"])
    json_patch(api, ns, name, trans)
    return {"applied": True, "action": "patched", "namespace": ns, "name": name, **plan,
            "patches": {"predictor": pred, "transformer": trans}}


def set_canary_traffic(name: str, percent: int, *, namespace: str | None = None, api=None,
                       champion: str | None = None) -> dict:
    """Set the transformer's challenger share (`rentalml ab promote|rollback --cluster`): 0 sends every user to
    the champion; with `champion` (promote) the champion arm becomes that version and the challenger arm is
    emptied. Only the env entries change (JSON Patch)."""
    if not 0 <= int(percent) <= 100:
        raise ValueError(f"percent must be between 0 and 100, got {percent}")
    api = api or custom_objects_api()
    ns = namespace_of(namespace)
    live = get_isvc(api, ns, name)
    env = {ENV_PERCENT: str(int(percent))}
    if champion is not None:
        env = {ENV_CHAMPION: str(champion), ENV_CHALLENGER: "", ENV_PERCENT: "0"}
    ops = env_ops(live, "transformer", env)
    json_patch(api, ns, name, ops)
    return {"applied": True, "action": "patched", "namespace": ns, "name": name,
            "challenger_percent": int(env[ENV_PERCENT]), "patch": ops}
