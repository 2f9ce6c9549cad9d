"""`make demo`: the whole loop locally on embedded defaults (SQLite MLflow, local files).

generate a marketplace → benchmark all models → train + export + register the hybrid (champion) →
start `rentalml serve` → ask it for three users' recommendations with tritonclient → shut down.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

from rentalml.config import get_settings

DEMO_PARAMS = {"epochs": 60}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(http_port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if client.is_server_ready() and client.is_model_ready("rental-recommender"):
                return
        except Exception:
            pass
        time.sleep(0.3)
    raise TimeoutError("server did not become ready")


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="the whole rentalml loop locally")
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--properties", type=int, default=1000)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--epochs", type=int, default=DEMO_PARAMS["epochs"])
    args = ap.parse_args(argv)
    params = {**DEMO_PARAMS, "epochs": args.epochs}
    from rentalml.data.generator import generate_marketplace
    from rentalml.evaluation.benchmark import run_benchmark
    from rentalml.evaluation.report import format_table, write_report

    t0 = time.perf_counter()
    s = get_settings()
    print(f"== rentalml demo (state in {s.home_dir}, MLflow at {s.tracking_uri})")
    ds = generate_marketplace(n_users=args.users, n_properties=args.properties, n_events=args.events, seed=42)
    ds.save(s.home_dir / "data" / "demo")
    print(f"== 1. synthetic marketplace: {ds.summary()}")
    data_dir = s.home_dir / "data" / "demo"
    print("== 2. baselines (random-75-25, k=10)")
    result = run_benchmark(ds, "random-75-25", 42, 10, ("popularity", "collaborative", "content"),
                           params=params, log=lambda m: None)
    curves = result.pop("_curves", {})
    print("== 3. the training pipeline, locally with kfp.local (ingest → validate → features → tune → train → "
          "evaluate → champion gate → export → register)")
    summary_path = s.home_dir / "runs" / "demo-pipeline.json"
    cmd = [sys.executable, "-m", "rentalml.cli", "pipeline", "run", "--local", "--source", str(data_dir),
           "--model", "hybrid", "--params", json.dumps(params), "--deploy-mode", "none", "--json", str(summary_path)]
    subprocess.run(cmd, check=True)
    summary = json.loads(summary_path.read_text())
    hybrid = {key: float(v) for key, v in summary["scores"].items() if isinstance(v, (int, float))}
    result["models"]["hybrid"] = hybrid
    print(format_table(result))
    print(f"   report: {write_report(result, s.home_dir / 'reports' / 'demo', curves)}")
    reg = summary["registered"]
    print(f"   rental-recommender v{reg.get('version')} -> alias {reg.get('alias')} (gate: {summary['gate']})")
    http_port, grpc_port = _free_port(), _free_port()
    print(f"== 4. rentalml serve (champion) on http :{http_port}, grpc :{grpc_port}")
    env = {**os.environ, "KSERVE_LOGLEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "rentalml.cli", "serve", "--http-port", str(http_port),
                             "--grpc-port", str(grpc_port)], env=env)
    try:
        wait_ready(http_port, proc)
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        users = np.array([b"u_000001", b"u_000042", b"u_new_visitor"], dtype=object)
        inp = grpcclient.InferInput("user_id", [len(users)], "BYTES")
        inp.set_data_from_numpy(users)
        k = grpcclient.InferInput("k", [1], "INT32")
        k.set_data_from_numpy(np.array([5], dtype=np.int32))
        out = client.infer("rental-recommender", [inp, k])
        ids, scores = out.as_numpy("property_id"), out.as_numpy("score")
        print("== 5. recommendations (KServe v2 over gRPC, tritonclient)")
        for u, row, sc in zip(users, ids, scores, strict=True):
            recs = ", ".join(f"{p.decode()} ({v:.2f})" for p, v in zip(row, sc, strict=True))
            print(f"   {u.decode():14s} -> {recs}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"== done in {time.perf_counter() - t0:.0f} s; server stopped")


if __name__ == "__main__":
    main()
