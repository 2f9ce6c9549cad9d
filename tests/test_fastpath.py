"""The v2 REST fast path (rentalml.inference.protocol.rest) answers exactly as KServe's own stack does, and the
batching (inference.batching.run_missing / LoopBatcher) gives every request the rows it would get alone.

Two real `rentalml serve` processes on one bundle, one with `serve.fast_path=false`, fed the same bytes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

httpclient = pytest.importorskip("tritonclient.http")
import tritonclient.grpc as grpcclient  # noqa: E402
from serving_helpers import MODEL, Server, make_bundle, warm_users  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

INFER = f"/v2/models/{MODEL}/infer"


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("fastpath") / "bundle", "7")


@pytest.fixture(scope="module")
def servers(bundle_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("fastpath-logs")
    env = {"RENTALML_SERVE__CACHE_SIZE": "0"}  # every request runs the model
    fast = Server(bundle_dir, logs / "fast.log", env=env)
    slow = Server(bundle_dir, logs / "slow.log", env={**env, "RENTALML_SERVE__FAST_PATH": "false"})
    try:
        fast.wait_ready()
        slow.wait_ready()
        yield fast, slow
    finally:
        for s in (fast, slow):
            assert s.stop() == 0, s.log.read_text()[-3000:]


def _binary_body(users: list[str], outputs: dict[str, bool] | None = None, k: int | None = None,
                 parameters: dict | None = None) -> tuple[bytes, int]:
    inp = httpclient.InferInput("user_id", [len(users)], "BYTES")
    inp.set_data_from_numpy(np.array(users, dtype=object), binary_data=True)
    inputs = [inp]
    if k is not None:
        kin = httpclient.InferInput("k", [1], "INT32")
        kin.set_data_from_numpy(np.array([k], dtype=np.int32), binary_data=True)
        inputs.append(kin)
    outs = None if outputs is None else [httpclient.InferRequestedOutput(n, binary_data=b) for n, b in outputs.items()]
    body, json_len = httpclient.InferenceServerClient.generate_request_body(inputs, outputs=outs,
                                                                            parameters=parameters)
    return body, json_len


def _normalise(r: httpx.Response) -> tuple:
    """Status, the headers a client reads, and the body with the per-request random id removed."""
    ct = r.headers.get("content-type", "")
    json_len = r.headers.get("inference-header-content-length")
    if json_len is not None:
        head, rest = json.loads(r.content[: int(json_len)]), r.content[int(json_len):]
    else:
        head, rest = r.json(), b""
    if isinstance(head, dict) and re.fullmatch(r"[0-9a-f]{32}", str(head.get("id", ""))):
        head.pop("id")
    return (r.status_code, ct.split(";")[0], json_len is not None, r.headers.get("x-model-version"),
            r.headers.get("x-variant"), head, rest)


def _post(server, content: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(server.url + INFER, content=content, headers=headers or {}, timeout=30)


def _requests(users: list[str]) -> dict[str, tuple[bytes, dict]]:
    u = users
    cases = {}
    body, n = _binary_body(u[:1])
    cases["binary in, default outputs"] = (body, {"inference-header-content-length": str(n)})
    body, n = _binary_body(u[:3], {"property_id": True, "score": True}, k=5)
    cases["binary in and out, k=5, 3 users"] = (body, {"inference-header-content-length": str(n)})
    body, n = _binary_body(u[:2], {"score": True, "property_id": False})
    cases["mixed binary/JSON outputs"] = (body, {"inference-header-content-length": str(n)})
    body, n = _binary_body(u[:1], {"score": False})
    cases["one JSON output"] = (body, {"inference-header-content-length": str(n)})
    doc = {"id": "req-42", "inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [2], "data": [u[0], "nobody"]},
                                      {"name": "k", "datatype": "INT32", "shape": [1], "data": [3]}]}
    cases["JSON, request id, unknown user"] = (json.dumps(doc).encode(), {"content-type": "application/json"})
    cases["JSON as curl sends it"] = (json.dumps(doc).encode(), {"content-type": "application/x-www-form-urlencoded"})
    doc = {"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [1], "data": [u[1]]}],
           "parameters": {"min_bedrooms": 2, "available_only": True}}
    cases["business rules as parameters"] = (json.dumps(doc).encode(), {"content-type": "application/json"})
    # malformed: every one is refused with the same status and message by both stacks
    bad = {
        "missing user_id": {"inputs": [{"name": "k", "datatype": "INT32", "shape": [1], "data": [1]}]},
        "FP32 k": {"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [1], "data": [u[0]]},
                              {"name": "k", "datatype": "FP32", "shape": [1], "data": [2.0]}]},
        "k=0": {"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [1], "data": [u[0]]},
                           {"name": "k", "datatype": "INT32", "shape": [1], "data": [0]}]},
        "unknown output": {"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [1], "data": [u[0]]}],
                           "outputs": [{"name": "bogus"}]},
        "bad budget_band": {"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [1], "data": [u[0]]}],
                            "parameters": {"budget_band": "wide"}},
        "shape as a string": {"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": "1", "data": [u[0]]}]},
        "no inputs": {"inputs": []},
    }
    for name, doc in bad.items():
        cases[f"malformed: {name}"] = (json.dumps(doc).encode(), {"content-type": "application/json"})
    cases["malformed: not JSON"] = (b"{not json", {"content-type": "application/json"})
    # binary requests at the edges of the common-case decoder (protocol.decode.everyday)
    body, n = _binary_body(u[:2], {"property_id": True, "score": True}, k=3)
    doc = json.loads(body[:n])
    doc["id"] = "req-7"
    head = json.dumps(doc).encode()
    cases["binary with a request id"] = (head + body[n:], {"inference-header-content-length": str(len(head))})
    k64 = httpclient.InferInput("k", [1], "INT64")
    k64.set_data_from_numpy(np.array([4], dtype=np.int64), binary_data=True)
    inp = httpclient.InferInput("user_id", [1], "BYTES")
    inp.set_data_from_numpy(np.array([u[0]], dtype=object), binary_data=True)
    body, n = httpclient.InferenceServerClient.generate_request_body([inp, k64])
    cases["binary INT64 k"] = (body, {"inference-header-content-length": str(n)})
    body, n = _binary_body(u[:1], k=0)
    cases["malformed: binary k=0"] = (body, {"inference-header-content-length": str(n)})
    bad = httpclient.InferInput("user_id", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"\xff\xfe"], dtype=object), binary_data=True)
    body, n = httpclient.InferenceServerClient.generate_request_body([bad])
    cases["malformed: user id not UTF-8"] = (body, {"inference-header-content-length": str(n)})
    body, n = _binary_body(u[:1], parameters={"city": "nowhere-city"})
    cases["binary with a business rule"] = (body, {"inference-header-content-length": str(n)})
    body, n = _binary_body(u[:1])
    cases["malformed: binary part cut short"] = (body[:-2], {"inference-header-content-length": str(n)})
    cases["malformed: header length past the body"] = (body, {"inference-header-content-length": str(len(body) + 9)})
    return cases


KSERVE_500 = ("malformed: binary part cut short", "malformed: user id not UTF-8")


def test_fast_path_answers_as_kserve_does(servers, bundle_dir):
    fast, slow = servers
    users = warm_users(bundle_dir)[:5]
    for name, (body, headers) in _requests(users).items():
        a, b = _normalise(_post(fast, body, headers)), _normalise(_post(slow, body, headers))
        if name in KSERVE_500:
            # KServe 0.21 fails in its BYTES decoder (500); the fast path checks first and names the input
            assert b[0] == 500, b
            assert a[0] == 400 and "'user_id'" in a[5]["error"], a
            continue
        assert a == b, f"{name}:\nfast {a}\nslow {b}"
        if name.startswith("malformed"):
            assert 400 <= a[0] < 500, f"{name}: {a}"
        else:
            assert a[0] == 200, f"{name}: {a}"


def _grpc_answer(server, users, k=None, dtype="BYTES", model=MODEL):
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    arr = np.array(users, dtype=object if dtype == "BYTES" else np.int32)
    inp = grpcclient.InferInput("user_id", list(arr.shape), dtype)
    inp.set_data_from_numpy(arr)
    inputs = [inp]
    if k is not None:
        kin = grpcclient.InferInput("k", [1], "INT32")
        kin.set_data_from_numpy(np.array([k], dtype=np.int32))
        inputs.append(kin)
    try:
        r = c.infer(model, inputs)
    except InferenceServerException as exc:
        return ("error", exc.status(), exc.message())
    resp = r.get_response(as_json=True)
    resp.pop("id", None)
    return ("ok", resp, r.as_numpy("property_id").tolist(), r.as_numpy("score").tolist())
    

def test_grpc_fast_servicer_answers_as_kserve_does(servers, bundle_dir):
    fast, slow = servers
    users = warm_users(bundle_dir)[:4]
    cases = {"one user": dict(users=users[:1]), "three users, k=4": dict(users=users[:3], k=4),
             "unknown user": dict(users=["nobody"], k=2), "k=0": dict(users=users[:1], k=0),
             "INT32 user_id": dict(users=[1, 2], dtype="INT32"), "other model": dict(users=users[:1], model="nope")}
    for name, kw in cases.items():
        a, b = _grpc_answer(fast, **kw), _grpc_answer(slow, **kw)
        assert a == b, f"{name}:\nfast {a}\nslow {b}"
        assert (a[0] == "ok") == (name in ("one user", "three users, k=4", "unknown user")), (name, a)


def _kserve_predict_count(server) -> float:
    """KServe's own request_predict_seconds histogram: fed by its stack (Model.__call__), not by the fast path."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("request_predict_seconds_count") and MODEL in line)


