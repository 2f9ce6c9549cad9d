"""Never-seen properties at serving time: the live catalogue, placed by the bundle's fold-in graph.

`foldin.onnx` (written by rentalml.export.foldin, which documents its interface) gives a property listed after
training a score from the CONTENT tower and a content proxy (its nearest warm property). `LiveCatalogue` holds
those properties and runs the graph; the pipeline's merge-live step puts their scores among the model's.
Models without a content tower have no fold-in graph: their new properties wait for the next training run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

FOLDIN_FILE = "foldin.onnx"


class LiveCatalogue:
    """Properties listed (or re-listed with new attributes) after the bundle was trained, placed by the content
    tower. Thread-safe for one writer and many readers (arrays are replaced, never mutated)."""

    def __init__(self, bundle):
        from rentalml.data.features import FeatureEncoder

        self.bundle = bundle
        enc_path = Path(bundle.path) / "encoders.json"
        enc = json.loads(enc_path.read_text()).get("item") if enc_path.exists() else None
        self.encoder = FeatureEncoder.from_dict(enc) if enc else None
        self.available = (Path(bundle.path) / FOLDIN_FILE).exists() and self.encoder is not None
        self.ids = np.zeros(0, dtype=object)
        self.features = np.zeros((0, 0), np.float32)
        self.attributes: pd.DataFrame = pd.DataFrame()
        self._session = None

    @property
    def session(self):
        if self._session is None:
            from rentalml.runtime.bundle import onnx_session

            self._session = onnx_session(Path(self.bundle.path) / FOLDIN_FILE)
        return self._session

    def __len__(self) -> int:
        return len(self.ids)

    def upsert(self, properties: pd.DataFrame) -> int:
        """Add or update never-seen properties (rows with a property_id and the property schema's attributes).
        Properties the bundle already knows are ignored here (their vectors come from training). Returns the
        number of live properties."""
        if not self.available:
            raise RuntimeError("this bundle has no fold-in graph (a model without a content tower): new "
                               "properties need a training run")
        df = properties.reset_index() if "property_id" not in properties.columns else properties.copy()
        df["property_id"] = df["property_id"].astype(str)
        df = df[self.bundle.property_index.get_indexer(df["property_id"]) < 0].drop_duplicates("property_id",
                                                                                                keep="last")
        if df.empty:
            return len(self)
        merged = pd.concat([self.attributes, df.set_index("property_id")]) if len(self.attributes) else \
            df.set_index("property_id")
        merged = merged[~merged.index.duplicated(keep="last")]
        feats = self.encoder.transform(merged.reset_index()).astype(np.float32)
        self.attributes, self.features, self.ids = merged, feats, merged.index.to_numpy(dtype=object)
        return len(self)

    def remove(self, property_ids: Iterable[str]) -> None:
        keep = ~np.isin(self.ids, list(property_ids))
        self.attributes, self.features, self.ids = self.attributes[keep], self.features[keep], self.ids[keep]

    def proxies(self) -> dict[str, int]:
        """Each live property's content proxy: the warm property whose item-item neighbours it borrows (a
        never-seen property in a streamed history stands in by it)."""
        _, proxy = self.scores(np.full((1, self.bundle.history_len), self.bundle.n_items, np.int64))
        return dict(zip(self.ids, proxy.tolist(), strict=True))

    def scores(self, histories: np.ndarray, user_features: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        feed = {"history": histories, "new_features": self.features}
        if self.bundle.user_feature_dim:
            feed["user_features"] = (user_features if user_features is not None else
                                     np.zeros((len(histories), self.bundle.user_feature_dim), np.float32))
        s, proxy = self.session.run(None, feed)
        return s, proxy
