"""Soak: one `rentalml serve` (a real process, its recommendation cache in a real Redis) under a mixed open-loop
load for --duration seconds (default 600) at --load (default 0.8) of the capacity measured in the same run.

1. Bundles: one hybrid fit (--users / --properties / --events / --epochs) written twice, as model versions "1"
   and "2" (or --bundle and --reload-bundle).
2. Redis (rentalml.services.start_redis, or --redis-url) is the cache (RENTALML_REDIS_URL); the --hot-users are
   requested once on every protocol before anything is measured.
3. Capacity: a closed loop (each client thread sends its next request when the last one returned) with the same
   request mix, for --capacity-s at each --ramp thread count; the highest requests/s reached is a ceiling: a
   closed loop never queues. With --capacity open (the default) the capacity is then the highest open-loop rate
   the server sustains (open_loop: p99 from the due time within the 250 ms SLO of the latency alert and within
   3 x p50, p50 within 1.5 x the median service time, everything due sent), searched down from that ceiling in
   10 % steps of --open-step-s each; with --capacity closed it is the ceiling itself. That is the capacity of the
   steady mix the soak then offers (70 % hot users with their rows cached, 30 % misses), on this machine with this
   client beside the server. It is not what the server does while every request misses: the best thread count
   runs once more with misses only (`misses_only`, what a storm leaves; --no-miss-capacity skips it), and once
   more after the soak (on a shared machine the two can differ). Each step records the server's CPU per request,
   a figure of the code that the machine's load moves much less than requests/s.
4. Soak: requests fall due at a constant rate (--load x capacity) and --workers threads, each with its own three
   clients, send them. A request's latency counts from the time it was due (wrk2's way: a stalled server cannot
   hide behind a stalled client). The mix: v2 REST (tritonclient.http), v2 gRPC (tritonclient.grpc) and
   POST /predict (httpx) in turn; with probability --hot-share a hot user with k=10 (a cache hit once warm),
   else any known user with k in 11..60 (nearly always a miss). --timeline (default reload@0.4,storm@0.6): at
   40 % of the duration one hot reload (POST /admin/reload to the other version's bundle: 1 -> 2, then 2 -> 1
   ...; as it returns, how many hot users already have a row of the new version: the server pre-warms them,
   serve.prewarm_rows), at 60 % one invalidation storm (POST /admin/invalidate of every known user and the
   --storm-properties most popular properties, in --storm-calls concurrent calls).
5. Every --sample-s: the server's RSS and CPU time (its process and its children, psutil), its /metrics
   (ml_cache_hit_rate, ml_inference_requests_total, ml_model_reloads_total) and Redis INFO (keyspace hits /
   misses, keys). Per window: latency from the due time, service time p99, hit ratio, RSS, the server's share of
   a core and its CPU per request answered.

The issue's bars: zero errors (any non-2xx answer or transport error), RSS growth <= 10 % from the end of
--warmup-s to the end, overall p99 <= 3 x p50 (and `kept_up`: no request waited > 1 s for a free client worker, as
p99 <= 3 x p50 means nothing over a backlog). Writes --out (benchmarks/results/soak.json), prints a table, and
exits 1 when any request failed.

    python benchmarks/soak.py [--duration 600] [--load 0.8] [--workers 16] [--ramp 2,4,8] [--capacity-s 10]
    (--rate R offers R requests/s instead of --load x capacity: two server versions side by side at one rate)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

MODEL = "rental-recommender"
PROTOCOLS = ("v2 REST", "v2 gRPC", "/predict")


# ---- bundles and the server ------------------------------------------------------------------------------------
def build_bundles(out: Path, users: int, properties: int, events: int, epochs: int) -> tuple[Path, Path, dict]:
    """One hybrid fit written as model version "1" and as version "2" (what the hot reload switches to)."""
    from rentalml.data.generator import generate_marketplace
    from rentalml.export.bundle import write_bundle
    from rentalml.training.trainer import fit_model

    t0 = time.perf_counter()
    ds = generate_marketplace(n_users=users, n_properties=properties, n_events=events, seed=42)
    fitted = fit_model("hybrid", ds, params={"epochs": epochs, "neighbours": 32})
    v1, v2 = (write_bundle(fitted, ds, out / f"v{v}", model_version=str(v)) for v in (1, 2))
    return v1, v2, {"users": users, "properties": properties, "events": events, "epochs": epochs,
                    "build_seconds": round(time.perf_counter() - t0, 1)}


class Served:
    """`rentalml serve --bundle ...` in a subprocess, its cache in Redis at `redis_url`."""

    def __init__(self, bundle: Path, workdir: Path, redis_url: str):
        import subprocess

        from rentalml.services import free_port

        self.http_port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.log = workdir / "server.log"
        env = {**os.environ, "KSERVE_LOGLEVEL": "WARNING", "RENTALML_HOME": str(workdir / "home"),
               "RENTALML_REDIS_URL": redis_url}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rentalml.cli", "serve", "--bundle", str(bundle),
                 "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port)],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def wait_ready(self, timeout: float = 180.0) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        from rentalml.services import wait_until

        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{self.grpc_port}")

        def ready() -> bool:
            try:
                return (self.http.get(f"/v2/models/{MODEL}/ready", timeout=2).status_code == 200
                        and grpc.is_server_ready())
            except (httpx.TransportError, InferenceServerException):
                return False

        try:
            wait_until(ready, timeout, interval=0.2, proc=self.proc, what="rentalml serve ready")
        except (RuntimeError, TimeoutError) as exc:
            raise SystemExit(f"{exc}:\n{self.log.read_text(errors='replace')[-3000:]}") from None
        grpc.close()

    def usage(self) -> tuple[int, float]:
        """(resident bytes, CPU seconds) of the server process and all its children."""
        import psutil

        try:
            procs = [root := psutil.Process(self.proc.pid), *root.children(recursive=True)]
            cpu = [p.cpu_times() for p in procs]
            return sum(p.memory_info().rss for p in procs), sum(c.user + c.system for c in cpu)
        except psutil.NoSuchProcess:
            return 0, 0.0

    def metrics(self) -> dict:
        """The samples the soak follows, from /metrics: {(name, variant, status): value}."""
        from prometheus_client.parser import text_string_to_metric_families

        keep = ("ml_cache_hit_rate", "ml_inference_requests_total", "ml_model_reloads_total",
                "ml_cache_errors_total")
        out = {}
        for fam in text_string_to_metric_families(self.http.get("/metrics").text):
            for s in fam.samples:
                if s.name in keep:
                    key = "|".join([s.name, *(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model")])
                    out[key] = s.value
        return out

    def version(self) -> str:
        return self.http.get("/health").json()["model_version"]

    def stop(self) -> int | None:
        from rentalml.services import stop_process

        self.http.close()
        return stop_process(self.proc, timeout=30)


# ---- the three protocols -----------------------------------------------------------------------------------
class Clients:
    """One client per protocol, made and used in one thread (tritonclient.http runs on gevent greenlets, which
    other threads cannot use). call() returns the model version that answered; it raises on any error."""

    def __init__(self, http_port: int, grpc_port: int):
        import tritonclient.grpc as grpcclient
        import tritonclient.http as httpclient

        self.mods = (httpclient, grpcclient)
        self.v2 = (httpclient.InferenceServerClient(f"127.0.0.1:{http_port}"),
                   grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}"))
        self.web = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30)

    def call(self, protocol: int, user: str, k: int) -> str:
        if protocol == 2:
            r = self.web.post("/predict", json={"user_id": user, "num_recommendations": k})
            r.raise_for_status()
            body = r.json()
            if not body["recommendations"]:
                raise AssertionError(f"/predict: no recommendations for {user}")
            return body["model_version"]
        mod, client = self.mods[protocol], self.v2[protocol]
        inputs = [mod.InferInput("user_id", [1], "BYTES"), mod.InferInput("k", [1], "INT32")]
        inputs[0].set_data_from_numpy(np.array([user], dtype=object))
        inputs[1].set_data_from_numpy(np.array([k], dtype=np.int32))
        res = client.infer(MODEL, inputs)
        ids = res.as_numpy("property_id")
        if ids is None or ids.shape != (1, k):
            raise AssertionError(f"{PROTOCOLS[protocol]}: property_id {None if ids is None else ids.shape}")
        params = res.get_response()["parameters"] if protocol == 0 else \
            {key: p.string_param for key, p in res.get_response().parameters.items()}
        return params["model_version"]

    def close(self) -> None:
        for c in (*self.v2, self.web):
            c.close()


class Mix:
    """The request stream: protocols in turn; a hot user with k=10 (cache hit) with probability hot_share, else a
    random known user with k in 11..60 (cache miss, nearly always). Thread-safe, reproducible from the seed."""

    def __init__(self, hot: list[str], known: list[str], hot_share: float, seed: int = 7):
        self.hot, self.known, self.hot_share = hot, known, hot_share
        self.rng = np.random.default_rng(seed)
        self.lock = threading.Lock()
        self.i = 0

    def next(self) -> tuple[int, str, int]:
        with self.lock:
            i, self.i = self.i, self.i + 1
            if self.rng.random() < self.hot_share:
                return i % 3, self.hot[int(self.rng.integers(len(self.hot)))], 10
            return i % 3, self.known[int(self.rng.integers(len(self.known)))], int(self.rng.integers(11, 61))


class Load:
    """`threads` workers, each with its own Clients. Closed loop (rate None): each sends the next request of the
    mix when its last one returned. Open loop: a dispatcher makes a request due every 1/rate s, a free worker
    sends it, and latency counts from the due time. Records (due, sent, done, protocol, version | None) per
    request, with time relative to t0; errors keep their first messages."""

    def __init__(self, served: Served, mix: Mix, threads: int, rate: float | None = None):
        self.served, self.mix, self.threads, self.rate = served, mix, threads, rate
        self.records: list[tuple[float, float, float, int, str | None]] = []
        self.errors: list[str] = []
        self.n_errors = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.due: queue.Queue = queue.Queue()
        self.t0 = 0.0

    def _worker(self, ready: threading.Barrier) -> None:
        clients = Clients(self.served.http_port, self.served.grpc_port)
        for protocol in range(len(PROTOCOLS)):  # connections open before anything is measured
            clients.call(protocol, self.mix.hot[0], 10)
        mine = []
        ready.wait()
        while True:
            if self.rate is None:
                if self.stop.is_set():
                    break
                due, spec = time.perf_counter(), self.mix.next()
            else:
                item = self.due.get()
                if item is None:
                    break
                due, spec = item
            sent = time.perf_counter()
            try:
                version = clients.call(*spec)
            except Exception as exc:  # any non-2xx answer or transport error
                version = None
                with self.lock:
                    self.n_errors += 1
                    if len(self.errors) < 20:
                        self.errors.append(f"{PROTOCOLS[spec[0]]} {spec[1]} k={spec[2]}: {exc!r}"[:500])
            mine.append((due - self.t0, sent - self.t0, time.perf_counter() - self.t0, spec[0], version))
        clients.close()
        with self.lock:
            self.records.extend(mine)

    def run(self, seconds: float, during=None) -> float:
        """Load for `seconds`; `during(t0)` runs in this thread meanwhile (the soak's events). Returns the time
        the load lasted."""
        ready = threading.Barrier(self.threads + 1)
        workers = [threading.Thread(target=self._worker, args=(ready,), daemon=True) for _ in range(self.threads)]
        for w in workers:
            w.start()
        ready.wait()
        self.t0 = time.perf_counter()
        side = threading.Thread(target=during, args=(self.t0,), daemon=True) if during else None
        if side:
            side.start()
        if self.rate is None:
            self.stop.wait(seconds)
            self.stop.set()
        else:  # the dispatcher: every request due by now is queued, then a short pause
            n = 0
            while (now := time.perf_counter() - self.t0) < seconds:
                for i in range(n, int(now * self.rate) + 1):
                    self.due.put((self.t0 + i / self.rate, self.mix.next()))
                n = max(n, int(now * self.rate) + 1)
                time.sleep(min(0.002, 0.5 / self.rate))
            for _ in workers:
                self.due.put(None)
        for w in workers:
            w.join()
        if side:
            side.join()
        return time.perf_counter() - self.t0


def closed_loop(served: Served, hot: list[str], known: list[str], hot_share: float, threads: int,
                seconds: float) -> dict:
    """Requests/s of `threads` closed-loop clients over `seconds`, the soak's mix (a capacity step)."""
    probe = Load(served, Mix(hot, known, hot_share, seed=threads), threads)
    cpu0 = served.usage()[1]
    secs = probe.run(seconds)
    cpu = served.usage()[1] - cpu0
    lat = np.array([r[2] - r[1] for r in probe.records])
    step = {"threads": threads, "rps": round(len(probe.records) / secs, 1), "errors": probe.n_errors, **pct(lat),
            # the server's CPU per request (its process and children): what the code costs, whatever the load
            "server_cpu_ms_per_req": round(cpu * 1000 / max(1, len(probe.records)), 3)}
    print(f"capacity, {threads} threads: {step}", flush=True)
    return step


#: the serving SLO the alert holds (manifests/base/monitoring/alerts.yaml, RentalmlHighP99Latency: p99 > 250 ms)
SLO_P99_S = 0.25
#: where an open-loop step stops counting as sustained: p99 above KNEE x p50 (the latency curve's knee)
KNEE = 3.0
#: and when its median latency from the due time exceeds NO_BACKLOG x its median service time (a queue builds)
NO_BACKLOG = 1.5


def open_loop(served: Served, hot: list[str], known: list[str], hot_share: float, workers: int, rate: float,
              seconds: float) -> dict:
    """One open-loop capacity step: `rate` requests/s due for `seconds`, the soak's mix and client. Sustained when
    the server kept up with latency still flat: every due request sent by the end, no error, p99 from the due time
    within the SLO (SLO_P99_S) and within KNEE x p50, and p50 within NO_BACKLOG x the median service time. Past
    that knee the extra wait is queueing, not work: at 770 requests/s p50 4.7 ms, p99 21 ms; at 550/s 2.8 and
    7.0 ms (2026-12-03, docs/benchmarks.md "Soak")."""
    probe = Load(served, Mix(hot, known, hot_share, seed=int(rate)), workers, rate)
    cpu0 = served.usage()[1]
    secs = probe.run(seconds)
    cpu = served.usage()[1] - cpu0
    lat = np.array([r[2] - r[0] for r in probe.records])
    service = np.array([r[2] - r[1] for r in probe.records])
    due = int(seconds * rate) + 1
    p, ps = pct(lat), pct(service)
    step = {"rate": round(rate, 1), "rps": round(len(probe.records) / secs, 1), "errors": probe.n_errors, **p,
            "service_p50_ms": ps.get("p50_ms"), "service_p99_ms": ps.get("p99_ms"),
            "server_cpu_ms_per_req": round(cpu * 1000 / max(1, len(probe.records)), 3),
            "sustained": sustained(p, ps, len(probe.records), due, probe.n_errors)}
    print(f"open-loop step, {rate:.0f} req/s: {step}", flush=True)
    return step


def sustained(lat: dict, service: dict, sent: int, due: int, errors: int) -> bool:
    """open_loop's rule over a step's latency from the due time (`lat`) and service time (`service`), pct() dicts.
    The no-backlog term matters: past saturation p50 itself grows and p99 <= 3 x p50 then holds for the wrong
    reason (912/s on 2026-12-03: p50 65 ms, p99 192 ms, service p50 12.5 ms)."""
    return bool(lat.get("n") and lat["p99_ms"] <= min(SLO_P99_S * 1000, KNEE * lat["p50_ms"])
                and lat["p50_ms"] <= NO_BACKLOG * service["p50_ms"] and sent >= 0.99 * due and errors == 0)


def open_loop_capacity(served: Served, hot: list[str], known: list[str], hot_share: float, workers: int,
                       ceiling: float, seconds: float, step: float = 0.1, floor: float = 0.3) -> dict:
    """The highest open-loop rate the server sustains (open_loop's rule), searched down from the closed-loop
    ceiling in steps of `step` x ceiling. A closed loop never queues (a slow answer just delays the next send),
    so its requests/s is an upper bound: offered at a constant rate, a rate near it builds a backlog that a
    10-minute soak never drains (the 2026-12-02 quiet run: 80 % of a closed-loop 799/s, p99 2.7 s)."""
    steps = []
    for i in range(int(round((1.0 - floor) / step)) + 1):
        steps.append(open_loop(served, hot, known, hot_share, workers, ceiling * round(1.0 - i * step, 6), seconds))
        if steps[-1]["sustained"]:
            break
    found = steps[-1]["rate"] if steps[-1]["sustained"] else None  # the search stops at the first sustained step
    return {"steps": steps, "rps": found, "slo_p99_ms": SLO_P99_S * 1000, "knee": KNEE}


class ClientGC:
    """The load generator's own garbage collections (gc.callbacks): a collection stops every client thread, and
    the requests due meanwhile count it as latency, though the server had nothing to do with it (wrk2, in C, has
    none). The client freezes what it built before the load (gc.freeze) so full collections do not walk it, and
    the pauses that are left are recorded beside the latencies."""

    def __init__(self):
        self.pauses: list[tuple[int, float]] = []
        self._t = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._t))

    def __enter__(self) -> ClientGC:
        gc.collect()
        gc.freeze()
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)

    def summary(self) -> dict:
        ms = np.array([d for _, d in self.pauses]) * 1000
        full = [d for g, d in self.pauses if g == 2]
        return {"collections": len(ms), "full": len(full), "total_ms": round(float(ms.sum()), 1) if len(ms) else 0.0,
                "max_ms": round(float(ms.max()), 2) if len(ms) else 0.0,
                "full_max_ms": round(max(full) * 1000, 2) if full else 0.0}