def test_fast_path_is_the_one_answering(servers, bundle_dir):
    fast, slow = servers
    users = warm_users(bundle_dir)[:3]
    body, n = _binary_body(users[:1])
    before = _kserve_predict_count(fast), _kserve_predict_count(slow)
    for _ in range(5):
        for s in (fast, slow):
            assert _post(s, body, {"inference-header-content-length": str(n)}).status_code == 200
    after = _kserve_predict_count(fast), _kserve_predict_count(slow)
    assert after[0] == before[0], "well-formed requests must not reach KServe's stack on the fast server"
    assert after[1] == before[1] + 5
    for _ in range(3):  # gRPC: the fast servicer answers without KServe's dataplane either
        for s in (fast, slow):
            assert _grpc_answer(s, users[:1])[0] == "ok"
    again = _kserve_predict_count(fast), _kserve_predict_count(slow)
    assert again == (after[0], after[1] + 3)


def test_concurrent_requests_get_what_they_get_alone(servers, bundle_dir):
    """Requests that land in one event-loop iteration share an engine call; each still gets its own rows."""
    fast, slow = servers
    users = warm_users(bundle_dir)[:24]
    asks = [(users[i: i + 1 + i % 3], 3 + i % 8) for i in range(len(users))]
    expected = {}
    sc = httpclient.InferenceServerClient(f"127.0.0.1:{slow.http_port}")
    for us, k in asks:
        expected[(tuple(us), k)] = _ids(sc, us, k)

    def one(ask):
        c = httpclient.InferenceServerClient(f"127.0.0.1:{fast.http_port}")
        us, k = ask
        return [(tuple(us), k, _ids(c, us, k)) for _ in range(4)]

    with ThreadPoolExecutor(8) as pool:
        for batch in pool.map(one, asks * 2):
            for us, k, got in batch:
                assert got == expected[(us, k)], (us, k)


