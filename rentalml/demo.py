"""`make demo`: the whole loop locally on embedded defaults (SQLite MLflow and database, local files, Feast on
SQLite + DuckDB, a Tansu broker on loopback).

generate a marketplace → database of record (db init + seed) → feature store (apply + materialize) →
benchmark the baselines → the KFP training pipeline locally, ingesting from the database → start Tansu and
`rentalml serve` (champion, Feast features, fold-in from the stream) → ask it with tritonclient → stream a new
listing, a new visitor's views and a price change through `rentalml stream run` → ask again: the new visitor
gets model recommendations, the new listing is recommended, the explanation shows the new price → drift check
→ shut down. Nothing is retrained between the two questions.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from rentalml.config import get_settings
from rentalml.services import wait_until

DEMO_PARAMS = {"epochs": 60}


class Chatter:
    """Where everything that is not the demo's own output goes: kfp.local's executor logs, the server's and the
    stream processor's logs, library warnings and logging. The console keeps the demo's steps, a progress bar for
    long work and the results; the log's path is printed at the start, and its tail on a failure."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the demo
        self._stderr_fd = os.dup(2)
        os.dup2(self.file.fileno(), 2)  # C-level and Python stderr of this process (library warnings, tqdm)
        sys.stderr = self.file
        logging.basicConfig(stream=self.file, level=logging.INFO, force=True,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.captureWarnings(True)

    def tail(self, n: int = 40) -> str:
        self.file.flush()
        return "\n".join(self.path.read_text(errors="replace").splitlines()[-n:])

    def restore(self) -> None:
        self.file.flush()
        os.dup2(self._stderr_fd, 2)
        sys.stderr = sys.__stderr__


def _run_logged(cmd: list[str], chatter: Chatter, *, env: dict | None = None, label: str = "",
                timeout: float = 3600) -> None:
    """Run a CLI step with its output in the log, under a progress line that names the pipeline tasks kfp.local
    has finished so far ("Task 'x' finished with status SUCCESS" in its log)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    chatter.file.write(f"\n$ {' '.join(cmd)}\n")
    chatter.file.flush()
    start = chatter.path.stat().st_size
    proc = subprocess.Popen(cmd, env=env, stdout=chatter.file, stderr=chatter.file)
    done_re = re.compile(r"Task '([\w-]+)' finished with status SUCCESS")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(label, total=None)

        def finished() -> bool:  # the progress line follows the log until the step's process ends
            with open(chatter.path, errors="replace") as f:
                f.seek(start)
                done = done_re.findall(re.sub(r"\x1b\[[0-9;]*m", "", f.read()))
            bar.update(task, description=f"{label}: {len(done)} steps done" + (f", last {done[-1]}" if done else ""))
            return proc.poll() is not None

        try:
            wait_until(finished, timeout, interval=0.5, what=label)
        except TimeoutError:
            proc.kill()
            raise TimeoutError(f"{label} took longer than {timeout:.0f} s (log: {chatter.path})") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed with exit code {proc.returncode}; log {chatter.path}:\n"
                           f"{chatter.tail()}")


def wait_ready(http_port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")

    def ready() -> bool:
        try:
            return client.is_server_ready() and client.is_model_ready("rental-recommender")
        except Exception:  # noqa: BLE001 - tritonclient's own error type while the server starts
            return False

    wait_until(ready, timeout, interval=0.3, proc=proc, what="the server and its model ready")


def _ask(grpc_port: int, users: list[str], k: int = 5) -> dict[str, list[str]]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    inp = grpcclient.InferInput("user_id", [len(users)], "BYTES")
    inp.set_data_from_numpy(np.array([u.encode() for u in users], dtype=object))
    kin = grpcclient.InferInput("k", [1], "INT32")
    kin.set_data_from_numpy(np.array([k], dtype=np.int32))
    out = client.infer("rental-recommender", [inp, kin])
    sources = out.get_response().parameters["sources"].string_param.split(",")
    ids, scores = out.as_numpy("property_id"), out.as_numpy("score")
    res = {}
    for u, row, sc, src in zip(users, ids, scores, sources, strict=True):
        res[u] = [p.decode() for p in row]
        recs = ", ".join(f"{p.decode()} ({v:.2f})" for p, v in zip(row, sc, strict=True))
        print(f"   {u:14s} [{src:10s}] -> {recs}")
    return res


def _stream_events(ds, first: dict[str, list[str]], env: dict, s) -> tuple[str, tuple[str, str, float]]:
    """Produce contract events to Tansu and run the stream processor until it is idle."""
    from datetime import UTC, datetime

    from kafka import KafkaProducer

    items = ds.items
    now = datetime.now(UTC).isoformat()
    twin = first["u_000001"][0]  # a new listing just like u_000001's favourite
    attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in items.loc[twin].items()
             if k in ("price", "bedrooms", "bathrooms", "area_sqm", "lat", "lon", "property_type", "room_type",
                      "city", "neighbourhood", "pets_allowed")}
    attrs["amenities"] = [str(a) for a in items.loc[twin, "amenities"]]
    listing = "p_new_listing"
    city = items.loc[twin, "city"]
    views = list(items.index[items["city"] == city][:5])
    u, pid = "u_000042", first["u_000042"][1]
    price = float(items.loc[pid, "price"]) * 0.9
    events = [("property_data", listing, {"event_id": "demo-listing", "event_type": "listed",
                                          "property_id": listing, "timestamp": now, "attributes": attrs}),
              ("property_data", pid, {"event_id": "demo-price", "event_type": "updated", "property_id": pid,
                                      "timestamp": now, "attributes": {"price": price}})]
    events += [("user_interactions", "u_new_visitor", {"event_id": f"demo-view-{i}", "event_type": "view",
                                                       "user_id": "u_new_visitor", "property_id": p,
                                                       "timestamp": now, "session_id": "demo", "variant": None})
               for i, p in enumerate(views)]
    producer = KafkaProducer(bootstrap_servers=env["RENTALML_KAFKA__BOOTSTRAP_SERVERS"])
    for topic, key, value in events:
        producer.send(topic, key=key.encode(), value=json.dumps(value).encode())
    producer.flush()
    producer.close()
    print(f"   produced {len(events)} events: {listing} listed (like {twin}), u_new_visitor viewed "
          f"{', '.join(views)}, {pid} price -> ${price:,.0f}")
    out = subprocess.run([sys.executable, "-m", "rentalml.cli", "stream", "run", "--idle-exit-s", "3",
                          "--no-verbose"], env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"stream processor failed: {out.stderr[-2000:]}")
    print(f"   stream processor: {out.stdout.strip().splitlines()[-1]}")
    time.sleep(float(s.serve.live_refresh_s) + 0.6)  # the server's next look at the stream state
    return listing, (u, pid, price)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="the whole rentalml loop locally")
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--properties", type=int, default=1000)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--epochs", type=int, default=DEMO_PARAMS["epochs"])
    args = ap.parse_args(argv)
    params = {**DEMO_PARAMS, "epochs": args.epochs}
    t0 = time.perf_counter()
    s = get_settings()
    chatter = Chatter(s.home_dir / "demo.log")
    print(f"== rentalml demo (state in {s.home_dir}, MLflow at {s.tracking_uri})")
    print(f"   library and server logs: {chatter.path}")
    try:
        _demo(args, params, s, chatter, t0)
    except BaseException:
        chatter.restore()
        print(f"demo failed; the last lines of {chatter.path}:\n{chatter.tail()}", file=sys.stderr)
        raise
    chatter.restore()


def _demo(args, params: dict, s, chatter: Chatter, t0: float) -> None:
    from rentalml.data.generator import generate_marketplace
    from rentalml.evaluation.benchmark import run_benchmark
    from rentalml.evaluation.report import format_table, write_report

    ds = generate_marketplace(n_users=args.users, n_properties=args.properties, n_events=args.events, seed=42)
    ds.save(s.home_dir / "data" / "demo")
    print(f"== 1. synthetic marketplace: {ds.summary()}")
    data_dir = s.home_dir / "data" / "demo"
    from rentalml.db import store as db
    from rentalml.features import store as fs

    db.init_db(s.db_url)
    seeded = db.seed(s.db_url, ds)
    print(f"   database of record {s.db_url}: {json.dumps(seeded, default=str)}")
    fstore = fs.open_store(s)
    fs.build_offline_tables(ds, fs.data_dir(fstore))
    fs.apply(fstore)
    fs.materialize(fstore, fs.dataset_end(ds))
    print(f"   feature store: Feast project {s.feast.project}, views {', '.join(sorted(fs.objects(fstore)))[:120]}")
    print("== 2. baselines (random-75-25, k=10)")
    result = run_benchmark(ds, "random-75-25", 42, 10, ("popularity", "collaborative", "content"),
                           params=params, log=lambda m: None)
    curves = result.pop("_curves", {})
    print("== 3. the training pipeline, locally with kfp.local (ingest from the database → validate → features → "
          "tune → train → evaluate → champion gate → export → register)")
    summary_path = s.home_dir / "runs" / "demo-pipeline.json"
    cmd = [sys.executable, "-m", "rentalml.cli", "pipeline", "run", "--local", "--source", "db",
           "--model", "hybrid", "--params", json.dumps(params), "--deploy-mode", "none", "--json", str(summary_path)]
    _run_logged(cmd, chatter, label="pipeline")
    summary = json.loads(summary_path.read_text())
    hybrid = {key: float(v) for key, v in summary["scores"].items() if isinstance(v, (int, float))}
    result["models"]["hybrid"] = hybrid
    print(format_table(result))
    print(f"   report: {write_report(result, s.home_dir / 'reports' / 'demo', curves)}")
    reg = summary["registered"]
    print(f"   rental-recommender v{reg.get('version')} -> alias {reg.get('alias')} (gate: {summary['gate']})")
    from rentalml.services import free_port, start_tansu, stop_process

    broker = start_tansu(log=chatter.path.with_name("tansu.log"))
    http_port, grpc_port = free_port(), free_port()
    print(f"== 4. Tansu (Kafka API) on {broker.url}; rentalml serve (champion, Feast features, fold-in) on "
          f"http :{http_port}, grpc :{grpc_port}")
    env = {**os.environ, "KSERVE_LOGLEVEL": "WARNING", "RENTALML_KAFKA__BOOTSTRAP_SERVERS": broker.url,
           "RENTALML_SERVE__FEATURE_SOURCE": "feast", "RENTALML_SERVE__FOLD_IN": "true",
           "RENTALML_SERVE__LIVE_REFRESH_S": "0.5"}
    proc = subprocess.Popen([sys.executable, "-m", "rentalml.cli", "serve", "--http-port", str(http_port),
                             "--grpc-port", str(grpc_port)], env=env, stdout=chatter.file, stderr=chatter.file)
    try:
        wait_ready(http_port, proc)
        users = ["u_000001", "u_000042", "u_new_visitor"]
        print("== 5. recommendations (KServe v2 over gRPC, tritonclient)")
        first = _ask(grpc_port, users)
        print("== 6. streaming: a new listing, the new visitor's first views and a price change -> Kafka -> "
              "rentalml stream run (validate, aggregate, Feast push, state)")
        listing, price_of = _stream_events(ds, first, env, s)
        print("== 7. the same question again (no retraining): fold-in and fresh features")
        second = _ask(grpc_port, users)
        u, pid, price = price_of
        import httpx

        r = httpx.post(f"http://127.0.0.1:{http_port}/predict", json={"user_id": u, "num_recommendations": 5,
                                                                       "include_explanations": True}).json()
        for item in r["recommendations"]:
            if item["property_id"] == pid:
                print(f"   {u}'s {pid} now explained as: {item['explanation']} (price streamed: ${price:,.0f})")
        seen = sum(listing in row for row in second.values())
        print(f"   new listing {listing} appears in {seen} of {len(users)} lists; "
              f"u_new_visitor: {'model' if first['u_new_visitor'] != second['u_new_visitor'] else 'unchanged'}")
    finally:
        stop_process(proc)
        broker.stop()
    print("== 8. drift check of the demo data against the champion's training snapshot (no retraining)")
    out = subprocess.run([sys.executable, "-m", "rentalml.cli", "monitor", "drift", "--current", str(data_dir),
                          "--window-days", "0", "--retrain", "off"], capture_output=True, text=True)
    if out.returncode == 0:
        doc = json.loads(out.stdout)
        print(f"   drift over threshold: {doc['over_threshold']} ({', '.join(doc['drifted']) or 'none'}); "
              f"report {doc['report']}")
    else:
        print(f"   drift check failed: {out.stderr[-500:]}")
    print(f"== done in {time.perf_counter() - t0:.0f} s; server and broker stopped")


if __name__ == "__main__":
    main()
