"""rentalml Feast definitions (project `rentalml`): entities, batch + push sources, feature views, on-demand views.

The names are a contract shared with the stream processor (push sources) and serving (online reads): see
`../shared/design/contracts.md` "Feature-store contract" and README.md in this folder.

The batch sources are parquet files that `rentalml.features.store.build_offline_tables` writes under
`$RENTALML_HOME/feast/data/`. The DuckDB offline store reads a FileSource path as given (relative paths would
resolve against the working directory, not the repo), so the sources need absolute paths: every object is built
by `build(data_dir)`, which `rentalml.features.store.open_store(settings)` calls with the data directory derived
from Settings. Nothing here reads the environment.

Bump FEATURES_VERSION whenever a view's schema, source or semantics change: it is tagged on every view and
recorded with each trained model (MLflow tag `lineage.feature_views`, entries `view:version`).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Float64, Int64, String, UnixTimestamp

#: version of the feature definitions (calendar-style: year.month.revision)
FEATURES_VERSION = "2026.11.1"
TAGS = {"version": FEATURES_VERSION, "owner": "rentalml", "project": "rentalml"}
TIMESTAMP = "event_timestamp"

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING,
              description="a marketplace user (ids u_… in synthetic data)", tags=TAGS)
property_ = Entity(name="property", join_keys=["property_id"], value_type=ValueType.STRING,
                   description="a listed property (ids p_… in synthetic data)", tags=TAGS)

#: view name -> (entity, fields, ttl, description); the batch file of a view is `<data_dir>/<view>.parquet`
VIEWS: dict[str, tuple[Entity, list[Field], timedelta, str]] = {
    "property_attributes": (property_, [
        Field(name="price", dtype=Float64), Field(name="bedrooms", dtype=Int64),
        Field(name="bathrooms", dtype=Float64), Field(name="city", dtype=String),
        Field(name="lat", dtype=Float64), Field(name="lon", dtype=Float64),
        Field(name="available", dtype=Int64), Field(name="property_type", dtype=String),
    ], timedelta(days=365), "listing attributes as of each listing/update event (1 = on the market)"),
    "property_engagement": (property_, [
        Field(name="views_1h", dtype=Int64), Field(name="views_24h", dtype=Int64),
        Field(name="views_7d", dtype=Int64), Field(name="saves_24h", dtype=Int64),
        Field(name="saves_7d", dtype=Int64), Field(name="inquiries_7d", dtype=Int64),
        Field(name="applications_7d", dtype=Int64), Field(name="last_event_ts", dtype=UnixTimestamp),
    ], timedelta(days=2), "event counts over windows ending at each snapshot (daily in batch, per event from "
                          "the stream); last_event_ts = time of the latest event"),
    "user_taste": (user, [
        Field(name="n_events_7d", dtype=Int64), Field(name="median_price", dtype=Float64),
        Field(name="pref_bedrooms", dtype=Float64), Field(name="top_city", dtype=String),
        Field(name="pref_lat", dtype=Float64), Field(name="pref_lon", dtype=Float64),
    ], timedelta(days=31), "taste from the user's interactions of the last 30 days (weighted by event type)"),
}
PUSH_SOURCES = {f"{view}_push": view for view in VIEWS}
ON_DEMAND_VIEWS = ("property_derived", "user_property_match")


def columns(view: str) -> list[str]:
    """Join key, event_timestamp and the feature columns of a batch/push table (the push contract)."""
    entity, fields, _, _ = VIEWS[view]
    return [entity.join_key, TIMESTAMP, *(f.name for f in fields)]


def build(data_dir: str | Path) -> dict[str, object]:
    """Every Feast object of the repo by name, the batch sources under `data_dir` (absolute)."""
    data_dir = Path(data_dir).resolve()
    objs: dict[str, object] = {"user": user, "property": property_}
    fvs: dict[str, FeatureView] = {}
    for view, (entity, fields, ttl, doc) in VIEWS.items():
        batch = FileSource(name=f"{view}_source", path=str(data_dir / f"{view}.parquet"), timestamp_field=TIMESTAMP,
                           description=f"batch table of {view} (rentalml features materialize)", tags=TAGS)
        push = PushSource(name=f"{view}_push", batch_source=batch, description=f"streaming updates of {view}",
                          tags=TAGS)
        fvs[view] = FeatureView(name=view, entities=[entity], ttl=ttl, schema=list(fields), source=push, online=True,
                                description=doc, tags=TAGS)
        objs[f"{view}_source"], objs[f"{view}_push"], objs[view] = batch, push, fvs[view]

    @on_demand_feature_view(sources=[fvs["property_attributes"]], schema=[Field(name="price_per_bedroom",
                                                                                dtype=Float64)],
                            mode="pandas", tags=TAGS, description="price / max(bedrooms, 1) (studios count as one)")
    def property_derived(inputs: pd.DataFrame) -> pd.DataFrame:
        price = pd.to_numeric(inputs["price"], errors="coerce").astype(float)
        beds = pd.to_numeric(inputs["bedrooms"], errors="coerce").astype(float).clip(lower=1.0)
        return pd.DataFrame({"price_per_bedroom": (price / beds).astype(float)})

    @on_demand_feature_view(sources=[fvs["property_attributes"], fvs["user_taste"]],
                            schema=[Field(name="distance_to_pref_km", dtype=Float64),
                                    Field(name="price_ratio_to_user_median", dtype=Float64)],
                            mode="pandas", tags=TAGS,
                            description="distance from the property to the user's preferred location and its price "
                                        "relative to the user's median price (NaN when the user has no taste yet)")
    def user_property_match(inputs: pd.DataFrame) -> pd.DataFrame:
        num = {c: pd.to_numeric(inputs[c], errors="coerce").astype(float)
               for c in ("lat", "lon", "pref_lat", "pref_lon", "price", "median_price")}
        # haversine inline: an on-demand udf is serialised by value and must not reference module-level helpers
        lat1, lon1, lat2, lon2 = (np.radians(num[c].to_numpy()) for c in ("lat", "lon", "pref_lat", "pref_lon"))
        a = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
        dist = 6371.0 * 2 * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))
        ratio = num["price"] / num["median_price"].where(num["median_price"] > 0)
        return pd.DataFrame({"distance_to_pref_km": dist.astype(float), "price_ratio_to_user_median":
                             ratio.to_numpy(dtype=float)})

    objs["property_derived"], objs["user_property_match"] = property_derived, user_property_match
    return objs
