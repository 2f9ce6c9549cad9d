"""The cluster split, run for real on loopback: a real Triton (the nvidia-pytriton wheel's tritonserver on the
python-backend twin of the exported two-version repository, tests/conftest.py `triton_server`) and the
transformer side (`RemoteStages`, `rentalml serve --role transformer`) driving the core two-stage recommendation
over it. Each A/B arm calls its own model version (`/v2/models/<m>/versions/<V>/infer`): answers equal that
version's in-process engine, users are sticky, versions never mix (issue 11, defect 13).

KServe starts a custom transformer with `--model_name`, `--predictor_host` and `--http_port` appended to the
container args (kserve/kserve v0.15.2 pkg/apis/serving/v1beta1/transformer_custom.go, GetContainer), and
`--workers` from containerConcurrency (same file); the v2 version route is Triton's / KServe's
(kserve docs/predict-api/v2/required_api.md: `POST v2/models/${MODEL_NAME}[/versions/${MODEL_VERSION}]/infer`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from rentalml.evaluation.ab import CHALLENGER, assign_variant
from rentalml.runtime.bundle import Bundle
from rentalml.runtime.features import Filters
from rentalml.runtime.pipeline import Pipeline
from rentalml.services import free_port, stop_process, wait_port

SALT = "transformer-test-salt"


def recommend(bundle, users, k, *, filters=None, **kw):
    return Pipeline(bundle, **kw).run(users, k, filters)


@pytest.fixture(scope="module")
def loaded(triton_bundles):
    return {v: Bundle(d) for v, d in triton_bundles.items()}


def test_remote_stages_equal_local_per_version(loaded, triton_server):
    from rentalml.inference.predictor import RemoteStages

    for v, bundle in loaded.items():
        stages = RemoteStages(triton_server.url, bundle.n_items, version=v)
        users = list(bundle.user_index[:30]) + ["u_brand_new"]
        # with candidates covering the catalogue, retrieval → ranking on Triton equals the in-process exact
        # scorer; with fewer the remote lists are the two-stage approximation (recall: tests/test_two_stage.py)
        local = recommend(bundle, users, 10, filters=Filters(budget=2000))
        remote = recommend(bundle, users, 10, filters=Filters(budget=2000), stages=stages,
                           n_candidates=bundle.n_items)
        assert (remote.property_ids == local.property_ids).all(), v
        np.testing.assert_allclose(remote.scores, local.scores, rtol=1e-4, atol=1e-4)
        assert remote.sources == local.sources and remote.sources[-1] == "cold_start"
        short = recommend(bundle, users, 10, filters=Filters(budget=2000), stages=stages, n_candidates=50)
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(short.property_ids, local.property_ids,
                                                                      strict=True)])
        assert overlap > 0.7
    # bulk: more rows than max_batch_size are split into several Triton calls
    b = loaded[2]
    many = list(b.user_index[:150])
    stages = RemoteStages(triton_server.url, b.n_items, version=2)
    assert stages.max_batch["rental-ranker"] == 64
    bulk = recommend(b, many, 10, stages=stages, n_candidates=b.n_items)
    assert (bulk.property_ids == recommend(b, many, 10).property_ids).all()


def test_remote_stages_refuse_a_version_triton_does_not_serve(loaded, triton_server):
    from rentalml.inference.predictor import PredictorError, RemoteStages

    with pytest.raises(PredictorError, match="version 7"):
        RemoteStages(triton_server.url, loaded[1].n_items, version=7)


def test_triton_rejects_bad_tensors_naming_them(loaded, triton_server):
    """What the retired ONNX Runtime stand-in imitated, now from Triton itself: wrong shape, wrong datatype and a
    missing input are 400s naming the input, and the model keeps serving."""
    b = loaded[1]
    url = f"{triton_server.url}/v2/models/rental-ranker/versions/1/infer"
    hist = np.full(b.history_len, b.n_items).tolist()
    meta = httpx.get(f"{triton_server.url}/v2/models/rental-ranker/versions/1").json()
    width = next(t["shape"][1] for t in meta["inputs"] if t["name"] == "candidates")
    good = {"history": ("INT64", [1, b.history_len], hist),
            "candidates": ("INT64", [1, width], list(range(width))),
            "user_features": ("FP32", [1, b.user_feature_dim], [0.0] * b.user_feature_dim)}

    def post(**change):
        inputs = {**good, **change}
        body = {"inputs": [{"name": n, "datatype": d, "shape": s, "data": x} for n, (d, s, x) in inputs.items()
                           if x is not None]}
        return httpx.post(url, json=body)

    assert post().status_code == 200
    r = post(history=("INT64", [1, 3], [1, 2, 3]))
    assert r.status_code == 400 and "history" in r.text
    r = post(history=("FP32", [1, b.history_len], hist))
    assert r.status_code == 400 and "history" in r.text and "FP32" in r.text
    r = post(candidates=("INT64", [1, width], None))
    assert r.status_code == 400 and "candidates" in r.text
    assert httpx.get(f"{triton_server.url}/v2/models/rental-ranker/versions/1/ready").status_code == 200


def _stats(url: str, model: str, version: int) -> int:
    doc = httpx.get(f"{url}/v2/models/{model}/versions/{version}/stats").json()
    return int(doc["model_stats"][0]["inference_count"])


def _rows(res, mod) -> tuple[list[list[str]], list[str], list[str]]:
    ids = [[p.decode() for p in row] for row in res.as_numpy("property_id")]
    resp = res.get_response()
    params = resp["parameters"] if mod is httpclient else {k: v.string_param for k, v in resp.parameters.items()}
    n = len(ids)
    versions = params["model_version"].split(",") if "," in params["model_version"] else [params["model_version"]] * n
    variants = params["variant"].split(",") if "," in params["variant"] else [params["variant"]] * n
    return ids, versions, variants


def test_transformer_pins_each_arm_to_its_triton_version(loaded, triton_server, triton_bundles, tmp_path):
    """`rentalml serve --role transformer` with the champion (version 1) and a 50 % challenger (version 2), started
    the way KServe starts a transformer, over real Triton holding both versions: every row's model_version is
    the version that computed it (its ids equal that version's in-process answer, and the versions answer
    differently), users are sticky (the salted split), a request holding users of both arms gets each row from
    its own version, and Triton served both versions."""
    http, grpc = free_port(), free_port()
    env = {**os.environ, "KSERVE_LOGLEVEL": "WARNING", "OMP_NUM_THREADS": "1", "RENTALML_HOME": str(tmp_path),
           "RENTALML_SERVE__AB_SALT": SALT, "RENTALML_SERVE__CACHE_SIZE": "0"}
    host = triton_server.url.removeprefix("http://")
    before = {v: _stats(triton_server.url, "rental-ranker", v) for v in (1, 2)}
    proc = subprocess.Popen([sys.executable, "-m", "rentalml.cli", "serve", "--role", "transformer",
                             "--bundle", str(triton_bundles[1]), "--challenger-bundle", str(triton_bundles[2]),
                             "--challenger-percent", "50", "--grpc-port", str(grpc), "--model_name",
                             "rental-recommender", "--predictor_host", host, "--http_port", str(http),
                             "--workers", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_port(http, timeout=120, proc=proc)
        hc = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
        for _ in range(200):
            try:
                if hc.is_model_ready("rental-recommender"):
                    break
            except Exception:  # noqa: BLE001 - not up yet
                pass
        gc = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
        users = list(loaded[1].user_index[:40])
        arm_of = {u: 2 if assign_variant(u, SALT, 50) == CHALLENGER else 1 for u in users}
        assert set(arm_of.values()) == {1, 2}
        ref = {v: dict(zip(users, recommend(b, users, 10).property_ids.tolist(), strict=True))
               for v, b in loaded.items()}
        differ = [u for u in users if ref[1][u] != ref[2][u]]
        assert len(differ) > len(users) // 2  # the versions are distinguishable by their answers

        def ask(mod, client, batch):
            inp = mod.InferInput("user_id", [len(batch)], "BYTES")
            inp.set_data_from_numpy(np.array(batch, dtype=object))
            k = mod.InferInput("k", [1], "INT32")
            k.set_data_from_numpy(np.array([10], dtype=np.int32))
            return _rows(client.infer("rental-recommender", [inp, k]), mod)

        seen: dict[str, set] = {u: set() for u in users}
        for mod, client in ((httpclient, hc), (grpcclient, gc)):
            for batch in ([u] for u in users):  # one user a request
                ids, versions, variants = ask(mod, client, batch)
                seen[batch[0]].add(versions[0])
                assert versions[0] == str(arm_of[batch[0]])
                assert variants[0] == ("challenger" if arm_of[batch[0]] == 2 else "champion")
                assert ids[0] == ref[arm_of[batch[0]]][batch[0]], (batch, versions)
            ids, versions, _ = ask(mod, client, users)  # both arms in one request: nothing mixes
            assert versions == [str(arm_of[u]) for u in users]
            assert ids == [ref[arm_of[u]][u] for u in users]
        assert all(len(v) == 1 for v in seen.values())  # sticky
        after = {v: _stats(triton_server.url, "rental-ranker", v) for v in (1, 2)}
        assert after[1] > before[1] and after[2] > before[2]
        # the impressions carry the version that served them
        events = [json.loads(line) for line in (tmp_path / "ab" / "outcomes.jsonl").read_text().splitlines()]
        assert events and all(e["model_version"] == str(arm_of[e["user_id"]]) for e in events)
    finally:
        stop_process(proc, timeout=20)


def test_transformer_refuses_arms_on_one_triton_version(loaded, triton_server, triton_bundles, tmp_path):
    """Two different bundles that resolve to the same Triton version would silently share graphs: refused."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(triton_bundles[2], other)
    meta = json.loads((other / "bundle.json").read_text())
    (other / "bundle.json").write_text(json.dumps({**meta, "model_version": "1"}))
    env = {**os.environ, "KSERVE_LOGLEVEL": "WARNING", "OMP_NUM_THREADS": "1", "RENTALML_HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "-m", "rentalml.cli", "serve", "--role", "transformer",
                          "--bundle", str(triton_bundles[1]), "--challenger-bundle", str(other),
                          "--challenger-percent", "50", "--predictor-host", triton_server.url,
                          "--http-port", str(free_port()), "--grpc-port", str(free_port())],
                         env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode != 0 and "same Triton model version 1" in res.stderr


def test_the_predictor_role_is_retired():
    res = subprocess.run([sys.executable, "-m", "rentalml.cli", "serve", "--role", "predictor"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "server or transformer" in res.stderr
