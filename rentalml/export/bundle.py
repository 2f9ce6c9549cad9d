"""Writing the model bundle (contracts.md): what training writes, MLflow stores and serving loads.

The reader (`Bundle`, `read_meta`) and everything that serves from a bundle live in rentalml.runtime; this
module only writes. Layout of a bundle directory:
  bundle.json          format version, model name/version, created_at, data snapshot hash, feature views,
                       metrics, code version, graph interface (n_items, history_len, user_feature_dim)
  foldin.onnx          never-seen properties scored by the content tower (rentalml.export.foldin), when the
                       model has one
  checkpoint.pkl       the trained model (Fitted) for incremental fine-tuning; not read by serving
  drift_reference.json per-feature and model-score distributions of the training data (rentalml.monitoring)
  scorer.onnx          history → top-k (see rentalml.export.onnx_export); scorer.int8.onnx when quantized
  retrieval.onnx       two-stage serving, models with a two-tower part (rentalml.export.two_stage): history →
  ranker.onnx          top-C candidates (or the user embedding + ann_index.faiss for large catalogues) → ranked
  users.parquet        user_id, index, history (property indices, oldest → newest), city, features (list)
  properties.parquet   property_id, index and the raw property attributes (filters, explanations)
  popularity.parquet   cold-start fallback: city ("*" = everywhere), property index, score, rank
  item_vectors.npy     item embeddings of the two-tower part (explanations), when the model has one
  reranker.json        the hybrid's learned re-ranker (models.rerank.PairRanker), when it has one; then also
  pair_context.npz     what its features read about items (PairContext) and users.parquet's history_times
  encoders.json        fitted feature encoders (to encode never-seen properties/users as in training)
  checksums.json       sha256 and size of every other file, and of bundle.json's content less the keys the
                       registry stamps (model_version, registry); written last, checked by the reader
                       (rentalml.runtime.bundle.verify_bundle) before it reads anything
"""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from rentalml import __version__
from rentalml.export.onnx_export import export_scorer
from rentalml.runtime.bundle import (
    CHECKSUMS,
    FALLBACK_PER_CITY,
    FORMAT_VERSION,
    HISTORY_LEN,
    PAIR_CONTEXT,
    RERANKER,
    bundle_checksums,
)


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def _histories(fitted, dataset) -> list[np.ndarray]:
    """Per user (fitted.user_ids order), training history item indices ordered oldest → newest."""
    df = dataset.interactions[["user_id", "property_id", "timestamp"]]
    df = df[df["user_id"].isin(set(fitted.user_ids))]
    item_pos = pd.Index(fitted.item_ids).get_indexer(df["property_id"])
    df = df.assign(item=item_pos)[item_pos >= 0]
    train = fitted.train.tocsr()
    user_pos = pd.Index(fitted.user_ids).get_indexer(df["user_id"])
    in_train = np.asarray(train[user_pos, df["item"].to_numpy()]).ravel() > 0
    df = df[in_train].sort_values("timestamp").drop_duplicates(["user_id", "item"], keep="last")
    groups = df.groupby("user_id", sort=False)["item"].apply(lambda s: s.to_numpy(np.int64))
    return [groups.get(u, np.zeros(0, np.int64)) for u in fitted.user_ids]


