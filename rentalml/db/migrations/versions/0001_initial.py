"""Initial schema of the database of record: properties, users, interactions and their indexes.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")
UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "properties",
        sa.Column("property_id", sa.String(128), nullable=False),
        sa.Column("price", sa.Float()),
        sa.Column("bedrooms", sa.Integer()),
        sa.Column("bathrooms", sa.Float()),
        sa.Column("area_sqm", sa.Float()),
        sa.Column("lat", sa.Float()),
        sa.Column("lon", sa.Float()),
        sa.Column("property_type", sa.String(64)),
        sa.Column("room_type", sa.String(64)),
        sa.Column("city", sa.String(128)),
        sa.Column("neighbourhood", sa.String(128)),
        sa.Column("amenities", JSONType),
        sa.Column("pets_allowed", sa.Boolean()),
        sa.Column("available_from", sa.Date()),
        sa.Column("listed_at", UTC),
        sa.Column("extra", JSONType),
        sa.Column("available", sa.Boolean(), nullable=False, server_default=sa.true()),
        sa.Column("updated_at", UTC),
        sa.PrimaryKeyConstraint("property_id", name="pk_properties"),
    )
    op.create_index("ix_properties_city_price", "properties", ["city", "price"])
    op.create_index("ix_properties_available_listed_at", "properties", ["available", "listed_at"])
    op.create_index("ix_properties_updated_at", "properties", ["updated_at"])

    op.create_table(
        "users",
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("budget", sa.Float()),
        sa.Column("preferred_bedrooms", sa.Integer()),
        sa.Column("preferred_areas", JSONType),
        sa.Column("household_size", sa.Integer()),
        sa.Column("extra", JSONType),
        sa.Column("updated_at", UTC),
        sa.PrimaryKeyConstraint("user_id", name="pk_users"),
    )

    op.create_table(
        "interactions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(128), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("property_id", sa.String(128), nullable=False),
        sa.Column("event_type", sa.String(32)),
        sa.Column("timestamp", UTC, nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("session_id", sa.String(128)),
        sa.Column("variant", sa.String(64)),
        sa.Column("extra", JSONType),
        sa.PrimaryKeyConstraint("id", name="pk_interactions"),
        sa.UniqueConstraint("event_id", name="uq_interactions_event_id"),
    )
    op.create_index("ix_interactions_user_id_timestamp", "interactions", ["user_id", "timestamp"])
    op.create_index("ix_interactions_property_id_timestamp", "interactions", ["property_id", "timestamp"])
    op.create_index("ix_interactions_timestamp", "interactions", ["timestamp"])


def downgrade() -> None:
    op.drop_table("interactions")
    op.drop_table("users")
    op.drop_table("properties")
