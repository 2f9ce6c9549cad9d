"""Request bodies of the friendly JSON API (validated by the handlers, published in /openapi.json and /docs)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    user_id: str
    num_recommendations: int | None = Field(
        default=None, description="how many, 1..serve.max_k; absent: the server's serve.default_k")
    model_type: str | None = Field(default=None, description="must name the served model type (null: any)")
    include_explanations: bool = False
    filters: dict | None = Field(
        default=None, description="business rules for this request: budget, budget_band [lo, hi], city, "
                                  "min_bedrooms, available_only")

    @field_validator("num_recommendations", mode="before")
    @classmethod
    def _given_means_a_number(cls, v):
        """Absent is the server's default; an explicit null is a client mistake, as for any integer."""
        if v is None:
            raise PydanticCustomError("int_type", "Input should be a valid integer")
        return v


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: str = Field(min_length=1)
    property_id: str = Field(min_length=1)


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    user_id: str = Field(min_length=1)
    property_id: str = Field(min_length=1)
    outcome: Literal["click", "save", "inquiry"]
    request_id: str | None = None
    variant: str | None = None
    model_version: str | None = None
    timestamp: datetime | None = None


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    champion: str | None = None
    challenger: str | None = None
    challenger_percent: float | None = Field(default=None, ge=0, le=100)


class InvalidateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_ids: list[str] = []
    property_ids: list[str] = []
