"""The one stand-in Kubernetes API server (rentalml.components.kubefake), used by the local cluster and by the
tests of deploy, A/B promotion, and the tune/train steps: it refuses what the API server and the admission
webhooks refuse, for creates and for patches alike, so a passing call against it means an admitted one.
Driven through `handle` (the HTTP handler's body) and once through the real client."""

from __future__ import annotations

import json

import crd_schema
import pytest
from rentalml.components.kubefake import JSON_PATCH, MERGE_PATCH, FakeKubeApi, set_condition

from rentalml.training import jobs

TJ = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/ml/trainjobs"


def _create(api: FakeKubeApi, doc: dict) -> tuple[int, dict]:
    return api.handle("POST", TJ, "application/json", json.dumps(doc).encode())


def _patch(api: FakeKubeApi, name: str, ctype: str, patch) -> tuple[int, dict]:
    return api.handle("PATCH", f"{TJ}/{name}", ctype, json.dumps(patch).encode())


def test_create_sets_server_fields_and_refuses_a_taken_name_or_a_wrong_api_version():
    api = FakeKubeApi(validate=crd_schema.errors)
    code, obj = _create(api, jobs.trainjob("t1"))
    assert code == 201
    meta = obj["metadata"]
    assert meta["namespace"] == "ml" and meta["uid"] and meta["generation"] == 1 and meta["resourceVersion"]
    assert _create(api, jobs.trainjob("t1"))[0] == 409
    other = {**jobs.trainjob("t2"), "apiVersion": "trainer.kubeflow.org/v1"}
    assert _create(api, other)[0] == 400
    named = {**jobs.trainjob("x"), "metadata": {"generateName": "tj-"}}
    code, obj = _create(api, named)
    assert code == 201 and obj["metadata"]["name"].startswith("tj-") and len(obj["metadata"]["name"]) == 8
    assert api.api_calls() == {("create", "trainer.kubeflow.org", "trainjobs")}


def test_patches_are_validated_and_admitted_like_creates():
    """The API server validates an update against the CRD and calls the validating webhooks on UPDATE too:
    a patch cannot smuggle in what a create would be refused."""
    api = FakeKubeApi(validate=crd_schema.errors)
    assert _create(api, jobs.trainjob("t1"))[0] == 201
    code, body = _patch(api, "t1", JSON_PATCH, [{"op": "add", "path": "/spec/trainer/numNode", "value": 2}])
    assert code == 422 and "numNode" in body["message"]
    code, body = _patch(api, "t1", JSON_PATCH,
                        [{"op": "replace", "path": "/spec/runtimePatches/0/manager", "value": "rentalml"}])
    assert code == 403 and "domain-prefixed" in body["message"]
    assert api.get("trainer.kubeflow.org", "ml", "trainjobs", "t1")["spec"] == jobs.trainjob("t1")["spec"]


def test_patch_semantics_per_content_type_and_immutable_fields():
    api = FakeKubeApi()
    assert _create(api, jobs.trainjob("t1"))[0] == 201
    before = api.get("trainer.kubeflow.org", "ml", "trainjobs", "t1")
    # RFC 7386: a list in a merge patch replaces the whole list; null deletes a key; generation follows the spec
    code, obj = _patch(api, "t1", MERGE_PATCH, {"spec": {"trainer": {"args": ["--x"], "numNodes": None}}})
    assert code == 200 and obj["spec"]["trainer"]["args"] == ["--x"] and "numNodes" not in obj["spec"]["trainer"]
    assert obj["spec"]["trainer"]["env"] == before["spec"]["trainer"]["env"]  # maps merge
    assert obj["metadata"]["generation"] == 2
    assert int(obj["metadata"]["resourceVersion"]) > int(before["metadata"]["resourceVersion"])
    # RFC 6902: a failed `test` refuses the whole patch
    code, _ = _patch(api, "t1", JSON_PATCH, [{"op": "test", "path": "/spec/trainer/args/0", "value": "--y"},
                                             {"op": "replace", "path": "/spec/trainer/args/0", "value": "--z"}])
    assert code == 422
    assert api.get("trainer.kubeflow.org", "ml", "trainjobs", "t1")["spec"]["trainer"]["args"] == ["--x"]
    # strategic merge is not served for custom resources
    assert _patch(api, "t1", "application/strategic-merge-patch+json", {"spec": {}})[0] == 415
    for path, value in (("/metadata/name", "t2"), ("/metadata/namespace", "other"), ("/metadata/uid", "u"),
                        ("/kind", "JobSet")):
        code, body = _patch(api, "t1", JSON_PATCH, [{"op": "replace", "path": path, "value": value}])
        assert code == 422 and "immutable" in body["message"], path
    assert _patch(api, "nope", MERGE_PATCH, {"spec": {}})[0] == 404


def test_controllers_move_the_status_on_read_through_the_real_client():
    reads = []

    def controller(obj):
        reads.append(obj["metadata"]["name"])
        set_condition(obj, "Complete" if len(reads) > 1 else "Created", "Test")

    with FakeKubeApi(controllers={"trainjobs": controller}) as api:
        client = api.api()
        group, version, plural = jobs.TRAINJOB_API
        client.create_namespaced_custom_object(group, version, "ml", plural, jobs.trainjob("t1"))
        first = client.get_namespaced_custom_object(group, version, "ml", plural, "t1")
        second = client.get_namespaced_custom_object(group, version, "ml", plural, "t1")
    assert [c["type"] for c in first["status"]["conditions"]] == ["Created"]
    assert [(c["type"], c["status"]) for c in second["status"]["conditions"]] == [("Created", "False"),
                                                                                    ("Complete", "True")]
    assert api.calls[0] == ("create", group, plural, "ml", "t1")
    assert {c[0] for c in api.calls} == {"create", "get"}


def test_only_inference_services_get_kserve_revisions():
    api = FakeKubeApi()
    _, obj = _create(api, jobs.trainjob("t1"))
    assert "components" not in obj.get("status", {})


@pytest.mark.parametrize("ctype", [JSON_PATCH, MERGE_PATCH])
def test_a_patch_of_a_non_spec_field_keeps_the_generation(ctype):
    api = FakeKubeApi()
    _create(api, jobs.trainjob("t1"))
    patch = ([{"op": "add", "path": "/metadata/annotations", "value": {"a": "b"}}] if ctype == JSON_PATCH
             else {"metadata": {"annotations": {"a": "b"}}})
    code, obj = _patch(api, "t1", ctype, patch)
    assert code == 200 and obj["metadata"]["generation"] == 1 and obj["metadata"]["annotations"] == {"a": "b"}
