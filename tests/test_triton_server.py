"""A real Triton Inference Server in the tests: the `tritonserver` of the nvidia-pytriton 0.7.0 wheel (Triton
2.51, python backend only) on the python-backend twin of the exported repository (rentalml.services.start_triton,
rentalml.export.triton.write_python_twin), started with the ServingRuntime's args.

Protocol and routes are Triton's (triton-inference-server/server r24.10, docs/protocol/README.md and
kserve/kserve docs/predict-api/v2/required_api.md): `/v2/models/<m>/versions/<v>` metadata / ready / infer,
v2 binary tensor extension (docs/protocol/extension_binary_data.md), statistics extension
(docs/protocol/extension_statistics.md), gRPC ModelInfer with `model_version`.
"""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from rentalml.export.triton import ENSEMBLE, RANKER, RETRIEVAL, SCORER, load_config
from rentalml.runtime.bundle import Bundle
from rentalml.runtime.history import pad_histories
from rentalml.runtime.two_stage import two_stage_topk
from rentalml.services import ServiceUnavailable, start_triton, triton_args


@pytest.fixture(scope="module")
def loaded(triton_bundles):
    return {v: Bundle(d) for v, d in triton_bundles.items()}


def _feed(b: Bundle, users: np.ndarray) -> dict[str, np.ndarray]:
    return {"history": pad_histories([b.user_history[u] for u in users], b.n_items, b.history_len),
            "user_features": b.user_features[users].astype(np.float32)}


def _infer(client, mod, model: str, version: int, feed: dict, outputs: list[str]) -> dict:
    ins = []
    for name, arr in feed.items():
        i = mod.InferInput(name, list(arr.shape), "INT64" if arr.dtype == np.int64 else "FP32")
        if mod is httpclient:
            i.set_data_from_numpy(arr, binary_data=True)
        else:
            i.set_data_from_numpy(arr)
        ins.append(i)
    res = client.infer(model, ins, model_version=str(version), outputs=[mod.InferRequestedOutput(o) for o in outputs])
    resp = res.get_response()
    got = resp["model_version"] if isinstance(resp, dict) else resp.model_version
    assert got == str(version)
    return {o: res.as_numpy(o) for o in outputs}


def test_both_versions_are_served_and_addressable(triton_server, triton_repo):
    client = httpclient.InferenceServerClient(triton_server.url.removeprefix("http://"))
    for name in (SCORER, RETRIEVAL, RANKER):
        meta = client.get_model_metadata(name)
        assert sorted(meta["versions"]) == ["1", "2"], name
        assert meta["platform"] == "python"
        for v in ("1", "2"):
            assert client.is_model_ready(name, v)
            # the served tensors are the cluster config's
            cfg = load_config(triton_repo / name / "config.pbtxt")
            assert [(t["name"], t["shape"][1:]) for t in client.get_model_metadata(name, v)["inputs"]] == \
                [(t.name, list(t.dims)) for t in cfg.input]
        assert not client.is_model_ready(name, "3")
    assert client.get_model_metadata(ENSEMBLE)["versions"] == ["2"]


def test_http_and_grpc_top_k_equal_the_in_process_engine(triton_server, loaded):
    """rental-scorer of each version over tritonclient HTTP (binary tensors) and gRPC == that version's bundle
    scorer in process; the two versions answer differently (so pinning is observable)."""
    http = httpclient.InferenceServerClient(triton_server.url.removeprefix("http://"))
    grpc = grpcclient.InferenceServerClient(triton_server.grpc_url)
    users = np.arange(48)  # < max_batch_size: one request, split by nothing
    answers = {}
    for v, b in loaded.items():
        feed = _feed(b, users)
        for client, mod in ((http, httpclient), (grpc, grpcclient)):
            out = _infer(client, mod, SCORER, v, feed, ["indices", "scores"])
            ref_idx, ref_sc = b.score_histories([b.user_history[u] for u in users], out["indices"].shape[1],
                                                feed["user_features"])
            np.testing.assert_array_equal(out["indices"], ref_idx)
            np.testing.assert_allclose(out["scores"], ref_sc, rtol=1e-5, atol=1e-5)
        answers[v] = out["indices"][:, :10]
    assert (answers[1] != answers[2]).any(axis=1).mean() > 0.5


def test_ensemble_runs_its_pinned_version(triton_server, loaded):
    grpc = grpcclient.InferenceServerClient(triton_server.grpc_url)
    b = loaded[2]
    users = np.arange(16)
    feed = _feed(b, users)
    out = _infer(grpc, grpcclient, ENSEMBLE, 2, feed, ["indices", "scores"])
    t_idx, t_sc = two_stage_topk(b, [b.user_history[u] for u in users], out["indices"].shape[1],
                                 user_features=feed["user_features"])
    np.testing.assert_array_equal(out["indices"], t_idx)
    np.testing.assert_allclose(out["scores"], t_sc, rtol=1e-5, atol=1e-5)


def test_triton_args_take_the_servingruntime_command():
    args = ["tritonserver", "--model-store=/mnt/models", "--grpc-port=9000", "--http-port", "8080",
            "--metrics-port=8002", "--allow-grpc=true", "--strict-readiness=true"]
    got = triton_args(args, binary="/x/tritonserver", model_repository="/repo", http_port=1, grpc_port=2,
                      metrics_port=3, backends="/b")
    assert got == ["/x/tritonserver", "--model-store=/repo", "--grpc-port=2", "--http-port=1", "--metrics-port=3",
                   "--allow-grpc=true", "--strict-readiness=true", "--backend-directory=/b"]


def test_a_model_that_fails_to_load_is_reported_with_the_log(triton_server, tmp_path):
    """Triton exits at start-up when a model fails to load: start_triton raises with the log's tail."""
    bad = tmp_path / "repo" / "broken"
    (bad / "1").mkdir(parents=True)
    (bad / "config.pbtxt").write_text('name: "broken"\nbackend: "python"\nmax_batch_size: 4\n'
                                      'input [ { name: "x" data_type: TYPE_INT64 dims: [ 1 ] } ]\n'
                                      'output [ { name: "y" data_type: TYPE_INT64 dims: [ 1 ] } ]\n')
    (bad / "1" / "model.py").write_text("raise RuntimeError('no such model here')\n")
    with pytest.raises(ServiceUnavailable, match="no such model here"):
        start_triton(tmp_path / "repo", timeout=60)
