"""`rentalml optimize`: optimized variants of a bundle's scorer.onnx, each measured against fp32.

Variants: fp32 (the bundle's graph), int8-dynamic (weights int8, activations quantized at run time),
int8-static (QDQ, activation ranges calibrated on real user histories), pruned-NN (magnitude pruning of every
2-D float initializer — item embedding tables, MLP and item-item weights — to NN % zeros per tensor),
ort (ONNX Runtime format, graph optimizations applied, for the mobile/minimal runtime) and tensorrt (an
engine built through ONNX Runtime's TensorRT provider when `tensorrt` is importable; else a "skipped" row).
Per variant: file size, latency (ONNX Runtime CPU, one intra-op thread, median of `repeats` runs at batch 1
and 64), nDCG@10 on a holdout, its delta vs fp32, the mean top-10 overlap with fp32, and `deployable`:
False when the relative nDCG@10 drop vs fp32 exceeds `max_ndcg_drop` (0.01 = 1 %).
Holdout: the later interactions of a dataset (--dataset: interactions of the bundle's users not in their
bundle history), or by default each user's most recent bundle-history item (leave-last-out, in-sample:
absolute nDCG is optimistic, the deltas between variants are what the table is for).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import scipy.sparse as sp
from onnx import numpy_helper

from rentalml.export.onnx_export import quantize_int8
from rentalml.runtime.bundle import Bundle
from rentalml.runtime.history import pad_histories

K = 10


@dataclass
class Holdout:
    histories: list[np.ndarray]  # model input per user (property indices, oldest → newest)
    relevant: sp.csr_matrix  # users × n_items held-out interactions
    user_features: np.ndarray | None
    source: str


def holdout_leave_last(bundle: Bundle, max_users: int = 2000, seed: int = 0) -> Holdout:
    users = [u for u, h in enumerate(bundle.user_history) if len(h) >= 2]
    rng = np.random.default_rng(seed)
    users = np.sort(rng.choice(users, min(max_users, len(users)), replace=False)) if users else np.zeros(0, int)
    if not len(users):
        raise ValueError("the bundle has no user with ≥ 2 history items to hold out")
    hist = [bundle.user_history[u][:-1] for u in users]
    last = np.array([bundle.user_history[u][-1] for u in users])
    rel = sp.csr_matrix((np.ones(len(users), np.float32), (np.arange(len(users)), last)),
                        shape=(len(users), bundle.n_items))
    return Holdout(hist, rel, _feats(bundle, users), "leave-last-out of the bundle histories (in-sample)")


def holdout_from_dataset(bundle: Bundle, interactions: pd.DataFrame, max_users: int = 2000,
                         seed: int = 0) -> Holdout:
    """Relevant = interactions of the bundle's users with catalogued properties that are not in their history."""
    u = bundle.user_index.get_indexer(interactions["user_id"].astype(str))
    j = bundle.property_index.get_indexer(interactions["property_id"].astype(str))
    keep = (u >= 0) & (j >= 0)
    pairs = pd.DataFrame({"u": u[keep], "j": j[keep]}).drop_duplicates()
    seen = {(a, b) for a, h in enumerate(bundle.user_history) for b in h}
    pairs = pairs[[(a, b) not in seen for a, b in zip(pairs["u"], pairs["j"], strict=True)]]
    users = np.sort(pairs["u"].unique())
    if not len(users):
        raise ValueError("dataset: no interaction of a bundle user with a catalogued property outside their "
                         "bundle history (nothing to hold out)")
    users = np.sort(np.random.default_rng(seed).choice(users, min(max_users, len(users)), replace=False))
    pairs = pairs[pairs["u"].isin(users)]
    row = pd.Index(users).get_indexer(pairs["u"])
    rel = sp.csr_matrix((np.ones(len(pairs), np.float32), (row, pairs["j"])), shape=(len(users), bundle.n_items))
    return Holdout([bundle.user_history[x] for x in users], rel, _feats(bundle, users),
                   "dataset interactions outside the bundle histories")


def _feats(bundle: Bundle, users: np.ndarray) -> np.ndarray | None:
    if not bundle.user_feature_dim:
        return None
    if bundle.user_features is None:
        return np.zeros((len(users), bundle.user_feature_dim), np.float32)
    return bundle.user_features[users].astype(np.float32)