# ---- what happens during the soak ------------------------------------------------------------------------------
class Sampler(threading.Thread):
    """Every `every` s: RSS, the server's metric samples, Redis INFO; `t` relative to the load's t0."""

    def __init__(self, served: Served, redis_url: str, every: float):
        super().__init__(daemon=True)
        import redis

        self.served, self.every = served, every
        self.redis = redis.Redis.from_url(redis_url)
        self.samples: list[dict] = []
        self.t0 = time.perf_counter()
        self.halt = threading.Event()

    def sample(self) -> dict:
        info = self.redis.info("stats")
        rss, cpu = self.served.usage()
        s = {"t": round(time.perf_counter() - self.t0, 2), "rss_mb": round(rss / 2**20, 1), "cpu_s": round(cpu, 2),
             "metrics": self.served.metrics(), "redis_hits": info["keyspace_hits"],
             "redis_misses": info["keyspace_misses"], "redis_keys": self.redis.dbsize(),
             "loadavg_1m": round(os.getloadavg()[0], 2)}
        self.samples.append(s)
        return s

    def run(self) -> None:
        while not self.halt.wait(self.every):
            self.sample()


def reload(served: Served, bundle: Path, redis_url: str, hot: list[str]) -> dict:
    """POST /admin/reload to `bundle`; then how many hot users already have a row of the new version (k=10) in the
    cache, read as the reload returns: the server pre-warms them before the swap (serve.prewarm_rows)."""
    import redis

    from rentalml.cache import cache_key

    t = time.perf_counter()
    r = served.http.post("/admin/reload", json={"champion": str(bundle)}, timeout=120)
    r.raise_for_status()
    body, seconds = r.json(), round(time.perf_counter() - t, 3)
    version = body["after"]["champion"]["model_version"]
    pipe = redis.Redis.from_url(redis_url).pipeline(transaction=False)
    for u in hot:
        pipe.exists(cache_key(version, u, 10))
    return {"seconds": seconds, "model_version": version, "prewarmed_rows": body.get("prewarmed_rows"),
            "hot_users_cached_new_version": int(sum(pipe.execute()))}


