"""What the faiss backends share: the import, the thread count, write/read of the index file (`FaissTopK`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rentalml.runtime.retrieval.base import TopK


def faiss():
    import faiss as _faiss  # faiss-cpu; imported on first use so `import rentalml.runtime` stays light

    return _faiss


def set_threads(threads: int | None) -> None:
    """faiss parallelises a batch of queries over OpenMP threads (process-wide); serving passes its thread
    budget (the bundle reader's `threads`), like ONNX Runtime's intra-op threads."""
    if threads:
        faiss().omp_set_num_threads(int(threads))


def write(index: Any, directory: Path, stem: str) -> list[str]:
    faiss().write_index(index, str(directory / f"{stem}.faiss"))
    return [f"{stem}.faiss"]


def read(directory: Path, files: list[str]) -> Any:
    return faiss().read_index(str(directory / files[0]))


def search(index: Any, q: np.ndarray, k: int, params: Any) -> tuple[np.ndarray, np.ndarray]:
    scores, rows = index.search(q, k, params=params)
    return scores.astype(np.float32, copy=False), rows.astype(np.int64, copy=False)


class FaissTopK(TopK):
    """A TopK whose index is one faiss index in `faiss_index`: saved as `<stem>.faiss`, loaded with the bundle
    reader's thread budget."""

    faiss_index: Any = None

    def _save(self, directory: Path, stem: str) -> list[str]:
        return write(self.faiss_index, directory, stem)

    def _load(self, directory: Path, files: list[str], threads: int | None) -> None:
        set_threads(threads)
        self.faiss_index = read(directory, files)
