"""Issue 13 point 3, registry outage, with a real MLflow tracking server process (sqlite store, artifacts served
by it) and real `rentalml serve` processes in registry mode:

- a server that started once while MLflow was up has the champion's bundle in its local cache; with MLflow down,
  a new server starts from that cached bundle, and /health's `registry` block and `ml_registry_up` /
  `ml_model_from_cache` say so;
- POST /admin/reload with MLflow down answers 503 with the reason, and the cached version keeps answering v2;
- MLflow started again on the same store and port, the alias moved: the watcher loads the new version from the
  registry and the health block and the gauges flip back.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

tritonclient = pytest.importorskip("tritonclient")
import tritonclient.http as httpclient  # noqa: E402
from serving_helpers import Server, make_bundle, v2_infer, v2_params, warm_users  # noqa: E402

from rentalml.config import Settings  # noqa: E402
from rentalml.services import Service, free_port, stop_process, wait_until  # noqa: E402

BIN = Path(sys.executable).parent  # the venv's console scripts (mlflow)


class MlflowServer:
    """`mlflow server` on 127.0.0.1:port over one sqlite store and artifact dir; stop() and start() again keep
    both (the same registry coming back)."""

    def __init__(self, root: Path, port: int | None = None):
        self.root, self.port = root, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.svc: Service | None = None

    def start(self) -> None:
        log = open(self.root / "mlflow.log", "ab")  # noqa: SIM115 - the child holds it
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", (self.root / "artifacts").as_uri(), "--serve-artifacts"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True,
            env={**os.environ, "HOME": str(self.root), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        log.close()
        self.svc = Service("mlflow", self.url, self.port, proc)

        def healthy() -> bool:
            try:
                return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
            except httpx.TransportError:  # not listening yet
                return False

        try:
            wait_until(healthy, 300, interval=0.25, proc=proc, what="the MLflow server's /health")
        except (TimeoutError, RuntimeError) as exc:
            raise AssertionError(f"{exc}:\n{(self.root / 'mlflow.log').read_text()[-3000:]}") from None

    def stop(self) -> None:
        if self.svc is not None and self.svc.proc is not None:
            # uvicorn's worker is in the server's own session: end that group (by its id), then the server
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.svc.proc.pid, signal.SIGTERM)
            stop_process(self.svc.proc, timeout=20)
            with contextlib.suppress(ProcessLookupError):  # a worker that outlived its server
                os.killpg(self.svc.proc.pid, signal.SIGKILL)
        self.svc = None


def _metric(srv, name: str, **labels) -> float | None:
    """One sample's value from the server's /metrics (None when there is no such sample)."""
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(httpx.get(f"{srv.url}/metrics", timeout=5).text):
        for sample in fam.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def _served_version(srv) -> str:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{srv.http_port}")
    try:
        r = v2_infer(client, httpclient, srv.users[:3], k=5)
        assert r.as_numpy("property_id").shape == (3, 5)
        return v2_params(r, False)["model_version"]
    finally:
        client.close()


@pytest.fixture
def world(tmp_path):
    from rentalml.registry import mlflow_registry as reg

    mlflow_srv = MlflowServer(tmp_path)
    s = Settings(home=tmp_path / "client-home", mlflow_tracking_uri=mlflow_srv.url)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # nothing MLflow writes may land in the repository
    servers: list[Server] = []
    try:
        mlflow_srv.start()
        b1 = make_bundle(tmp_path / "b1", "1")
        run = reg.log_training_run(model_type="hybrid", params={}, metrics={"ndcg@10": 0.1}, bundle_dir=b1,
                                   settings=s)
        assert reg.register(run, settings=s)["version"] == "1"
        env = {"RENTALML_MLFLOW_TRACKING_URI": mlflow_srv.url,
               "RENTALML_SERVE__REGISTRY_CACHE_DIR": str(tmp_path / "bundle-cache"),
               "RENTALML_SERVE__RELOAD_POLL_S": "0.5", "RENTALML_SERVE__REGISTRY_TIMEOUT_S": "3"}

        def serve(tag: str) -> Server:
            srv = Server(None, tmp_path / f"serve-{tag}.log", env=env)
            servers.append(srv)
            srv.users = warm_users(b1)[:10]
            srv.wait_ready(timeout=90)
            return srv

        yield {"mlflow": mlflow_srv, "settings": s, "reg": reg, "serve": serve, "tmp": tmp_path}
    finally:
        os.chdir(cwd)
        for srv in servers:
            srv.stop()
        mlflow_srv.stop()


def test_serve_starts_from_cache_keeps_serving_on_reload_and_picks_up_the_registry(world):
    mlflow_srv, s, reg, tmp = world["mlflow"], world["settings"], world["reg"], world["tmp"]

    # 1. MLflow up: the server fetches version 1, verified, into the cache and records champion -> 1
    first = world["serve"]("up")
    health = httpx.get(f"{first.url}/health").json()
    assert health["model_version"] == "1"
    assert health["registry"]["reachable"] is True and health["registry"]["serving_cached"] == {}, health
    assert _metric(first, "ml_registry_up", model="rental-recommender") == 1
    assert _metric(first, "ml_model_from_cache", variant="champion") == 0
    index = (tmp / "bundle-cache" / "index.json").read_text()
    assert '"version": "1"' in index, index
    assert first.stop() == 0, first.log.read_text()[-3000:]

    # 2. MLflow down: a new server starts from the cached bundle and says so
    mlflow_srv.stop()
    cached = world["serve"]("down")
    health = httpx.get(f"{cached.url}/health").json()
    assert health["status"] == "ok" and health["model_version"] == "1", health
    reg_health = health["registry"]
    assert reg_health["reachable"] is False and reg_health["serving_cached"] == {"champion": "1"}, health
    assert "registry unreachable, serving cached champion version 1" in reg_health["detail"], health
    assert health["routing"]["champion"]["source"].startswith("cache:"), health
    assert _metric(cached, "ml_registry_up", model="rental-recommender") == 0
    assert _metric(cached, "ml_model_from_cache", variant="champion") == 1
    assert _served_version(cached) == "1"
    assert "model registry unreachable" in cached.log.read_text()

    # 3. reload with MLflow down: 503 with the reason; version 1 keeps answering
    r = httpx.post(f"{cached.url}/admin/reload", json={}, timeout=60)
    assert r.status_code == 503, r.text
    assert "unreachable" in r.json()["error"], r.text
    assert _served_version(cached) == "1"
    assert httpx.get(f"{cached.url}/health").json()["model_version"] == "1"

    # 4. MLflow back on the same store and port, the champion alias moved to version 2: the watcher loads it from
    # the registry, and the health block and the gauges flip back
    mlflow_srv.start()
    b2 = make_bundle(tmp / "b2", "2")
    run = reg.log_training_run(model_type="hybrid", params={}, metrics={"ndcg@10": 0.2}, bundle_dir=b2, settings=s)
    assert reg.register(run, settings=s)["version"] == "2"
    reg.set_alias("champion", "2", settings=s)

    def flipped() -> dict | None:
        h = httpx.get(f"{cached.url}/health", timeout=5).json()
        return h if h["model_version"] == "2" and h["registry"]["reachable"] is True else None

    health = wait_until(flipped, 90, interval=0.25, proc=cached.proc, what="the watcher to load version 2")
    assert health["registry"]["serving_cached"] == {} and "detail" not in health["registry"], health
    assert not health["routing"]["champion"]["source"].startswith("cache:"), health
    assert _served_version(cached) == "2"
    assert _metric(cached, "ml_registry_up", model="rental-recommender") == 1
    assert _metric(cached, "ml_model_from_cache", variant="champion") == 0


def test_cache_record_and_lookup_refuse_a_corrupt_entry(tmp_path):
    """The cache's own contract: the alias record is written whole, and an entry that no longer matches its
    checksums is never handed out."""
    from rentalml.registry.cache import BundleCache

    cache = BundleCache(tmp_path / "cache")
    b = make_bundle(cache.dir("m", "3"), "3")
    cache.record("m", "champion", "3")
    hit = cache.lookup("m", "champion")
    assert hit is not None and hit.version == "3" and hit.path == b and hit.cached
    assert cache.lookup("m", "challenger") is None
    assert cache.lookup("m", version="3").path == b
    onnx = next(b.glob("*.onnx"))
    onnx.write_bytes(onnx.read_bytes()[:100])  # truncated after it was cached
    assert cache.lookup("m", "champion") is None
    assert not list((tmp_path / "cache").glob(".index.*[!k]")), "a temporary index file was left behind"
