"""The runtime's declared interfaces and its one result type.

Every method the pipeline (rentalml.runtime.pipeline) calls on a collaborator is declared here, so a new
implementation (a remote predictor, another feature store, another index) is checked against one list, not
found by reading the pipeline. They are ABCs (an implementation subclasses them and cannot forget an abstract
method) and carry the few facts the pipeline used to find by type or attribute probing (`exact`,
`in_process`, `any_history_width`, `unavailable()`): what a caller needs to know is asked, never guessed.

* `Retriever` — stage 1 on its own: histories → candidate indices (the two-stage graphs + the ANN index,
  rentalml.runtime.two_stage). The index itself is a `rentalml.runtime.retrieval.TopK` (TFRS's `TopK`:
  index(candidates, identifiers), query → (scores, identifiers)), one module per backend.
* `Stages` — the numeric half of a recommendation: retrieval and ranking over padded histories.
  `rentalml.runtime.stages.LocalStages` runs the bundle's graphs in process (ONNX Runtime);
  `rentalml.inference.predictor.RemoteStages` calls them on a KServe v2 predictor (Triton).
* `FeatureSource` — candidate and user features: `LocalFeatures` (the bundle's table + live overrides) or
  `FeastFeatures` (the online store), rentalml.runtime.features.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class Recommendations:
    """The one result type: what the runtime returns to every caller (serving extends it with routing)."""

    property_ids: np.ndarray  # object [N, k], best first ("" where nothing qualifies)
    scores: np.ndarray  # float32 [N, k], non-increasing along each row
    sources: list[str]  # per row: "model" | "cold_start"
    filtered_out: list[int] = field(default_factory=list)  # candidates the business rules removed, per row


class Retriever(ABC):
    """Stage 1: padded histories [N, L] (+ user features) → candidate property indices [N, n], best first,
    padded with n_items where fewer qualify. The user's own history is never a candidate. `search` overrides
    the ANN index's search parameters for the call ({"nprobe": 64}, {"ef_search": 400}, "exhaustive")."""

    n_items: int

    @abstractmethod
    def candidates(self, history: np.ndarray, user_features: np.ndarray | None, n_candidates: int,
                   search: dict | str | None = None) -> np.ndarray: ...


class Stages(ABC):
    """Retrieval and ranking of padded histories (INT64 [N, L], padding = n_items)."""

    n_items: int

    @property
    @abstractmethod
    def max_candidates(self) -> int:
        """The most candidates `retrieve` returns (the bundle's retrieval size)."""

    @property
    @abstractmethod
    def exact(self) -> bool:
        """`retrieve_rank` scores the whole catalogue with the full model: the top-n it returns is the model's
        top-n, so a caller may ask for only as many candidates as it needs (k plus what filters can remove)."""

    @property
    @abstractmethod
    def in_process(self) -> bool:
        """No network call (the serving layer may run it on its event loop)."""

    @property
    def any_history_width(self) -> bool:
        """Histories may be padded to the longest one only (else to the bundle's history_len)."""
        return False

    @abstractmethod
    def retrieve(self, history: np.ndarray, n: int, user_features: np.ndarray | None = None) -> np.ndarray:
        """[N, ≤ n] candidate indices (n_items = padding)."""

    @abstractmethod
    def rank(self, history: np.ndarray, candidates: np.ndarray,
             user_features: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The candidates re-ordered by the full model: (indices, scores), best first, padding last."""

    def retrieve_rank(self, history: np.ndarray, n: int,
                      user_features: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Both stages; implementations may fuse them into one call (the in-process exact scorer does)."""
        return self.rank(history, self.retrieve(history, n, user_features), user_features)


class FeatureSource(ABC):
    """Property attributes for the filter step and the user's context for the request's default rules."""

    @property
    def in_process(self) -> bool:
        """Answers from this process's memory (no feature-store call)."""
        return False

    @abstractmethod
    def properties(self, ids: list[str]) -> pd.DataFrame:
        """Index property_id (in the order of `ids`), columns FILTER_COLUMNS; NaN where unknown."""

    @abstractmethod
    def user(self, user_id: str) -> dict:
        """budget / median_price, top_city, ... ({} when unknown)."""

    def unavailable(self) -> set[str] | None:
        """Ids that are not available (delisted), when the source knows them without a lookup: the
        availability-only rule is then a set lookup. None: the filter step fetches `properties` instead."""
        return None
