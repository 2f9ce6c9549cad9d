"""Export a fitted model's scoring path to ONNX with the top-k inside the graph.

Graph `scorer.onnx` (the same interface for every model type):
  inputs   history        INT64 [N, L]  the user's recent property indices, padded with n_items
           k              INT64 [1]     how many to return
           user_features  FP32  [N, Fu] only when the model has a user-feature tower
  outputs  indices        INT64 [N, k]  property indices, best first (history items excluded)
           scores         FP32  [N, k]  non-increasing per row
The user representation is computed in the graph from the history, so a user unknown at training time
(or one with fresh interactions) is scored without retraining.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from rentalml.models.base import Popularity
from rentalml.models.hybrid import Hybrid
from rentalml.models.itemitem import SparseEASE
from rentalml.models.neural import TwoTower

OPSET = 17
NEG = -1e30


class Scorer(nn.Module):
    def __init__(self, fitted):
        super().__init__()
        model = fitted.model
        n = len(fitted.item_ids)
        self.n = n
        self.tower = self.itemitem = None
        self.beta = 1.0
        self.has_pop = False
        tower = model.tower if isinstance(model, Hybrid) else model if isinstance(model, TwoTower) else None
        ii = model.itemitem if isinstance(model, Hybrid) else model if isinstance(model, SparseEASE) else None
        if isinstance(model, Hybrid):
            self.beta = float(model.beta)
        if tower is not None:
            tin = tower.table_in
            self.register_buffer("table_in", torch.cat([tin, torch.zeros(1, tin.shape[1])]))
            self.register_buffer("table_out_t", tower.table_out.T.contiguous())
            self.register_buffer("bias", tower.net.item_bias.detach().clone())
            self.user_tower = tower.net.user_tower
            self.user_feat_dim = tower.net.user_feat_dim
            self.tower = True
        else:
            self.user_feat_dim = 0
        if ii is not None:
            pad_idx = np.full((1, ii.out_idx.shape[1]), n, dtype=np.int64)
            self.register_buffer("out_idx", torch.from_numpy(np.vstack([ii.out_idx, pad_idx])))
            self.register_buffer("out_w", torch.from_numpy(np.vstack([ii.out_w, np.zeros_like(pad_idx,
                                                                                              np.float32)])))
            self.itemitem = True
            # never-seen properties borrow their content neighbour's item-item score; warm ones are their own
            # proxy with weight 1, so the graph touches only the cold columns (a gather over all n columns cost
            # ~40 µs of a ~250 µs call on a 10k catalogue)
            proxy, proxy_w = getattr(model, "proxy", None), getattr(model, "proxy_w", None)
            cold = np.zeros(0, np.int64) if proxy is None else \
                np.flatnonzero((proxy != np.arange(n)) | (proxy_w != 1.0)).astype(np.int64)
            self.n_cold = len(cold)
            if self.n_cold:
                self.register_buffer("cold_idx", torch.from_numpy(cold)[None, :])
                self.register_buffer("cold_proxy", torch.from_numpy(proxy[cold].astype(np.int64)))
                self.register_buffer("cold_w", torch.from_numpy(proxy_w[cold].astype(np.float32)))
        if isinstance(model, Popularity):
            self.register_buffer("pop", torch.from_numpy(model.pop.astype(np.float32)))
            self.has_pop = True
        if self.tower is None and self.itemitem is None and not self.has_pop:
            raise TypeError(f"no ONNX export for {type(model).__name__}")

    def user_vector(self, history: torch.Tensor, user_features: torch.Tensor | None = None) -> torch.Tensor:
        """The user tower on a padded history (TwoTowerNet.user_vectors on index matrices)."""
        mask = (history < self.n).to(torch.float32)
        cnt = mask.sum(1, keepdim=True).clamp(min=1.0)
        h = self.table_in[history].sum(1) / cnt.sqrt()
        if self.user_feat_dim:
            h = torch.cat([h, user_features], dim=1)
        return self.user_tower(torch.tanh(h))

    def forward(self, history: torch.Tensor, k: torch.Tensor, user_features: torch.Tensor | None = None):
        batch = history.shape[0]
        scores = None  # [N, n + 1]: column n is the padding index
        if self.tower is not None:
            u = self.user_vector(history, user_features)
            scores = torch.cat([u @ self.table_out_t + self.bias, torch.zeros(batch, 1)], dim=1)
        if self.itemitem is not None:
            tgt = self.out_idx[history].reshape(batch, -1)
            w = self.out_w[history].reshape(batch, -1)
            ii = torch.zeros(batch, self.n + 1).scatter_add(1, tgt, w)
            if self.n_cold:  # never-seen properties borrow their content neighbour's score
                ii = ii.scatter(1, self.cold_idx.expand(batch, -1), ii[:, self.cold_proxy] * self.cold_w)
            scores = self.beta * ii if scores is None else scores + self.beta * ii
        if self.has_pop:
            pop = torch.cat([self.pop, torch.zeros(1)])[None, :]
            scores = torch.zeros(batch, self.n + 1) + pop if scores is None else scores + pop
        scores = scores.scatter(1, history, torch.full(history.shape, NEG))
        top_s, top_i = torch.topk(scores[:, : self.n], k[0], dim=1)
        return top_i, top_s


def export_scorer(fitted, path: str | Path, history_len: int = 256) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scorer = Scorer(fitted).eval()
    inputs = {"history": (dummy_history(len(fitted.item_ids), history_len), {0: "batch", 1: "history_len"}),
              "k": (torch.tensor([10], dtype=torch.int64), {})}
    return export_graph(scorer, path, inputs, {"indices": {0: "batch", 1: "k"}, "scores": {0: "batch", 1: "k"}},
                        scorer.user_feat_dim)


def dummy_history(n_items: int, history_len: int, batch: int = 2) -> torch.Tensor:
    """A tracing input: padded histories (n_items = padding) with three real items."""
    hist = torch.full((batch, history_len), n_items, dtype=torch.int64)
    hist[:, :3] = torch.tensor([0, 1, min(2, n_items - 1)])
    return hist


def export_graph(module: torch.nn.Module, path: str | Path, inputs: dict[str, tuple[torch.Tensor, dict]],
                 outputs: dict[str, dict], user_feat_dim: int = 0) -> Path:
    """torch.onnx.export of one of the bundle's graphs (opset OPSET, TorchScript exporter) + the ONNX checker.
    `inputs`: name → (example tensor, dynamic axes); `outputs`: name → dynamic axes; an optional trailing
    `user_features` input [batch, user_feat_dim] when the model has a user-feature tower."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names, args = list(inputs), tuple(t for t, _ in inputs.values())
    axes = {name: ax for name, (_, ax) in inputs.items() if ax} | {name: ax for name, ax in outputs.items() if ax}
    if user_feat_dim:
        args = (*args, torch.zeros(2, user_feat_dim))
        names.append("user_features")
        axes["user_features"] = {0: "batch"}
    with torch.no_grad():
        torch.onnx.export(module.eval(), args, str(path), input_names=names, output_names=list(outputs),
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    onnx.checker.check_model(str(path))
    return path


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 quantization (weights int8, activations quantized at run time) of the MatMul/Gemm ops."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    return Path(dst)