# --------------------------------------------------------------------------------------------- variants
def prune_magnitude(src: str | Path, dst: str | Path, sparsity: float, min_size: int = 256) -> Path:
    """Zero the smallest-|w| fraction `sparsity` of every 2-D float initializer with ≥ min_size elements."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    m = onnx.load(str(src))
    for i, init in enumerate(m.graph.initializer):
        if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) != 2 or np.prod(init.dims) < min_size:
            continue
        w = numpy_helper.to_array(init).copy()
        n_zero = int(sparsity * w.size)
        if n_zero:
            cut = np.partition(np.abs(w).ravel(), n_zero - 1)[n_zero - 1]
            w[np.abs(w) <= cut] = 0.0
        m.graph.initializer[i].CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(m, str(dst))
    return Path(dst)


def quantize_int8_static(src: str | Path, dst: str | Path, feeds: list[dict]) -> Path:
    """Static int8 (QDQ) of the MatMul/Gemm ops; activation ranges from `feeds` (real user histories)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    reader = Reader()
    quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"],
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=False)
    return Path(dst)


def to_ort_format(src: str | Path, dst: str | Path) -> Path:
    """ONNX Runtime (flatbuffer) format with basic graph optimizations, loadable by the mobile/minimal build."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return Path(dst)


def tensorrt_engine(src: str | Path, out_dir: Path) -> tuple[Path | None, str]:
    """(engine cache dir, note): builds an fp16 engine via ONNX Runtime's TensorRT provider when possible."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return None, "skipped: tensorrt not installed"
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return None, "skipped: onnxruntime has no TensorrtExecutionProvider"
    cache = out_dir / "tensorrt"
    cache.mkdir(exist_ok=True)
    return cache, "built"


def _session(path: Path, providers=None, options: dict | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=[(p, options or {}) for p in providers]
                                if providers else ["CPUExecutionProvider"])


def _feed(bundle: Bundle, histories, feats, k: int) -> dict:
    feed = {"history": pad_histories(histories, bundle.n_items, bundle.history_len), "k": np.array([k], np.int64)}
    if bundle.user_feature_dim:
        feed["user_features"] = feats
    return feed


def _topk(sess, bundle: Bundle, hold: Holdout, k: int = K, batch: int = 256) -> np.ndarray:
    out = []
    for s in range(0, len(hold.histories), batch):
        f = hold.user_features[s:s + batch] if hold.user_features is not None else None
        out.append(sess.run(["indices"], _feed(bundle, hold.histories[s:s + batch], f, k))[0])
    return np.vstack(out)


def _latency_ms(sess, feed: dict, repeats: int) -> float:
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@dataclass
class VariantRow:
    variant: str
    file: str | None
    size_mb: float | None
    gzip_mb: float | None  # what zeros buy: pruned weights compress (the file stays dense)
    latency_ms_b1: float | None
    latency_ms_b64: float | None
    ndcg_at_10: float | None
    ndcg_delta: float | None  # absolute, vs fp32
    ndcg_rel_drop: float | None  # (fp32 − variant) / fp32
    top10_overlap: float | None  # mean |top-10 ∩ fp32 top-10| / 10
    deployable: bool
    note: str = ""


