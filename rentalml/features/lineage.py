"""Feature lineage for MLflow (no Feast import: the training workflow uses it on every run).

Entries of `lineage.feature_views` are `view:FEATURES_VERSION` for Feast views and plain names for the local
feature tables (`property_features`, `user_features`)."""

from __future__ import annotations


def feature_lineage(feature_views: list[str] | None) -> dict:
    """{"feature_views": [...]} plus "features_version" (and "feature_store": "feast") when Feast views were used;
    raises ValueError when the Feast views carry different versions (one training run, one definitions version)."""
    views = list(feature_views or [])
    versions = sorted({v.split(":", 1)[1] for v in views if ":" in v})
    if len(versions) > 1:
        raise ValueError(f"feature_views: mixed feature definition versions {versions}")
    out: dict = {"feature_views": views}
    if versions:
        out.update(features_version=versions[0], feature_store="feast")
    return out
