"""The one retrieval interface: a maximum-inner-product top-k index over a fixed candidate set.

Modelled on TFRS's `tfrs.layers.factorized_top_k.TopK`: `index(candidates, identifiers)` builds the index
(and returns it), `query(queries, k)` returns `(scores, identifiers)`, best first. Here the score is the
inner product <q, x> (the two-tower score <u, v> + b with x = [v, b] and q = [u, 1]), results are padded with
identifier -1 and score -inf where fewer than k candidates are reachable, and every backend additionally
knows how to save itself into a bundle folder and load back (`save` / `load`), its default search setting
(`search_defaults`, recorded in the bundle) and the setting that makes its search exhaustive (`exhaustive()`:
every IVF list probed; for HNSW a beam as wide as the catalogue).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np


class TopK(ABC):
    """Top-k by inner product. Subclasses implement `_build`, `_search`, `_save`, `_load` and `exhaustive`."""

    name: ClassVar[str]
    #: build parameters (n_lists, M, ...) and search parameters (nprobe, ef_search) with their defaults
    build_defaults: ClassVar[dict[str, Any]] = {}
    search_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **params: Any):
        unknown = set(params) - set(self.build_defaults) - set(self.search_defaults)
        if unknown:
            raise ValueError(f"{self.name}: unknown parameters {sorted(unknown)}; known: "
                             f"{sorted({**self.build_defaults, **self.search_defaults})}")
        self.build_params = {k: params.get(k, v) for k, v in self.build_defaults.items()}
        self.search_params = {k: params.get(k, v) for k, v in self.search_defaults.items()}
        self.ids: np.ndarray | None = None  # identifiers of the indexed rows (None: the row number itself)
        self.dim = 0
        self.n = 0

    # --- building -------------------------------------------------------------------------------------------
    def index(self, candidates: np.ndarray, identifiers: np.ndarray | None = None) -> TopK:
        """Build the index over candidates [n, D] (float32), identified by `identifiers` [n] (default 0..n-1)."""
        x = np.ascontiguousarray(candidates, dtype=np.float32)
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"candidates must be a non-empty [n, D] matrix, got shape {x.shape}")
        if identifiers is not None:
            identifiers = np.asarray(identifiers, np.int64)
            if identifiers.shape != (len(x),):
                raise ValueError(f"identifiers must have shape ({len(x)},), got {identifiers.shape}")
        self.n, self.dim = x.shape
        self.ids = None if identifiers is None or np.array_equal(identifiers, np.arange(len(x))) else identifiers
        self._build(x)
        return self

    @abstractmethod
    def _build(self, x: np.ndarray) -> None: ...

    # --- searching ------------------------------------------------------------------------------------------
    def query(self, queries: np.ndarray, k: int, search: dict[str, Any] | str | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """queries [B, D] → (scores float32 [B, k], identifiers int64 [B, k]), best first; -inf / -1 where
        fewer than k candidates were reached. `search` overrides the search parameters for this call
        ("exhaustive" = `exhaustive()`)."""
        if not self.n:
            raise RuntimeError(f"{self.name}: query before index()")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries have shape {q.shape}, the index holds dim {self.dim}")
        k = int(k)
        if k < 1:
            raise ValueError(f"k must be ≥ 1, got {k}")
        params = dict(self.search_params)
        if search == "exhaustive":
            params.update(self.exhaustive())
        elif search:
            unknown = set(search) - set(params)
            if unknown:
                raise ValueError(f"{self.name}: unknown search parameters {sorted(unknown)}; known: {sorted(params)}")
            params.update(search)
        kk = min(k, self.n)
        scores, rows = self._search(q, kk, **params)
        out_s = np.full((len(q), k), -np.inf, np.float32)
        out_i = np.full((len(q), k), -1, np.int64)
        out_s[:, :kk], out_i[:, :kk] = scores, rows
        miss = out_i < 0
        out_s[miss] = -np.inf
        if self.ids is not None:
            out_i[~miss] = self.ids[out_i[~miss]]
        return out_s, out_i

    @abstractmethod
    def _search(self, q: np.ndarray, k: int, **params: Any) -> tuple[np.ndarray, np.ndarray]:
        """(scores [B, k], row numbers [B, k]) with -1 rows where the search reached fewer than k."""

    @abstractmethod
    def exhaustive(self) -> dict[str, Any]:
        """Search parameters under which the search visits every candidate."""

    # --- persistence ----------------------------------------------------------------------------------------
    def save(self, directory: str | Path, stem: str = "ann_index") -> dict[str, Any]:
        """Write the index into `directory`; returns the bundle.json record `load` reads back."""
        d = Path(directory)
        files = self._save(d, stem)
        if self.ids is not None:
            np.save(d / f"{stem}.ids.npy", self.ids)
            files.append(f"{stem}.ids.npy")
        return {"backend": self.name, "params": {**self.build_params, **self.search_params},
                "files": files, "n": self.n, "dim": self.dim}

    @abstractmethod
    def _save(self, directory: Path, stem: str) -> list[str]: ...

    @classmethod
    def load(cls, directory: str | Path, record: dict[str, Any], threads: int | None = None) -> TopK:
        d = Path(directory)
        obj = cls(**record.get("params", {}))
        obj.n, obj.dim = int(record["n"]), int(record["dim"])
        ids = [f for f in record["files"] if f.endswith(".ids.npy")]
        obj.ids = np.load(d / ids[0]) if ids else None
        obj._load(d, [f for f in record["files"] if not f.endswith(".ids.npy")], threads)
        return obj

    @abstractmethod
    def _load(self, directory: Path, files: list[str], threads: int | None) -> None: ...

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes the index holds in memory (vectors, lists, graph)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, dim={self.dim}, {self.build_params}, {self.search_params})"


def recall_at_n(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean |approx ∩ exact| / |exact| per row (recall@N of an approximate top-N against the exact top-N)."""
    return float(np.mean([len(set(a[a >= 0].tolist()) & set(e.tolist())) / len(e)
                          for a, e in zip(approx, exact, strict=True)]))
