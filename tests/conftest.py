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
