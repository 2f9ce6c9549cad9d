"""The runtime pipeline (rentalml.runtime.pipeline): history → retrieve → rank → merge live → features → filter
→ fill, with business rules."""

from __future__ import annotations

import numpy as np
import pytest

from rentalml.runtime.bundle import Bundle
from rentalml.runtime.features import FeastFeatures, Filters, LocalFeatures
from rentalml.runtime.history import user_features_of
from rentalml.runtime.interfaces import FeatureSource, Retriever, Stages
from rentalml.runtime.pipeline import Engine, Pipeline
from rentalml.runtime.stages import LocalStages
from rentalml.runtime.two_stage import TwoStage


def recommend(bundle, users, k, *, filters=None, **kw):
    return Pipeline(bundle, **kw).run(users, k, filters)


class TwoStageOnly(LocalStages):
    """The in-process stages without the exact one-graph shortcut: retrieval.onnx → ranker.onnx, two calls."""

    exact = False


@pytest.fixture(scope="module")
def bundle(hybrid_bundle_dir):
    return Bundle(hybrid_bundle_dir)


def test_without_filters_two_stage_equals_the_scorer(bundle):
    """retrieve → rank through the two-stage graphs (C = the catalogue) equals the one-graph scorer's top-k, and
    the exact stages (one fused call) give the same lists."""
    users = list(bundle.user_index[:50])
    idx, sc = bundle.score_histories([bundle.history_of(u) for u in users], 10, user_features_of(bundle, users))
    stages = TwoStageOnly(bundle)
    assert stages.two_stage is not None and not stages.exact and LocalStages(bundle).exact
    got = recommend(bundle, users, 10, filters=Filters(available_only=False), n_candidates=bundle.n_items,
                    stages=stages)
    assert (got.property_ids == bundle.property_ids[idx]).all()
    np.testing.assert_allclose(got.scores, sc, rtol=1e-4, atol=1e-4)
    fused = recommend(bundle, users, 10, filters=Filters(available_only=False))
    assert (fused.property_ids == got.property_ids).all()


def test_pipeline_steps_are_named_in_order():
    assert Pipeline.STEPS == ("history", "retrieve", "rank", "merge_live", "features", "filter", "fill")


class OnlyDeclaredStages(Stages):
    """Implements exactly the `Stages` interface (no attribute beyond it): the pipeline must need nothing else."""

    def __init__(self, inner: LocalStages, exact: bool):
        self.inner, self.n_items, self._exact, self.calls = inner, inner.n_items, exact, []

    max_candidates = property(lambda self: self.inner.max_candidates)
    exact = property(lambda self: self._exact)
    in_process = property(lambda self: True)

    def retrieve(self, history, n, user_features=None):
        self.calls.append("retrieve")
        return self.inner.two_stage.candidates(history, user_features, n)

    def rank(self, history, candidates, user_features=None):
        self.calls.append("rank")
        return self.inner.two_stage.rank(history, candidates, user_features)

    def retrieve_rank(self, history, n, user_features=None):
        self.calls.append("retrieve_rank")
        return self.inner.retrieve_rank(history, n, user_features)


class OnlyDeclaredFeatures(FeatureSource):
    """A remote-like feature source: properties and user only (no unavailable set, not in process)."""

    def __init__(self, inner: LocalFeatures):
        self.inner, self.calls = inner, []

    def properties(self, ids):
        self.calls.append("properties")
        return self.inner.properties(ids)

    def user(self, user_id):
        return self.inner.user(user_id)


