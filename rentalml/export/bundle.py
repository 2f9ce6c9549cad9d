"""The model bundle (contracts.md): what training writes, MLflow stores and serving loads.

Layout of a bundle directory:
  bundle.json          format version, model name/version, created_at, data snapshot hash, feature views,
                       metrics, code version, graph interface (n_items, history_len, user_feature_dim)
  foldin.onnx          never-seen properties scored by the content tower (rentalml.export.foldin), when the
                       model has one
  checkpoint.pkl       the trained model (Fitted) for incremental fine-tuning; not read by serving
  drift_reference.json per-feature and model-score distributions of the training data (rentalml.monitoring)
  scorer.onnx          history → top-k (see rentalml.export.onnx_export); scorer.int8.onnx when quantized
  retrieval.onnx       two-stage serving, models with a two-tower part (rentalml.export.two_stage): history →
  ranker.onnx          top-C candidates (or the user embedding + ann_index.npz for large catalogues) → ranked
  users.parquet        user_id, index, history (property indices, oldest → newest), city, features (list)
  properties.parquet   property_id, index and the raw property attributes (filters, explanations)
  popularity.parquet   cold-start fallback: city ("*" = everywhere), property index, score, rank
  item_vectors.npy     item embeddings of the two-tower part (explanations), when the model has one
  encoders.json        fitted feature encoders (to encode never-seen properties/users as in training)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from rentalml import __version__
from rentalml.export.onnx_export import export_scorer, pad_histories, trim_padding

FORMAT_VERSION = 1
HISTORY_LEN = 256
FALLBACK_PER_CITY = 200


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

        write_reference(out, dataset)  # the training snapshot that `rentalml monitor drift` compares against
    return out


def read_meta(bundle_dir: str | Path) -> dict:
    """The bundle's bundle.json (lineage: data_snapshot, code_version, feature_views, metrics...)."""
    return json.loads((Path(bundle_dir) / "bundle.json").read_text())


@dataclass
class Recommendations:
    property_ids: np.ndarray  # object [N, k]
    scores: np.ndarray  # float32 [N, k]
    sources: list[str]  # "model" | "cold_start" per row