def optimize_bundle(bundle_dir: str | Path, out_dir: str | Path, *, max_ndcg_drop: float = 0.01,
                    holdout: Holdout | None = None, prune_sparsities: tuple[float, ...] = (0.5,),
                    repeats: int = 30, calib_users: int = 256, tensorrt: bool = True) -> dict:
    """Write the variants, optimize.json and optimize.md into out_dir; return the report."""
    if max_ndcg_drop < 0:
        raise ValueError(f"max_ndcg_drop must be ≥ 0, got {max_ndcg_drop}")
    bundle = Bundle(bundle_dir)
    src = bundle.path / bundle.meta["graph"].get("file", "scorer.onnx")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hold = holdout or holdout_leave_last(bundle)
    calib_hist = [h for h in bundle.user_history if len(h)][:calib_users]
    calib_feats = _feats(bundle, np.flatnonzero([len(h) > 0 for h in bundle.user_history])[:calib_users])
    calib = [_feed(bundle, calib_hist[s:s + 16], None if calib_feats is None else calib_feats[s:s + 16], K)
             for s in range(0, len(calib_hist), 16)]

    files: dict[str, tuple[Path | None, str]] = {}
    fp32 = out / "scorer.fp32.onnx"
    shutil.copyfile(src, fp32)
    files["fp32"] = (fp32, "")
    files["int8-dynamic"] = (quantize_int8(fp32, out / "scorer.int8-dynamic.onnx"), "")
    files["int8-static"] = (quantize_int8_static(fp32, out / "scorer.int8-static.onnx", calib),
                            f"QDQ, calibrated on {len(calib_hist)} user histories")
    for sp_ in prune_sparsities:
        name = f"pruned-{round(sp_ * 100)}"
        files[name] = (prune_magnitude(fp32, out / f"scorer.{name}.onnx", sp_),
                       f"{sp_:.0%} of every 2-D weight zeroed (dense storage)")
    files["ort"] = (to_ort_format(fp32, out / "scorer.ort"), "ORT format, basic optimizations")
    trt_dir, trt_note = tensorrt_engine(fp32, out) if tensorrt else (None, "skipped: disabled")

    n_b = min(64, len(hold.histories))
    idx64 = np.resize(np.arange(len(hold.histories)), 64)
    f64 = hold.user_features[idx64] if hold.user_features is not None else None
    feed64 = _feed(bundle, [hold.histories[i] for i in idx64], f64, K)
    feed1 = _feed(bundle, hold.histories[:1], None if hold.user_features is None else hold.user_features[:1], K)
    rows: list[VariantRow] = []
    ref_top = None
    ref_ndcg = None
    from rentalml.evaluation.metrics import ranking_metrics

    has = np.diff(hold.relevant.indptr) > 0
    for name, (path, note) in files.items():
        sess = _session(path)
        top = _topk(sess, bundle, hold)
        ndcg = float(ranking_metrics(top[has], hold.relevant[has], K)["ndcg"].mean())
        if ref_top is None:
            ref_top, ref_ndcg = top, ndcg
        rows.append(_row(name, path, sess, feed1, feed64, repeats, top, ndcg, ref_top, ref_ndcg, max_ndcg_drop, note))
    if trt_dir is not None:
        opts = {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(trt_dir)}
        sess = _session(fp32, ["TensorrtExecutionProvider", "CUDAExecutionProvider"], opts)
        top = _topk(sess, bundle, hold)
        ndcg = float(ranking_metrics(top[has], hold.relevant[has], K)["ndcg"].mean())
        rows.append(_row("tensorrt", trt_dir, sess, feed1, feed64, repeats, top, ndcg, ref_top, ref_ndcg,
                         max_ndcg_drop, "fp16 engine via ONNX Runtime TensorRT EP"))
    else:
        rows.append(VariantRow("tensorrt", None, None, None, None, None, None, None, None, None, False, trt_note))
    report = {
        "bundle": str(bundle.path), "model_type": bundle.model_type, "n_items": bundle.n_items,
        "holdout": {"source": hold.source, "users": int(has.sum())}, "k": K, "max_ndcg_drop": max_ndcg_drop,
        "latency": {"runtime": "onnxruntime CPUExecutionProvider, 1 intra-op thread", "repeats": repeats,
                    "batch_sizes": [1, 64], "distinct_users_in_batch64": n_b},
        "variants": [asdict(r) for r in rows],
    }
    (out / "optimize.json").write_text(json.dumps(report, indent=2))
    (out / "optimize.md").write_text(markdown_table(report))
    return report


def _gzip_bytes(path: Path) -> int:
    import gzip

    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return sum(len(gzip.compress(p.read_bytes(), compresslevel=6)) for p in files)


def _row(name, path: Path, sess, feed1, feed64, repeats, top, ndcg, ref_top, ref_ndcg, max_drop, note) -> VariantRow:
    size = (sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir()
            else path.stat().st_size) / 1e6
    overlap = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(top, ref_top, strict=True)]))
    rel = (ref_ndcg - ndcg) / ref_ndcg if ref_ndcg > 0 else 0.0
    return VariantRow(name, path.name, round(size, 3), round(_gzip_bytes(path) / 1e6, 3),
                      round(_latency_ms(sess, feed1, repeats), 3), round(_latency_ms(sess, feed64, repeats), 3),
                      round(ndcg, 5), round(ndcg - ref_ndcg, 5), round(rel, 5), round(overlap, 4),
                      bool(rel <= max_drop), note)


def markdown_table(report: dict) -> str:
    lines = ["| variant | size MB | gzip MB | latency ms (b=1) | latency ms (b=64) | nDCG@10 | Δ vs fp32 "
             "| top-10 overlap | deployable | note |", "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    for r in report["variants"]:
        rel = None if r["ndcg_rel_drop"] is None else 0.0 - 100 * r["ndcg_rel_drop"]
        delta = "" if r["ndcg_delta"] is None else f"{r['ndcg_delta']:+.4f} ({rel:+.1f} %)"
        lines.append(f"| {r['variant']} | {f(r['size_mb'], '.2f')} | {f(r['gzip_mb'], '.2f')} | "
                     f"{f(r['latency_ms_b1'], '.3f')} | {f(r['latency_ms_b64'], '.3f')} | "
                     f"{f(r['ndcg_at_10'], '.4f')} | {delta} | "
                     f"{f(r['top10_overlap'], '.3f')} | {'yes' if r['deployable'] else 'no'} | {r['note']} |")
    return "\n".join(lines) + "\n"
