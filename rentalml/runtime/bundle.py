"""The bundle reader: what serving, the demo, the benchmarks and the tests load (rentalml.export.bundle writes it).

The layout of a bundle directory (contracts.md) is documented once, where it is written: rentalml.export.bundle.

`Bundle` only reads and answers lookups (ids, histories, the cold-start lists, one scorer call); producing a
recommendation is rentalml.runtime.pipeline's job.

Integrity: the writer records a sha256 of every file in checksums.json (`bundle_checksums`), and of bundle.json's
content less the keys the registry stamps later (`REGISTRY_KEYS`). `Bundle` checks them before it reads anything
(`verify_bundle`): a truncated or swapped file, or an edited bundle.json, raises BundleIntegrityError (a
ValueError) naming the file and both digests, and is logged as an error; a server keeps the version it serves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from rentalml.runtime.history import pad_histories, trim_padding

FORMAT_VERSION = 1
HISTORY_LEN = 256
FALLBACK_PER_CITY = 200
#: the integrity manifest beside bundle.json (written last by rentalml.export.bundle.write_bundle)
CHECKSUMS = "checksums.json"
#: bundle.json keys stamped after training (rentalml.registry.mlflow_registry.fetch_bundle): not in its digest
REGISTRY_KEYS = ("model_version", "registry")
#: the hybrid's learned re-ranker (rentalml.models.rerank), when it has one: weights and item context
RERANKER = "reranker.json"
PAIR_CONTEXT = "pair_context.npz"

log = logging.getLogger(__name__)


def onnx_session(path: str | Path, threads: int = 1):
    """An ONNX Runtime CPU session of one of the bundle's graphs, as every runtime path opens them (the scorer, the
    two stages, the fold-in graph). ORT's CPU memory arena is off: it grows to the largest batch the session has
    run and never gives that back, so a storm's batches of misses left +23 MB in one scorer session for good
    (in-process, the soak's bundle, batches of up to 64 users: 231 -> 254 MB with the arena, 233 -> 234 without;
    the soak's RSS step after its storm). The calls cost the same without it: 0.48 / 0.68 / 7.33 ms at 1 / 4 / 64
    users against 0.53 / 0.70 / 6.92 ms with it, alternated in one process (2026-12-03, docs/benchmarks.md
    "Soak")."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class BundleIntegrityError(ValueError):
    """A bundle's files or bundle.json differ from its checksums.json (truncated, swapped or edited)."""


def read_meta(bundle_dir: str | Path) -> dict:
    """The bundle's bundle.json (lineage: data_snapshot, code_version, feature_views, metrics...)."""
    return json.loads((Path(bundle_dir) / "bundle.json").read_text())


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def meta_sha256(meta: dict) -> str:
    """sha256 of bundle.json's content (canonical JSON) without REGISTRY_KEYS."""
    body = {k: v for k, v in meta.items() if k not in REGISTRY_KEYS}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                     default=str).encode()).hexdigest()


def bundle_checksums(bundle_dir: str | Path) -> dict:
    """The manifest of a written bundle: sha256 and size of every file but bundle.json and checksums.json, and
    the digest of bundle.json's content (`meta_sha256`)."""
    root = Path(bundle_dir)
    files = {p.relative_to(root).as_posix(): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
             for p in sorted(root.rglob("*")) if p.is_file() and p.name not in (CHECKSUMS, "bundle.json")}
    return {"algorithm": "sha256", "files": files,
            "bundle.json": {"sha256": meta_sha256(read_meta(root)), "excludes": list(REGISTRY_KEYS)}}


