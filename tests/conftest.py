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


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


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
