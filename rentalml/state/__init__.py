"""The stream state store (a core data-plane contract): one interface (`base.StateStore`), one file per
backend (`redis`, `sqlite`). The stream processor writes it; serving (inference.freshness) reads it."""

from __future__ import annotations

from rentalml.config import Settings, get_settings

from .base import Applied, StateStore, decode_attributes, encode_event

__all__ = ["Applied", "StateStore", "decode_attributes", "encode_event", "open_state", "recent_history",
           "seed_from_dataset"]


def open_state(settings: Settings | None = None) -> StateStore:
    """Redis when settings.redis_url is set, else SQLite at $RENTALML_HOME/stream/state.db."""
    settings = settings or get_settings()
    if settings.redis_url:
        from .redis import RedisState

        return RedisState(settings, settings.redis_url)
    from .sqlite import SQLiteState

    return SQLiteState(settings, settings.home_dir / "stream" / "state.db")


def recent_history(user_id: str, settings: Settings | None = None) -> list[str]:
    """The user's most recently interacted distinct property ids as seen by the stream, oldest -> newest
    (at most settings.stream.history_len); [] for a user the stream has not seen."""
    store = open_state(settings)
    try:
        return store.recent_history(user_id)
    finally:
        store.close()


def seed_from_dataset(store: StateStore, dataset) -> int:
    """Seed the attributes of properties the stream has not seen from a Dataset's properties table (as listed,
    available=1). Returns the number of properties seeded."""
    from rentalml.data.events import property_events

    return store.seed_properties({ev["property_id"]: {**ev["attributes"], "available": 1}
                                  for ev in property_events(dataset)})
