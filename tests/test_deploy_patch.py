"""The deploy step's patch of the InferenceService, applied with the API server's semantics for the content type
the kubernetes client sends, to the object rendered from the dev overlay (defect 5c and 13's deploy side).

Upstream rules these tests hold deploy to:
* kubernetes-client/python 30.1.0, kubernetes/client/api/custom_objects_api.py
  `patch_namespaced_custom_object_with_http_info`: Content-Type is always `application/merge-patch+json`
  (select_header_content_type(['application/merge-patch+json'])), and kubernetes/client/rest.py only rewrites
  json-patch bodies that are not lists.
* kubernetes/kubernetes staging/src/k8s.io/apiserver/pkg/endpoints/handlers/patch.go: merge patch is RFC 7386
  (a list in the patch replaces the list), JSON patch is RFC 6902; staging/src/k8s.io/apiextensions-apiserver/
  pkg/apiserver/customresource_handler.go and the docs page "Update API Objects in Place Using kubectl patch":
  strategic merge patch is not supported for custom resources (415).
rentalml.components.kubefake applies exactly these (jsonpatch / json-merge-patch libraries).
"""

from __future__ import annotations

import copy
import os

import pytest
from rentalml.components import rendered as cl
from rentalml.components import steps
from rentalml.components.kubefake import FakeKubeApi

from rentalml import kserve as ks

NS = "rentalml"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    return cl.render("dev", workdir=tmp_path_factory.mktemp("render"))


@pytest.fixture
def cluster(rendered, tmp_path, monkeypatch):
    """The fake API server holding the rendered InferenceService; KUBECONFIG points at it, so the code under
    test builds its client exactly as outside a pod (config.load_kube_config)."""
    isvc = cl.find(rendered, "InferenceService", "rental-recommender")
    with FakeKubeApi() as api:
        api.put(isvc, NS)
        monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "kubeconfig", NS)))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield api, isvc


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def _without(container: dict, names: set[str]) -> dict:
    c = copy.deepcopy(container)
    c["env"] = [e for e in c.get("env", []) if e["name"] not in names]
    return c


ARMS = {ks.ENV_CHAMPION, ks.ENV_CHALLENGER, ks.ENV_PERCENT}


def _deploy(version: str, tmp_path, percent: int = 10) -> dict:
    return steps.deploy(version=version, mode="kserve", canary_percent=percent, isvc_name="rental-recommender",
                        namespace=NS, manifest_path=tmp_path / f"deploy-{version}.yaml")


def test_deploy_patch_keeps_every_env_mount_probe_and_auth(cluster, tmp_path):
    """Two deploys (first version, then a canary) leave the transformer exactly as rendered except the three
    arm settings, and the predictor exactly as rendered except its revision annotation and 100 % traffic."""
    api, rendered = cluster
    first = _deploy("1", tmp_path)
    assert first["champion"] == "1" and first["percent"] == 0
    res = _deploy("2", tmp_path, percent=10)
    assert (res["champion"], res["challenger"], res["percent"], res["versions"]) == ("1", "2", 10, ["1", "2"])

    live = api.get("serving.kserve.io", NS, "inferenceservices", "rental-recommender")
    tr, tr0 = live["spec"]["transformer"], rendered["spec"]["transformer"]
    c, c0 = tr["containers"][0], tr0["containers"][0]
    # every env entry, mount, probe, port, security setting and volume of the rendered transformer is still there
    assert _without(c, ARMS) == c0
    assert {k: v for k, v in tr.items() if k != "containers"} == {k: v for k, v in tr0.items() if k != "containers"}
    env = _env(c)
    assert env["RENTALML_AUTH__ENABLED"]["value"] == "true"
    assert env["RENTALML_AUTH__JWT_SECRET_FILE"] == _env(c0)["RENTALML_AUTH__JWT_SECRET_FILE"]
    assert env[ks.ENV_CHAMPION]["value"] == "1" and env[ks.ENV_CHALLENGER]["value"] == "2"
    assert env[ks.ENV_PERCENT]["value"] == "10"
    # predictor: same model, storageUri, resources; a new revision pinned to the live versions, no Knative split
    pred, pred0 = live["spec"]["predictor"], rendered["spec"]["predictor"]
    assert pred["model"] == pred0["model"]
    assert pred["annotations"][ks.VERSIONS_ANNOTATION] == "1,2" and pred["canaryTrafficPercent"] == 100
    assert {k: v for k, v in pred.items() if k not in ("annotations", "canaryTrafficPercent")} == \
        {k: v for k, v in pred0.items() if k not in ("annotations", "canaryTrafficPercent")}
    assert live["metadata"]["labels"][ks.VERSION_LABEL] == "2"
    assert live["metadata"]["annotations"] == rendered["metadata"]["annotations"]
    assert live["status"]["components"]["predictor"]["latestReadyRevision"].endswith("00003")
    # only JSON Patches, and only what the deployer Role allows
    assert {p["content_type"] for p in api.patches()} == {ks.JSON_PATCH}
    assert api.api_calls() <= set(ks.API_CALLS)
    role = cl.find(cl.render("dev", workdir=tmp_path / "r"), "Role", "rentalml-deployer")
    allowed = {(v, g, r) for rule in role["rules"] for v in rule["verbs"] for g in rule["apiGroups"]
               for r in rule["resources"]}
    assert set(ks.API_CALLS) <= allowed


