"""Hot reload under concurrent load (registry watcher and POST /admin/reload): zero failed requests, responses
switch model version; and the request timeout (REST 504, gRPC DEADLINE_EXCEEDED)."""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest

tritonclient = pytest.importorskip("tritonclient")
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from serving_helpers import Server, make_bundle, v2_infer, v2_params, warm_users  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from rentalml.config import Settings  # noqa: E402


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    from rentalml.registry import mlflow_registry as reg

    home = tmp_path_factory.mktemp("reload-home")
    s = Settings(home=home, mlflow_tracking_uri=f"sqlite:///{home}/mlflow.db")
    cwd = os.getcwd()
    os.chdir(home)  # nothing MLflow writes may land in the repository
    try:
        bundle = make_bundle(home / "b1", "1")  # v1: the champion the server starts with
        run = reg.log_training_run(model_type="hybrid", params={}, metrics={"ndcg@10": 0.1}, bundle_dir=bundle,
                                   settings=s)
        assert reg.register(run, settings=s)["version"] == "1"
        yield s, reg, home
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def server(registry, tmp_path_factory):
    s, _, home = registry
    srv = Server(None, tmp_path_factory.mktemp("reload-log") / "server.log",
                 env={"RENTALML_HOME": str(home), "RENTALML_MLFLOW_TRACKING_URI": s.tracking_uri,
                      "RENTALML_SERVE__RELOAD_POLL_S": "0.5"})
    srv.users = warm_users(home / "b1")[:50]
    try:
        srv.wait_ready()
        yield srv
    finally:
        assert srv.stop() == 0, srv.log.read_text()[-3000:]


def _metric(srv, name: str, **labels) -> float:
    """One sample's value from the server's /metrics (0 when the sample does not exist yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(httpx.get(f"{srv.url}/metrics").text):
        for sample in fam.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def _register_new(registry, metric: float) -> dict:
    """Register a fresh bundle as the next version (whatever the other tests registered before)."""
    from mlflow import MlflowClient

    s, reg, home = registry
    versions = MlflowClient(s.tracking_uri).search_model_versions(f"name='{s.model_name}'")
    n = max(int(v.version) for v in versions) + 1
    bundle = make_bundle(home / f"b{n}", str(n))
    run = reg.log_training_run(model_type="hybrid", params={}, metrics={"ndcg@10": metric}, bundle_dir=bundle,
                               settings=s)
    res = reg.register(run, settings=s)
    assert res["version"] == str(n)
    return res


def _routing(server, registry, champion: str, challenger: str | None = None, percent: float = 0) -> None:
    """Each test's own starting point: these aliases in the registry and the server serving them."""
    from mlflow import MlflowClient

    s, reg, _ = registry
    reg.set_alias("champion", champion, settings=s)
    if challenger is None:
        if reg.alias_version("challenger", settings=s) is not None:
            MlflowClient(s.tracking_uri).delete_registered_model_alias(s.model_name, "challenger")
    else:
        reg.set_alias("challenger", challenger, settings=s)
    r = httpx.post(f"{server.url}/admin/reload", json={"challenger_percent": percent}, timeout=60)
    assert r.status_code == 200, r.text
    health = httpx.get(f"{server.url}/health").json()
    assert health["model_version"] == champion, health


class Load:
    """Client threads (each its own tritonclient.http client) sending v2 requests until stopped."""

    def __init__(self, srv, threads: int = 4):
        self.srv, self.stop_evt = srv, threading.Event()
        self.results: list[list[tuple[float, str]]] = [[] for _ in range(threads)]
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, i):
        c = httpclient.InferenceServerClient(f"127.0.0.1:{self.srv.http_port}")
        n = 0
        while not self.stop_evt.is_set():
            u = self.srv.users[(i * 7 + n) % len(self.srv.users)]
            n += 1
            try:
                r = v2_infer(c, httpclient, [u], k=5)
                assert r.as_numpy("property_id").shape == (1, 5)
                self.results[i].append((time.monotonic(), v2_params(r, False)["model_version"]))
            except Exception as exc:
                self.errors.append(repr(exc))
        c.close()

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_evt.set()
        for t in self.threads:
            t.join()

    def check(self, old: str, new: str, switched_at: float):
        assert not self.errors, self.errors[:3]
        total = sum(len(r) for r in self.results)
        assert total > 50, total
        for res in self.results:
            versions = [v for _, v in res]
            assert set(versions) <= {old, new}
            assert old in versions and new in versions, versions
            first_new = versions.index(new)
            assert all(v == new for v in versions[first_new:]), "no response from the old version after the swap"
            assert all(v == new for t, v in res if t > switched_at)
        return total


def _version(srv) -> str:
    return httpx.get(f"{srv.url}/health").json()["model_version"]


def test_watcher_reloads_new_champion_under_load(server, registry):
    _routing(server, registry, champion="1")
    reloads = _metric(server, "ml_model_reloads_total", model="rental-recommender")
    with Load(server) as load:
        time.sleep(1.0)
        # a new, better version is registered: the gate makes it the champion, and the watcher (not a request)
        # swaps the server to it
        res = _register_new(registry, metric=0.9)
        new = res["version"]
        assert res["alias"] == "champion"
        deadline = time.monotonic() + 30
        while _version(server) != new and time.monotonic() < deadline:
            time.sleep(0.1)
        switched = time.monotonic()
        assert _version(server) == new
        time.sleep(1.0)
    total = load.check("1", new, switched)
    assert _metric(server, "ml_model_reloads_total", model="rental-recommender") >= reloads + 1
    print(f"watcher reload under load: {total} requests, 0 failed")


