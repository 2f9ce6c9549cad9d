"""Shared fixtures: a small seeded synthetic marketplace, its splits and cached model fits."""

from __future__ import annotations

import pytest
import torch

from rentalml.data.generator import generate_marketplace
from rentalml.evaluation.protocols import split
from rentalml.training.trainer import fit_model

# Test machines are small and shared: intra-op thread oversubscription makes the tiny fits here ~10x slower.
torch.set_num_threads(1)

#: small, fast training parameters for the tests
FAST_PARAMS = {"epochs": 10, "neighbours": 32}

#: the files whose tests run longest (each runs whole pipelines, images or outages: `make test`'s
#: --durations, docs/architecture.md "Test time"), collected first so that pytest-xdist starts them first and the
#: short files fill the other workers meanwhile, instead of one long test starting last
SLOW_FIRST = ("test_local_cluster.py", "test_demo.py", "test_images.py", "test_faults.py", "test_monitoring.py",
              "test_pipeline.py", "test_freshness.py", "test_distributed.py", "test_streaming.py", "test_rbac.py")


#: the tests that read the session fixture `drift_retraining` (one kfp.local pipeline run, below): `make test`'s
#: scheduler (pytest_xdist_make_scheduler) sends them to one worker, so the run happens once
SHARED_RUN = ("test_pipeline.py::test_local_pipeline_run",
              "test_monitoring.py::test_drift_injection_triggers_a_retraining_run")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept
    readers = {f"{item.path.name}::{item.name}" for item in items if "drift_retraining" in item.fixturenames}
    if readers - set(SHARED_RUN):
        raise pytest.UsageError(f"tests reading drift_retraining must be listed in SHARED_RUN: {readers}")


def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile, with the SHARED_RUN tests as one more unit of their own (so on one worker). pytest-xdist's
    loadgroup would do this with marks, but with pytest 9 it silently groups nothing: xdist 3.8 renames
    `item._nodeid`, which pytest 9's Node.nodeid no longer reads."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LoadFileSharedRun(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.rsplit("/", 1)[-1] in SHARED_RUN:
                return "shared-run"
            return super()._split_scope(nodeid)

    return LoadFileSharedRun(config, log)


@pytest.fixture(scope="session")
def market():
    return generate_marketplace(n_users=400, n_properties=200, n_events=8000, seed=1)


@pytest.fixture(scope="session")
def splits(market):
    cache: dict = {}

    def get(protocol: str = "random-75-25", seed: int = 42):
        if (protocol, seed) not in cache:
            cache[protocol, seed] = split(market.interactions, protocol, seed)
        return cache[protocol, seed]

    return get


@pytest.fixture(scope="session")
def fit(market, splits):
    """fit(name, protocol="random-75-25", seed=42, **params) → Fitted on the protocol's train split (cached)."""
    cache: dict = {}

    def get(name: str, protocol: str = "random-75-25", seed: int = 42, **params):
        key = (name, protocol, seed, tuple(sorted(params.items())))
        if key not in cache:
            train, _ = splits(protocol)
            cache[key] = fit_model(name, market, train, params={**FAST_PARAMS, **params}, seed=seed)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def hybrid_bundle_dir(market, fit, tmp_path_factory):
    """A bundle of the default (hybrid) model fit on the random-75-25 train split, written once per session."""
    from rentalml.export.bundle import write_bundle

    return write_bundle(fit("hybrid"), market, tmp_path_factory.mktemp("hybrid-bundle") / "b", quantize=False)


# --- one kfp.local training-pipeline run, read by two tests ----------------------------------------------------
def shift_market(ds, seed: int = 7):
    """A batch after a market shift: prices up 80 %, people only look at 3+ bedroom houses, views turn into
    applications."""
    import numpy as np

    from rentalml.data.dataset import Dataset

    items = ds.items.copy()
    items["price"] = items["price"] * 1.8
    big = set(items.index[items["bedrooms"] >= 3])  # items are indexed by property_id
    inter = ds.interactions[ds.interactions["property_id"].isin(big)].copy()
    inter["event_type"] = np.where(np.random.default_rng(seed).random(len(inter)) < 0.6, "application",
                                   inter["event_type"])
    return Dataset(inter.reset_index(drop=True), items, ds.users, name="shifted")


@pytest.fixture(scope="session")
def shifted_batch(market):
    return shift_market(market)


