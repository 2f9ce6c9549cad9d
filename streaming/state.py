"""Moved to the core: rentalml.state (interface in rentalml.state.base, one file per backend). Serving reads the
same store, and a deployable never imports another one, so the store is a core contract. This module only
re-exports the names the stream processor's callers used; new code imports rentalml.state."""

from rentalml.state import (
    Applied,
    StateStore,
    decode_attributes,
    encode_event,
    open_state,
    recent_history,
    seed_from_dataset,
)
from rentalml.state.redis import RedisState
from rentalml.state.sqlite import SQLiteState

__all__ = ["Applied", "RedisState", "SQLiteState", "StateStore", "decode_attributes", "encode_event", "open_state",
           "recent_history", "seed_from_dataset"]