def test_admin_reload_under_load(server, registry):
    s, reg, _ = registry
    other = _register_new(registry, metric=0.0)["version"]  # a version of our own to roll back from
    _routing(server, registry, champion=other)
    reloads = _metric(server, "ml_model_reloads_total", model="rental-recommender")
    with Load(server) as load:
        time.sleep(1.0)
        reg.set_alias("champion", "1", settings=s)  # roll back to v1 and reload at once
        r = httpx.post(f"{server.url}/admin/reload", timeout=60)
        switched = time.monotonic()
        assert r.status_code == 200, r.text
        assert r.json()["after"]["champion"]["model_version"] == "1"
        time.sleep(1.0)
    print(f"/admin/reload under load: {load.check(other, '1', switched)} requests, 0 failed")
    # the reload is counted (the watcher may count the same alias move once more)
    assert _metric(server, "ml_model_reloads_total", model="rental-recommender") >= reloads + 1
    bad = httpx.post(f"{server.url}/admin/reload", json={"champion": "/no/such/bundle"})
    assert bad.status_code == 400 and "champion" in bad.json()["error"]
    bad = httpx.post(f"{server.url}/admin/reload", json={"challenger_percent": 150})
    assert bad.status_code == 422 and "challenger_percent" in bad.json()["error"]


def test_canary_from_registry_then_promote(server, registry):
    """Registry mode: the challenger alias joins at 50 % (sticky by user), `promote` moves the aliases and the
    running server follows (watcher) — everyone on the new champion."""
    from rentalml.evaluation import ab

    s, reg, _ = registry
    challenger = _register_new(registry, metric=0.0)["version"]
    _routing(server, registry, champion="1", challenger=challenger, percent=50)
    assert (reg.alias_version("champion", settings=s), reg.alias_version("challenger", settings=s)) == \
        ("1", challenger)
    assert httpx.get(f"{server.url}/health").json()["routing"]["challenger"]["model_version"] == challenger
    salt = Settings().serve.ab_salt
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    for u in server.users[:20]:
        params = v2_params(v2_infer(c, grpcclient, [u], k=3), True)
        arm = ab.assign_variant(u, salt, 50)
        assert (params["variant"], params["model_version"]) == (arm, "1" if arm == "champion" else challenger)
    assert ab.promote(settings=s)["champion"] == challenger
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health = httpx.get(f"{server.url}/health").json()
        if health["model_version"] == challenger and health["routing"]["challenger"] is None:
            break
        time.sleep(0.1)
    assert health["routing"]["challenger"] is None, health
    for u in server.users[:10]:
        params = v2_params(v2_infer(c, grpcclient, [u], k=3), True)
        assert (params["variant"], params["model_version"]) == ("champion", challenger)
    c.close()


def test_request_timeout(registry, tmp_path):
    _, _, home = registry
    srv = Server(home / "b1", tmp_path / "timeout.log", env={"RENTALML_SERVE__REQUEST_TIMEOUT_S": "0.000001",
                                                            "RENTALML_SERVE__CACHE_SIZE": "0"})
    try:
        srv.wait_ready()
        # known users (the ONNX graph runs, ~ms) against a 1 µs limit
        users = warm_users(home / "b1")[:100]
        r = httpx.post(f"{srv.url}/predict", json={"user_id": users[0], "num_recommendations": 100})
        assert r.status_code == 504 and "request_timeout_s" in r.json()["error"], r.text
        h = httpclient.InferenceServerClient(f"127.0.0.1:{srv.http_port}")
        with pytest.raises(InferenceServerException) as err:
            v2_infer(h, httpclient, users, k=100)
        assert err.value.status() == "504" and "request_timeout_s" in err.value.message()
        g = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
        with pytest.raises(InferenceServerException) as err:
            v2_infer(g, grpcclient, users, k=100)
        assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED" and "request_timeout_s" in err.value.message()
        # the three timed-out requests (REST /predict, v2 REST, v2 gRPC) are counted, not just declared
        assert _metric(srv, "ml_inference_timeouts_total", model="rental-recommender") == 3
    finally:
        assert srv.stop() == 0, srv.log.read_text()[-3000:]


def test_registry_watcher_reloads_on_a_move_and_keeps_serving_through_errors(caplog):
    """RegistryWatcher (inference/loading.py) checks every interval through rentalml.services.wait_until: a
    registry that cannot answer and a reload that fails are logged and the served version stays; a moved alias
    reloads. Driven by an injected sleep: no thread, no wall clock."""
    from rentalml.inference.loading import RegistryWatcher

    answers: list = [RuntimeError("registry down"), ("1", None), ("2", None), ("2", None), ("3", None), ("3", None)]
    served, last, reloads, sleeps = ["1"], [None], [], []

    def latest():
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        last[0] = a
        return a

    def reload():
        reloads.append(last[0][0])
        if len(reloads) == 1:
            raise ValueError("bundle unreadable")
        served[0] = last[0][0]

    def sleep(s):
        sleeps.append(s)
        if not answers:
            watcher.stop()

    watcher = RegistryWatcher(lambda: (served[0], None), latest, reload, 7.0, clock=lambda: 0.0, sleep=sleep)
    with caplog.at_level("WARNING", logger="rentalml.inference"):
        watcher.run()  # returns once stopped
    assert reloads == ["2", "2", "3"] and served == ["3"]
    assert set(sleeps) == {7.0} and len(sleeps) == 7
    warnings = [r.getMessage() for r in caplog.records]
    assert any("registry down" in w for w in warnings) and any("bundle unreadable" in w for w in warnings)
