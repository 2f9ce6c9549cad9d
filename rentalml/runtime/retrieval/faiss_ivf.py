"""faiss IndexIVFFlat, inner-product metric: a flat (IndexFlatIP) coarse quantizer over `n_lists` k-means
centroids, candidates stored uncompressed in the inverted lists, `nprobe` lists scanned per query.

faiss trains the coarse k-means spherically for the inner-product metric (IndexIVF sets `cp.spherical`);
`train_metric="l2"` trains plain L2 k-means instead (a flat L2 clustering index) while the lists are still
probed by inner product. n_lists default 4·√n (faiss' guideline: 4·√n … 16·√n); nprobe default n_lists / 16,
at least 64 (benchmarks/retrieval.py, tower-like vectors, top 200: recall@200 0.972 at 100k (79 of 1,265
lists), 0.956 at 1M (250 of 4,000); the floor keeps small catalogues, whose lists are short, above 0.95)."""

from __future__ import annotations

from typing import Any

import numpy as np

from rentalml.runtime.retrieval import _faiss


class FaissIVF(_faiss.FaissTopK):
    name = "faiss_ivf"
    build_defaults = {"n_lists": None, "train_metric": "ip", "seed": 0}
    search_defaults = {"nprobe": None}

    def _build(self, x: np.ndarray) -> None:
        faiss = _faiss.faiss()
        n, d = x.shape
        n_lists = max(1, min(int(self.build_params["n_lists"] or round(4 * np.sqrt(n))), n))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, n_lists, faiss.METRIC_INNER_PRODUCT)
        index.own_fields = True
        quantizer.this.disown()
        index.cp.seed = int(self.build_params["seed"])
        if self.build_params["train_metric"] == "l2":
            index.cp.spherical = False
            index.clustering_index = faiss.IndexFlatL2(d)
        elif self.build_params["train_metric"] != "ip":
            raise ValueError(f"train_metric must be 'ip' or 'l2', got {self.build_params['train_metric']!r}")
        index.train(x)
        index.add(x)
        self.faiss_index = index
        self.build_params["n_lists"] = n_lists
        if self.search_params["nprobe"] is None:
            self.search_params["nprobe"] = min(n_lists, max(64, round(n_lists / 16)))

    @property
    def n_lists(self) -> int:
        return int(self.faiss_index.nlist)

    def exhaustive(self) -> dict[str, Any]:
        return {"nprobe": self.n_lists}

    def _search(self, q: np.ndarray, k: int, nprobe: int | None = None, **_: Any) -> tuple[np.ndarray, np.ndarray]:
        nprobe = max(1, min(int(nprobe or self.n_lists), self.n_lists))
        return _faiss.search(self.faiss_index, q, k, _faiss.faiss().SearchParametersIVF(nprobe=nprobe))

    @property
    def nbytes(self) -> int:
        ix = self.faiss_index
        lists = ix.invlists
        stored = sum(lists.list_size(i) for i in range(ix.nlist))
        return int(stored * (ix.code_size + 8) + ix.nlist * ix.d * 4)
