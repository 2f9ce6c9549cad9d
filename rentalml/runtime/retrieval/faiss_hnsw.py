"""faiss IndexHNSWFlat, inner-product metric (METRIC_INNER_PRODUCT): a navigable small-world graph of `M`
links per node (2·M on the bottom layer) over the uncompressed candidates, built with a beam of
`ef_construction`; a query walks the graph with a beam of max(ef_search, k)."""

from __future__ import annotations

from typing import Any

import numpy as np

from rentalml.runtime.retrieval import _faiss


class FaissHNSW(_faiss.FaissTopK):
    name = "faiss_hnsw"
    build_defaults = {"M": 32, "ef_construction": 40}
    search_defaults = {"ef_search": 256}

    def _build(self, x: np.ndarray) -> None:
        faiss = _faiss.faiss()
        index = faiss.IndexHNSWFlat(x.shape[1], int(self.build_params["M"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(self.build_params["ef_construction"])
        index.add(x)
        self.faiss_index = index

    def exhaustive(self) -> dict[str, Any]:
        return {"ef_search": self.n}

    def _search(self, q: np.ndarray, k: int, ef_search: int = 256, **_: Any) -> tuple[np.ndarray, np.ndarray]:
        return _faiss.search(self.faiss_index, q, k, _faiss.faiss().SearchParametersHNSW(efSearch=int(ef_search)))

    @property
    def nbytes(self) -> int:
        h = self.faiss_index.hnsw
        return int(self.n * self.dim * 4 + h.neighbors.size() * 4 + h.levels.size() * 4 + h.offsets.size() * 8)
