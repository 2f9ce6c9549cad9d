"""KServe model `rental-recommender`: the Open Inference Protocol (v2) face of a model bundle.

A thin layer: every recommendation comes from `rentalml.export.bundle.Bundle.recommend` (ONNX Runtime scorer
plus the bundle's cold-start fallback). This module only validates v2 requests, shapes v2 responses, keeps a
small per-user LRU cache and records the Prometheus metrics.

Interface (contracts.md):
  inputs   user_id      BYTES [N]     marketplace user ids ("u_123"); unknown users get cold-start results
           k            INT32 [1]     optional, 1..settings.serve.max_k (default settings.serve.default_k)
  outputs  property_id  BYTES [N,k]   best first
           score        FP32  [N,k]   non-increasing along each row
  response parameters: model_version, variant, model_type, sources (comma-separated "model"/"cold_start")
  REST response headers: x-model-version, x-variant

When a cold-start user asks for more items than the fallback list holds, the row is padded with property_id ""
and score -FLT_MAX (finite, so JSON stays valid, and still non-increasing).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import numpy as np

from rentalml.config import get_settings
from rentalml.export.bundle import Bundle, Recommendations

from . import MODEL_NAME
from . import metrics as m

# Quirk: importing kserve runs argparse.parse_known_args() over sys.argv (kserve/model_server.py), so a caller's
# own flags (e.g. `--workers 3`) would silently become ModelServer defaults. Import it with a bare argv.
_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    import kserve
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
finally:
    sys.argv = _argv

INPUT_USER = "user_id"
INPUT_K = "k"
OUTPUT_IDS = "property_id"
OUTPUT_SCORES = "score"
OUTPUTS = (OUTPUT_IDS, OUTPUT_SCORES)
INT_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
PAD_SCORE = np.float32(np.finfo(np.float32).min)


class _LRUCache:
    """(user_id, k) → one recommendation row; bounded size, entries expire after ttl seconds. Thread-safe."""

    def __init__(self, size: int, ttl_s: float):
        self.size, self.ttl_s = int(size), float(ttl_s)
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.size > 0 and self.ttl_s > 0

    def get(self, key):
        if not self.enabled:
            return None
        now = time.monotonic()
        with self._lock:
            entry = self._data.get(key)
            if entry is not None and entry[0] > now:
                self._data.move_to_end(key)
                self.hits += 1
                return entry[1]
            if entry is not None:
                del self._data[key]
            self.misses += 1
            return None

    def put(self, key, value) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._data[key] = (time.monotonic() + self.ttl_s, value)
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class RecommenderModel(kserve.Model):
    """`rental-recommender` served by KServe's ModelServer (REST + gRPC v2). Picklable for `--workers N`."""

    def __init__(self, bundle: str | Path | Bundle, name: str = MODEL_NAME, variant: str = "champion",
                 max_k: int | None = None, default_k: int | None = None, cache_size: int | None = None,
                 cache_ttl_s: float | None = None):
        super().__init__(name, return_response_headers=True)
        serve = get_settings().serve
        self.bundle_path = Path(bundle.path if isinstance(bundle, Bundle) else bundle)
        self.bundle: Bundle | None = bundle if isinstance(bundle, Bundle) else None
        self.variant = variant
        self.max_k = int(max_k if max_k is not None else serve.max_k)
        self.default_k = int(default_k if default_k is not None else serve.default_k)
        self._cache_size = int(cache_size if cache_size is not None else serve.cache_size)
        self._cache_ttl_s = float(cache_ttl_s if cache_ttl_s is not None else serve.cache_ttl_s)
        self.cache = _LRUCache(self._cache_size, self._cache_ttl_s)
        self.load_seconds = 0.0
        # set by the server when REST runs in spawned worker processes: they rebuild the friendly routes
        self.install_routes_on_unpickle = False

    # ---- lifecycle -------------------------------------------------------------------------------------
    def load(self) -> bool:
        t0 = time.perf_counter()
        if self.bundle is None:
            self.bundle = Bundle(self.bundle_path)
        # build the ONNX Runtime session and run the graph (and the cold-start path) once, so that the first
        # request pays nothing extra
        k = min(self.default_k, self.bundle.n_items)
        self.bundle.score_histories([np.zeros(1, dtype=np.int64)], k)
        self.bundle.recommend([""], k)
        self.load_seconds = self.bundle.load_seconds + (time.perf_counter() - t0)
        m.MODEL_LOAD_SECONDS.labels(self.name, self.variant).set(self.load_seconds)
        m.CACHE_HIT_RATE.labels(self.name, self.variant).set(0.0)
        self.ready = True
        return self.ready

    def __getstate__(self):
        state = dict(self.__dict__)
        state["cache"] = None  # locks don't pickle; a fresh process starts with an empty cache
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.cache = _LRUCache(self._cache_size, self._cache_ttl_s)
        if self.ready and self.bundle is not None:
            m.MODEL_LOAD_SECONDS.labels(self.name, self.variant).set(self.load_seconds)
            m.CACHE_HIT_RATE.labels(self.name, self.variant).set(0.0)
        if self.install_routes_on_unpickle:  # inside a spawned REST worker (see server.serve)
            from .server import worker_init

            worker_init(self)

    # ---- metadata --------------------------------------------------------------------------------------
    @property
    def model_version(self) -> str:
        return self.bundle.model_version if self.bundle is not None else ""

    @property
    def model_type(self) -> str:
        return self.bundle.model_type if self.bundle is not None else ""

    def get_input_types(self) -> list[dict]:
        return [{"name": INPUT_USER, "datatype": "BYTES", "shape": [-1]},
                {"name": INPUT_K, "datatype": "INT32", "shape": [1]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": OUTPUT_IDS, "datatype": "BYTES", "shape": [-1, -1]},
                {"name": OUTPUT_SCORES, "datatype": "FP32", "shape": [-1, -1]}]

    # ---- core call (shared by v2 and the friendly API) -------------------------------------------------
    def k_problem(self, k) -> str | None:
        """Why k is not an acceptable number of recommendations (None when it is)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            return f"must be an integer between 1 and {self.max_k}, got {k!r}"
        if not 1 <= int(k) <= self.max_k:
            return f"must be between 1 and {self.max_k}, got {int(k)}"
        return None

    def recommend(self, user_ids: list[str], k: int) -> Recommendations:
        """Bundle.recommend with the per-user cache in front; pads short rows (see module docstring)."""
        bundle = self.bundle
        n, kk = len(user_ids), min(int(k), bundle.n_items)
        ids = np.empty((n, k), dtype=object)
        ids[:] = ""
        scores = np.full((n, k), PAD_SCORE, dtype=np.float32)
        sources = [""] * n
        misses = []
        for i, u in enumerate(user_ids):
            hit = self.cache.get((u, k))
            if hit is None:
                misses.append(i)
            else:
                ids[i], scores[i], sources[i] = hit
        if misses:
            rec = bundle.recommend([user_ids[i] for i in misses], kk)
            sc = np.where(np.isfinite(rec.scores), rec.scores, PAD_SCORE).astype(np.float32)
            for j, i in enumerate(misses):
                ids[i, :kk] = rec.property_ids[j]
                scores[i, :kk] = sc[j]
                sources[i] = rec.sources[j]
                self.cache.put((user_ids[i], k), (ids[i].copy(), scores[i].copy(), sources[i]))
        if self.cache.enabled:
            m.CACHE_HIT_RATE.labels(self.name, self.variant).set(self.cache.hit_rate)
        return Recommendations(ids, scores, sources)

    async def arecommend(self, user_ids: list[str], k: int) -> Recommendations:
        """recommend() on the event loop's thread pool: ONNX Runtime releases the GIL, so REST and gRPC
        requests overlap instead of queueing behind one another on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, self.recommend, user_ids, k)

    # ---- v2 request parsing ----------------------------------------------------------------------------
    def parse_request(self, request: InferRequest) -> tuple[list[str], int]:
        inputs = {}
        for inp in request.inputs:
            if inp.name in inputs:
                raise InvalidInput(f"input '{inp.name}' is given more than once")
            inputs[inp.name] = inp
        unexpected = sorted(set(inputs) - {INPUT_USER, INPUT_K})
        if unexpected:
            raise InvalidInput(f"unexpected input '{unexpected[0]}': {self.name} takes inputs "
                               f"'{INPUT_USER}' (BYTES [N]) and optional '{INPUT_K}' (INT32 [1])")
        user = inputs.get(INPUT_USER)
        if user is None:
            raise InvalidInput(f"input '{INPUT_USER}' is missing: send the user ids as BYTES with shape [N]")
        if user.datatype != "BYTES":
            raise InvalidInput(f"input '{INPUT_USER}' has datatype {user.datatype}; expected BYTES")
        shape = list(user.shape)
        if len(shape) != 1:
            raise InvalidInput(f"input '{INPUT_USER}' has shape {shape}; expected a 1-D shape [N]")
        if shape[0] <= 0:
            raise InvalidInput(f"input '{INPUT_USER}' is empty (shape {shape}); send at least one user id")
        try:
            raw = user.as_numpy().reshape(-1)
        except Exception as exc:  # data does not match the declared shape, undecodable binary, ...
            raise InvalidInput(f"input '{INPUT_USER}' could not be decoded as BYTES {shape}: {exc}") from None
        user_ids = []
        for v in raw:
            if isinstance(v, (bytes, bytearray, np.bytes_)):
                try:
                    v = bytes(v).decode("utf-8")
                except UnicodeDecodeError:
                    raise InvalidInput(f"input '{INPUT_USER}' holds a value that is not UTF-8") from None
            elif not isinstance(v, str):
                raise InvalidInput(f"input '{INPUT_USER}' holds a {type(v).__name__}; expected strings")
            user_ids.append(v)

        k = self.default_k
        kin = inputs.get(INPUT_K)
        if kin is not None:
            if kin.datatype not in INT_TYPES:
                raise InvalidInput(f"input '{INPUT_K}' has datatype {kin.datatype}; expected INT32")
            kshape = list(kin.shape)
            if int(np.prod(kshape)) != 1 or len(kshape) > 1:
                raise InvalidInput(f"input '{INPUT_K}' has shape {kshape}; expected [1]")
            try:
                kv = kin.as_numpy().reshape(-1)
            except Exception as exc:
                raise InvalidInput(f"input '{INPUT_K}' could not be decoded as {kin.datatype} [1]: {exc}") from None
            if kv.size != 1:
                raise InvalidInput(f"input '{INPUT_K}' must hold exactly one value, got {kv.size}")
            k = int(kv[0])
            problem = self.k_problem(k)
            if problem:
                raise InvalidInput(f"input '{INPUT_K}' {problem}")

        if request.request_outputs:
            for out in request.request_outputs:
                if out.name not in OUTPUTS:
                    raise InvalidInput(f"requested output '{out.name}' does not exist; "
                                       f"outputs are '{OUTPUT_IDS}' and '{OUTPUT_SCORES}'")
        return user_ids, k

    def response_parameters(self, sources: list[str] | None = None) -> dict:
        params = {"model_version": self.model_version, "variant": self.variant, "model_type": self.model_type}
        if sources is not None:
            params["sources"] = ",".join(sources)
        return params

    # ---- KServe handler --------------------------------------------------------------------------------
    async def predict(self, payload: InferRequest, headers: dict | None = None,
                      response_headers: dict | None = None) -> InferResponse:
        t0 = time.perf_counter()
        protocol = m.GRPC if getattr(payload, "from_grpc", False) else m.REST
        status = m.FAILED
        try:
            if not isinstance(payload, InferRequest):
                raise InvalidInput(f"{self.name} speaks the v2 inference protocol only "
                                   f"(POST /v2/models/{self.name}/infer or gRPC ModelInfer)")
            try:
                user_ids, k = self.parse_request(payload)
            except InvalidInput:
                status = m.REJECTED
                raise
            rec = await self.arecommend(user_ids, k)
            binary = payload.use_binary_outputs
            requested = [o.name for o in payload.request_outputs] if payload.request_outputs else list(OUTPUTS)
            arrays = {OUTPUT_IDS: ("BYTES", rec.property_ids), OUTPUT_SCORES: ("FP32", rec.scores)}
            outputs = []
            for name in requested:
                dtype, arr = arrays[name]
                out = InferOutput(name=name, shape=list(arr.shape), datatype=dtype)
                out.set_data_from_numpy(arr, binary_data=binary)
                outputs.append(out)
            if response_headers is not None:
                response_headers["x-model-version"] = self.model_version
                response_headers["x-variant"] = self.variant
            response = InferResponse(
                response_id=payload.id or str(uuid.uuid4()),
                model_name=self.name,
                model_version=self.model_version,
                infer_outputs=outputs,
                parameters=self.response_parameters(rec.sources),
                use_binary_outputs=binary,
                requested_outputs=payload.request_outputs,
                from_grpc=payload.from_grpc,
            )
            status = m.SUCCESS
            return response
        finally:
            m.INFERENCE_REQUESTS.labels(self.name, self.variant, status).inc()
            if status != m.REJECTED:
                m.INFERENCE_DURATION.labels(self.name, self.variant, protocol).observe(time.perf_counter() - t0)