def verify_bundle(bundle_dir: str | Path, meta: dict | None = None) -> bool:
    """Check a bundle against its checksums.json. True when verified, False when the bundle has no manifest (one
    written before manifests existed: logged as a warning, served). Raises BundleIntegrityError naming every file
    that differs, with the expected and actual sha256 (each also logged as an error)."""
    root = Path(bundle_dir)
    manifest_path = root / CHECKSUMS
    if not manifest_path.is_file():
        log.warning("bundle %s has no %s: its files cannot be verified (written before checksums existed)",
                    root, CHECKSUMS)
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
        files, meta_entry = manifest["files"], manifest["bundle.json"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleIntegrityError(f"bundle {root}: {CHECKSUMS} is unreadable ({exc})") from None
    problems = []
    for name, want in files.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{name}: missing (expected sha256 {want['sha256']}, {want['bytes']} bytes)")
            continue
        got = file_sha256(path)
        size = path.stat().st_size
        if got != want["sha256"] or size != want["bytes"]:
            problems.append(f"{name}: sha256 mismatch: expected {want['sha256']} ({want['bytes']} bytes), "
                            f"actual {got} ({size} bytes)")
    try:
        got = meta_sha256(read_meta(root) if meta is None else meta)
    except ValueError as exc:
        got = f"unreadable ({exc})"
    if got != meta_entry["sha256"]:
        problems.append(f"bundle.json: content sha256 mismatch (keys {', '.join(REGISTRY_KEYS)} excluded): "
                        f"expected {meta_entry['sha256']}, actual {got}")
    if problems:
        for p in problems:
            log.error("bundle %s refused: %s", root, p)
        raise BundleIntegrityError(f"bundle {root} is corrupt or mismatched: " + "; ".join(problems))
    return True


class Bundle:
    """A loaded bundle: ONNX Runtime session + id maps + cold-start fallback. Picklable (for --workers)."""

    def __init__(self, path: str | Path, int8: bool = False, threads: int = 1, verify: bool = True):
        """`verify`: check the files against checksums.json first (BundleIntegrityError when they differ)."""
        self.path = Path(path)
        self.int8 = int8
        self.threads = threads
        t0 = time.perf_counter()
        try:
            self.meta = read_meta(self.path)
        except ValueError as exc:  # JSONDecodeError: a truncated or hand-broken bundle.json
            log.error("bundle %s refused: bundle.json is not JSON (%s)", self.path, exc)
            raise BundleIntegrityError(f"bundle {self.path}: bundle.json is not JSON ({exc})") from None
        self.verified = verify_bundle(self.path, self.meta) if verify else False
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
        self.reranker = self.pair_context = None
        self.rerank_candidates = 0
        self.user_history_times: list[np.ndarray] | None = None
        if self.meta.get("rerank"):
            from rentalml.models.rerank import PairContext, PairRanker

            rr = self.meta["rerank"]
            self.reranker = PairRanker.from_dict(json.loads((self.path / rr["ranker"]).read_text()))
            self.pair_context = PairContext.from_npz(self.path / rr["context"])
            self.rerank_candidates = int(rr["candidates"])
            self.user_history_times = [np.asarray(t, dtype=np.float64) for t in users["history_times"]]
        self._session = None
        self.load_seconds = time.perf_counter() - t0

    # sessions are not picklable: build lazily per process
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_session"] = None
        return state

    @property
    def session(self):
        if self._session is None:
            name = "scorer.int8.onnx" if self.int8 and (self.path / "scorer.int8.onnx").exists() else "scorer.onnx"
            self._session = onnx_session(self.path / name, self.threads)
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

    def history_times(self, user_id: str, history: np.ndarray, now: float) -> np.ndarray:
        """The time (years) of each pair of `history` (a user's merged history): a training pair's from the
        bundle (re-ranker bundles), `now` for the rest (streamed events)."""
        pos = self._user_pos.get(user_id, -1)
        if pos < 0 or self.user_history_times is None:
            return np.full(len(history), now)
        own, when = self.user_history[pos], self.user_history_times[pos]
        if len(history) <= len(own) and np.array_equal(history, own[len(own) - len(history):]):
            return when[len(own) - len(history):]  # the training history itself (no streamed events): no lookup
        at = dict(zip(own.tolist(), when.tolist(), strict=True))
        return np.array([at.get(int(h), now) for h in history], dtype=np.float64)

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

    def cold_start(self, k: int, city: str | None = None, exclude: np.ndarray | None = None):
        idx, sc = self.fallback.get(city or "*", self.fallback["*"])
        if exclude is not None and len(exclude):
            keep = ~np.isin(idx, exclude)
            idx, sc = idx[keep], sc[keep]
        if len(idx) < k and city:
            gi, gs = self.cold_start(k, None, np.concatenate([idx, exclude if exclude is not None else idx[:0]]))
            idx, sc = np.concatenate([idx, gi]), np.concatenate([sc, gs])
        return idx[:k], sc[:k]

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
