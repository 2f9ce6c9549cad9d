"""Retrieval behind one interface (`TopK`, rentalml.runtime.retrieval.base), one module per backend:

    brute       BruteForce   exact, every candidate scored (numpy GEMM)
    faiss_ivf   FaissIVF     faiss IndexIVFFlat, inner product
    faiss_hnsw  FaissHNSW    faiss IndexHNSWFlat, inner product

The numpy IVF rentalml served before faiss is gone: at equal recall@200 (0.95) it took 2.8× (100k) and 6.4×
(1M) faiss IVF-Flat's time per query in batches, 6× and 15× one query at a time
(benchmarks/results/retrieval.json), far outside the 10 % that would have justified keeping it for a smaller
image.

`make(backend, **params)` returns an empty index (`.index(candidates, identifiers)` builds it), `load(dir,
record)` reads what `TopK.save` wrote (the record lives in bundle.json["two_stage"]["ann"]). Measured against
each other by benchmarks/retrieval.py; the exported bundles use `DEFAULT_BACKEND` at its default setting
unless `export.ann_backend` says otherwise.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from rentalml.runtime.retrieval.base import TopK, recall_at_n

BACKENDS = {"brute": "brute:BruteForce", "faiss_ivf": "faiss_ivf:FaissIVF", "faiss_hnsw": "faiss_hnsw:FaissHNSW"}
DEFAULT_BACKEND = "faiss_ivf"

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "TopK", "backend", "load", "make", "recall_at_n"]


def backend(name: str) -> type[TopK]:
    if name not in BACKENDS:
        raise ValueError(f"unknown retrieval backend {name!r}; known: {sorted(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def make(name: str = DEFAULT_BACKEND, **params: Any) -> TopK:
    return backend(name)(**params)


def load(directory: str | Path, record: dict[str, Any], threads: int | None = None) -> TopK:
    """The index `TopK.save` wrote into `directory`, as its record describes it."""
    return backend(record["backend"]).load(directory, record, threads)
