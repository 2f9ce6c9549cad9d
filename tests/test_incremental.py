"""Incremental learning without a full retrain: a never-seen property is placed by the content tower and shows
up where its twin is recommended; a brand-new user with a few streamed events gets model recommendations that
follow those events; the periodic fine-tune registers a challenger and leaves the champion alone."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd
import pytest

from rentalml.data.dataset import Dataset
from rentalml.data.generator import generate_marketplace
from rentalml.runtime.bundle import Bundle
from rentalml.runtime.features import Filters
from rentalml.runtime.live import LiveCatalogue
from rentalml.runtime.pipeline import Pipeline

NO_RULES = Filters(available_only=False)  # the model's lists as they are (fold-in is what is under test)


def recommend(bundle, users, k, recent=None, live=None):
    """The runtime pipeline with streamed history (`recent`) and never-seen properties (`live`)."""
    return Pipeline(bundle, recent=recent, live=live).run(users, k, NO_RULES)


@pytest.fixture(scope="module")
def bundle(hybrid_bundle_dir):
    return Bundle(hybrid_bundle_dir)


def test_bundle_has_foldin_graph_and_checkpoint(bundle):
    assert (bundle.path / "foldin.onnx").exists() and (bundle.path / "checkpoint.pkl").exists()
    assert bundle.meta["foldin"]["inputs"] == ["history", "new_features"]


def test_never_seen_property_is_placed_by_the_content_tower(bundle, market):
    """p_new is a copy of a popular property's attributes (a re-listing by another agent): the content tower gives
    it the same place, so it appears in the lists of the users who get its twin — within one call, no retrain."""
    users = list(bundle.user_index[:300])
    base = recommend(bundle, users, 10)
    counts = pd.Series(base.property_ids.ravel()).value_counts()
    twin = counts.index[0]
    live = LiveCatalogue(bundle)
    assert live.available
    attrs = market.items.loc[[twin]].reset_index().assign(property_id="p_new_twin")
    far = market.items.iloc[[0]].reset_index().assign(property_id="p_new_other", price=99_999.0, bedrooms=9,
                                                      city="Nowhere", neighbourhood="Nowhere-n1")
    assert live.upsert(pd.concat([attrs, far])) == 2
    _, proxy = live.scores(np.full((1, bundle.history_len), bundle.n_items, np.int64))
    assert bundle.property_ids[proxy[0]] == twin or market.items.loc[bundle.property_ids[proxy[0]], "price"] == \
        market.items.loc[twin, "price"]
    rec = recommend(bundle, users, 20, recent=lambda u: [], live=live)
    with_twin = [i for i in range(len(users)) if twin in base.property_ids[i]]
    got = [i for i in with_twin if "p_new_twin" in rec.property_ids[i]]
    assert len(with_twin) >= 20 and len(got) / len(with_twin) >= 0.8
    # the twin lands next to its original (the lists are merged by score): within 3 places for most users
    gaps = [abs(list(rec.property_ids[i]).index("p_new_twin") - list(rec.property_ids[i]).index(twin)) for i in got
            if twin in rec.property_ids[i]]
    assert np.median(gaps) <= 3
    # an implausible listing (absurd price, unknown city) is not placed like a popular one
    assert sum("p_new_other" in r for r in rec.property_ids) < sum("p_new_twin" in r for r in rec.property_ids)
    # known properties are ignored by the live catalogue (their vectors come from training)
    assert live.upsert(market.items.iloc[:3].reset_index()) == 2


def test_brand_new_user_is_folded_in_from_streamed_events(bundle, market):
    items = market.items
    city = items["city"].value_counts().index[2]  # a mid-sized city (19 listings): not the fallback's
    picks = list(items.index[items["city"] == city][:5])
    streamed = {"u_brand_new": picks}
    rec = recommend(bundle, ["u_brand_new", "u_nobody"], 10, recent=lambda u: streamed.get(u, []))
    assert rec.sources == ["model", "cold_start"]
    top = [p for p in rec.property_ids[0] if p]
    assert not set(top) & set(picks)  # what they already saw is not recommended again
    share = np.mean(items.loc[top, "city"].to_numpy() == city)
    base_share = np.mean(items.loc[[p for p in rec.property_ids[1] if p], "city"].to_numpy() == city)
    assert share >= 0.7 and share > base_share
    # a known user's streamed events change their list too (fold-in of new interactions)
    u = bundle.user_index[0]
    before = recommend(bundle, [u], 10).property_ids[0]
    after = recommend(bundle, [u], 10, recent=lambda _: picks).property_ids[0]
    assert list(before) != list(after)


def test_finetune_registers_a_challenger(tmp_path, monkeypatch, market):
    from rentalml.config import get_settings
    from rentalml.registry.mlflow_registry import alias_version
    from rentalml.training.incremental import finetune_champion
    from rentalml.training.workflow import train_and_register

    monkeypatch.setenv("RENTALML_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RENTALML_MLFLOW_TRACKING_URI", raising=False)
    get_settings.cache_clear()
    try:
        first = train_and_register(market, "hybrid", params={"epochs": 4, "neighbours": 16, "dim": 16, "hidden": 16})
        champion = alias_version("champion")
        later = generate_marketplace(n_users=500, n_properties=200, n_events=3000, seed=1)
        inter = later.interactions.copy()
        inter["timestamp"] = pd.to_datetime(inter["timestamp"], utc=True) + timedelta(days=100)
        recent = Dataset(inter, later.items, later.users, name="recent")
        res = finetune_champion(recent, window_days=None, epochs=2)
    finally:
        get_settings.cache_clear()
    assert first and res["registered"]["alias"] == "challenger" and not res["registered"]["promoted"]
    assert res["champion_version"] == champion and res["new_users"] > 0
    assert res["finetuned"]["ndcg@10"] > 0 and res["champion_foldin"]["ndcg@10"] > 0
    monkeypatch.setenv("RENTALML_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    try:
        assert alias_version("champion") == champion
        assert alias_version("challenger") == res["registered"]["version"]
    finally:
        get_settings.cache_clear()