def test_deploy_waits_for_the_predictor_revision_before_moving_users(rendered, tmp_path, monkeypatch):
    """Rollout order: the transformer's arms change only once the predictor revision holding the new version
    is ready; when it never gets ready, the users stay where they were."""
    isvc = cl.find(rendered, "InferenceService", "rental-recommender")
    with FakeKubeApi(ready=False) as api:
        api.put(isvc, NS)
        monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "kubeconfig", NS)))
        with pytest.raises(ks.DeployError, match="predictor not ready"):
            ks.deploy_version("rental-recommender", version="7", canary_percent=10, namespace=NS, ready_timeout=0.3,
                             poll=0.1)
        live = api.get("serving.kserve.io", NS, "inferenceservices", "rental-recommender")
        assert ks.ENV_CHAMPION not in _env(live["spec"]["transformer"]["containers"][0])
        assert live["spec"]["predictor"]["annotations"][ks.VERSIONS_ANNOTATION] == "7"


def test_ab_rollback_patch_touches_only_the_percent(cluster, tmp_path):
    api, rendered = cluster
    _deploy("1", tmp_path)
    _deploy("2", tmp_path, percent=25)
    ks.set_canary_traffic("rental-recommender", 0, namespace=NS)
    live = api.get("serving.kserve.io", NS, "inferenceservices", "rental-recommender")
    c = live["spec"]["transformer"]["containers"][0]
    assert _env(c)[ks.ENV_PERCENT]["value"] == "0" and _env(c)[ks.ENV_CHALLENGER]["value"] == "2"
    assert _without(c, ARMS) == rendered["spec"]["transformer"]["containers"][0]


def test_missing_inference_service_is_an_error_not_a_bare_create(rendered, tmp_path, monkeypatch):
    """Deploy never creates the object from a spec of its own (that one had no auth, mounts or probes)."""
    with FakeKubeApi() as api:
        monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "kubeconfig", NS)))
        with pytest.raises(ks.DeployError, match="apply the manifests first"):
            _deploy("1", tmp_path)
        assert not [r for r in api.requests if r["method"] != "GET"]


def test_fake_api_applies_the_api_servers_patch_semantics(cluster):
    """The stand-in is faithful where the defect lives: a merge patch naming `containers` replaces the list
    (what the old deploy sent: env, mounts, probes and auth gone); strategic merge is refused for a CR."""
    from kubernetes import client, config

    api, rendered = cluster
    config.load_kube_config(config_file=os.environ["KUBECONFIG"])
    objs = client.CustomObjectsApi()
    spec = {"containers": [{"name": "kserve-container", "image": "x", "args": ["serve"]}]}
    objs.patch_namespaced_custom_object(ks.ISVC_GROUP, ks.ISVC_VERSION, NS, ks.ISVC_PLURAL, "rental-recommender",
                                        {"spec": {"transformer": spec}})
    assert api.patches()[-1]["content_type"] == "application/merge-patch+json"
    live = api.get("serving.kserve.io", NS, "inferenceservices", "rental-recommender")
    assert "env" not in live["spec"]["transformer"]["containers"][0]
    assert live["spec"]["transformer"]["volumes"] == rendered["spec"]["transformer"]["volumes"]  # maps merge
    code, body = api.handle("PATCH", f"/apis/{ks.ISVC_GROUP}/{ks.ISVC_VERSION}/namespaces/{NS}/{ks.ISVC_PLURAL}/"
                            "rental-recommender", "application/strategic-merge-patch+json", b"{}")
    assert code == 415