def storm(served: Served, redis_url: str, users: list[str], hot: list[str], properties: list[str],
          calls: int) -> dict:
    """Every known user and the top properties invalidated at once, in `calls` concurrent admin calls."""
    import redis

    from rentalml.cache import user_index_key

    r = redis.Redis.from_url(redis_url)

    def cached_hot() -> int:  # hot users that have a cached row now (their reverse-index set exists)
        pipe = r.pipeline(transaction=False)
        for u in hot:
            pipe.exists(user_index_key(u))
        return int(sum(pipe.execute()))

    before_hot, before_keys = cached_hot(), r.dbsize()
    chunks = [{"user_ids": list(c)} for c in np.array_split(np.array(users, dtype=object), calls)]
    chunks[0]["property_ids"] = properties

    def call(body: dict) -> int:
        with httpx.Client(base_url=served.url, timeout=120) as c:
            resp = c.post("/admin/invalidate", json=body)
            resp.raise_for_status()
            return resp.json()["invalidated"]

    t = time.perf_counter()
    with ThreadPoolExecutor(calls) as pool:
        invalidated = sum(pool.map(call, chunks))
    seconds = time.perf_counter() - t
    return {"calls": calls, "users": len(users), "properties": len(properties), "invalidated_rows": invalidated,
            "seconds": round(seconds, 3), "hot_users_cached_before": before_hot,
            "hot_users_cached_after": cached_hot(), "redis_keys_before": before_keys,
            "redis_keys_after": r.dbsize()}