@pytest.fixture(scope="session")
def drift_retraining(hybrid_bundle_dir, shifted_batch, tmp_path_factory):
    """`rentalml monitor drift --retrain local --fail-on-drift` on a shifted batch, against the hybrid bundle, in
    an empty state dir: the drift it finds triggers the whole training pipeline under kfp.local (a fresh Python
    process per step, the costliest thing in the suite), which the monitor runs as `rentalml pipeline run
    --local` with --json. Read-only for its readers: test_monitoring asserts the trigger and what it registered,
    test_pipeline asserts the pipeline run itself (artifacts, gate, lineage, local deploy). Both are listed in
    SHARED_RUN, so the run happens once per `make test`."""
    import json
    import os
    import subprocess
    import sys
    from types import SimpleNamespace

    root = tmp_path_factory.mktemp("drift-retraining")
    home, batch, out = root / "home", root / "shifted", root / "report"
    shifted_batch.save(batch)
    summary = root / "pipeline-summary.json"
    params = json.dumps({"epochs": 3, "eval_every": 3, "neighbours": 16, "dim": 16, "hidden": 16})
    env = {**os.environ, "RENTALML_HOME": str(home), "RENTALML_MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
           "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "rentalml.cli", "monitor", "drift", "--current", str(batch), "--bundle",
           str(hybrid_bundle_dir), "--window-days", "0", "--out", str(out), "--retrain", "local",
           "--retrain-arg=--params", f"--retrain-arg={params}", "--retrain-arg=--json",
           f"--retrain-arg={summary}", "--fail-on-drift"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=600)
    return SimpleNamespace(home=home, batch=batch, out=out, result=res, summary=summary,
                           tracking_uri=env["RENTALML_MLFLOW_TRACKING_URI"])


# --- real services on loopback (rentalml.services) ------------------------------------------------------------
# Outside CI a missing server binary skips the test with the reason; `.ci/run` sets RENTALML_REQUIRE_SERVICES=1,
# which turns that skip into a failure, so CI can never pass with a service test silently skipped.
import os  # noqa: E402

from rentalml import services as _services  # noqa: E402


def _service(kind: str, **kw):
    try:
        svc = _services.start_tansu(**kw) if kind == "tansu" else getattr(_services, f"start_{kind}")(**kw)
    except _services.ServiceUnavailable as exc:
        if os.environ.get("RENTALML_REQUIRE_SERVICES") == "1":
            pytest.fail(f"required service missing: {exc}")
        pytest.skip(str(exc))
    return svc


@pytest.fixture(scope="session")
def kafka_bootstrap():
    """bootstrap servers of a real Tansu broker (memory storage) for the whole session."""
    svc = _service("tansu")
    yield svc.url
    svc.stop()


@pytest.fixture(scope="session")
def redis_url():
    svc = _service("redis")
    yield svc.url
    svc.stop()


@pytest.fixture(scope="session")
def postgres_url():
    """SQLAlchemy URL (postgresql+psycopg://...) of a throw-away PostgreSQL cluster."""
    svc = _service("postgres")
    yield svc.url
    svc.stop()


@pytest.fixture(scope="session")
def pushgateway_url():
    svc = _service("pushgateway")
    yield svc.url
    svc.stop()


# --- real Triton (rentalml.services.start_triton): the nvidia-pytriton wheel's tritonserver --------------------
@pytest.fixture(scope="session")
def triton_bundles(market, fit, hybrid_bundle_dir, tmp_path_factory):
    """{1: dir, 2: dir}: two distinguishable hybrid bundles with the same tensor widths, their bundle.json
    model_version set to their Triton version (as fetch_bundle writes the MLflow version)."""
    import json
    import shutil

    from rentalml.export.bundle import write_bundle

    root = tmp_path_factory.mktemp("triton-bundles")
    v1 = root / "v1"
    shutil.copytree(hybrid_bundle_dir, v1)
    meta = json.loads((v1 / "bundle.json").read_text())
    (v1 / "bundle.json").write_text(json.dumps({**meta, "model_version": "1"}, indent=2))
    v2 = write_bundle(fit("hybrid", beta=5.0), market, root / "v2", model_version="2", quantize=False)
    return {1: v1, 2: v2}


@pytest.fixture(scope="session")
def triton_repo(triton_bundles, tmp_path_factory):
    """The cluster repository holding versions 1 and 2 (rentalml export --triton), and its python twin beside it
    (rentalml.export.triton.twin_dir)."""
    from rentalml.export.triton import write_python_twin, write_triton_repo

    repo = tmp_path_factory.mktemp("triton-repo") / "models"
    for version, bundle in sorted(triton_bundles.items()):
        write_triton_repo(bundle, repo, version=version, gpu=False)
    write_python_twin(repo)
    return repo


def servingruntime_args() -> list[str]:
    """The kserve-tritonserver ServingRuntime container's args, as the rendered base manifests give them."""
    from pathlib import Path

    import yaml

    doc = yaml.safe_load((Path(__file__).parents[1] / "manifests/base/serving/servingruntime.yaml").read_text())
    return list(doc["spec"]["containers"][0]["args"])


@pytest.fixture(scope="session")
def triton_server(triton_repo):
    """A real Triton on the python twin of `triton_repo`, started with the ServingRuntime's args (model store and
    ports substituted), for the whole session. `.url` (HTTP), `.grpc_url`."""
    from rentalml.export.triton import twin_dir

    svc = _service("triton", model_repository=twin_dir(triton_repo), args=servingruntime_args())
    yield svc
    svc.stop()
