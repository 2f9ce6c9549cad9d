"""The two-stage retrieval runtime: a bundle's retrieval.onnx → (ANN search) → ranker.onnx with ONNX Runtime.

The graphs and their interface are written by rentalml.export.two_stage (see its docstring); this module
only runs them. `TwoStage` is the in-process `Retriever` (stage 1: history → candidates, through the ANN
index for large catalogues: the `rentalml.runtime.retrieval` backend and parameters bundle.json records
under two_stage.ann) plus the ranker.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rentalml.runtime.bundle import Bundle, onnx_session, read_meta
from rentalml.runtime.history import pad_histories
from rentalml.runtime.interfaces import Retriever


class TwoStage(Retriever):
    """Runs a bundle's retrieval → (ANN search) → ranker with ONNX Runtime. Picklable (sessions are lazy)."""

    def __init__(self, bundle_dir: str | Path, threads: int = 1):
        self.path = Path(bundle_dir)
        self.threads = threads
        meta = read_meta(self.path)
        ts = meta.get("two_stage")
        if not ts:
            raise ValueError(f"bundle {self.path} has no two-stage graphs (model type "
                             f"{meta.get('model_type')!r} has no two-tower part)")
        self.meta = ts
        self.n_items = int(meta["graph"]["n_items"])
        self.history_len = int(meta["graph"]["history_len"])
        self.user_feature_dim = int(meta["graph"].get("user_feature_dim", 0))
        self.n_candidates = int(ts["n_candidates"])
        self.ann = ts["mode"] == "ann"
        self._sessions: dict = {}
        self._index = None

    def __getstate__(self):
        return {**self.__dict__, "_sessions": {}, "_index": None}

    def _session(self, name: str):
        if name not in self._sessions:
            self._sessions[name] = onnx_session(self.path / self.meta[name], self.threads)
        return self._sessions[name]

    @property
    def index(self):
        """The bundle's ANN index (a rentalml.runtime.retrieval.TopK), loaded on first use; None in brute-force
        mode (the retrieval graph scans the catalogue itself)."""
        if self._index is None and self.ann:
            from rentalml.runtime import retrieval

            record = self.meta.get("ann")
            if not record:
                raise ValueError(f"bundle {self.path} has an ANN index ({self.meta.get('ann_index')}) from before "
                                 "the retrieval backends (the numpy IVF): re-export it")
            self._index = retrieval.load(self.path, record, threads=self.threads)
        return self._index

    def candidates(self, history: np.ndarray, user_features: np.ndarray | None, n_candidates: int,
                   search: dict | str | None = None) -> np.ndarray:
        """Stage 1: [N, n_candidates] candidate indices (padding n_items where an ANN probe found too few)."""
        feed = {"history": history}
        if self.user_feature_dim:
            feed["user_features"] = (np.zeros((len(history), self.user_feature_dim), np.float32)
                                     if user_features is None else np.asarray(user_features, np.float32))
        if not self.ann:
            cand, _ = self._session("retrieval").run(None, feed)
            return cand[:, :n_candidates]
        (emb,) = self._session("retrieval").run(None, feed)
        extra = int((history < self.n_items).sum(1).max(initial=0))  # history items are dropped after the search
        _, idx = self.index.query(emb, n_candidates + extra, search)
        out = np.full((len(history), n_candidates), self.n_items, dtype=np.int64)
        for r in range(len(history)):
            row = idx[r][(idx[r] >= 0) & ~np.isin(idx[r], history[r])][:n_candidates]
            out[r, : len(row)] = row
        return out

    def topk(self, histories: list[np.ndarray], k: int, n_candidates: int | None = None,
             user_features: np.ndarray | None = None, search: dict | str | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k property indices and scores for histories (index arrays, oldest → newest); `search` overrides
        the ANN index's search parameters (ANN bundles only)."""
        c = self.n_candidates if n_candidates is None else int(n_candidates)
        if not 1 <= c <= self.n_candidates:
            raise ValueError(f"n_candidates must be in [1, {self.n_candidates}] (the bundle's retrieval size), "
                             f"got {n_candidates}")
        k = max(1, min(int(k), c))
        hist = pad_histories(histories, self.n_items, self.history_len)
        if self.user_feature_dim and user_features is None:
            user_features = np.zeros((len(histories), self.user_feature_dim), np.float32)
        cand = self.candidates(hist, user_features, c, search)
        idx, scores = self.rank(hist, cand, user_features)
        return idx[:, :k], scores[:, :k]

    def rank(self, history: np.ndarray, candidates: np.ndarray,
             user_features: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Stage 2 on padded histories [N, L]: the candidates [N, C] sorted by the full model (indices, scores)."""
        feed = {"history": history, "candidates": np.asarray(candidates, np.int64)}
        if self.user_feature_dim:
            feed["user_features"] = (np.zeros((len(history), self.user_feature_dim), np.float32)
                                     if user_features is None else np.asarray(user_features, np.float32))
        idx, scores = self._session("ranker").run(None, feed)
        return idx, scores


_CACHE: dict[tuple[Path, int], TwoStage] = {}


def two_stage_topk(bundle: Bundle | TwoStage | str | Path, history: list[np.ndarray], k: int,
                   n_candidates: int | None = None, user_features: np.ndarray | None = None,
                   search: dict | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Two-stage top-k for a bundle (a Bundle, its directory or a TwoStage): (indices [N, k], scores [N, k])."""
    if isinstance(bundle, TwoStage):
        return bundle.topk(history, k, n_candidates, user_features, search)
    path, threads = (bundle.path, bundle.threads) if isinstance(bundle, Bundle) else (Path(bundle), 1)
    path = Path(path).resolve()
    key = (path, (path / "bundle.json").stat().st_mtime_ns)  # a rewritten bundle gets new sessions
    if key not in _CACHE:
        _CACHE[key] = TwoStage(path, threads=threads)
    return _CACHE[key].topk(history, k, n_candidates, user_features, search)