# ---- figures -----------------------------------------------------------------------------------------------------
def pct(lat_s: np.ndarray) -> dict:
    if lat_s.size == 0:
        return {"n": 0}
    p50, p95, p99, p999 = np.percentile(lat_s * 1000, [50, 95, 99, 99.9])
    return {"n": int(lat_s.size), "p50_ms": round(float(p50), 2), "p95_ms": round(float(p95), 2),
            "p99_ms": round(float(p99), 2), "p99.9_ms": round(float(p999), 2),
            "max_ms": round(float(lat_s.max() * 1000), 2)}


def hit_ratio(a: dict, b: dict) -> dict:
    """Cache hit ratio between two samples: from the server's metrics (ml_cache_hit_rate x successful requests,
    per variant: each request asks for one user) and from Redis' keyspace counters (one MGET key per lookup)."""
    def hits_and_lookups(s: dict) -> tuple[float, float]:
        m, hits, lookups = s["metrics"], 0.0, 0.0
        for key, v in m.items():
            name, *labels = key.split("|")
            if name == "ml_inference_requests_total" and "status=success" in labels:
                variant = next(x for x in labels if x.startswith("variant="))
                lookups += v
                hits += v * m.get(f"ml_cache_hit_rate|{variant}", 0.0)
        return hits, lookups

    (h0, n0), (h1, n1) = hits_and_lookups(a), hits_and_lookups(b)
    rh, rm = b["redis_hits"] - a["redis_hits"], b["redis_misses"] - a["redis_misses"]
    return {"server": round((h1 - h0) / (n1 - n0), 3) if n1 > n0 else None,
            "redis": round(rh / (rh + rm), 3) if rh + rm else None}


