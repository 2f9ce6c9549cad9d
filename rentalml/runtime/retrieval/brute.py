"""Exact top-k: every candidate scored (one GEMM per block of queries). The reference the ANN backends are
measured against, and what small catalogues need (below `export.ann_min_items` the retrieval graph does this
itself)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rentalml.runtime.retrieval.base import TopK


def exact_topk(q: np.ndarray, x: np.ndarray, k: int, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of the k largest <q, x_j> per query, best first (ties: lower row first)."""
    k = min(k, len(x))
    out_s = np.empty((len(q), k), np.float32)
    out_i = np.empty((len(q), k), np.int64)
    for s in range(0, len(q), block):
        sc = q[s:s + block] @ x.T
        top = np.argpartition(-sc, k - 1, axis=1)[:, :k] if k < len(x) else np.broadcast_to(
            np.arange(len(x)), sc.shape)
        ts = np.take_along_axis(sc, top, 1)
        order = np.lexsort((top, -ts), axis=1)
        out_i[s:s + block] = np.take_along_axis(top, order, 1)
        out_s[s:s + block] = np.take_along_axis(ts, order, 1)
    return out_s, out_i


class BruteForce(TopK):
    name = "brute"

    def _build(self, x: np.ndarray) -> None:
        self.x = x

    def _search(self, q: np.ndarray, k: int, **params: Any) -> tuple[np.ndarray, np.ndarray]:
        return exact_topk(q, self.x, k)

    def exhaustive(self) -> dict[str, Any]:
        return {}

    def _save(self, directory: Path, stem: str) -> list[str]:
        np.save(directory / f"{stem}.npy", self.x)
        return [f"{stem}.npy"]

    def _load(self, directory: Path, files: list[str], threads: int | None) -> None:
        self.x = np.load(directory / files[0])

    @property
    def nbytes(self) -> int:
        return int(self.x.nbytes)
