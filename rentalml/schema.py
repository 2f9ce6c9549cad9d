"""Domain schema: typed records and the column layout of the parquet tables.

Tables (pandas DataFrames / parquet files) are the working format; the pydantic records validate single
events (streaming, APIs) and document the fields.
"""

from __future__ import annotations

from copy import copy
from datetime import date, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

EventType = Literal["view", "save", "inquiry", "application", "lease"]

#: Implicit-feedback strength of each interaction type (a lease is the strongest signal).
EVENT_WEIGHTS: dict[str, float] = {"view": 1.0, "save": 2.0, "inquiry": 3.0, "application": 4.0, "lease": 5.0}

PROPERTY_NUMERIC = ["price", "bedrooms", "bathrooms", "area_sqm", "lat", "lon"]
PROPERTY_CATEGORICAL = ["property_type", "room_type", "city", "neighbourhood"]
PROPERTY_COLUMNS = [
    "property_id", *PROPERTY_NUMERIC, *PROPERTY_CATEGORICAL,
    "amenities", "pets_allowed", "available_from", "listed_at",
]
USER_COLUMNS = ["user_id", "budget", "preferred_bedrooms", "preferred_areas", "household_size"]
INTERACTION_COLUMNS = ["event_id", "user_id", "property_id", "event_type", "timestamp", "weight", "session_id"]


class Property(BaseModel):
    model_config = ConfigDict(extra="forbid")
    property_id: str
    price: float = Field(gt=0)
    bedrooms: int = Field(ge=0)
    bathrooms: float = Field(ge=0)
    area_sqm: float | None = Field(default=None, gt=0)
    property_type: str
    room_type: str
    city: str
    neighbourhood: str
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)
    amenities: list[str] = Field(default_factory=list)
    pets_allowed: bool = False
    available_from: date | None = None
    listed_at: datetime | None = None


class User(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: str
    budget: float | None = Field(default=None, gt=0)
    preferred_bedrooms: int | None = Field(default=None, ge=0)
    preferred_areas: list[str] = Field(default_factory=list)
    household_size: int | None = Field(default=None, ge=1)


class Interaction(BaseModel):
    """One `user_interactions` event (contracts.md)."""

    model_config = ConfigDict(extra="forbid")
    event_id: str = Field(min_length=1)
    event_type: EventType
    user_id: str = Field(min_length=1)
    property_id: str = Field(min_length=1)
    timestamp: datetime
    session_id: str | None = None
    variant: str | None = None

    @field_validator("timestamp")
    @classmethod
    def _zoned(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("timestamp must carry a time zone (ISO-8601 with offset)")
        return v

    @property
    def weight(self) -> float:
        return EVENT_WEIGHTS[self.event_type]


PropertyEventType = Literal["listed", "updated", "delisted"]
#: attribute names a `property_data` event may carry (the property schema without the id, plus `available`)
PROPERTY_ATTRIBUTES = [*(n for n in Property.model_fields if n != "property_id"), "available"]


def _all_optional(model: type[BaseModel], exclude: set[str]) -> dict:
    """The fields of `model` (same types and bounds) as omittable (default None, not validated); an explicit null
    stays invalid for a field the model requires."""
    fields = {}
    for name, info in model.model_fields.items():
        if name not in exclude:
            opt = copy(info)
            opt.default, opt.default_factory = None, None
            fields[name] = (info.annotation, opt)
    return fields


#: The changed attributes of a `property_data` event: any subset of the property schema (same types and bounds),
#: plus `available` (1 = on the market, 0 = delisted). Unknown names are rejected.
PropertyAttributes = create_model("PropertyAttributes", __config__=ConfigDict(extra="forbid"),
                                  **_all_optional(Property, {"property_id"}),
                                  available=(int | None, Field(default=None, ge=0, le=1)))


class PropertyEvent(BaseModel):
    """One `property_data` event (contracts.md): `listed`/`updated` carry only the changed attributes."""

    model_config = ConfigDict(extra="forbid")
    event_id: str = Field(min_length=1)
    event_type: PropertyEventType
    property_id: str = Field(min_length=1)
    timestamp: datetime
    attributes: PropertyAttributes = Field(default_factory=PropertyAttributes)

    _zoned = field_validator("timestamp")(Interaction._zoned.__func__)

    def changed(self) -> dict:
        """The attributes the event sets (JSON-ready), `available` implied by listed (1) / delisted (0)."""
        out = self.attributes.model_dump(mode="json", exclude_unset=True)
        if self.event_type == "listed":
            out.setdefault("available", 1)
        elif self.event_type == "delisted":
            out["available"] = 0
        return out