def summarize(load: Load, samples: list[dict], events: dict, duration: float, warmup: float, window: float) -> dict:
    rec = sorted(load.records)
    due = np.array([r[0] for r in rec])
    lat = np.array([r[2] - r[0] for r in rec])  # from the due time
    service = np.array([r[2] - r[1] for r in rec])  # from the send
    done_at = np.array([r[2] for r in rec])
    proto = np.array([r[3] for r in rec])
    ok = np.array([r[4] is not None for r in rec])
    out = {"requests": len(rec), "errors": load.n_errors, "first_errors": load.errors,
           "achieved_rps": round(len(rec) / duration, 1), "latency": pct(lat[ok]), "service_time": pct(service[ok]),
           # due -> sent: the wait for a free client worker (a backlog when the server falls behind)
           "client_wait": pct(np.array([r[1] - r[0] for r in rec])),
           "protocols": {p: {**pct(lat[ok & (proto == i)]), "errors": int((~ok & (proto == i)).sum())}
                         for i, p in enumerate(PROTOCOLS)}}
    # the reloads: which versions answered, and none but the new one for a request sent after one returned
    # (until the next reload began)
    out["versions"] = {p: sorted({r[4] for r in rec if r[3] == i and r[4] is not None})
                       for i, p in enumerate(PROTOCOLS)}
    reloads = [e for e in events if e["name"] == "reload" and "model_version" in e]
    out["old_version_after_reload"] = sum(
        1 for e, nxt in zip(reloads, [*reloads[1:], None][:len(reloads)], strict=True) for r in rec
        if e["done_t"] < r[1] < (nxt["t"] if nxt else float("inf")) and r[4] not in (None, e["model_version"]))
    # windows
    wins = []
    for a in np.arange(0, duration, window):
        sel = (due >= a) & (due < a + window)
        s0 = [s for s in samples if s["t"] <= a + 0.25]  # the first sample is taken as the load starts
        s1 = [s for s in samples if s["t"] <= a + window + 1e-6]
        marks = [e["name"] for e in events if a <= e["t"] < a + window]
        wins.append({"t": float(a), **pct(lat[sel & ok]), "errors": int((sel & ~ok).sum()),
                     "service_p99_ms": pct(service[sel & ok]).get("p99_ms"),
                     "rps": round(float(sel.sum()) / window, 1),
                     "hit_ratio": hit_ratio(s0[-1], s1[-1]) if s0 and s1 and s1[-1] is not s0[-1] else None,
                     "rss_mb": s1[-1]["rss_mb"] if s1 else None, "events": marks,
                     # the server's share of one CPU, and the machine's load, over the window
                     "server_cpu": round((s1[-1]["cpu_s"] - s0[-1]["cpu_s"]) / (s1[-1]["t"] - s0[-1]["t"]), 2)
                     if s0 and s1 and s1[-1]["t"] > s0[-1]["t"] else None,
                     "loadavg_1m": s1[-1]["loadavg_1m"] if s1 else None})
        # the server's CPU per request answered in the window (what the code costs, whatever the machine's load)
        done = int(((done_at >= s0[-1]["t"]) & (done_at < s1[-1]["t"])).sum()) if s0 and s1 else 0
        wins[-1]["server_cpu_ms_per_req"] = (round((s1[-1]["cpu_s"] - s0[-1]["cpu_s"]) * 1000 / done, 3)
                                            if done and s1[-1]["t"] > s0[-1]["t"] else None)
    out["windows"] = wins
    after = [s for s in samples if s["t"] >= warmup]
    if after:
        base, last = after[0], samples[-1]
        out["rss"] = {"after_warmup_mb": base["rss_mb"], "at_t": base["t"], "end_mb": last["rss_mb"],
                      "max_mb": max(s["rss_mb"] for s in after), "start_mb": samples[0]["rss_mb"],
                      "growth": round(last["rss_mb"] / base["rss_mb"] - 1, 4)}
        # between the events (from warm-up, or `settle` s after an event, to the next one): does memory creep
        # while the server only answers requests?
        settle, edges = 2 * window, [(warmup, "warm-up")]
        for e in events:
            edges += [(e["t"], e["name"]), (e["done_t"] + settle, e["name"])]
        edges.append((duration, "end"))
        segs = []
        for (a, after), (b, before) in zip(edges[::2], edges[1::2], strict=True):
            inside = [x for x in samples if a <= x["t"] <= b]
            if len(inside) >= 2:
                segs.append({"from_t": inside[0]["t"], "to_t": inside[-1]["t"], "after": after, "before": before,
                             "from_mb": inside[0]["rss_mb"], "to_mb": inside[-1]["rss_mb"],
                             "mb_per_min": round((inside[-1]["rss_mb"] - inside[0]["rss_mb"]) * 60
                                                 / (inside[-1]["t"] - inside[0]["t"]), 3)})
        out["rss"]["between_events"] = segs
    if samples:
        out["hit_ratio_overall"] = hit_ratio(samples[0], samples[-1])
        out["server_hit_rate_gauge_at_end"] = {k.split("|", 1)[1]: v for k, v in samples[-1]["metrics"].items()
                                               if k.startswith("ml_cache_hit_rate|")}
    lat_ok = out["latency"]
    out["bars"] = {"zero_errors": load.n_errors == 0,
                   "rss_growth_le_10pct": bool(out.get("rss") and out["rss"]["growth"] <= 0.10),
                   "p99_le_3x_p50": bool(lat_ok.get("n") and lat_ok["p99_ms"] <= 3 * lat_ok["p50_ms"]),
                   # not a bar of the issue: a backlog (requests waiting > 1 s for a free client worker) makes the
                   # ratio above meaningless, e.g. p50 6.8 s and p99 10.8 s pass it
                   "kept_up": bool(out["client_wait"].get("n") and out["client_wait"]["p99_ms"] < 1000)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of open-loop load")
    ap.add_argument("--load", type=float, default=0.8, help="share of the measured capacity")
    ap.add_argument("--rate", type=float, help="offer this many requests/s instead (side-by-side runs of two "
                    "server versions at one rate)")
    ap.add_argument("--workers", type=int, default=16, help="client threads of the open loop")
    ap.add_argument("--ramp", default="2,4,8", help="client threads of the capacity steps, comma-separated")
    ap.add_argument("--capacity-s", type=float, default=10.0, help="seconds of each capacity step")
    ap.add_argument("--capacity", choices=("open", "closed"), default="open",
                    help="open (default): the soak's rate is --load x the highest open-loop rate sustained within "
                         "the SLO, searched down from the closed-loop ramp's best; closed: --load x that best")
    ap.add_argument("--open-step-s", type=float, default=20.0, help="seconds of each open-loop capacity step")
    ap.add_argument("--no-miss-capacity", dest="miss_capacity", action="store_false",
                    help="skip the misses-only capacity step (what a storm leaves)")
    ap.add_argument("--warmup-s", type=float, default=None, help="RSS baseline after this (default 10 %%)")
    ap.add_argument("--sample-s", type=float, default=5.0, help="RSS / metrics sampling period")
    ap.add_argument("--window-s", type=float, default=None, help="latency table window (default duration/20)")
    ap.add_argument("--hot-users", type=int, default=200)
    ap.add_argument("--hot-share", type=float, default=0.7)
    ap.add_argument("--timeline", default="reload@0.4,storm@0.6",
                    help="events as name@share-of-duration, comma-separated (names: reload, storm)")
    ap.add_argument("--storm-calls", type=int, default=4)
    ap.add_argument("--storm-properties", type=int, default=200)
    ap.add_argument("--users", type=int, default=5_000)
    ap.add_argument("--properties", type=int, default=10_000)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--bundle", type=Path, help="version-1 bundle (with --reload-bundle) instead of training")
    ap.add_argument("--reload-bundle", type=Path, help="the bundle the hot reload switches to")
    ap.add_argument("--redis-url", help="a running Redis (default: one started here)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "soak.json")
    a = ap.parse_args(argv)
    if (a.bundle is None) != (a.reload_bundle is None):
        ap.error("--bundle and --reload-bundle go together")
    timeline_spec = sorted((float(at), name) for name, at in (x.strip().split("@") for x in a.timeline.split(",")
                                                               if x.strip()))
    if any(name not in ("reload", "storm") for _, name in timeline_spec):
        ap.error("--timeline: events are reload and storm")
    warmup = a.warmup_s if a.warmup_s is not None else a.duration / 10
    window = a.window_s or a.duration / 20

    from rentalml.services import start_redis

    tmp = Path(tempfile.mkdtemp(prefix="rentalml-soak-"))
    if a.bundle:
        v1, v2, data = a.bundle, a.reload_bundle, {"bundle": str(a.bundle), "reload_bundle": str(a.reload_bundle)}
    else:
        print("building bundles ...", flush=True)
        v1, v2, data = build_bundles(tmp, a.users, a.properties, a.events, a.epochs)
    users_df = pd.read_parquet(v1 / "users.parquet")
    known = users_df[users_df["history"].map(len) > 0]["user_id"].astype(str).tolist()
    hot = list(np.random.default_rng(3).choice(known, size=min(a.hot_users, len(known)), replace=False))
    props = pd.read_parquet(v1 / "properties.parquet").set_index("index")["property_id"].astype(str)
    pop = pd.read_parquet(v1 / "popularity.parquet")
    top = props.loc[pop[pop["city"] == "*"].sort_values("rank")["index"].head(a.storm_properties)].tolist()
    redis_svc = None if a.redis_url else start_redis()
    redis_url = a.redis_url or redis_svc.url
    result = {"config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                         "warmup_s": warmup, "window_s": window, "known_users": len(known), "cache": "redis",
                         "client": "same host, loopback"},
              "data": data, "env": {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()}}
    served = Served(v1, tmp, redis_url)
    rc = 1
    try:
        served.wait_ready()
        warm = Clients(served.http_port, served.grpc_port)
        for i, u in enumerate(hot * 3):  # every hot user cached, every protocol's connection warm
            warm.call(i % 3, u, 10)
        warm.close()
        # capacity: closed loop, same mix
        steps = [closed_loop(served, hot, known, a.hot_share, int(x), a.capacity_s)
                 for x in a.ramp.split(",") if x.strip()]
        closed = max(s["rps"] for s in steps)
        result["capacity"] = {"steps": steps, "closed_rps": closed, "mode": a.capacity}
        capacity = closed
        if a.capacity == "open" and not a.rate:
            result["capacity"]["open"] = found = open_loop_capacity(served, hot, known, a.hot_share, a.workers,
                                                                    closed, a.open_step_s)
            if found["rps"] is None:
                raise SystemExit(f"no open-loop rate down to 30 % of {closed:.0f} req/s was sustained (open_loop's "
                                 f"rule): {found['steps']}")
            capacity = found["rps"]
        rate = a.rate or a.load * capacity
        result["capacity"].update({"rps": capacity, "soak_rate": round(rate, 1)})
        if a.miss_capacity:  # what a storm leaves: every request a miss (hot_share 0), at the best thread count
            best = max(steps, key=lambda s: s["rps"])["threads"]
            result["capacity"]["misses_only"] = closed_loop(served, hot, known, 0.0, best, a.capacity_s)
        print(f"soak: {a.duration:.0f} s at {rate:.0f} requests/s ({rate / capacity:.0%} of {capacity:.0f})",
              flush=True)

        sampler = Sampler(served, redis_url, a.sample_s)
        events: list[dict] = []

        def timeline(t0: float) -> None:
            sampler.t0 = t0
            sampler.sample()
            sampler.start()
            bundles = [v2, v1]
            for at, name in timeline_spec:
                delay = t0 + at * a.duration - time.perf_counter()
                if delay > 0:
                    sampler.halt.wait(delay)  # a clock for the timeline, not a wait for a condition
                t = time.perf_counter() - t0
                try:
                    e = reload(served, bundles[sum(x["name"] == "reload" for x in events) % 2], redis_url, hot) \
                        if name == "reload" else storm(served, redis_url, known, hot, top, a.storm_calls)
                except Exception as exc:
                    e = {"failed": repr(exc)}
                events.append({"name": name, "t": round(t, 2), "done_t": round(time.perf_counter() - t0, 3), **e})
                print(f"{name} at {t:.1f} s: {events[-1]}", flush=True)

        soak = Load(served, Mix(hot, known, a.hot_share, seed=11), a.workers, rate)
        with ClientGC() as client_gc:
            lasted = soak.run(a.duration, during=timeline)
        sampler.halt.set()
        sampler.join()
        sampler.sample()
        # the same closed loop again at the best thread count: did the machine give the server what it had at
        # the start? (on a shared machine the offered rate can exceed what the server gets later)
        best = max(steps, key=lambda s: s["rps"])["threads"]
        result["capacity"]["after"] = closed_loop(served, hot, known, a.hot_share, best, a.capacity_s)
        result["events"] = events
        result["soak"] = summarize(soak, sampler.samples, events, a.duration, warmup, window)
        result["soak"]["seconds"] = round(lasted, 1)
        result["soak"]["client_gc"] = client_gc.summary()
        result["samples"] = sampler.samples
        result["model_version_at_end"] = served.version()
        rc = 0 if soak.n_errors == 0 and all("failed" not in e for e in events) else 1
    finally:
        result["server_exit_code"] = served.stop()
        if redis_svc:
            redis_svc.stop()
    result["env"]["loadavg_at_end"] = os.getloadavg()
    if rc == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"server log and bundles kept in {tmp}", file=sys.stderr)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"\nwrote {a.out}")
    return rc


