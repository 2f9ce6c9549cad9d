"""The serving half of the cluster, run on this machine from the rendered dev overlay (issue 11, "What to build"
point 3; rentalml.pipelines.local_cluster, also `rentalml pipeline local-cluster` / `make cluster-local`).

Two kfp.local pipeline runs register to a real MLflow server (--serve-artifacts on moto's S3, as the rendered
Deployment configures it), publish the Triton repository to the InferenceService's storageUri and deploy through
a stand-in API server with the API server's patch semantics (rentalml.components.kubefake). KServe's own storage
initializer (kserve-storage 0.21.0, `Storage.download_files`, what kserve/storage-initializer runs) fetches the
storageUri; real Triton (nvidia-pytriton 0.7.0's tritonserver, python-backend twin) serves it with the
ServingRuntime's args; the transformer runs with the patched InferenceService's command, args, env, mounts and
KServe's added args (kserve pkg/controller/v1beta1/inferenceservice/components/transformer.go). Requests go
through it with tritonclient over HTTP and gRPC with a JWT, as the manifest turns auth on.
"""

from __future__ import annotations

import copy

import pytest

from rentalml import kserve as ks

ARMS = {ks.ENV_CHAMPION, ks.ENV_CHALLENGER, ks.ENV_PERCENT}


def _need():
    import shutil

    from rentalml.services import ServiceUnavailable, prepare_triton, tansu_binary

    missing = [b for b in ("kubectl", "redis-server") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"not installed: {missing}")
    try:
        tansu_binary()
        prepare_triton()
    except ServiceUnavailable as exc:
        pytest.skip(str(exc))


def _strip(container: dict) -> dict:
    c = copy.deepcopy(container)
    c["env"] = [e for e in c.get("env", []) if e["name"] not in ARMS]
    return c


def test_local_cluster_retrain_publish_deploy_canary(tmp_path):
    _need()
    from rentalml.pipelines.local_cluster import run, summary

    rep = run(tmp_path / "cluster", users=12, canary_percent=50, log=lambda m: None)
    info = summary(rep)
    v1, v2 = (str(rep[f"run{i}"]["registered"]["version"]) for i in (1, 2))
    assert (v1, v2) == ("1", "2"), info
    # run 1: published where the InferenceService points, deployed to everyone; JWT on as in the manifest
    for user, by_kind in rep["first"].items():
        assert {str(p["model_version"]) for p in by_kind.values()} == {v1}, (user, by_kind)
    assert rep["unauthenticated"].startswith("rejected"), rep["unauthenticated"]
    # run 2: the patched object kept every env entry, mount, probe and the auth settings of the rendered one
    rendered, live = rep["rendered_isvc"]["spec"], rep["after2"]["spec"]
    assert _strip(live["transformer"]["containers"][0]) == rendered["transformer"]["containers"][0]
    assert live["predictor"]["model"] == rendered["predictor"]["model"]
    env = {e["name"]: e.get("value") for e in live["transformer"]["containers"][0]["env"]}
    assert env["RENTALML_AUTH__ENABLED"] == "true"
    assert (env[ks.ENV_CHAMPION], env[ks.ENV_CHALLENGER], env[ks.ENV_PERCENT]) == (v1, v2, "50")
    assert live["predictor"]["annotations"][ks.VERSIONS_ANNOTATION] == f"{v1},{v2}"
    # sticky per user over HTTP and gRPC, both arms used, never mixed
    seen = {}
    for user, answers in rep["answers"].items():
        versions = {str(p["model_version"]) for _kind, p in answers}
        assert len(versions) == 1, (user, answers)
        seen[user] = versions.pop()
    assert set(seen.values()) == {v1, v2}, info
    # the answers' versions are the Triton versions that computed them: each version's models ran once per user
    # answered with that version, except users whose answer came from the cache (answered with v1 before)
    delta = rep["triton_delta"]
    for v in (v1, v2):
        computed = [u for u, got in seen.items() if got == v and not (v == v1 and u in rep["first"])]
        ran = {k: n for k, n in delta.items() if k.rsplit(":", 1)[1] == v and n}
        assert ran and set(ran.values()) == {len(computed)}, (v, computed, delta)
    assert not {k for k, n in delta.items() if n and k.rsplit(":", 1)[1] not in (v1, v2)}, delta
    # the A/B impressions reached Kafka with the version each user was answered with
    events = [e for e in rep["outcomes"] if e.get("user_id") in seen]
    assert events, info
    assert all(str(e["model_version"]) == seen[e["user_id"]] for e in events)