def test_the_pipeline_calls_only_what_the_interfaces_declare(bundle):
    """Stages and feature sources written against the ABCs alone (as RemoteStages and FeastFeatures are) give the
    same lists as the in-process ones: the pipeline asks `exact` / `unavailable()` instead of probing types."""
    from rentalml.inference.predictor import RemoteStages

    for cls in (LocalStages, RemoteStages, OnlyDeclaredStages):
        assert issubclass(cls, Stages) and not cls.__abstractmethods__, cls
    assert not RemoteStages.exact and not RemoteStages.in_process
    assert RemoteStages.any_history_width is Stages.any_history_width  # the default: full width
    assert issubclass(TwoStage, Retriever) and issubclass(FeastFeatures, FeatureSource)
    assert FeastFeatures(store=None).unavailable() is None and not FeastFeatures(store=None).in_process
    users = [*bundle.user_index[:30], "u_never_seen"]
    cases = [(True, None), (False, None), (True, Filters(budget=2000.0)), (False, Filters(city="Austin"))]
    for exact, filters in cases:
        stages = OnlyDeclaredStages(LocalStages(bundle), exact)
        feats = OnlyDeclaredFeatures(LocalFeatures(bundle))
        got = Pipeline(bundle, stages=stages, features=feats).run(users, 10, filters)
        ref = Pipeline(bundle, stages=LocalStages(bundle) if exact else TwoStageOnly(bundle)).run(users, 10, filters)
        assert (got.property_ids == ref.property_ids).all() and got.sources == ref.sources
        assert stages.calls == (["retrieve_rank"] if exact else ["retrieve", "rank"])
        assert "properties" in feats.calls  # no unavailable set: the filter step looks the candidates up
    engine = Engine(bundle, stages=OnlyDeclaredStages(LocalStages(bundle), True))
    assert engine.in_process and not Engine(bundle, features=OnlyDeclaredFeatures(LocalFeatures(bundle))).in_process


def test_budget_band_and_city_filters(bundle, market):
    users = list(bundle.user_index[:40])
    f = Filters(budget=2000.0, budget_band=(0.8, 1.2), city="Austin")
    got = recommend(bundle, users, 10, filters=f)
    ids = [p for row in got.property_ids for p in row if p]
    assert ids
    price = market.items.loc[ids, "price"].to_numpy()
    assert ((price >= 1600) & (price <= 2400)).all()
    assert (market.items.loc[ids, "city"] == "Austin").all()
    assert sum(got.filtered_out) > 0
    # every list is full: the filters' casualties are replaced from the ranked candidates or the city fallback
    assert all((row != "").sum() == 10 for row in got.property_ids)
    # scores stay sorted within a list
    assert all((np.diff(s) <= 1e-6).all() for s in got.scores)


def test_delisted_property_disappears_and_price_change_applies(bundle, market):
    users = list(bundle.user_index[:100])
    feats = LocalFeatures(bundle)
    first = recommend(bundle, users, 10, features=feats)
    top = first.property_ids[0][0]
    feats.update(top, {"available": 0})
    second = recommend(bundle, users, 10, features=feats)
    assert top not in set(second.property_ids.ravel())
    other = first.property_ids[1][0]
    budget = float(market.items.loc[other, "price"])
    feats.update(other, {"price": budget * 3})  # a price hike takes it out of the user's budget band
    third = recommend(bundle, users[1:2], 10, features=feats, filters=Filters(budget=budget))
    assert other not in set(third.property_ids.ravel())


def test_cold_user_gets_filtered_fallback(bundle):
    got = recommend(bundle, ["u_never_seen"], 5, filters=Filters(city="Boston", budget=1500))
    assert got.sources == ["cold_start"]
    ids = [p for p in got.property_ids[0] if p]
    props = bundle.properties.set_index("property_id").loc[ids]
    assert len(ids) > 0 and (props["city"] == "Boston").all()
    assert ((props["price"] >= 0.7 * 1500) & (props["price"] <= 1.3 * 1500)).all()


@pytest.mark.parametrize("params,field", [({"budget": "cheap"}, "budget"), ({"budget_band": "1"}, "budget_band"),
                                          ({"min_bedrooms": -1}, "min_bedrooms"), ({"city": 3}, "city"),
                                          ({"budget_band": [2, 1]}, "budget_band")])
def test_bad_filter_parameters_name_the_field(params, field):
    with pytest.raises(ValueError, match=field):
        Filters.from_request(params)


def test_filters_from_user_context():
    f = Filters.from_request({}, {"median_price": 1800.0, "top_city": "Denver"})
    assert f.budget == 1800.0 and f.city is None  # the city is a preference, not a hard rule
    assert Filters.from_request({"budget": 900}, {"median_price": 1800.0}).budget == 900
