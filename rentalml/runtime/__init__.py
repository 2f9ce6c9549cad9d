"""The recommendation runtime: everything that reads a bundle and answers with recommendations.

    bundle      Bundle (the reader), read_meta, bundle constants          rentalml.runtime.bundle
    history     padded histories, training + streamed history merge       rentalml.runtime.history
    interfaces  Stages, FeatureSource, Retriever (ABCs); Recommendations  rentalml.runtime.interfaces
    features    Filters (business rules), LocalFeatures, FeastFeatures    rentalml.runtime.features
    stages      LocalStages (the bundle's graphs in ONNX Runtime)         rentalml.runtime.stages
    two_stage   TwoStage: retrieval → ANN search → ranker                 rentalml.runtime.two_stage
    retrieval   TopK (one interface; brute, faiss IVF / HNSW backends)    rentalml.runtime.retrieval
    live        LiveCatalogue: never-seen properties via foldin.onnx      rentalml.runtime.live
    pipeline    Pipeline (the named steps) and Engine (what a server holds) rentalml.runtime.pipeline

rentalml.export writes bundles and never serves; nothing here imports rentalml.export (no training stack,
no torch), so the runtime is what the serving image needs. Names are re-exported lazily (PEP 562): importing
this package imports no submodule, so the package adds no edge to the import graph.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Bundle": "bundle", "read_meta": "bundle",
    "Recommendations": "interfaces", "Stages": "interfaces", "FeatureSource": "interfaces",
    "Retriever": "interfaces",
    "Filters": "features", "LocalFeatures": "features", "FeastFeatures": "features",
    "LocalStages": "stages", "TwoStage": "two_stage", "TopK": "retrieval", "LiveCatalogue": "live",
    "Pipeline": "pipeline", "Engine": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