def print_table(r: dict) -> None:
    s = r["soak"]
    cap = r["capacity"]
    how = (f"open loop, p99 within {cap['open']['slo_p99_ms']:.0f} ms and {cap['open']['knee']:g} x p50; closed "
           f"loop {cap['closed_rps']:.0f}"
           if "open" in cap else "closed loop")
    print(f"\ncapacity {cap['rps']:.0f} req/s ({how}; "
          f"{r['capacity'].get('after', {}).get('rps', 0):.0f} after the soak, "
          f"{r['capacity'].get('misses_only', {}).get('rps', 0):.0f} with misses only), soak {s['seconds']:.0f} s at "
          f"{r['capacity']['soak_rate']:.0f} req/s: {s['requests']} requests, {s['errors']} errors, "
          f"load average {r['env']['loadavg_at_start'][0]:.2f} -> {r['env']['loadavg_at_end'][0]:.2f}\n")
    print("| window s | req/s | p50 ms | p99 ms | service p99 ms | errors | hit ratio (server / redis) | RSS MB | "
          "server CPU | CPU ms/req | load 1m | event |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for w in s["windows"]:
        h = w["hit_ratio"] or {}
        print(f"| {w['t']:.0f} | {w['rps']:.0f} | {w.get('p50_ms', '-')} | {w.get('p99_ms', '-')} | "
              f"{w.get('service_p99_ms', '-')} | {w['errors']} | {h.get('server')} / {h.get('redis')} | "
              f"{w['rss_mb']} | {w['server_cpu']} | {w.get('server_cpu_ms_per_req')} | {w['loadavg_1m']} | "
              f"{', '.join(w['events'])} |")
    print("\n| protocol | requests | p50 ms | p99 ms | errors |\n|---|---:|---:|---:|---:|")
    for p, v in s["protocols"].items():
        print(f"| {p} | {v['n']} | {v.get('p50_ms')} | {v.get('p99_ms')} | {v['errors']} |")
    lat, rss = s["latency"], s.get("rss", {})
    print(f"\noverall p50 {lat.get('p50_ms')} ms, p99 {lat.get('p99_ms')} ms (service time p50 "
          f"{s['service_time'].get('p50_ms')}, p99 {s['service_time'].get('p99_ms')}; wait for a client worker p99 "
          f"{s['client_wait'].get('p99_ms')}); RSS "
          f"{rss.get('after_warmup_mb')} MB after warm-up -> {rss.get('end_mb')} MB at the end "
          f"({rss.get('growth', 0):+.1%}); hit ratio {s.get('hit_ratio_overall')}; bars {s['bars']}")
    if "client_gc" in s:
        print(f"the client's own collections during the soak: {s['client_gc']}")
    for seg in rss.get("between_events", []):
        print(f"RSS after {seg['after']} ({seg['from_t']:.0f} s) to {seg['before']} ({seg['to_t']:.0f} s): "
              f"{seg['from_mb']} -> {seg['to_mb']} MB ({seg['mb_per_min']:+.2f} MB/min)")


if __name__ == "__main__":
    sys.exit(main())
