"""Two-stage recommendation with business rules (rentalml.recommend): retrieval → filters → ranking → fill."""

from __future__ import annotations

import numpy as np
import pytest

from rentalml.export.bundle import Bundle
from rentalml.recommend import Filters, LocalFeatures, LocalStages, recommend


@pytest.fixture(scope="module")
def bundle(hybrid_bundle_dir):
    return Bundle(hybrid_bundle_dir)


def test_without_filters_two_stage_equals_the_scorer(bundle):
    users = list(bundle.user_index[:50])
    base = bundle.recommend(users, 10)
    got = recommend(bundle, users, 10, filters=Filters(available_only=False), n_candidates=bundle.n_items)
    assert LocalStages(bundle).two_stage is not None
    assert (got.property_ids == base.property_ids).all()
    np.testing.assert_allclose(got.scores, base.scores, rtol=1e-4, atol=1e-4)


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
