"""Streaming freshness: time from producing a property price update to Kafka until the Feast online store serves
the new price, under a background load of user interactions. One run, one machine: Tansu, Redis, the stream
processor (`rentalml stream run`, a subprocess), the background producer (`rentalml stream produce`, a
subprocess) and this measuring process share the CPUs.

  * background: `rentalml stream produce --dataset synthetic:U,P,E --rate R` (property listings first, then the
    interactions stamped with the send time) for about --seconds;
  * probes: every --interval s a `property_data` "updated" event with a new price for one of --probes properties
    (round robin), sent with its own producer (linger 0) and the send time recorded;
  * a poller reads `property_attributes:price` of the pending probes from the online store (Redis) every few ms;
    latency = first time the new price is read - send time;
  * with --serve (default): a `rentalml serve` (bundle of the background dataset, serve.feature_source=feast)
    is polled on POST /explain for the pending probes; served latency = first time the explanation shows the new
    price - send time (the path Kafka → processor → Feast → serving).
Writes benchmarks/results/streaming_latency.json (one entry per --rate under "runs": p50/p95/p99, achieved
events/s) and prints a markdown row.

    OMP_NUM_THREADS=1 python benchmarks/streaming_latency.py [--rate 5000] [--seconds 20] [--interval 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "streaming_latency.json"


def uptime() -> str:
    """`uptime` (the load averages: the machine is shared)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def committed_batches(log: Path) -> list[tuple[float, dict]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        i = line.find('{"committed"')
        if i >= 0:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((stamp, json.loads(line[i:])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=5000.0, help="background interactions per second")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between price updates")
    ap.add_argument("--probes", type=int, default=20, help="properties whose price is updated (round robin)")
    ap.add_argument("--dataset", default="synthetic:2000,1000,20000", help="users,properties of the background; "
                    "its interactions are replayed cyclically")
    ap.add_argument("--serve", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure the served explanation (POST /explain of a rentalml serve on Feast)")
    args = ap.parse_args()

    from rentalml.services import start_redis, start_tansu, stop_process, wait_until

    tansu, redis = start_tansu(), start_redis()
    home = Path(tempfile.mkdtemp(prefix="rentalml-stream-bench-"))
    env = {**os.environ, "RENTALML_HOME": str(home), "RENTALML_KAFKA__BOOTSTRAP_SERVERS": tansu.url,
           "RENTALML_REDIS_URL": redis.url, "RENTALML_FEAST__REPO_PATH": str(ROOT / "feature_repo"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    os.environ.update({k: v for k, v in env.items() if k.startswith("RENTALML_")})
    from rentalml.config import get_settings

    get_settings.cache_clear()
    from rentalml.features.store import apply, open_store
    from rentalml.kafka import PROPERTY_DATA, ensure_topics, producer

    store = open_store()
    apply(store)
    ensure_topics()
    procs: list[subprocess.Popen] = []
    try:
        log = home / "stream.log"
        proc = subprocess.Popen([sys.executable, "-m", "rentalml.cli", "stream", "run"], env=env,
                                stdout=subprocess.DEVNULL, stderr=open(log, "ab"), cwd=str(ROOT))
        procs.append(proc)
        probes = [f"p_{i:06d}" for i in range(1, args.probes + 1)]
        served_url = None
        if args.serve:
            from rentalml.data.loaders import load_dataset
            from rentalml.export.bundle import write_bundle
            from rentalml.services import free_port, wait_port
            from rentalml.training.trainer import fit_model

            ds = load_dataset(args.dataset)
            bundle = write_bundle(fit_model("popularity", ds), ds, home / "bundle", quantize=False)
            http, grpc = free_port(), free_port()
            srv = subprocess.Popen([sys.executable, "-m", "rentalml.cli", "serve", "--bundle", str(bundle),
                                    "--http-port", str(http), "--grpc-port", str(grpc)],
                                   env={**env, "KSERVE_LOGLEVEL": "WARNING", "RENTALML_SERVE__FEATURE_SOURCE": "feast"},
                                   stdout=subprocess.DEVNULL, stderr=open(home / "serve.log", "ab"), cwd=str(ROOT))
            procs.append(srv)
            wait_port(http, timeout=120, proc=srv)
            served_url = f"http://127.0.0.1:{http}/explain"
        prod = producer(linger_ms=0, acks=1)

        def update(i: int, pid: str, price: float) -> float:
            ev = {"event_id": f"bench-{i}", "event_type": "updated", "property_id": pid,
                  "timestamp": datetime.now(UTC).isoformat(), "attributes": {"price": price}}
            t = time.perf_counter()
            prod.send(PROPERTY_DATA, key=pid.encode(), value=json.dumps(ev).encode())
            prod.flush()
            return t

        def read_prices(pids: list[str]) -> dict[str, float | None]:
            resp = store.get_online_features(features=["property_attributes:price"],
                                             entity_rows=[{"property_id": p} for p in pids]).to_dict()
            return dict(zip(resp["property_id"], resp["price"], strict=True))

        # warm-up: the processor is up (group joined, Feast open) once a price update shows
        update(-1, probes[0], 1.0)
        try:
            wait_until(lambda: read_prices([probes[0]])[probes[0]] == 1.0, timeout=120, interval=0.1, proc=proc,
                       what="the stream processor's first push")
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"stream processor not ready ({exc}):\n" + log.read_text()[-3000:]) from None
        load_before = uptime()

        n_bg = int(args.rate * args.seconds)
        bg = subprocess.Popen([sys.executable, "-m", "rentalml.cli", "stream", "produce", "--dataset", args.dataset,
                               "--rate", str(args.rate), "--limit", str(n_bg), "--timestamps", "now",
                               "--cycle"], env=env, stdout=subprocess.PIPE, stderr=open(home / "produce.log", "ab"),
                              cwd=str(ROOT))
        procs.append(bg)
        time.sleep(2.0)  # let the background reach its rate

        sent: dict[int, tuple[str, float, float]] = {}  # i -> (property, price, send time)
        seen: dict[int, float] = {}
        lock = threading.Lock()
        stop = threading.Event()

        def poller() -> None:
            while not stop.is_set() or len(seen) < len(sent):
                with lock:
                    pending = {i: v for i, v in sent.items() if i not in seen}
                if not pending:
                    time.sleep(0.002)
                    if stop.is_set():
                        break
                    continue
                latest: dict[str, tuple[int, float]] = {}
                for i, (pid, price, _) in pending.items():
                    latest[pid] = max(latest.get(pid, (i, price)), (i, price))
                prices = read_prices(sorted(latest))
                now = time.perf_counter()
                with lock:
                    for i, (pid, price, _) in pending.items():
                        if prices.get(pid) is not None and (prices[pid] == price or latest[pid][0] > i
                                                            and prices[pid] == latest[pid][1]):
                            seen[i] = now  # a newer price of the same property implies this one was applied
                if stop.is_set() and time.perf_counter() - stop_at[0] > 10:
                    break
                time.sleep(0.02)  # resolution vs. the CPU this reader takes from the processor

        seen_served: dict[int, float] = {}

        def served_poller() -> None:
            import httpx

            client = httpx.Client(timeout=5)
            while not (stop.is_set() and (len(seen_served) >= len(sent) or time.perf_counter() - stop_at[0] > 10)):
                with lock:
                    pending = {i: v for i, v in sent.items() if i not in seen_served}
                latest: dict[str, tuple[int, float]] = {}
                for i, (pid, price, _) in pending.items():
                    latest[pid] = max(latest.get(pid, (i, price)), (i, price))
                shown = {}
                for pid in latest:
                    r = client.post(served_url, json={"user_id": "u_000001", "property_id": pid})
                    shown[pid] = r.json().get("explanation", "") if r.status_code == 200 else ""
                now = time.perf_counter()
                with lock:
                    for i, (pid, price, _) in pending.items():
                        if f"${price:,.0f}/month" in shown.get(pid, "") or (
                                latest[pid][0] > i and f"${latest[pid][1]:,.0f}/month" in shown.get(pid, "")):
                            seen_served[i] = now
                time.sleep(0.02)
            client.close()

        stop_at = [0.0]
        th = threading.Thread(target=poller, daemon=True)
        th.start()
        th2 = threading.Thread(target=served_poller, daemon=True) if served_url else None
        if th2 is not None:
            th2.start()
        t_start = time.perf_counter()
        i = 0
        while time.perf_counter() - t_start < args.seconds - 2.0 and bg.poll() is None:
            pid = probes[i % len(probes)]
            price = 2000.0 + i
            t = update(i, pid, price)
            with lock:
                sent[i] = (pid, price, t)
            i += 1
            time.sleep(max(0.0, args.interval - (time.perf_counter() - t)))
        stop.set()
        stop_at[0] = time.perf_counter()
        th.join(timeout=15)
        if th2 is not None:
            th2.join(timeout=15)
        bg_out, _ = bg.communicate(timeout=args.seconds + 120)  # a loaded machine produces slower than --rate
        produced = json.loads(bg_out.decode().strip().splitlines()[-1])
        time.sleep(1.0)
        lat = np.array([seen[k] - sent[k][2] for k in sent if k in seen])
        lat_srv = np.array([seen_served[k] - sent[k][2] for k in sent if k in seen_served])
        rows = committed_batches(log)
        window = [(t, d) for t, d in rows if d["records"] > 0]
        if len(window) >= 2:
            recs = sum(d["records"] for _, d in window[1:])
            processed_rate = recs / (window[-1][0] - window[0][0])
        else:
            processed_rate = None
        batch_s = np.array([d["batch_s"] for _, d in window]) if window else np.array([np.nan])
        push_s = np.array([d["push_s"] for _, d in window]) if window else np.array([np.nan])
        result = {
            "benchmark": "streaming_latency", "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
            "setup": {"target_events_per_s": args.rate, "seconds": args.seconds, "update_interval_s": args.interval,
                      "probes": args.probes, "dataset": args.dataset, "broker": "Tansu (memory)",
                      "online_store": "Redis (Feast)", "state_store": "Redis (Lua)",
                      "batch_size": get_settings().stream.batch_size},
            "background_produced": produced,
            "achieved_processed_events_per_s": round(processed_rate, 1) if processed_rate else None,
            "price_updates": {"sent": len(sent), "seen": int(len(lat))},
            "latency_s": {**{f"p{q}": round(float(np.percentile(lat, q)), 4) for q in (50, 95, 99)},
                          "max": round(float(lat.max()), 4), "mean": round(float(lat.mean()), 4)} if len(lat) else None,
            "served_explanation_latency_s": ({**{f"p{q}": round(float(np.percentile(lat_srv, q)), 4)
                                                 for q in (50, 95, 99)}, "seen": int(len(lat_srv)),
                                              "max": round(float(lat_srv.max()), 4)} if len(lat_srv) else None),
            "batch_s": {"p50": round(float(np.nanpercentile(batch_s, 50)), 4),
                        "p99": round(float(np.nanpercentile(batch_s, 99)), 4)},
            "push_s": {"p50": round(float(np.nanpercentile(push_s, 50)), 4),
                       "p99": round(float(np.nanpercentile(push_s, 99)), 4)},
            "target": "p99 < 1 s at 5,000 events/s",
            "uptime_before": load_before, "uptime_after": uptime(),
        }
        OUT.parent.mkdir(parents=True, exist_ok=True)
        doc = json.loads(OUT.read_text()) if OUT.exists() else {}
        runs = doc.get("runs", {}) if isinstance(doc.get("runs"), dict) else {}
        runs[f"{args.rate:.0f}"] = result  # one entry per background rate (the latest run)
        history = doc.get("history", []) if isinstance(doc.get("history"), list) else []
        history.append({k: result[k] for k in ("when", "setup", "background_produced",
                                                "achieved_processed_events_per_s", "price_updates", "latency_s",
                                                "batch_s", "uptime_before", "uptime_after")})
        OUT.write_text(json.dumps({"benchmark": "streaming_latency", "runs": runs, "history": history[-12:]},
                                  indent=2) + "\n")
        print(json.dumps(result, indent=2))
        if result["latency_s"]:
            ls = result["latency_s"]
            print(f"| {args.rate:.0f} target, {produced['events_per_s']} produced, "
                  f"{result['achieved_processed_events_per_s']} processed | {ls['p50']} | {ls['p95']} | {ls['p99']} | "
                  f"{len(lat)}/{len(sent)} |")
    finally:
        for p in procs:
            stop_process(p)
        tansu.stop()
        redis.stop()


if __name__ == "__main__":
    main()
