"""Incremental serving without a retrain: fold in new users and never-seen properties.

* New (or changed) users: the user tower is history-encoded, so a user's embedding is a function of the
  properties they interacted with. Serving merges the bundle's training history with the user's recent
  streamed interactions (`rentalml.streaming` keeps them; any `recent(user_id) -> [property_id]` callable) and
  scores that: a brand-new user is "folded in" from their first events, with no retrain.
* Never-seen properties (listed after training): `foldin.onnx` gives them a vector from the CONTENT tower (the
  ID part is zero, exactly as ID dropout trains cold items) and, for the hybrid's item-item term, the
  item-item score of their content-nearest warm property shrunk by COLD_SHRINK (as `Hybrid._cold_proxies`).
  Inputs: history INT64 [N, L] (as scorer.onnx), new_features FP32 [M, F] (the bundle's item encoder applied to
  the new properties' attributes) [, user_features]; outputs scores FP32 [N, M], proxy INT64 [M].
  The graph is run by rentalml.runtime.live.LiveCatalogue, whose scores the runtime pipeline merges in.

Models without a content tower (collaborative, item-item, popularity) cannot place a property they have never
seen: for them new properties wait for the next training run (documented in docs/architecture.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from rentalml.export.onnx_export import Scorer, dummy_history, export_graph
from rentalml.models.hybrid import COLD_SHRINK, Hybrid
from rentalml.models.neural import TwoTower


class FoldIn(nn.Module):
    """Scores of never-seen properties (content vectors) for histories, consistent with the scorer."""

    def __init__(self, fitted):
        super().__init__()
        model = fitted.model
        tower = model.tower if isinstance(model, Hybrid) else model if isinstance(model, TwoTower) else None
        if tower is None or not tower.net.use_content or fitted.item_features is None:
            raise TypeError(f"{fitted.name}: no content tower to place never-seen properties with")
        self.scorer = Scorer(fitted)  # the same user tower, tables and item-item weights as scorer.onnx
        self.item_content = tower.net.item_content
        self.n = len(fitted.item_ids)
        warm = np.flatnonzero(np.asarray(fitted.train.sum(0)).ravel() > 0)
        if not len(warm):
            warm = np.arange(self.n)
        with torch.no_grad():
            vec = nn.functional.normalize(self.item_content(torch.from_numpy(fitted.item_features)), dim=1)
        self.register_buffer("warm", torch.from_numpy(warm.astype(np.int64)))
        self.register_buffer("warm_vec_t", vec[warm].T.contiguous())
        # never-trained items keep their initial bias (0) in training; new ones get the catalogue median
        self.register_buffer("new_bias", tower.net.item_bias.detach().median().reshape(1))
        self.shrink = float(COLD_SHRINK)

    def forward(self, history: torch.Tensor, new_features: torch.Tensor, user_features: torch.Tensor | None = None):
        sc = self.scorer
        batch = history.shape[0]
        u = sc.user_vector(history, user_features)
        c = self.item_content(new_features)  # [M, d]: the ID part of a never-seen property is zero
        scores = u @ c.T + self.new_bias
        proxy = self.warm[torch.argmax(nn.functional.normalize(c, dim=1) @ self.warm_vec_t, dim=1)]
        if sc.itemitem is not None:
            tgt = sc.out_idx[history].reshape(batch, -1)
            w = sc.out_w[history].reshape(batch, -1)
            ii = torch.zeros(batch, self.n + 1).scatter_add(1, tgt, w)
            scores = scores + sc.beta * self.shrink * ii[:, proxy]
        return scores, proxy


def export_foldin(fitted, path: str | Path, history_len: int = 256) -> Path | None:
    """Write foldin.onnx, or return None for a model without a content tower."""
    try:
        mod = FoldIn(fitted).eval()
    except TypeError:
        return None
    inputs = {"history": (dummy_history(len(fitted.item_ids), history_len), {0: "batch"}),
              "new_features": (torch.zeros(3, fitted.item_features.shape[1]), {0: "new"})}
    return export_graph(mod, path, inputs, {"scores": {0: "batch", 1: "new"}, "proxy": {0: "new"}},
                        mod.scorer.user_feat_dim)
