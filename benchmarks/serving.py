"""Serving latency and throughput over loopback, one run, one machine (client and server share the CPUs).

Catalogue: ~10k properties (synthetic marketplace: 5k users / 10k properties / 100k events, quick hybrid fit).
Measures, for top-k (k=10) recommendations of one known user per request:
  floor       the serving engine in process (rentalml.runtime.Engine: ONNX Runtime + id maps + rules), no server;
              for a bundle with a learned re-ranker also without it ("no re-ranker": its cost, same run)
  v2 REST     `rentalml serve`, tritonclient.http (binary tensors)
  v2 gRPC     `rentalml serve`, tritonclient.grpc
  /predict    `rentalml serve`, friendly JSON API via httpx
p50/p95/p99 latency at concurrency 1 (--requests sequential requests after a warm-up), and requests/s with
--concurrency client threads (each with its own client) bounded by --load-requests and --load-seconds; the load
generator is `rentalml loadtest`'s (rentalml.inference.loadtest).
First with the server's recommendation cache switched off (RENTALML_SERVE__CACHE_SIZE=0) so every request runs
the model, once per --precisions entry (serve.precision: fp32 = scorer.onnx, int8 = scorer.int8.onnx; the run
also records how far int8's lists are from fp32's); then ("cache hit" rows) a server with the default in-process
cache and requests drawn from --hit-users warmed users, i.e. what a repeat visitor costs. Impression logging is
on (file sink, RENTALML_SERVE__LOG_IMPRESSIONS=always, as during an A/B test) throughout.
Writes benchmarks/results/serving.json and prints a markdown table.

    python benchmarks/serving.py [--requests 500] [--concurrency 8] [--load-requests 2000] [--load-seconds 30] \
        [--workers 1] [--hit-users 200] [--precisions fp32,int8] [--rerank auto|on|off]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

MODEL = "rental-recommender"


RERANK = {"auto": None, "on": True, "off": False}  # --rerank → the hybrid's `rerank` parameter


def build_bundle(out: Path, users: int, properties: int, events: int, epochs: int,
                 rerank: str = "auto") -> tuple[Path, dict]:
    from rentalml.data.generator import generate_marketplace
    from rentalml.export.bundle import write_bundle
    from rentalml.training.trainer import fit_model

    t0 = time.perf_counter()
    ds = generate_marketplace(n_users=users, n_properties=properties, n_events=events, seed=42)
    fitted = fit_model("hybrid", ds, params={"epochs": epochs, "neighbours": 32, "rerank": RERANK[rerank]})
    path = write_bundle(fitted, ds, out, model_version="bench")
    info = {"users": users, "properties": properties, "events": events, "epochs": epochs, "rerank": rerank,
            "catalogue": int(len(fitted.item_ids)), "build_seconds": round(time.perf_counter() - t0, 1)}
    return path, info


# one load generator for `rentalml loadtest` and this benchmark
from rentalml.inference.loadtest import concurrent, friendly, grpc_v2, http_v2, sequential  # noqa: E402

from rentalml.services import free_port, wait_until  # noqa: E402


def in_process(engine, k: int):
    """The serving engine in process (rentalml.runtime.Engine: what `rentalml serve` runs on a cache miss)."""
    def call(user: str):
        r = engine.recommend([user], k)
        assert r.property_ids.shape == (1, k)

    return call


def int8_agreement(bundle_path: Path, users: list[str], k: int) -> dict:
    """How far the int8 scorer's lists are from fp32's on this bundle (top-k overlap per user)."""
    from rentalml.runtime import Bundle, Filters, Pipeline

    rules = Filters(available_only=False)  # the scorers' lists as they are
    a = Pipeline(Bundle(bundle_path)).run(users, k, rules).property_ids
    b = Pipeline(Bundle(bundle_path, int8=True)).run(users, k, rules).property_ids
    overlap = [len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)]
    return {"users": len(users), f"top{k}_overlap_mean": round(float(np.mean(overlap)), 4),
            f"top{k}_identical_share": round(float(np.mean([o == 1.0 for o in overlap])), 4)}


# ---- server --------------------------------------------------------------------------------------------
def start_server(bundle: Path, log: Path, workers: int, cache: bool = False,
                 precision: str = "fp32") -> tuple[subprocess.Popen, int, int]:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "KSERVE_LOGLEVEL": "WARNING", "RENTALML_HOME": str(log.parent / "home"),
           "RENTALML_SERVE__LOG_IMPRESSIONS": "always",  # the cost of A/B logging is part of the figure
           "RENTALML_SERVE__PRECISION": precision}
    if not cache:
        env["RENTALML_SERVE__CACHE_SIZE"] = "0"
    cmd = [sys.executable, "-c", "from rentalml.cli import app; app()", "serve", "--bundle", str(bundle),
           "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--workers", str(workers)]
    fh = open(log, "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    h = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
    g = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    def ready() -> bool:
        try:
            return h.is_model_ready(MODEL) and g.is_server_ready()
        except Exception:  # tritonclient raises its own errors while the server starts
            return False

    try:
        wait_until(ready, 120, interval=0.2, proc=proc, what="the server's model and gRPC readiness")
    except (TimeoutError, RuntimeError) as exc:
        proc.kill()
        raise SystemExit(f"{exc}:\n{log.read_text()[-3000:]}") from None
    return proc, http_port, grpc_port


def stop_server(proc: subprocess.Popen) -> int | None:
    from rentalml.services import stop_process

    return stop_process(proc, timeout=30)


def versions() -> dict:
    from importlib.metadata import version

    out = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
           "cpus": os.cpu_count()}
    for pkg in ("kserve", "onnxruntime", "tritonclient", "fastapi", "uvicorn", "grpcio"):
        try:
            out[pkg] = version(pkg)
        except Exception:
            pass
    try:
        out["loadavg_1m_at_start"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=5_000)
    ap.add_argument("--properties", type=int, default=10_000)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--requests", type=int, default=500, help="sequential requests per mode (concurrency 1)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--load-requests", type=int, default=2000, help="request budget per mode under load")
    ap.add_argument("--load-seconds", type=float, default=30.0, help="time budget per mode under load")
    ap.add_argument("--workers", type=int, default=1, help="`rentalml serve --workers`")
    ap.add_argument("--hit-users", type=int, default=200, help="warmed users of the cache-hit rows (0: skip them)")
    ap.add_argument("--precisions", default="fp32,int8",
                    help="serve.precision of the cache-miss rows, comma-separated (fp32: scorer.onnx, int8: "
                         "scorer.int8.onnx)")
    ap.add_argument("--bundle", type=Path, help="reuse an existing bundle instead of training one")
    ap.add_argument("--rerank", choices=list(RERANK), default="auto",
                    help="the hybrid's learned re-ranker: chosen on validation (auto), forced on, or off")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serving.json")
    a = ap.parse_args()

    from rentalml.runtime import Bundle, Engine

    tmp = Path(tempfile.mkdtemp(prefix="rentalml-bench-"))
    if a.bundle:
        bundle_path, data = a.bundle, {"bundle": str(a.bundle)}
    else:
        print("building bundle ...", flush=True)
        bundle_path, data = build_bundle(tmp / "bundle", a.users, a.properties, a.events, a.epochs, a.rerank)
    users_df = pd.read_parquet(bundle_path / "users.parquet")
    known = users_df[users_df["history"].map(len) > 0]["user_id"].astype(str).to_numpy()
    rng = np.random.default_rng(7)
    users = rng.choice(known, size=max(a.requests + 100, a.load_requests + 100)).tolist()
    precisions = [p.strip() for p in a.precisions.split(",") if p.strip()]
    bundle = Bundle(bundle_path)
    data["catalogue"] = int(bundle.n_items)
    data["reranker"] = bundle.reranker is not None
    results = {"config": {"k": a.k, "requests": a.requests, "concurrency": a.concurrency,
                          "load_requests": a.load_requests, "load_seconds": a.load_seconds, "workers": a.workers,
                          "server_cache": "off, then on for the cache-hit rows", "hit_users": a.hit_users,
                          "precisions": precisions,
                          "outcomes_sink": "file", "log_impressions": "always", "kserve_loglevel": "WARNING",
                          "client": "same host, loopback"},
               "data": data, "env": versions(), "modes": {}}

    def record(name, seq, load):
        results["modes"][name] = {"c1": seq, f"c{a.concurrency}": load}
        print(f"{name:10s} c1 {seq}  c{a.concurrency} {load}", flush=True)

    if "int8" in precisions:
        results["int8_vs_fp32"] = int8_agreement(bundle_path, list(dict.fromkeys(users))[:2000], a.k)
        print(f"int8 vs fp32: {results['int8_vs_fp32']}", flush=True)
    for precision in precisions:
        print(f"in-process floor [{precision}] ...", flush=True)
        engine = Engine(Bundle(bundle_path, int8=precision == "int8"))
        record(f"floor [{precision}]", sequential(in_process(engine, a.k), users, a.requests),
               concurrent(lambda e=engine: in_process(e, a.k), users, a.concurrency, a.load_requests,
                          a.load_seconds))
        if engine.bundle.reranker is not None:  # the learned re-ranker's cost, side by side in the same run
            plain = Bundle(bundle_path, int8=precision == "int8")
            plain.reranker = None
            engine = Engine(plain)
            record(f"floor [{precision}, no re-ranker]", sequential(in_process(engine, a.k), users, a.requests),
                   concurrent(lambda e=engine: in_process(e, a.k), users, a.concurrency, a.load_requests,
                              a.load_seconds))

    protocols = [("v2 REST", http_v2), ("v2 gRPC", grpc_v2), ("/predict", friendly)]
    hot = list(dict.fromkeys(users))[:a.hit_users]
    runs = [(False, p) for p in precisions] + ([(True, precisions[0])] if a.hit_users else [])
    for cache, precision in runs:
        proc, http_port, grpc_port = start_server(bundle_path, tmp / f"server-{cache}-{precision}.log", a.workers,
                                                  cache, precision)
        try:
            for name, factory in protocols:
                port = grpc_port if factory is grpc_v2 else http_port
                pool = users
                if cache:
                    name = f"{name} (cache hit)"
                    warm = factory("127.0.0.1", port, a.k)
                    for u in hot:  # every hot user's row is cached before measuring
                        warm(u)
                    pool = (hot * (len(users) // len(hot) + 1))[:len(users)]
                else:
                    name = f"{name} [{precision}]"
                print(f"{name} ...", flush=True)
                record(name, sequential(factory("127.0.0.1", port, a.k), pool, a.requests),
                       concurrent(lambda f=factory, p=port: f("127.0.0.1", p, a.k), pool, a.concurrency,
                                  a.load_requests, a.load_seconds))
            if cache:  # the cache-hit rows really were hits
                import httpx

                rate = [ln for ln in httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=10).text.splitlines()
                        if ln.startswith("ml_cache_hit_rate{")]
                results["cache_hit_rate_at_end"] = [ln.rsplit(" ", 1)[1] for ln in rate]
        finally:
            rc = stop_server(proc)
        results[f"server_exit_code{'_cache' if cache else ''}_{precision}"] = rc

    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2))
    c = f"c{a.concurrency}"
    print(f"\ncatalogue {data['catalogue']} properties, k={a.k}, {results['env'].get('cpus')} CPUs shared by client "
          f"and server, --workers {a.workers}\n")
    print(f"| mode | p50 ms (c=1) | p95 ms (c=1) | p99 ms (c=1) | req/s ({a.concurrency} clients) | "
          f"p50 / p95 / p99 ms under load |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results["modes"].items():
        print(f"| {name} | {r['c1']['p50_ms']:.2f} | {r['c1']['p95_ms']:.2f} | {r['c1']['p99_ms']:.2f} | "
              f"{r[c]['rps']:.0f} | {r[c]['load_p50_ms']:.2f} / {r[c]['load_p95_ms']:.2f} / "
              f"{r[c]['load_p99_ms']:.2f} |")
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
