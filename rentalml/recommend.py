"""Compatibility shim: the recommendation runtime moved to `rentalml.runtime` (issue 12).

Kept for callers outside this repository's core that import `rentalml.recommend` (the serving image test):
every name here is the runtime's own, and `recommend()` runs the one pipeline (rentalml.runtime.pipeline).
New code imports from `rentalml.runtime`.
"""

from __future__ import annotations

from rentalml.runtime.features import FILTER_COLUMNS, FeastFeatures, Filters, LocalFeatures
from rentalml.runtime.interfaces import FeatureSource, Recommendations, Stages
from rentalml.runtime.pipeline import Engine, Pipeline
from rentalml.runtime.stages import LocalStages

Ranked = Recommendations  # the former name of the result type

__all__ = ["FILTER_COLUMNS", "Engine", "FeastFeatures", "FeatureSource", "Filters", "LocalFeatures", "LocalStages",
           "Ranked", "Recommendations", "Stages", "recommend"]


def recommend(bundle, user_ids: list[str], k: int = 10, *, filters=None, **kwargs) -> Recommendations:
    """`Pipeline(bundle, **kwargs).run(user_ids, k, filters)` (stages, features, recent, live, n_candidates)."""
    return Pipeline(bundle, **kwargs).run(user_ids, k, filters)