def _ids(client, users: list[str], k: int) -> list[list[str]]:
    inp = httpclient.InferInput("user_id", [len(users)], "BYTES")
    inp.set_data_from_numpy(np.array(users, dtype=object))
    kin = httpclient.InferInput("k", [1], "INT32")
    kin.set_data_from_numpy(np.array([k], dtype=np.int32))
    r = client.infer(MODEL, [inp, kin])
    return [[v.decode() for v in row] for row in r.as_numpy("property_id")]


RUN_MISSING = r"""
import sys
import numpy as np
from rentalml.inference.batching import Rows, run_missing
from rentalml.inference.model import RecommenderModel
from rentalml.runtime.features import Filters

model = RecommenderModel(sys.argv[1], cache_size=0)
model.load()
users = sys.argv[2].split(",")
rules = Filters.from_request({"min_bedrooms": 2})
asks = [(users[0:1], 10, None), (users[1:3], 10, None), (users[3:4], 4, None), (users[4:5], 10, rules),
        (users[5:6] + ["nobody"], 10, None)]
alone = [model.batcher.recommend(model.routing, us, k, f) for us, k, f in asks]
batches = [Rows(model.batcher, model.routing, us, k, f) for us, k, f in asks]
assert run_missing(model.batcher, batches) == [None] * len(asks)
for b, ref in zip(batches, alone):
    got = b.result()
    assert (got.property_ids == ref.property_ids).all(), (got.property_ids, ref.property_ids)
    assert np.allclose(got.scores, ref.scores, atol=1e-5), (got.scores, ref.scores)
    assert got.sources == ref.sources
# one engine call for the unfiltered k=10 rows of three requests
calls = []
engine = model.routing.champion.engine
orig = engine.recommend
engine.recommend = lambda u, k, f=None: calls.append((list(u), k, f)) or orig(u, k, f)
run_missing(model.batcher, [Rows(model.batcher, model.routing, us, k, f) for us, k, f in asks])
assert sorted(len(u) for u, _, _ in calls) == [1, 1, 5], calls
print("ok")
"""


def test_run_missing_merges_requests_and_matches_single_calls(bundle_dir):
    # own process: kserve cannot be imported where tritonclient.grpc already is (see test_serving.py)
    users = warm_users(bundle_dir)[:6]
    out = subprocess.run([sys.executable, "-c", RUN_MISSING, str(bundle_dir), ",".join(users)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
