"""Two-stage serving graphs: retrieval (two-tower user embedding → top-C candidates) and ranking.

`retrieval.onnx` (models with a two-tower part):
  inputs   history            INT64 [N, L]  padded with n_items (L = the bundle's history_len, fixed)
           user_features      FP32  [N, Fu] only when the model has a user-feature tower
  outputs  brute-force mode (catalogue < export.ann_min_items):
           candidates         INT64 [N, C]  the tower's top-C property indices (history excluded), best first
           candidate_scores   FP32  [N, C]  the tower's scores of those
           ANN mode (catalogue ≥ export.ann_min_items): the catalogue scan is left to an IVF index
           (`ann_index.npz`, rentalml.export.ann) searched outside the graph:
           user_embedding     FP32  [N, D]  D = item-vector dim + 1 (a trailing 1 that meets the item bias)
`ranker.onnx`:
  inputs   history            INT64 [N, L]
           candidates         INT64 [N, C]  property indices (n_items = padding, ranked last); C free
           user_features      FP32  [N, Fu] only when the model has a user-feature tower
  outputs  indices            INT64 [N, C]  the candidates re-ordered by the full model's score, best first
           scores             FP32  [N, C]  non-increasing (the full model: tower + beta · item-item)
The ranker returns every candidate sorted, so a caller takes the first k: there is no `k` input, which keeps
both graphs batchable by Triton's dynamic batcher (every input has the batch dimension first).
With C ≥ the catalogue size the two stages give exactly the one-graph `scorer.onnx` top-k.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from rentalml.export.onnx_export import NEG, Scorer, dummy_history, export_graph, pad_histories
from rentalml.models.hybrid import Hybrid
from rentalml.models.itemitem import SparseEASE
from rentalml.models.neural import TwoTower

DEFAULT_CANDIDATES = 200


def tower_of(model):
    """The two-tower part of a model (None for item-item / popularity models, which have no retrieval)."""
    return model.tower if isinstance(model, Hybrid) else model if isinstance(model, TwoTower) else None


class _UserTower(nn.Module):
    """history (padded index matrix) [+ user features] → user vector, as TwoTowerNet.user_vectors."""

    def __init__(self, tower: TwoTower):
        super().__init__()
        tin = tower.table_in
        self.n = tin.shape[0]
        self.register_buffer("table_in", torch.cat([tin, torch.zeros(1, tin.shape[1])]))
        self.user_tower = tower.net.user_tower
        self.user_feat_dim = tower.net.user_feat_dim

    # the scorer's user tower on the same buffers (n, table_in, user_tower, user_feat_dim): one definition
    user_vector = Scorer.user_vector


class Retrieval(_UserTower):
    def __init__(self, fitted, n_candidates: int, embedding_only: bool = False):
        tower = tower_of(fitted.model)
        if tower is None:
            raise TypeError(f"{fitted.name} has no two-tower part to retrieve with")
        super().__init__(tower)
        self.embedding_only = embedding_only
        self.c = max(1, min(int(n_candidates), self.n))
        self.register_buffer("table_out_t", tower.table_out.T.contiguous())
        self.register_buffer("bias", tower.net.item_bias.detach().clone())

    def forward(self, history: torch.Tensor, user_features: torch.Tensor | None = None):
        u = self.user_vector(history, user_features)
        if self.embedding_only:
            return torch.cat([u, torch.ones(u.shape[0], 1)], dim=1)
        s = torch.cat([u @ self.table_out_t + self.bias, torch.zeros(u.shape[0], 1)], dim=1)
        s = s.scatter(1, history, torch.full(history.shape, NEG))
        top_s, top_i = torch.topk(s[:, : self.n], self.c, dim=1)
        return top_i, top_s


class Ranker(_UserTower):
    def __init__(self, fitted):
        model = fitted.model
        tower = tower_of(model)
        if tower is None:
            raise TypeError(f"{fitted.name} has no two-tower part to rank with")
        super().__init__(tower)
        n = self.n
        tout = tower.table_out
        self.register_buffer("table_out", torch.cat([tout, torch.zeros(1, tout.shape[1])]))
        self.register_buffer("bias", torch.cat([tower.net.item_bias.detach(), torch.zeros(1)]))
        ii = model.itemitem if isinstance(model, Hybrid) else None
        self.beta = float(model.beta) if isinstance(model, Hybrid) else 0.0
        self.itemitem = isinstance(ii, SparseEASE) and self.beta != 0.0
        self.has_proxy = False
        if self.itemitem:
            pad_idx = np.full((1, ii.out_idx.shape[1]), n, dtype=np.int64)
            self.register_buffer("out_idx", torch.from_numpy(np.vstack([ii.out_idx, pad_idx])))
            self.register_buffer("out_w", torch.from_numpy(
                np.vstack([ii.out_w, np.zeros_like(pad_idx, np.float32)])))
            if getattr(model, "proxy", None) is not None:
                self.register_buffer("proxy", torch.from_numpy(np.append(model.proxy, n).astype(np.int64)))
                self.register_buffer("proxy_w", torch.from_numpy(np.append(model.proxy_w, 0.0).astype(np.float32)))
                self.has_proxy = True

    def forward(self, history: torch.Tensor, candidates: torch.Tensor, user_features: torch.Tensor | None = None):
        batch = history.shape[0]
        u = self.user_vector(history, user_features)
        v = self.table_out[candidates]  # [N, C, d]
        s = torch.bmm(v, u.unsqueeze(2)).squeeze(2) + self.bias[candidates]
        if self.itemitem:
            tgt = self.out_idx[history].reshape(batch, -1)
            w = self.out_w[history].reshape(batch, -1)
            ii = torch.zeros(batch, self.n + 1).scatter_add(1, tgt, w)
            if self.has_proxy:  # the candidates' proxies only (never-seen properties borrow a neighbour's score)
                s = s + self.beta * (torch.gather(ii, 1, self.proxy[candidates]) * self.proxy_w[candidates])
            else:
                s = s + self.beta * torch.gather(ii, 1, candidates)
        seen = (candidates.unsqueeze(2) == history.unsqueeze(1)).to(torch.float32).sum(2) > 0
        s = torch.where(seen | (candidates >= self.n), torch.full_like(s, NEG), s)
        top_s, order = torch.topk(s, candidates.shape[1], dim=1)
        return torch.gather(candidates, 1, order), top_s


def export_retrieval(fitted, path: str | Path, history_len: int, n_candidates: int = DEFAULT_CANDIDATES,
                     embedding_only: bool = False) -> Path:
    mod = Retrieval(fitted, n_candidates, embedding_only).eval()
    outs = ["user_embedding"] if embedding_only else ["candidates", "candidate_scores"]
    return export_graph(mod, path, {"history": (dummy_history(mod.n, history_len), {0: "batch"})},
                        {o: {0: "batch"} for o in outs}, mod.user_feat_dim)


def export_ranker(fitted, path: str | Path, history_len: int, n_candidates: int) -> Path:
    mod = Ranker(fitted).eval()
    c = max(1, min(int(n_candidates), mod.n))
    cand_axes = {0: "batch", 1: "n_candidates"}  # any C: a caller may rank fewer than retrieval returns
    inputs = {"history": (dummy_history(mod.n, history_len), {0: "batch"}),
              "candidates": (torch.arange(c, dtype=torch.int64).repeat(2, 1), cand_axes)}
    return export_graph(mod, path, inputs, {"indices": cand_axes, "scores": cand_axes}, mod.user_feat_dim)


def export_two_stage(fitted, out_dir: str | Path, history_len: int, n_candidates: int = DEFAULT_CANDIDATES,
                     ann_min_items: int = 100_000, n_lists: int | None = None, seed: int = 0) -> dict | None:
    """Write retrieval.onnx, ranker.onnx (and ann_index.npz for large catalogues); the bundle.json section."""
    from rentalml.export.ann import IVFIndex

    tower = tower_of(fitted.model)
    if tower is None:
        return None
    out = Path(out_dir)
    n = len(fitted.item_ids)
    c = max(1, min(int(n_candidates), n))
    ann = n >= ann_min_items
    export_retrieval(fitted, out / "retrieval.onnx", history_len, c, embedding_only=ann)
    export_ranker(fitted, out / "ranker.onnx", history_len, c)
    meta = {"retrieval": "retrieval.onnx", "ranker": "ranker.onnx", "n_candidates": c,
            "mode": "ann" if ann else "brute_force", "embedding_dim": int(tower.table_out.shape[1]) + 1,
            "ann_index": None}
    if ann:
        index = IVFIndex.build(tower.table_out.numpy(), tower.net.item_bias.detach().numpy(), n_lists=n_lists,
                               seed=seed)
        index.save(out / "ann_index.npz")
        meta.update(ann_index="ann_index.npz", n_lists=index.n_lists, nprobe=index.default_nprobe)
    return meta


class TwoStage:
    """Runs a bundle's retrieval → (ANN search) → ranker with ONNX Runtime. Picklable (sessions are lazy)."""

    def __init__(self, bundle_dir: str | Path, threads: int = 1):
        from rentalml.export.bundle import read_meta

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
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
            self._sessions[name] = ort.InferenceSession(str(self.path / self.meta[name]), so,
                                                        providers=["CPUExecutionProvider"])
        return self._sessions[name]

    @property
    def index(self):
        if self._index is None and self.ann:
            from rentalml.export.ann import IVFIndex

            self._index = IVFIndex.load(self.path / self.meta["ann_index"])
        return self._index

    def candidates(self, history: np.ndarray, user_features: np.ndarray | None, n_candidates: int,
                   nprobe: int | None = None) -> np.ndarray:
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
        idx, _ = self.index.search(emb, n_candidates + extra, nprobe=nprobe)
        out = np.full((len(history), n_candidates), self.n_items, dtype=np.int64)
        for r in range(len(history)):
            row = idx[r][(idx[r] >= 0) & ~np.isin(idx[r], history[r])][:n_candidates]
            out[r, : len(row)] = row
        return out

    def topk(self, histories: list[np.ndarray], k: int, n_candidates: int | None = None,
             user_features: np.ndarray | None = None, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k property indices and scores for histories (index arrays, oldest → newest)."""
        c = self.n_candidates if n_candidates is None else int(n_candidates)
        if not 1 <= c <= self.n_candidates:
            raise ValueError(f"n_candidates must be in [1, {self.n_candidates}] (the bundle's retrieval size), "
                             f"got {n_candidates}")
        k = max(1, min(int(k), c))
        hist = pad_histories(histories, self.n_items, self.history_len)
        if self.user_feature_dim and user_features is None:
            user_features = np.zeros((len(histories), self.user_feature_dim), np.float32)
        cand = self.candidates(hist, user_features, c, nprobe)
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


def two_stage_topk(bundle, history: list[np.ndarray], k: int, n_candidates: int | None = None,
                   user_features: np.ndarray | None = None, nprobe: int | None = None):
    """Two-stage top-k for a bundle (a path, a Bundle or a TwoStage): (indices [N, k], scores [N, k])."""
    if not isinstance(bundle, TwoStage):
        path = Path(getattr(bundle, "path", bundle)).resolve()
        key = (path, (path / "bundle.json").stat().st_mtime_ns)  # a rewritten bundle gets new sessions
        if key not in _CACHE:
            _CACHE[key] = TwoStage(path, threads=getattr(bundle, "threads", 1))
        bundle = _CACHE[key]
    return bundle.topk(history, k, n_candidates, user_features, nprobe)
