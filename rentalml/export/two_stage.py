"""Two-stage serving graphs: retrieval (two-tower user embedding → top-C candidates) and ranking.

`retrieval.onnx` (models with a two-tower part):
  inputs   history            INT64 [N, L]  padded with n_items (L = the bundle's history_len, fixed)
           user_features      FP32  [N, Fu] only when the model has a user-feature tower
  outputs  brute-force mode (catalogue < export.ann_min_items):
           candidates         INT64 [N, C]  the tower's top-C property indices (history excluded), best first
           candidate_scores   FP32  [N, C]  the tower's scores of those
           ANN mode (catalogue ≥ export.ann_min_items): the catalogue scan is left to an ANN index
           (`ann_index.*`, the rentalml.runtime.retrieval backend `export.ann_backend`, faiss IVF-Flat by
           default; bundle.json two_stage.ann records backend, parameters and files) searched outside the graph:
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
This module writes the graphs; rentalml.runtime.two_stage runs them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from rentalml.export.onnx_export import NEG, Scorer, dummy_history, export_graph
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
                     ann_min_items: int = 100_000, ann_backend: str | None = None,
                     ann_params: dict | None = None) -> dict | None:
    """Write retrieval.onnx, ranker.onnx (and the ANN index for large catalogues); the bundle.json section.
    The index is `ann_backend` (default: export.ann_backend) at its default parameters unless `ann_params`
    (default: export.ann_params) sets them, built over the item vectors with the bias as a last column."""
    from rentalml.runtime import retrieval

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
        from rentalml.config import get_settings

        exp = get_settings().export
        x = np.hstack([tower.table_out.numpy(), tower.net.item_bias.detach().numpy()[:, None]]).astype(np.float32)
        index = retrieval.make(ann_backend or exp.ann_backend,
                               **(exp.ann_params if ann_params is None else ann_params)).index(x)
        record = index.save(out)
        meta.update(ann_index=record["files"][0], ann=record)
    return meta
