"""Load generator for a running `rentalml serve` (used by `rentalml loadtest` and benchmarks/serving.py).

Protocols: `friendly` (POST /predict, httpx), `rest` (v2 over HTTP, tritonclient.http, binary tensors), `grpc`
(v2 over gRPC, tritonclient.grpc). Loopback only: the target host must resolve to 127.0.0.0/8 or ::1 — this is a
tool for measuring a local server, not for loading someone else's.

Does not import kserve (tritonclient.grpc and kserve cannot share a process).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urlparse

import numpy as np

MODEL = "rental-recommender"
PROTOCOLS = ("friendly", "rest", "grpc")


def loopback_target(url: str) -> tuple[str, int]:
    """(host, port) of url when it is a loopback address; ValueError otherwise."""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise ValueError(f"url must name a host and a port, got {url!r}")
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {host!r}: {exc}") from None
    if not addrs or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
        raise ValueError(f"refusing to load-test {host} ({', '.join(sorted(addrs))}): loopback addresses only")
    return host, port


def stats(lat_s: list[float]) -> dict:
    if not lat_s:
        return {"n": 0}
    a = np.asarray(lat_s) * 1000
    return {"n": int(a.size), "p50_ms": round(float(np.percentile(a, 50)), 3),
            "p95_ms": round(float(np.percentile(a, 95)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3),
            "mean_ms": round(float(a.mean()), 3)}


def sequential(call: Callable[[str], None], users: list[str], n: int, warmup: int = 50) -> dict:
    """n requests one after another (concurrency 1) after `warmup` unmeasured ones."""
    for u in users[:warmup]:
        call(u)
    lat = []
    for i in range(n):
        u = users[(warmup + i) % len(users)]
        t0 = time.perf_counter()
        call(u)
        lat.append(time.perf_counter() - t0)
    return stats(lat)


def concurrent(make_call: Callable[[], Callable[[str], None]], users: list[str], threads: int, total: int,
               max_seconds: float) -> dict:
    """`threads` workers, each with its own client (make_call() → call), share `total` requests / max_seconds."""
    lock = threading.Lock()
    counter = {"next": 0}
    lat: list[float] = []
    errors: list[str] = []
    start = threading.Barrier(threads + 1)
    clock = {"deadline": float("inf")}

    def worker():
        # the client is built and warmed inside its own thread: tritonclient.http runs on gevent greenlets,
        # which cannot be used from another thread than the one that created them
        mine, call = [], None
        try:
            call = make_call()
            call(users[0])
        except Exception as exc:
            errors.append(repr(exc))
            call = None
        start.wait()
        while call is not None and time.perf_counter() < clock["deadline"]:
            with lock:
                i = counter["next"]
                if i >= total:
                    break
                counter["next"] += 1
            t0 = time.perf_counter()
            try:
                call(users[i % len(users)])
            except Exception as exc:  # recorded, not fatal
                errors.append(repr(exc))
                continue
            mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    clock["deadline"] = t0 + max_seconds
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    out = {"threads": threads, "requests": len(lat), "errors": len(errors), "seconds": round(wall, 2),
           "rps": round(len(lat) / wall, 1) if wall > 0 else 0.0,
           **{f"load_{k}": v for k, v in stats(lat).items() if k != "n"}}
    if errors:
        out["first_error"] = errors[0]
    return out


# ---- clients -------------------------------------------------------------------------------------------
def _v2(client_module: str):
    """A v2 client factory over tritonclient.http or tritonclient.grpc (same API, different transport)."""

    def factory(host: str, port: int, k: int, token: str | None = None):
        import importlib

        tc = importlib.import_module(client_module)
        c = tc.InferenceServerClient(f"{host}:{port}")
        kin = tc.InferInput("k", [1], "INT32")
        kin.set_data_from_numpy(np.array([k], dtype=np.int32))
        headers = {"authorization": f"Bearer {token}"} if token else None

        def call(user: str):
            inp = tc.InferInput("user_id", [1], "BYTES")
            inp.set_data_from_numpy(np.array([user], dtype=object))
            r = c.infer(MODEL, [inp, kin], headers=headers)
            assert r.as_numpy("property_id").shape == (1, k)

        return call

    return factory


http_v2 = _v2("tritonclient.http")
grpc_v2 = _v2("tritonclient.grpc")


def friendly(host: str, port: int, k: int, token: str | None = None):
    import httpx

    headers = {"authorization": f"Bearer {token}"} if token else {}
    c = httpx.Client(base_url=f"http://{host}:{port}", timeout=30, headers=headers)

    def call(user: str):
        r = c.post("/predict", json={"user_id": user, "num_recommendations": k})
        r.raise_for_status()
        assert len(r.json()["recommendations"]) <= k

    return call


FACTORIES = {"friendly": friendly, "rest": http_v2, "grpc": grpc_v2}


def run(url: str, protocol: str, users: list[str], *, requests: int = 1000, duration_s: float = 10.0,
        concurrency: int = 4, k: int = 10, token: str | None = None) -> dict:
    """Load-test one protocol of the server at `url` (loopback; for grpc the url's port is the gRPC port)."""
    if protocol not in FACTORIES:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if requests < 1 or duration_s <= 0 or concurrency < 1:
        raise ValueError("requests, duration and concurrency must be positive")
    if not users:
        raise ValueError("no user ids to request")
    host, port = loopback_target(url)
    factory = FACTORIES[protocol]
    res = concurrent(lambda: factory(host, port, k, token), users, concurrency, requests, duration_s)
    return {"url": url, "protocol": protocol, "k": k, "concurrency": concurrency, "requested": requests,
            "duration_limit_s": duration_s, "requests": res["requests"], "errors": res["errors"],
            "seconds": res["seconds"], "rps": res["rps"], "p50_ms": res.get("load_p50_ms"),
            "p95_ms": res.get("load_p95_ms"), "p99_ms": res.get("load_p99_ms"),
            **({"first_error": res["first_error"]} if "first_error" in res else {})}
