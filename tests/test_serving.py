"""`rentalml serve` end to end: a real server subprocess, driven with tritonclient (HTTP + gRPC) and httpx."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

tritonclient = pytest.importorskip("tritonclient")
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from serving_helpers import MODEL, Server, make_bundle, warm_users  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from rentalml.config import get_settings  # noqa: E402

DEFAULT_K = get_settings().serve.default_k
MAX_K = get_settings().serve.max_k
METRICS = ("ml_inference_duration_seconds", "ml_inference_requests_total", "ml_cache_hit_rate", "ml_model_load_seconds")


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("serving") / "bundle", "1")


@pytest.fixture(scope="session")
def known_users(bundle_dir) -> list[str]:
    return warm_users(bundle_dir)[:3]


@pytest.fixture(scope="module")
def server(bundle_dir, tmp_path_factory):
    srv = Server(bundle_dir, tmp_path_factory.mktemp("serve-log") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        rc = srv.stop()
    assert rc == 0, f"SIGTERM should shut the server down cleanly, got {rc}:\n{srv.log.read_text()[-3000:]}"


@pytest.fixture(params=["http", "grpc"])
def client(request, server):
    if request.param == "http":
        c = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    else:
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    c.protocol = request.param
    yield c
    c.close()


def _mod(c):
    return httpclient if c.protocol == "http" else grpcclient


def _infer(c, user_ids=None, k=None, user_dtype="BYTES", user_shape=None, raw_users=None):
    mod = _mod(c)
    inputs = []
    if user_ids is not None or raw_users is not None:
        arr = raw_users if raw_users is not None else np.array(user_ids, dtype=object)
        inp = mod.InferInput("user_id", list(user_shape or arr.shape), user_dtype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    if k is not None:
        kin = mod.InferInput("k", [1], "INT32")
        kin.set_data_from_numpy(np.array([k], dtype=np.int32))
        inputs.append(kin)
    return c.infer(MODEL, inputs)


def _params(c, result) -> dict:
    resp = result.get_response()
    if c.protocol == "http":
        return resp["parameters"]
    return {key: p.string_param for key, p in resp.parameters.items()}


def _check_recs(result, n: int, k: int):
    ids = result.as_numpy("property_id")
    scores = result.as_numpy("score")
    assert ids.shape == (n, k) and scores.shape == (n, k)
    assert scores.dtype == np.float32
    decoded = [[v.decode() if isinstance(v, bytes) else str(v) for v in row] for row in ids]
    assert all(pid.startswith("p_") for row in decoded for pid in row)
    assert np.all(np.diff(scores, axis=1) <= 1e-6), "scores must be non-increasing along each row"
    assert all(len(set(row)) == len(row) for row in decoded), "no duplicate property in a row"
    return decoded, scores


# ---- v2 over HTTP and gRPC --------------------------------------------------------------------------------
def test_server_and_model_ready_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL)
    meta = client.get_model_metadata(MODEL)
    if client.protocol == "http":
        inputs = {i["name"]: i for i in meta["inputs"]}
        outputs = {o["name"]: o for o in meta["outputs"]}
        assert meta["name"] == MODEL
        assert inputs["user_id"]["datatype"] == "BYTES" and inputs["k"]["datatype"] == "INT32"
        assert outputs["property_id"]["datatype"] == "BYTES" and outputs["score"]["datatype"] == "FP32"
    else:
        assert meta.name == MODEL
        assert {i.name: i.datatype for i in meta.inputs} == {"user_id": "BYTES", "k": "INT32"}
        assert {o.name: o.datatype for o in meta.outputs} == {"property_id": "BYTES", "score": "FP32"}


def test_infer_known_and_unknown_users_default_k(client, known_users):
    users = [*known_users, "u_never_seen_before"]
    result = _infer(client, users)
    _check_recs(result, len(users), DEFAULT_K)
    params = _params(client, result)
    assert params["model_version"] == "1" and params["variant"] == "champion"
    assert params["sources"].split(",") == ["model"] * 3 + ["cold_start"]


def test_infer_explicit_k(client, known_users):
    users = [*known_users, "u_unknown"]
    result = _infer(client, users, k=5)
    decoded, _ = _check_recs(result, len(users), 5)
    # same user, same answer, whichever protocol; k is a prefix of the default-k list
    full, _ = _check_recs(_infer(client, users), len(users), DEFAULT_K)
    assert [row[:5] for row in full] == decoded


def test_http_json_outputs_and_requested_outputs(server, known_users):
    c = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    inp = httpclient.InferInput("user_id", [1], "BYTES")
    inp.set_data_from_numpy(np.array(known_users[:1], dtype=object), binary_data=False)
    out = [httpclient.InferRequestedOutput("score", binary_data=False)]
    result = c.infer(MODEL, [inp], outputs=out)
    assert result.as_numpy("property_id") is None
    assert result.as_numpy("score").shape == (1, DEFAULT_K)
    # plain JSON request (stock KServe 0.21 needs Content-Type: application/json; our middleware fixes that up)
    body = {"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [2], "data": [known_users[0], "nobody"]},
                       {"name": "k", "datatype": "INT32", "shape": [1], "data": [3]}]}
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["x-model-version"] == "1" and r.headers["x-variant"] == "champion"
    outs = {o["name"]: o for o in r.json()["outputs"]}
    assert outs["property_id"]["shape"] == [2, 3] and len(outs["score"]["data"]) == 6
    curl_style = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=json.dumps(body),
                            headers={"content-type": "application/x-www-form-urlencoded"})
    assert curl_style.status_code == 200, curl_style.text


MALFORMED = {
    "missing user_id": (dict(k=5), "user_id"),
    "INT32 user_id": (dict(raw_users=np.array([1, 2], dtype=np.int32), user_dtype="INT32"), "user_id"),
    "2-D user_id": (dict(raw_users=np.array([["u_1", "u_2"], ["u_3", "u_4"]], dtype=object)), "user_id"),
    "empty batch": (dict(raw_users=np.array([], dtype=object)), "user_id"),
    "k=0": (dict(user_ids=["u_1"], k=0), "k"),
    "k=100000": (dict(user_ids=["u_1"], k=100_000), "k"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_are_rejected(client, case, known_users):
    kwargs, field = MALFORMED[case]
    with pytest.raises(InferenceServerException) as err:
        _infer(client, **kwargs)
    if client.protocol == "http":
        assert err.value.status() == "400", err.value
    else:
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT", err.value
    assert f"'{field}'" in err.value.message(), err.value.message()
    # the server keeps serving
    _check_recs(_infer(client, known_users[:1], k=2), 1, 2)


def test_malformed_plain_http(server):
    for body, field in [({"inputs": [{"name": "k", "datatype": "INT32", "shape": [1], "data": [1]}]}, "user_id"),
                        ({"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [1], "data": ["u_1"]},
                                     {"name": "k", "datatype": "FP32", "shape": [1], "data": [2.0]}]}, "k"),
                        ({"inputs": [{"name": "user", "datatype": "BYTES", "shape": [1], "data": ["u_1"]}]}, "user"),
                        ({"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [1], "data": ["u_1"]}],
                          "outputs": [{"name": "bogus"}]}, "bogus")]:
        r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body)
        assert r.status_code == 400, r.text
        assert f"'{field}'" in r.json()["error"]


# ---- friendly JSON API ----------------------------------------------------------------------------------
def test_predict_with_explanations(server, known_users):
    r = httpx.post(f"{server.url}/predict",
                   json={"user_id": known_users[0], "num_recommendations": 4, "include_explanations": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["user_id"] == known_users[0] and body["source"] == "model"
    assert body["model_version"] == "1" and body["model_type"] == "hybrid" and body["variant"] == "champion"
    recs = body["recommendations"]
    assert [x["rank"] for x in recs] == [1, 2, 3, 4]
    assert all(x["property_id"].startswith("p_") and x["explanation"] for x in recs)
    scores = [x["score"] for x in recs]
    assert scores == sorted(scores, reverse=True)


def test_predict_unknown_user_and_defaults(server):
    r = httpx.post(f"{server.url}/predict", json={"user_id": "u_brand_new"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["source"] == "cold_start" and len(body["recommendations"]) == DEFAULT_K
    assert "explanation" not in body["recommendations"][0]


@pytest.mark.parametrize("payload,field", [
    ({"num_recommendations": 3}, "user_id"),
    ({"user_id": "u_1", "num_recommendations": 0}, "num_recommendations"),
    ({"user_id": "u_1", "num_recommendations": MAX_K + 1}, "num_recommendations"),
    ({"user_id": "u_1", "num_recommendations": "many"}, "num_recommendations"),
    ({"user_id": "u_1", "model_type": "no-such-model"}, "model_type"),
])
def test_predict_bad_input(server, payload, field):
    r = httpx.post(f"{server.url}/predict", json=payload)
    assert r.status_code in (400, 422), r.text
    body = r.json()
    assert field in body["error"]
    assert any(field in d["loc"] for d in body["detail"])


def test_health(server):
    r = httpx.get(f"{server.url}/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ok" and r.json()["model"] == MODEL and r.json()["model_version"] == "1"


def test_openapi_docs_describe_the_friendly_api(server):
    """/docs (Swagger UI) and /openapi.json are served; the friendly routes are there with their request schema."""
    assert httpx.get(f"{server.url}/docs").status_code == 200
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/predict", "/feedback", "/explain"} <= set(spec["paths"])
    schema = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"user_id", "num_recommendations"} <= set(schema["properties"]) and "user_id" in schema["required"]


def test_metrics_after_traffic(server, known_users):
    httpx.post(f"{server.url}/predict", json={"user_id": known_users[0]})
    text = httpx.get(f"{server.url}/metrics").text
    for name in METRICS:
        assert name in text, name
    assert 'ml_inference_requests_total{model="rental-recommender",status="rejected",variant="champion"}' in text
    assert 'status="success"' in text
    for protocol in ("rest", "grpc", "json"):
        assert f'protocol="{protocol}"' in text
    load = [ln for ln in text.splitlines() if ln.startswith("ml_model_load_seconds{")]
    assert load and float(load[0].rsplit(" ", 1)[1]) > 0
    assert "request_predict_seconds" in text  # KServe's own metrics share the registry


# ---- pickling (what --workers relies on) ---------------------------------------------------------------
PICKLE_CHECK = """
import pickle, sys
from rentalml.inference.model import RecommenderModel
users = sys.argv[2].split(",")
model = RecommenderModel(sys.argv[1], cache_size=100, cache_ttl_s=60)
model.load()
assert model.ready
first = model.batcher.recommend(model.routing, users, 5)
clone = pickle.loads(pickle.dumps(model))
again = clone.batcher.recommend(clone.routing, users, 5)
assert (first.property_ids == again.property_ids).all() and first.sources == again.sources
clone.batcher.recommend(clone.routing, users, 5)
assert clone.cache.hits == len(users) and abs(clone.cache.hit_rate - 0.5) < 1e-9, clone.cache.hit_rate
print("ok")
"""


def test_model_pickles_and_caches(bundle_dir, known_users):
    # own process: kserve's and tritonclient's gRPC stubs both register the `inference.*` protobuf symbols, so
    # kserve cannot be imported where tritonclient.grpc already is (duplicate symbol in the descriptor pool)
    out = subprocess.run([sys.executable, "-c", PICKLE_CHECK, str(bundle_dir), ",".join(known_users)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.slow
def test_workers_serve_and_shut_down(bundle_dir, known_users, tmp_path):
    srv = Server(bundle_dir, tmp_path / "workers.log", "--workers", "2")
    try:
        srv.wait_ready()
        for _ in range(4):
            r = httpx.post(f"{srv.url}/predict", json={"user_id": known_users[0], "num_recommendations": 2})
            assert r.status_code == 200, r.text
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
        c.protocol = "grpc"
        _check_recs(_infer(c, known_users, k=3), 3, 3)
    finally:
        rc = srv.stop()
    assert rc == 0, srv.log.read_text()[-3000:]
    with socket.socket() as s:  # no REST worker left behind holding the port
        assert s.connect_ex(("127.0.0.1", srv.http_port)) != 0


# ---- rentalml loadtest -----------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["friendly", "rest", "grpc"])
def test_loadtest_cli(server, bundle_dir, protocol):
    port = server.grpc_port if protocol == "grpc" else server.http_port
    # own process: the CLI imports tritonclient.grpc (and this test process may already hold it, harmlessly)
    out = subprocess.run([sys.executable, "-c", "from rentalml.cli import app; app()", "loadtest",
                          "--url", f"http://127.0.0.1:{port}", "--protocol", protocol, "--requests", "60",
                          "--duration", "20", "--concurrency", "2", "--k", "5", "--users-from", str(bundle_dir)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    assert res["protocol"] == protocol and res["requests"] == 60 and res["errors"] == 0
    assert 0 < res["p50_ms"] <= res["p95_ms"] <= res["p99_ms"] and res["rps"] > 0


def test_loadtest_refuses_other_hosts():
    from rentalml.inference.loadtest import loopback_target

    assert loopback_target("http://127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert loopback_target("localhost:8081")[1] == 8081
    for url in ("http://10.1.2.3:8080", "http://8.8.8.8:80", "http://127.0.0.1"):
        with pytest.raises(ValueError):
            loopback_target(url)
    out = subprocess.run([sys.executable, "-c", "from rentalml.cli import app; app()", "loadtest", "--url",
                          "http://192.0.2.1:8080", "--requests", "1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "loopback" in out.stderr


# ---- business rules per request (rentalml.recommend.Filters) ---------------------------------------------
def _rules(bundle_dir):
    props = pd.read_parquet(bundle_dir / "properties.parquet").set_index("property_id")
    city = props["city"].value_counts().index[0]
    budget = float(props.loc[props["city"] == city, "price"].median())
    return props, city, budget


def test_v2_request_parameters_apply_business_rules(client, known_users, bundle_dir):
    props, city, budget = _rules(bundle_dir)
    mod = _mod(client)
    inp = mod.InferInput("user_id", [3], "BYTES")
    inp.set_data_from_numpy(np.array(known_users[:3], dtype=object))
    # an integer budget: KServe 0.21's gRPC InferParameter has no double_param (tritonclient sends floats as
    # one, and the server would drop it); strings and integers travel on both protocols
    budget = int(budget)
    res = client.infer(MODEL, [inp], parameters={"city": city, "budget": budget})
    ids = [p.decode() if isinstance(p, bytes) else p for row in res.as_numpy("property_id") for p in row]
    got = props.loc[[p for p in ids if p]]
    assert len(got) > 0 and (got["city"] == city).all()
    assert got["price"].between(0.7 * budget, 1.3 * budget).all()
    with pytest.raises(Exception, match="budget"):  # 400 / INVALID_ARGUMENT naming the parameter
        client.infer(MODEL, [inp], parameters={"budget": "cheap"})
    assert client.is_server_ready()


def test_predict_filters(server, known_users, bundle_dir):
    props, city, budget = _rules(bundle_dir)
    r = httpx.post(f"{server.url}/predict", json={"user_id": known_users[0], "num_recommendations": 5,
                                                  "filters": {"city": city, "budget": budget,
                                                              "budget_band": [0.8, 1.2]}})
    assert r.status_code == 200, r.text
    got = props.loc[[x["property_id"] for x in r.json()["recommendations"]]]
    assert len(got) == 5 and (got["city"] == city).all() and got["price"].between(0.8 * budget, 1.2 * budget).all()
    for rules, field in (({"budget": "cheap"}, "filters.budget"), ({"budget_band": [2, 1]}, "filters.budget_band"),
                         ({"colour": "red"}, "filters")):
        r = httpx.post(f"{server.url}/predict", json={"user_id": known_users[0], "filters": rules})
        assert r.status_code == 422 and field in r.json()["error"], r.text