def write_bundle(fitted, dataset, out_dir: str | Path, *, model_name: str = "rental-recommender",
                 model_version: str = "0", metrics: dict | None = None, feature_views: list[str] | None = None,
                 quantize: bool = True, drift_reference: bool = True, checkpoint: bool = True,
                 n_candidates: int | None = None, ann_min_items: int | None = None) -> Path:
    from rentalml.config import get_settings
    from rentalml.export.onnx_export import quantize_int8
    from rentalml.export.two_stage import export_two_stage

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    export_scorer(fitted, out / "scorer.onnx", HISTORY_LEN)
    if quantize and fitted.name != "popularity":
        quantize_int8(out / "scorer.onnx", out / "scorer.int8.onnx")
    exp = get_settings().export
    two_stage = export_two_stage(fitted, out, HISTORY_LEN, n_candidates or exp.n_candidates,
                                 exp.ann_min_items if ann_min_items is None else ann_min_items)
    items = dataset.items.reindex(fitted.item_ids) if dataset.items is not None else pd.DataFrame(
        index=pd.Index(fitted.item_ids, name="property_id"))
    props = items.reset_index().rename(columns={"index": "property_id"})
    props.insert(1, "index", np.arange(len(props), dtype=np.int64))
    props.to_parquet(out / "properties.parquet", index=False)
    hist = _histories(fitted, dataset)
    city = items["city"].astype(str).to_numpy() if "city" in items.columns else None
    users = pd.DataFrame({"user_id": fitted.user_ids.astype(str), "index": np.arange(len(fitted.user_ids)),
                          "history": [h.tolist() for h in hist]})
    ranker = getattr(fitted.model, "ranker", None) if fitted.train_times is not None else None
    if ranker is not None:
        # the learned re-ranker (models.rerank): its weights, what its features read about items, and the time
        # of every history pair (years), which the runtime's rank step reads with the history
        (out / RERANKER).write_text(json.dumps(ranker.to_dict()))
        fitted.model.pair_context.to_npz(out / PAIR_CONTEXT)
        tt = fitted.train_times.tocsr()
        users["history_times"] = [np.asarray(tt[u, h].todense()).ravel().tolist() if len(h) else []
                                  for u, h in enumerate(hist)]
    if city is not None:
        users["city"] = [pd.Series(city[h]).mode().iat[0] if len(h) else None for h in hist]
    if fitted.user_features is not None:
        users["features"] = [r.tolist() for r in fitted.user_features]
    users.to_parquet(out / "users.parquet", index=False)
    pop = np.asarray(fitted.train.sum(0)).ravel()
    rows = []
    for c, sel in [("*", np.arange(len(pop)))] + ([] if city is None else
                                                  [(c, np.flatnonzero(city == c)) for c in np.unique(city)]):
        order = sel[np.argsort(-pop[sel], kind="stable")][:FALLBACK_PER_CITY]
        rows.append(pd.DataFrame({"city": c, "index": order, "score": pop[order].astype(np.float32),
                                  "rank": np.arange(len(order))}))
    pd.concat(rows).to_parquet(out / "popularity.parquet", index=False)
    tower = getattr(fitted.model, "tower", fitted.model if hasattr(fitted.model, "table_out") else None)
    if tower is not None and hasattr(tower, "table_out"):
        np.save(out / "item_vectors.npy", tower.table_out.numpy().astype(np.float32))
    enc = {"item": fitted.item_encoder.to_dict() if fitted.item_encoder else None,
           "user": fitted.user_encoder.to_dict() if fitted.user_encoder else None}
    (out / "encoders.json").write_text(json.dumps(enc))
    meta = {
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "model_version": str(model_version),
        "model_type": fitted.name,
        "created_at": datetime.now(UTC).isoformat(),
        "data_snapshot": dataset.snapshot_hash(),
        "dataset": dataset.name,
        "feature_views": feature_views or [],
        "metrics": metrics or {},
        "params": {k: v for k, v in fitted.params.items() if isinstance(v, (int, float, str, bool))},
        "code_version": code_version(),
        "graph": {"file": "scorer.onnx", "n_items": int(len(fitted.item_ids)), "history_len": HISTORY_LEN,
                  "user_feature_dim": int(fitted.user_features.shape[1]) if fitted.user_features is not None
                  and getattr(getattr(tower, "net", None), "user_feat_dim", 0) else 0},
    }
    if two_stage:
        meta["two_stage"] = two_stage
    if ranker is not None:
        from rentalml.models.hybrid import RERANK_CANDIDATES

        meta["rerank"] = {"ranker": RERANKER, "context": PAIR_CONTEXT, "candidates": RERANK_CANDIDATES}
    (out / "bundle.json").write_text(json.dumps(meta, indent=2, default=str))
    from rentalml.export.foldin import export_foldin

    if export_foldin(fitted, out / "foldin.onnx", HISTORY_LEN) is not None:
        meta["foldin"] = {"file": "foldin.onnx", "inputs": ["history", "new_features"], "outputs": ["scores", "proxy"]}
        (out / "bundle.json").write_text(json.dumps(meta, indent=2, default=str))
    if checkpoint:
        import pickle

        # the trained model itself, for incremental fine-tuning (rentalml.training.incremental); serving never
        # reads it
        with open(out / "checkpoint.pkl", "wb") as fh:
            pickle.dump(fitted, fh)
    if drift_reference:
        from rentalml.monitoring.drift import write_reference

        # the drift reference loads the bundle (a verified read): the digests of the files so far first
        (out / CHECKSUMS).write_text(json.dumps(bundle_checksums(out), indent=2))

        write_reference(out, dataset)  # the training snapshot that `rentalml monitor drift` compares against
    # last: the digests of everything above (a reader refuses a bundle whose files differ from them)
    (out / CHECKSUMS).write_text(json.dumps(bundle_checksums(out), indent=2))
    return out
