"""Fresh state from the stream for a serving engine (`serve.fold_in`): the users' recent interactions and the
properties the model has never seen, read from the stream processor's state store (rentalml.state:
Redis when `redis_url` is set, else the SQLite file under $RENTALML_HOME/stream).

* `recent(user_id)` — the user's streamed recent properties (oldest → newest), folded into their history;
* `refresh()` — at most every `serve.live_refresh_s`: properties with a property event since the last look;
  never-seen ones (listed after training) go into the engine's `LiveCatalogue` (content-tower scores), known
  ones update the local feature table (price changes, delistings), so business filters see them even without
  Feast. Delisted new listings leave the live catalogue.
"""

from __future__ import annotations

import logging
import threading
import time

import pandas as pd

from rentalml.config import Settings, get_settings
from rentalml.runtime.live import LiveCatalogue

log = logging.getLogger("rentalml.inference")


class StreamFeed:
    def __init__(self, bundle, settings: Settings | None = None, local_features=None):
        from rentalml.state import open_state

        self.settings = settings or get_settings()
        self.bundle = bundle
        self.state = open_state(self.settings)
        live = LiveCatalogue(bundle)
        self.live = live if live.available else None
        self.local = local_features
        self.every = float(self.settings.serve.live_refresh_s)
        self.lateness = float(self.settings.stream.allowed_lateness_s)
        self.cursor = float("-inf")
        #: bumped whenever the stream changed a property (a new listing, a price, a delisting): part of the
        #: recommendation cache's version, so no cached list outlives a catalogue change
        self.generation = 0
        self._seen = float("-inf")
        self._last = 0.0
        self._lock = threading.Lock()
        self.refresh(force=True)

    def recent(self, user_id: str) -> list[str]:
        try:
            return self.state.recent_history(user_id)
        except Exception as exc:  # the stream state is down: serve from the training history alone
            log.warning("stream state unavailable (%s): no fold-in for %s", exc, user_id)
            return []

    def refresh(self, force: bool = False) -> int:
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return 0
        if not self._lock.acquire(blocking=force):
            return 0  # another request is refreshing
        try:
            self._last = now
            changed = self.state.properties_since(self.cursor)
            if not changed:
                return 0
            # events may arrive up to the lateness bound out of order: look back that far next time
            self.cursor = max(ts for _, ts in changed) - self.lateness
            attrs = self.state.property_attributes([p for p, _ in changed])
            known = self.bundle.property_index.get_indexer(list(attrs)) >= 0
            new_rows, gone = [], []
            for (pid, a), is_known in zip(attrs.items(), known, strict=True):
                if is_known:
                    if self.local is not None:
                        self.local.update(pid, a)
                elif int(a.get("available", 1) or 0) == 0:
                    gone.append(pid)
                else:
                    new_rows.append({"property_id": pid, **a})
            if self.live is not None:
                if new_rows:
                    self.live.upsert(pd.DataFrame(new_rows))
                if gone and len(self.live):
                    self.live.remove(gone)
            fresh = max(ts for _, ts in changed)
            if fresh > self._seen:  # something new (the look-back window re-reads the last ones)
                self._seen = fresh
                self.generation += 1
            return len(changed)
        except Exception as exc:
            log.warning("stream state refresh failed: %s", exc)
            return 0
        finally:
            self._lock.release()
