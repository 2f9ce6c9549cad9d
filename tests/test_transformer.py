"""The cluster split, run for real on loopback: a v2 predictor serving the Triton model repository (the
stand-in for Triton: same repository, same config.pbtxt contract, same protocol) and the transformer side
(`RemoteStages`) driving the core two-stage recommendation over it. Results equal the in-process stages."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import numpy as np
import pytest

from rentalml.export.bundle import Bundle
from rentalml.export.triton import write_triton_repo
from rentalml.recommend import Filters, recommend
from rentalml.services import free_port, wait_port


@pytest.fixture(scope="module")
def bundle(hybrid_bundle_dir):
    return Bundle(hybrid_bundle_dir)


@pytest.fixture(scope="module")
def predictor(bundle, tmp_path_factory):
    repo = write_triton_repo(bundle.path, tmp_path_factory.mktemp("repo") / "models")
    http, grpc = free_port(), free_port()
    env = {**os.environ, "KSERVE_LOGLEVEL": "WARNING", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rentalml.cli", "serve", "--role", "predictor",
                             "--model-repository", str(repo), "--http-port", str(http), "--grpc-port", str(grpc)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_port(http, timeout=60, proc=proc)
        url = f"http://127.0.0.1:{http}"
        for _ in range(100):
            if httpx.get(f"{url}/v2/models/rental-ranker/ready").status_code == 200:
                break
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_predictor_serves_the_repository_models(predictor):
    for name in ("rental-retrieval", "rental-ranker", "rental-scorer"):
        meta = httpx.get(f"{predictor}/v2/models/{name}")
        assert meta.status_code == 200, name
        assert httpx.get(f"{predictor}/v2/models/{name}/ready").status_code == 200


def test_remote_stages_equal_local(bundle, predictor):
    from rentalml.inference.predictor import RemoteStages

    stages = RemoteStages(predictor, bundle.n_items)
    users = list(bundle.user_index[:30]) + ["u_brand_new"]
    # with candidates covering the catalogue, retrieval → ranking on the predictor equals the in-process exact
    # scorer; with fewer the remote lists are the two-stage approximation (recall: tests/test_two_stage.py)
    local = recommend(bundle, users, 10, filters=Filters(budget=2000))
    remote = recommend(bundle, users, 10, filters=Filters(budget=2000), stages=stages, n_candidates=bundle.n_items)
    assert (remote.property_ids == local.property_ids).all()
    np.testing.assert_allclose(remote.scores, local.scores, rtol=1e-4, atol=1e-4)
    assert remote.sources == local.sources and remote.sources[-1] == "cold_start"
    short = recommend(bundle, users, 10, filters=Filters(budget=2000), stages=stages, n_candidates=50)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(short.property_ids, local.property_ids,
                                                                  strict=True)])
    assert overlap > 0.7


def test_predictor_rejects_bad_tensors_naming_them(bundle, predictor):
    url = f"{predictor}/v2/models/rental-ranker/infer"
    body = {"inputs": [{"name": "history", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]}]}
    r = httpx.post(url, json=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "history" in r.text
    hist = np.full((1, bundle.history_len), bundle.n_items).ravel().tolist()
    body = {"inputs": [{"name": "history", "shape": [1, bundle.history_len], "datatype": "FP32", "data": hist}]}
    r = httpx.post(url, json=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "datatype" in r.text
    body = {"inputs": [{"name": "history", "shape": [1, bundle.history_len], "datatype": "INT64", "data": hist}]}
    r = httpx.post(url, json=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "candidates" in r.text
    # and it keeps serving
    assert httpx.get(f"{predictor}/v2/models/rental-ranker/ready").status_code == 200


def test_transformer_role_over_the_predictor(bundle, predictor, tmp_path):
    """`rentalml serve --role transformer` started the way KServe starts a transformer (it appends
    --model_name, --predictor_host and --http_port): its v2 answers equal the in-process engine's."""
    import tritonclient.http as httpclient

    http, grpc = free_port(), free_port()
    env = {**os.environ, "KSERVE_LOGLEVEL": "WARNING", "OMP_NUM_THREADS": "1", "RENTALML_HOME": str(tmp_path)}
    host = predictor.removeprefix("http://")
    proc = subprocess.Popen([sys.executable, "-m", "rentalml.cli", "serve", "--role", "transformer",
                             "--bundle", str(bundle.path), "--grpc-port", str(grpc), "--model_name",
                             "rental-recommender", "--predictor_host", host, "--http_port", str(http)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_port(http, timeout=90, proc=proc)
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
        for _ in range(200):
            try:
                if client.is_model_ready("rental-recommender"):
                    break
            except Exception:
                pass
        users = list(bundle.user_index[:20]) + ["u_brand_new"]
        inp = httpclient.InferInput("user_id", [len(users)], "BYTES")
        inp.set_data_from_numpy(np.array(users, dtype=object))
        k = httpclient.InferInput("k", [1], "INT32")
        k.set_data_from_numpy(np.array([10], dtype=np.int32))
        res = client.infer("rental-recommender", [inp, k])
        got = np.array([[p.decode() for p in row] for row in res.as_numpy("property_id")], dtype=object)
        local = recommend(bundle, users, 10)
        assert (got == local.property_ids).all()
        assert res.get_response()["parameters"]["sources"].split(",")[-1] == "cold_start"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
