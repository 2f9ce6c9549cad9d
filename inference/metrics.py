"""Prometheus metrics of the inference service (names fixed by contracts.md).

They live in prometheus_client's default REGISTRY, which is exactly what KServe's own `/metrics` route on the
HTTP port exposes, so they appear next to KServe's `request_*_seconds` histograms with no extra endpoint.

With `--workers N > 1` every REST worker is its own process with its own registry: a scrape sees the worker
that answered it (aggregate in Prometheus with `sum without(instance, pod)` as usual for multi-process pods).
"""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram

# protocol label values
REST = "rest"  # KServe v2 / Open Inference Protocol over HTTP
GRPC = "grpc"  # KServe v2 / Open Inference Protocol over gRPC
JSON = "json"  # friendly POST /predict

# status label values
SUCCESS = "success"
FAILED = "failed"  # server-side error (5xx / INTERNAL)
REJECTED = "rejected"  # malformed request (4xx / INVALID_ARGUMENT)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

INFERENCE_DURATION = Histogram(
    "ml_inference_duration_seconds",
    "Time to validate a request and compute its recommendations (inside the model server).",
    ["model", "variant", "protocol"],
    buckets=LATENCY_BUCKETS,
)
INFERENCE_REQUESTS = Counter(
    "ml_inference_requests_total",
    "Inference requests by outcome: success, failed (server error), rejected (malformed request).",
    ["model", "variant", "status"],
)
CACHE_HIT_RATE = Gauge(
    "ml_cache_hit_rate",
    "Share of per-user recommendation lookups answered from the cache (in-process or Redis) since this process "
    "started, per variant.",
    ["model", "variant"],
)
MODEL_LOAD_SECONDS = Gauge(
    "ml_model_load_seconds",
    "Seconds the serving process took to load the model bundle(s) and warm the ONNX Runtime session(s), last "
    "(re)load.",
    ["model", "variant"],
)

METRIC_NAMES = ("ml_inference_duration_seconds", "ml_inference_requests_total", "ml_cache_hit_rate",
                "ml_model_load_seconds")
MODEL_RELOADS = Counter("ml_model_reloads_total", "Hot reloads of the served model version(s).", ["model"])
TIMEOUTS = Counter("ml_inference_timeouts_total", "Requests that ran past serve.request_timeout_s.", ["model"])
REGISTRY_UP = Gauge("ml_registry_up", "1 when the last call to the MLflow registry (load, reload, watcher) reached "
                    "it, 0 when it was unreachable (registry mode only).", ["model"])
MODEL_FROM_CACHE = Gauge("ml_model_from_cache", "1 while the arm serves a bundle from the local bundle cache because "
                         "the registry was unreachable when it loaded, else 0.", ["model", "variant"])


@functools.lru_cache(maxsize=256)
def requests(model: str, variant: str, status: str):
    """INFERENCE_REQUESTS' child for these labels (labels() costs a few µs per call on the request path)."""
    return INFERENCE_REQUESTS.labels(model, variant, status)


@functools.lru_cache(maxsize=256)
def duration(model: str, variant: str, protocol: str):
    return INFERENCE_DURATION.labels(model, variant, protocol)
