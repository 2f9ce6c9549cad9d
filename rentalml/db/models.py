"""The database of record: `properties`, `users` and `interactions` as SQLAlchemy 2 declarative tables.

The columns mirror the `Dataset` tables (rentalml.schema). List columns (amenities, preferred_areas) are JSON
(JSONB on PostgreSQL); attributes outside the schema (a source's own columns: `accommodates`, MovieLens
`genres`) live in the `extra` JSON column, so any Dataset round-trips. Bookkeeping columns the Dataset does not
carry: `properties.available` (false once delisted) and `updated_at`.

Interactions are facts and carry no foreign keys: an event may name a user or a listing the database has not
seen yet (stream order is not guaranteed); `event_id` is unique and makes every writer idempotent.
Alembic migrations (rentalml/db/migrations) create the same schema; a test compares the two.
"""

from __future__ import annotations

from datetime import date, datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: JSON everywhere, JSONB on PostgreSQL
JSONType = sa.JSON().with_variant(JSONB(), "postgresql")
UTCDateTime = sa.DateTime(timezone=True)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    })


class PropertyRow(Base):
    __tablename__ = "properties"

    property_id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    price: Mapped[float | None] = mapped_column(sa.Float)
    bedrooms: Mapped[int | None] = mapped_column(sa.Integer)
    bathrooms: Mapped[float | None] = mapped_column(sa.Float)
    area_sqm: Mapped[float | None] = mapped_column(sa.Float)
    lat: Mapped[float | None] = mapped_column(sa.Float)
    lon: Mapped[float | None] = mapped_column(sa.Float)
    property_type: Mapped[str | None] = mapped_column(sa.String(64))
    room_type: Mapped[str | None] = mapped_column(sa.String(64))
    city: Mapped[str | None] = mapped_column(sa.String(128))
    neighbourhood: Mapped[str | None] = mapped_column(sa.String(128))
    amenities: Mapped[list | None] = mapped_column(JSONType)
    pets_allowed: Mapped[bool | None] = mapped_column(sa.Boolean)
    available_from: Mapped[date | None] = mapped_column(sa.Date)
    listed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    extra: Mapped[dict | None] = mapped_column(JSONType)
    available: Mapped[bool] = mapped_column(sa.Boolean, nullable=False, default=True, server_default=sa.true())
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        sa.Index(None, "city", "price"),  # search: listings of a city in a price band
        sa.Index(None, "available", "listed_at"),  # the live catalogue, newest first
        sa.Index(None, "updated_at"),  # incremental exports (feature materialisation)
    )


class UserRow(Base):
    __tablename__ = "users"

    user_id: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    budget: Mapped[float | None] = mapped_column(sa.Float)
    preferred_bedrooms: Mapped[int | None] = mapped_column(sa.Integer)
    preferred_areas: Mapped[list | None] = mapped_column(JSONType)
    household_size: Mapped[int | None] = mapped_column(sa.Integer)
    extra: Mapped[dict | None] = mapped_column(JSONType)
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class InteractionRow(Base):
    __tablename__ = "interactions"

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                                    autoincrement=True)
    event_id: Mapped[str] = mapped_column(sa.String(128), nullable=False)
    user_id: Mapped[str] = mapped_column(sa.String(128), nullable=False)
    property_id: Mapped[str] = mapped_column(sa.String(128), nullable=False)
    event_type: Mapped[str | None] = mapped_column(sa.String(32))
    timestamp: Mapped[datetime] = mapped_column(UTCDateTime, nullable=False)
    weight: Mapped[float] = mapped_column(sa.Float, nullable=False, default=1.0)
    session_id: Mapped[str | None] = mapped_column(sa.String(128))
    variant: Mapped[str | None] = mapped_column(sa.String(64))
    extra: Mapped[dict | None] = mapped_column(JSONType)

    __table_args__ = (
        sa.UniqueConstraint("event_id"),  # idempotent writers (seed, stream processor)
        sa.Index(None, "user_id", "timestamp"),  # a user's history, most recent last
        sa.Index(None, "property_id", "timestamp"),  # a listing's engagement windows
        sa.Index(None, "timestamp"),  # incremental ingest (`since`)
    )


properties = PropertyRow.__table__
users = UserRow.__table__
interactions = InteractionRow.__table__
metadata = Base.metadata

#: Dataset columns stored in their own column (everything else of a Dataset table goes into `extra`)
PROPERTY_FIELDS = [c.name for c in properties.columns if c.name not in ("extra", "available", "updated_at")]
USER_FIELDS = [c.name for c in users.columns if c.name not in ("extra", "updated_at")]
INTERACTION_FIELDS = [c.name for c in interactions.columns if c.name not in ("id", "extra")]
