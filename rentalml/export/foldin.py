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
  `LiveCatalogue` holds the new properties; `recommend_live` merges their scores into the scorer's top-k.

Models without a content tower (collaborative, item-item, popularity) cannot place a property they have never
seen: for them new properties wait for the next training run (documented in docs/architecture.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from rentalml.export.onnx_export import Scorer, dummy_history, export_graph
from rentalml.models.hybrid import COLD_SHRINK, Hybrid
from rentalml.models.neural import TwoTower

FOLDIN_FILE = "foldin.onnx"


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
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            self._session = ort.InferenceSession(str(Path(self.bundle.path) / FOLDIN_FILE), so,
                                                 providers=["CPUExecutionProvider"])
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

    def scores(self, histories: np.ndarray, user_features: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        feed = {"history": histories, "new_features": self.features}
        if self.bundle.user_feature_dim:
            feed["user_features"] = (user_features if user_features is not None else
                                     np.zeros((len(histories), self.bundle.user_feature_dim), np.float32))
        s, proxy = self.session.run(None, feed)
        return s, proxy


def user_features_of(bundle, user_ids: list[str]) -> np.ndarray | None:
    """The bundle's user-feature rows for known users, zeros for users it has never seen (as in training, a
    user without a profile)."""
    if not bundle.user_feature_dim:
        return None
    if bundle.user_features is None:
        return np.zeros((len(user_ids), bundle.user_feature_dim), np.float32)
    pos = bundle.user_positions(user_ids)
    known = pos >= 0
    if known.all():
        return bundle.user_features[pos]
    out = np.zeros((len(user_ids), bundle.user_feature_dim), np.float32)
    out[known] = bundle.user_features[pos[known]]
    return out


def merged_histories(bundle, user_ids: list[str], recent: Callable[[str], list[str]] | None,
                     live: LiveCatalogue | None = None) -> list[np.ndarray]:
    """Training history + recent streamed interactions, in bundle index space (oldest → newest, distinct).
    A never-seen property in a recent history stands in by its content proxy (the warm property whose
    item-item neighbours it borrows)."""
    if recent is None:  # training history only (no conversions: the request path calls this per request)
        return [bundle.history_of(uid)[-bundle.history_len:] for uid in user_ids]
    out = []
    proxy_of: dict[str, int] = {}
    if live is not None and len(live):
        _, proxy = live.scores(np.full((1, bundle.history_len), bundle.n_items, np.int64))
        proxy_of = dict(zip(live.ids, proxy.tolist(), strict=True))
    for uid in user_ids:
        h = list(bundle.history_of(uid))
        if recent is not None:
            pids = [str(p) for p in recent(uid) or []]
            idx = bundle.property_index.get_indexer(pids)
            for p, i in zip(pids, idx, strict=True):
                j = int(i) if i >= 0 else proxy_of.get(p, -1)
                if j >= 0:
                    if j in h:
                        h.remove(j)
                    h.append(j)
        out.append(np.asarray(h[-bundle.history_len:], dtype=np.int64))
    return out


def recommend_live(bundle, user_ids: list[str], k: int = 10, recent: Callable[[str], list[str]] | None = None,
                   live: LiveCatalogue | None = None):
    """`Bundle.recommend` plus fold-in: users scored from training + streamed history (a new user with events
    is a model user, not a cold start) and never-seen properties merged by their content-tower scores."""
    from rentalml.export.bundle import Recommendations
    from rentalml.export.onnx_export import pad_histories

    if recent is None and (live is None or not len(live)):
        return bundle.recommend(user_ids, k)
    hist = merged_histories(bundle, user_ids, recent, live)
    base = bundle.recommend(user_ids, k)
    warm = [i for i, h in enumerate(hist) if len(h)]
    ids, scores, sources = base.property_ids.copy(), base.scores.copy(), list(base.sources)
    if warm:
        uf = user_features_of(bundle, [user_ids[i] for i in warm])
        idx, sc = bundle.score_histories([hist[i] for i in warm], k, uf)
        wid = np.where(idx >= 0, bundle.property_ids[np.clip(idx, 0, None)], "").astype(object)
        if live is not None and len(live):
            padded = pad_histories([hist[i] for i in warm], bundle.n_items, bundle.history_len)
            new_sc, _ = live.scores(padded, uf)
            seen = [set(recent(user_ids[i]) or []) if recent else set() for i in warm]
            for r in range(len(warm)):
                mask = np.isin(live.ids, list(seen[r]))
                row_sc = np.where(mask, -np.inf, new_sc[r])
                all_ids = np.concatenate([wid[r], live.ids])
                all_sc = np.concatenate([sc[r], row_sc])
                top = np.argsort(-all_sc, kind="stable")[:k]
                wid[r, : len(top)], sc[r, : len(top)] = all_ids[top], all_sc[top]
        for r, i in enumerate(warm):
            ids[i], scores[i], sources[i] = wid[r], sc[r], "model"
    return Recommendations(ids, scores, sources)
