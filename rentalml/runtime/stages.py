"""In-process stages: the bundle's graphs with ONNX Runtime (the `Stages` the demo, tests and `rentalml serve`
without a predictor use; `rentalml.inference.predictor.RemoteStages` is the remote one)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from rentalml.runtime.history import trim_padding
from rentalml.runtime.interfaces import Stages
from rentalml.runtime.two_stage import TwoStage

if TYPE_CHECKING:
    from rentalml.runtime.bundle import Bundle


class LocalStages(Stages):
    """The bundle's graphs in process: retrieval.onnx + ranker.onnx, or scorer.onnx when there are none."""

    in_process = True

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.n_items = bundle.n_items
        self.two_stage: TwoStage | None = None  # the Retriever + ranker of two-stage bundles
        if bundle.has_two_stage:
            self.two_stage = TwoStage(bundle.path, threads=bundle.threads)

    @property
    def max_candidates(self) -> int:
        return self.two_stage.n_candidates if self.two_stage is not None else self.n_items

    @property
    def any_history_width(self) -> bool:
        """The exact scorer trims padding (trim_padding); the two-stage graphs take the full width."""
        return self.exact

    @property
    def exact(self) -> bool:
        """retrieve_rank scores the whole catalogue with the full model (no ANN index)."""
        return self.two_stage is None or not self.two_stage.ann

    def retrieve_rank(self, history: np.ndarray, n: int,
                      user_features: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Both stages in one call where the catalogue allows: below the ANN size the one-graph scorer ranks the
        whole catalogue by the full model (exact, and one ONNX Runtime call instead of two); ANN bundles run
        retrieval → IVF search → ranker."""
        if self.two_stage is not None and self.two_stage.ann:
            cand = self.retrieve(history, n, user_features)
            return self.rank(history, cand, user_features)
        feed = self._feed({"history": trim_padding(history, self.n_items),
                           "k": np.array([min(n, self.n_items)], np.int64)}, user_features, len(history))
        idx, sc = self.bundle.session.run(None, feed)
        return idx, sc

    def _feed(self, feed: dict, user_features: np.ndarray | None, n: int) -> dict:
        d = self.bundle.user_feature_dim
        if d:
            feed["user_features"] = user_features if user_features is not None else np.zeros((n, d), np.float32)
        return feed

    def retrieve(self, history: np.ndarray, n: int, user_features: np.ndarray | None = None) -> np.ndarray:
        n = min(n, self.max_candidates)
        if self.two_stage is not None:
            return self.two_stage.candidates(history, self._feed({}, user_features, len(history)).get(
                "user_features"), n)
        feed = self._feed({"history": history, "k": np.array([min(n, self.n_items)], np.int64)}, user_features,
                          len(history))
        idx, _ = self.bundle.session.run(None, feed)
        return idx

    def rank(self, history: np.ndarray, candidates: np.ndarray,
             user_features: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        if self.two_stage is not None:
            feed = self._feed({"history": history, "candidates": candidates}, user_features, len(history))
            return self.two_stage.rank(history, candidates, feed.get("user_features"))
        # one-graph models: the scorer's order over the whole catalogue, restricted to the candidates
        feed = self._feed({"history": trim_padding(history, self.n_items), "k": np.array([self.n_items], np.int64)},
                          user_features, len(history))
        idx, sc = self.bundle.session.run(None, feed)
        out_i = np.full(candidates.shape, self.n_items, np.int64)
        out_s = np.full(candidates.shape, -np.inf, np.float32)
        for r in range(len(candidates)):
            keep = np.isin(idx[r], candidates[r])
            row_i, row_s = idx[r][keep][: candidates.shape[1]], sc[r][keep][: candidates.shape[1]]
            out_i[r, : len(row_i)], out_s[r, : len(row_s)] = row_i, row_s
        return out_i, out_s