class Bundle:
    """A loaded bundle: ONNX Runtime session + id maps + cold-start fallback. Picklable (for --workers)."""

    def __init__(self, path: str | Path, int8: bool = False, threads: int = 1):
        self.path = Path(path)
        self.int8 = int8
        self.threads = threads
        t0 = time.perf_counter()
        self.meta = read_meta(self.path)
        g = self.meta["graph"]
        self.n_items = int(g["n_items"])
        self.history_len = int(g["history_len"])
        self.user_feature_dim = int(g.get("user_feature_dim", 0))
        self.properties = pd.read_parquet(self.path / "properties.parquet")
        self.property_ids = self.properties["property_id"].astype(str).to_numpy(dtype=object)
        self.property_index = pd.Index(self.property_ids)
        users = pd.read_parquet(self.path / "users.parquet")
        self.user_index = pd.Index(users["user_id"].astype(str))
        # the request path looks users up one at a time: a dict costs ~0.2 µs where pd.Index.get_indexer on a
        # one-element list costs ~50 µs (it builds an Index per call)
        self._user_pos = {u: i for i, u in enumerate(self.user_index)}
        self.user_history = [np.asarray(h, dtype=np.int64) for h in users["history"]]
        self.user_city = users["city"].tolist() if "city" in users.columns else [None] * len(users)
        self.user_features = (np.asarray(users["features"].tolist(), dtype=np.float32)
                              if "features" in users.columns else None)
        pop = pd.read_parquet(self.path / "popularity.parquet")
        self.fallback = {c: (g["index"].to_numpy(np.int64), g["score"].to_numpy(np.float32))
                         for c, g in pop.groupby("city", sort=False)}
        vec = self.path / "item_vectors.npy"
        self.item_vectors = np.load(vec) if vec.exists() else None
        self._session = None
        self._two_stage = None
        self.load_seconds = time.perf_counter() - t0

    # sessions are not picklable: build lazily per process
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_session"] = None
        state["_two_stage"] = None
        return state

    @property
    def session(self):
        if self._session is None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
            name = "scorer.int8.onnx" if self.int8 and (self.path / "scorer.int8.onnx").exists() else "scorer.onnx"
            self._session = ort.InferenceSession(str(self.path / name), so, providers=["CPUExecutionProvider"])
        return self._session

    @property
    def model_version(self) -> str:
        return str(self.meta.get("model_version", "0"))

    @property
    def model_type(self) -> str:
        return str(self.meta.get("model_type", ""))

    def user_positions(self, user_ids: list[str]) -> np.ndarray:
        """Row of each user in the bundle's user table, -1 for users it has never seen."""
        get = self._user_pos.get
        return np.fromiter((get(u, -1) for u in user_ids), dtype=np.int64, count=len(user_ids))

    def known(self, user_id: str) -> bool:
        return user_id in self._user_pos

    def history_of(self, user_id: str) -> np.ndarray:
        pos = self._user_pos.get(user_id, -1)
        return self.user_history[pos] if pos >= 0 else np.zeros(0, np.int64)

    def score_histories(self, histories: list[np.ndarray], k: int,
                        user_features: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k property indices and scores for arbitrary histories (index arrays, oldest → newest)."""
        k = max(1, min(int(k), self.n_items))
        feed = {"history": trim_padding(pad_histories(histories, self.n_items, self.history_len), self.n_items),
                "k": np.array([k], dtype=np.int64)}
        if self.user_feature_dim:
            feed["user_features"] = (user_features if user_features is not None else
                                     np.zeros((len(histories), self.user_feature_dim), np.float32))
        idx, scores = self.session.run(None, feed)
        return idx, scores

    @property
    def has_two_stage(self) -> bool:
        return bool(self.meta.get("two_stage"))

    def score_histories_two_stage(self, histories: list[np.ndarray], k: int,
                                  user_features: np.ndarray | None = None,
                                  n_candidates: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """As score_histories, through retrieval.onnx (→ ANN index) → ranker.onnx (rentalml.export.two_stage)."""
        if self._two_stage is None:
            from rentalml.export.two_stage import TwoStage

            self._two_stage = TwoStage(self.path, threads=self.threads)
        return self._two_stage.topk(histories, k, n_candidates, user_features)

    def cold_start(self, k: int, city: str | None = None, exclude: np.ndarray | None = None):
        idx, sc = self.fallback.get(city or "*", self.fallback["*"])
        if exclude is not None and len(exclude):
            keep = ~np.isin(idx, exclude)
            idx, sc = idx[keep], sc[keep]
        if len(idx) < k and city:
            gi, gs = self.cold_start(k, None, np.concatenate([idx, exclude if exclude is not None else idx[:0]]))
            idx, sc = np.concatenate([idx, gi]), np.concatenate([sc, gs])
        return idx[:k], sc[:k]

    def recommend(self, user_ids: list[str], k: int = 10) -> Recommendations:
        k = max(1, min(int(k), self.n_items))
        pos = self.user_positions(user_ids)
        out_idx = np.full((len(user_ids), k), -1, dtype=np.int64)
        out_sc = np.full((len(user_ids), k), -np.inf, dtype=np.float32)
        sources = ["model" if p >= 0 and len(self.user_history[p]) else "cold_start" for p in pos]
        warm = [i for i, s in enumerate(sources) if s == "model"]
        if warm:
            feats = self.user_features[pos[warm]] if self.user_feature_dim and self.user_features is not None else None
            idx, sc = self.score_histories([self.user_history[pos[i]] for i in warm], k, feats)
            out_idx[warm], out_sc[warm] = idx, sc
        for i, s in enumerate(sources):
            if s == "cold_start":
                city = self.user_city[pos[i]] if pos[i] >= 0 else None
                idx, sc = self.cold_start(k, city)
                out_idx[i, : len(idx)], out_sc[i, : len(sc)] = idx, sc
        ids = np.where(out_idx >= 0, self.property_ids[np.clip(out_idx, 0, None)], "")
        return Recommendations(ids.astype(object), out_sc, sources)

    def explain(self, user_id: str, property_id: str, attributes: dict | None = None,
                history: np.ndarray | None = None) -> str:
        """A short human explanation for recommending property_id to user_id. `attributes` (current values,
        e.g. from the online feature store) override the bundle's; `history` overrides the user's training
        history (e.g. with streamed events folded in)."""
        j = self.property_index.get_indexer([property_id])[0]
        if j < 0 and not attributes:
            return "unknown property"
        row = self.properties.iloc[j].to_dict() if j >= 0 else {}
        row.update(attributes or {})
        bits = []
        if "bedrooms" in row and pd.notna(row["bedrooms"]):
            bits.append(f"{int(row['bedrooms'])} bed")
        if "price" in row and pd.notna(row["price"]):
            bits.append(f"${float(row['price']):,.0f}/month")
        if "neighbourhood" in row and pd.notna(row["neighbourhood"]):
            bits.append(f"in {row['neighbourhood']}")
        desc = ", ".join(bits)
        hist = self.history_of(user_id) if history is None else history
        if j < 0:
            return f"new listing{': ' + desc if desc else ''}"
        if len(hist) == 0:
            return f"popular with renters{': ' + desc if desc else ''}"
        if self.item_vectors is not None:
            v = self.item_vectors
            h = v[hist[-50:]]
            sims = h @ v[j] / (np.linalg.norm(h, axis=1) * np.linalg.norm(v[j]) + 1e-9)
            nearest = self.property_ids[hist[-50:][int(np.argmax(sims))]]
            return f"similar to {nearest} you interacted with{': ' + desc if desc else ''}"
        return f"matches your recent activity{': ' + desc if desc else ''}"
