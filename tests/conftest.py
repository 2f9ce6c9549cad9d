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
