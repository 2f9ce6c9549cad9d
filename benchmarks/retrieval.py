"""Every retrieval backend (rentalml.runtime.retrieval) in one run: brute force, faiss IVF-Flat and faiss HNSW
(and, in the recorded run, the numpy IVF, removed after it: benchmarks/results/retrieval.json keeps its rows;
`git checkout e51a34e` has it), at 100k and 1M candidates.

Candidates: 64-d item vectors plus a bias (the two-tower score <u, v> + b is the inner product of
q = [u, 1] with x = [v, b], so the index holds 65-d vectors), shaped like trained item towers rather than
isotropic noise: items sit around n/100 "neighbourhood" centres whose sizes follow a Zipf law (a few big
segments, a long tail), item norms vary (popular items have larger vectors) and the bias is correlated with
the norm. Queries (users) are drawn around the same centres, weighted by segment size.

Per backend and setting: recall@200 (the ranker's candidate count) against the exact top-200, recall@10,
ms per query batched (all queries, batches of 64) and single (one query per call), build seconds, index
bytes and the RSS growth of the build. Everything runs on one thread (OMP_NUM_THREADS=1, faiss
omp_set_num_threads(1)) so the ratios hold on a shared machine; the load average is recorded.
Writes benchmarks/results/retrieval.json.

    python benchmarks/retrieval.py [--sizes 100000 1000000] [--queries 1000] [--single 200]
    python benchmarks/retrieval.py --table    # the markdown table of docs/benchmarks.md from the JSON
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from rentalml.runtime.retrieval import DEFAULT_BACKEND, backend, make, recall_at_n  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
N = 200


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def tower_like(n: int, n_queries: int, dim: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(candidates [n, dim + 1] = [v, b], queries [n_queries, dim + 1] = [u, 1])."""
    rng = np.random.default_rng(seed)
    n_centres = max(10, n // 100)
    centres = (rng.normal(size=(n_centres, dim)) * 3 / np.sqrt(dim)).astype(np.float32)
    weight = 1.0 / np.arange(1, n_centres + 1) ** 0.8
    weight /= weight.sum()
    seg = rng.choice(n_centres, n, p=weight)
    pop = rng.lognormal(0.0, 0.5, n).astype(np.float32)  # popularity: larger vectors, higher bias
    v = (centres[seg] + rng.normal(size=(n, dim)).astype(np.float32) / np.sqrt(dim)) * np.sqrt(pop)[:, None]
    b = 0.3 * np.log(pop) + 0.2 * rng.normal(size=n).astype(np.float32)
    useg = rng.choice(n_centres, n_queries, p=weight)
    u = centres[useg] + rng.normal(size=(n_queries, dim)).astype(np.float32) / np.sqrt(dim)
    x = np.hstack([v, b[:, None]]).astype(np.float32)
    q = np.hstack([u, np.ones((n_queries, 1), np.float32)]).astype(np.float32)
    return x, q


def timed_queries(index, q: np.ndarray, n_single: int, search: dict | None) -> dict:
    t0 = time.perf_counter()
    out = np.vstack([index.query(q[s:s + 64], N, search)[1] for s in range(0, len(q), 64)])
    batched = (time.perf_counter() - t0) * 1e3 / len(q)
    lat = []
    for i in range(min(n_single, len(q))):
        t0 = time.perf_counter()
        index.query(q[i:i + 1], N, search)
        lat.append((time.perf_counter() - t0) * 1e3)
    return {"ids": out, "ms_per_query_batched": round(batched, 4),
            "ms_per_query_single_mean": round(float(np.mean(lat)), 4),
            "ms_per_query_single_p50": round(float(np.median(lat)), 4)}


def settings(name: str, index) -> list[dict]:
    if name == "brute":
        return [{}]
    if name in ("ivf_numpy", "faiss_ivf"):
        lists = index.n_lists
        probes = sorted({max(1, round(lists * f)) for f in (1 / 128, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4)}
                        | {index.search_params["nprobe"]})
        return [{"nprobe": p} for p in probes]
    if name == "faiss_hnsw":
        return [{"ef_search": e} for e in sorted({200, 300, 400, 600, 1000, 2000, index.search_params["ef_search"]})]
    raise ValueError(name)


def ms_at_recall(rows: list[dict], target: float, key: str = "ms_per_query_batched") -> float | None:
    """ms per query at recall@200 = target, interpolated linearly between the two settings around it."""
    pts = sorted((r[f"recall_at_{N}"], r[key]) for r in rows)
    for (r0, t0), (r1, t1) in zip(pts, pts[1:], strict=False):
        if r0 <= target <= r1:
            return round(t0 + (t1 - t0) * (target - r0) / (r1 - r0) if r1 > r0 else min(t0, t1), 4)
    return round(pts[0][1], 4) if pts and pts[0][0] >= target else None


def run_size(n: int, n_queries: int, n_single: int, backends: list[str]) -> dict:
    x, q = tower_like(n, n_queries)
    doc: dict = {"candidates": n, "dim": int(x.shape[1]), "queries": len(q), "N": N,
                 "load_average_start": load_average(), "backends": {}}
    exact = None
    for name in backends:
        gc.collect()
        r0 = rss()
        t0 = time.perf_counter()
        index = make(name).index(x)
        build_s = time.perf_counter() - t0
        gc.collect()
        entry = {"build_seconds": round(build_s, 2), "index_bytes": index.nbytes,
                 "rss_growth_bytes": rss() - r0, "build_params": index.build_params,
                 "default_search": dict(index.search_params), "rows": []}
        for s in settings(name, index):
            t = timed_queries(index, q, n_single, s)
            ids = t.pop("ids")
            if name == "brute":
                exact = ids
            row = {**s, f"recall_at_{N}": round(recall_at_n(ids, exact), 4),
                   "recall_at_10": round(recall_at_n(ids[:, :10], exact[:, :10]), 4), **t,
                   "default": s == {k: index.search_params[k] for k in s}}
            if "nprobe" in s:
                row["fraction_scanned"] = round(s["nprobe"] / index.n_lists, 4)
            entry["rows"].append(row)
            print(json.dumps({"n": n, "backend": name, **row}), flush=True)
        for target in (0.9, 0.95, 0.99):
            entry[f"ms_batched_at_recall_{target}"] = ms_at_recall(entry["rows"], target)
            entry[f"ms_single_at_recall_{target}"] = ms_at_recall(entry["rows"], target, "ms_per_query_single_mean")
        doc["backends"][name] = entry
        del index
    doc["load_average_end"] = load_average()
    f, m = doc["backends"].get("faiss_ivf"), doc["backends"].get("ivf_numpy")
    if f and m:
        doc["numpy_vs_faiss_ivf_at_recall_0.95"] = {
            k: round(m[k] / f[k], 2) if m[k] and f[k] else None
            for k in ("ms_batched_at_recall_0.95", "ms_single_at_recall_0.95")}
    return doc


def summary(doc: dict) -> str:
    """One markdown row per size and backend: its default setting, and ms per query at recall@200 = 0.95."""
    out = ["| size | backend | default setting | recall@200 there | ms / query there (batched / single) "
           "| ms / query at recall 0.95 (batched / single) | build s | index MB |",
           "|---|---|---|---:|---:|---:|---:|---:|"]

    def ms(v):
        return "not reached" if v is None else f"{v:.2f}"

    for n, d in doc["sizes"].items():
        for name, e in d["backends"].items():
            r = next(r for r in e["rows"] if r.get("default"))
            knob = ", ".join(f"{k} {r[k]}" for k in ("nprobe", "ef_search") if k in r) or "exact"
            out.append(f"| {int(n):,} | {name} | {knob} | {r[f'recall_at_{N}']:.4f} | "
                       f"{r['ms_per_query_batched']:.2f} / {r['ms_per_query_single_mean']:.2f} | "
                       f"{ms(e['ms_batched_at_recall_0.95'])} / {ms(e['ms_single_at_recall_0.95'])} | "
                       f"{e['build_seconds']:.1f} | {e['index_bytes'] / 2**20:.0f} |")
    return "\n".join(out)


def table(doc: dict) -> str:
    """One markdown row per backend, setting and size."""
    out = ["| size | backend | setting | recall@200 | recall@10 | ms / query, batched | ms / query, single "
           "| build s | index MB | RSS growth MB |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n, d in doc["sizes"].items():
        for name, e in d["backends"].items():
            for i, r in enumerate(e["rows"]):
                knob = ", ".join(f"{k} {r[k]}" for k in ("nprobe", "ef_search") if k in r) or "exact"
                if r.get("default"):
                    knob = f"**{knob} (default)**"
                first = i == 0
                out.append(f"| {int(n):,} | {name} | {knob} | {r[f'recall_at_{N}']:.4f} | {r['recall_at_10']:.4f} "
                           f"| {r['ms_per_query_batched']:.3f} | {r['ms_per_query_single_mean']:.3f} | "
                           + (f"{e['build_seconds']:.1f} | {e['index_bytes'] / 2**20:.0f} | "
                              f"{e['rss_growth_bytes'] / 2**20:.0f} |" if first else " | | |"))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", action="store_true", help="print the table of the last run's JSON and exit")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--single", type=int, default=200, help="queries timed one per call")
    ap.add_argument("--backends", nargs="+", default=["brute", "faiss_ivf", "faiss_hnsw"])
    ap.add_argument("--out", type=Path, default=RESULTS / "retrieval.json")
    args = ap.parse_args()
    if args.table:
        doc = json.loads(args.out.read_text())
        print(summary(doc) + "\n\n" + table(doc))
        return
    import faiss

    faiss.omp_set_num_threads(1)
    for name in args.backends:
        backend(name)
    assert args.backends[0] == "brute", "brute force first: it is the ground truth"
    doc = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs shared with other jobs; one thread "
                      f"(OMP_NUM_THREADS=1, faiss omp 1)", "faiss": faiss.__version__, "numpy": np.__version__,
           "default_backend": DEFAULT_BACKEND, "sizes": {}}
    t0 = time.perf_counter()
    for n in args.sizes:
        doc["sizes"][str(n)] = run_size(n, args.queries, args.single, args.backends)
    doc["wall_seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(summary(doc) + "\n\n" + table(doc))
    print(json.dumps({n: {b: {k: v for k, v in e.items() if k.startswith("ms_") or k == "build_seconds"}
                          for b, e in d["backends"].items()} for n, d in doc["sizes"].items()}, indent=1))


if __name__ == "__main__":
    main()
