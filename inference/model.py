"""KServe model `rental-recommender`: load / reload, and preprocess → predict → postprocess of a v2 request.

A thin layer, shaped like KServe's `Model`: every recommendation comes from the runtime's one pipeline
(`rentalml.runtime.pipeline.Engine`), behind these parts of this package:
  protocol/    the v2 codec: `preprocess` decodes (protocol.decode), `postprocess` encodes (protocol.encode)
  routing.py   the champion/challenger arms and the sticky A/B split
  batching.py  the recommendation cache (in-process LRU or Redis) and the batching of its misses
  loading.py   the bundles and engines behind the arms, and the registry watcher
  heap.py      the process heap: malloc settings at start-up, collect / freeze / trim after a (re)load
`predict` answers within the request timeout, logs impressions (outcomes.py) and records the Prometheus metrics
(metrics.py); `reload` swaps in new versions without dropping a request. The v2 interface (inputs, outputs,
parameters, headers) is described in protocol/__init__.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rentalml.cache import open_cache
from rentalml.config import get_settings
from rentalml.evaluation.ab import CHALLENGER, CHAMPION
from rentalml.runtime.bundle import Bundle
from rentalml.runtime.features import Filters

from . import MODEL_NAME
from . import metrics as m
from .batching import Batcher
from .errors import RequestTimeout
from .heap import settle_heap, tune_malloc
from .loading import RegistryWatcher, load_routing, make_engine, mark_registry, registry_versions, served_version
from .outcomes import OutcomeLog
from .protocol import INPUT_K, INPUT_USER, OUTPUT_IDS, OUTPUT_SCORES, decode, encode
from .protocol.types import DeadlineExceeded, InferRequest, InferResponse, InvalidInput, Model
from .routing import Arm, RoutedRecommendations, Routing

log = logging.getLogger("rentalml.inference")


@dataclass(slots=True)
class Answer:
    """What `predict` returns and `postprocess` encodes: a query's recommendations and response parameters."""

    query: decode.Query
    rec: RoutedRecommendations
    params: dict


class RecommenderModel(Model):
    """`rental-recommender` served by KServe's ModelServer (REST + gRPC v2). Picklable for `--workers N`.

    `bundle` is the champion: a bundle directory, a loaded Bundle, or None to serve the registry alias
    `champion` (then `challenger` too when challenger_percent > 0, and reload re-reads the aliases).
    `challenger` (a directory or Bundle) with `challenger_percent` % of users (sticky: hash of salt + user id)
    makes this one model an A/B router; responses and metrics carry each row's variant and model version.
    """

    def __init__(self, bundle: str | Path | Bundle | None, name: str = MODEL_NAME, variant: str = "champion",
                 max_k: int | None = None, default_k: int | None = None, cache_size: int | None = None,
                 cache_ttl_s: float | None = None, challenger: str | Path | Bundle | None = None,
                 challenger_percent: float | None = None, salt: str | None = None,
                 request_timeout_s: float | None = None, reload_poll_s: float | None = None,
                 predictor_url: str | None = None):
        super().__init__(name, return_response_headers=True)
        self.predictor_url = predictor_url  # transformer role: the graphs run on this v2 predictor
        serve = get_settings().serve
        self.registry_mode = bundle is None
        self._sources = {CHAMPION: bundle, CHALLENGER: challenger}
        self.variant = variant
        self.max_k = int(max_k if max_k is not None else serve.max_k)
        self.default_k = int(default_k if default_k is not None else serve.default_k)
        self.challenger_percent = float(challenger_percent if challenger_percent is not None
                                        else serve.challenger_percent)
        if not 0 <= self.challenger_percent <= 100:
            raise ValueError(f"challenger_percent must be between 0 and 100, got {self.challenger_percent}")
        self.salt = salt if salt is not None else serve.ab_salt
        self.request_timeout_s = float(request_timeout_s if request_timeout_s is not None
                                       else serve.request_timeout_s)
        self.reload_poll_s = float(reload_poll_s if reload_poll_s is not None else serve.reload_poll_s)
        self.impressions_mode = str(serve.log_impressions).lower()
        if self.impressions_mode not in ("canary", "always", "off"):
            raise ValueError(f"serve.log_impressions must be 'canary', 'always' or 'off', "
                             f"got {self.impressions_mode!r}")
        self._cache_size = int(cache_size if cache_size is not None else serve.cache_size)
        self._cache_ttl_s = float(cache_ttl_s if cache_ttl_s is not None else serve.cache_ttl_s)
        self._prewarm_rows = int(serve.prewarm_rows)
        self.routing: Routing | None = None
        self.load_seconds = 0.0
        self.reloads = 0
        # set by the server when REST runs in spawned worker processes (`--workers N`): called with the model
        # once it is unpickled there (the worker's own routes and logging); a module-level function pickles by name
        self.worker_init: Callable[[RecommenderModel], None] | None = None
        self._init_process_state()

    def _init_process_state(self) -> None:
        """What does not pickle: the cache (locks, sockets), the outcome log, the reload lock and watcher."""
        self.cache = open_cache(size=self._cache_size, ttl_s=self._cache_ttl_s)
        self.batcher = Batcher(self.cache, self.name, prewarm_rows=self._prewarm_rows)
        self.outcomes = OutcomeLog()
        self._reload_lock = threading.Lock()
        self._watcher: RegistryWatcher | None = None

    # ---- load / reload -----------------------------------------------------------------------------------
    def _load(self, champion, challenger, percent: float) -> Routing:
        routing, seconds = load_routing(champion, challenger, percent, variant=self.variant, salt=self.salt,
                                        warm_k=self.default_k, registry_mode=self.registry_mode,
                                        predictor_url=self.predictor_url,
                                        allow_cache=self.routing is None)  # the local cache: at start only
        self.load_seconds = seconds
        if self.registry_mode:
            mark_registry(self.name, routing)
        for arm in (routing.champion, routing.challenger):
            if arm is not None:
                m.MODEL_LOAD_SECONDS.labels(self.name, arm.label).set(seconds)
                m.CACHE_HIT_RATE.labels(self.name, arm.label).set(0.0)
        return routing

    def load(self) -> bool:
        self.routing = self._load(self._sources[CHAMPION], self._sources[CHALLENGER], self.challenger_percent)
        settle_heap()
        self.ready = True
        self.start_watcher()
        return self.ready

    def reload(self, champion=None, challenger=None, challenger_percent: float | None = None) -> dict:
        """Load the new version(s) next to the serving ones, then swap the routing in one assignment: requests
        already running finish on the old bundles, new ones get the new. Returns before/after.

        Registry mode: re-reads the aliases (arguments ignored unless given). Bundle mode: `champion` /
        `challenger` (directories) replace the current ones; None keeps (re-reads) the current directory."""
        with self._reload_lock:
            before = self.routing.describe() if self.routing else None
            percent = self.challenger_percent if challenger_percent is None else float(challenger_percent)
            if not 0 <= percent <= 100:
                raise ValueError(f"challenger_percent must be between 0 and 100, got {percent}")
            champ_src = champion if champion is not None else (None if self.registry_mode else
                                                               self.routing.champion.bundle.path)
            chall_src = challenger
            if chall_src is None and not self.registry_mode and self.routing and self.routing.challenger:
                chall_src = self.routing.challenger.bundle.path
            t0 = time.perf_counter()
            routing = self._load(champ_src, chall_src, percent)
            shared = self.cache.backend != "memory"
            if shared:  # the new version's hot rows cached before it serves (a shared cache keys them by version)
                prewarmed = self._prewarm(routing)
            self.routing = routing  # the swap: one reference assignment
            self.challenger_percent = percent
            if champion is not None:
                self._sources[CHAMPION] = champion
            if challenger is not None:
                self._sources[CHALLENGER] = challenger
            if not shared:  # versions may repeat across bundle directories: emptied, then pre-warmed
                self.cache.clear()
                prewarmed = self._prewarm(routing)
            self.reloads += 1
            m.MODEL_RELOADS.labels(self.name).inc()
            after = routing.describe()
            settle_heap()  # the old routing is unreferenced now (requests still on it keep it until they end)
            log.info("reloaded in %.2fs (%d cache rows pre-warmed): %s", time.perf_counter() - t0, prewarmed, after)
            return {"before": before, "after": after, "seconds": round(time.perf_counter() - t0, 3),
                    "prewarmed_rows": prewarmed}

    def _prewarm(self, routing: Routing) -> int:
        """The most asked (user, k) rows of the new routing, cached (Batcher.prewarm); a failure is logged and
        only costs the misses the pre-warm would have saved."""
        t0 = time.perf_counter()
        try:
            n = self.batcher.prewarm(routing)
        except Exception as exc:  # noqa: BLE001 - the reload goes on; the rows are computed on their first miss
            log.warning("cache pre-warm of the new version failed (%s): its first requests miss", exc)
            return 0
        if n:
            log.info("pre-warmed %d cache rows of %s in %.2fs", n, routing.describe(), time.perf_counter() - t0)
        return n

    def start_watcher(self) -> None:
        """Registry mode with serve.reload_poll_s > 0: reload when an alias points to another version."""
        if not (self.registry_mode and self.reload_poll_s > 0) or (self._watcher and self._watcher.alive):
            return

        def serving() -> tuple:
            r = self.routing
            return served_version(r.champion), served_version(r.challenger)

        self._watcher = RegistryWatcher(serving, lambda: registry_versions(self.challenger_percent > 0, self.name),
                                        self.reload, self.reload_poll_s)
        self._watcher.start()

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in ("cache", "batcher", "outcomes", "_reload_lock", "_watcher"):
            state.pop(key, None)
        if state.get("routing") is not None:  # engines hold connections (predictor, Feast, stream state)
            state["routing"] = state["routing"].without_engines()
        return state

    def __setstate__(self, state):
        tune_malloc()  # a spawned REST worker is a new process: glibc's defaults again
        self.__dict__.update(state)
        self._init_process_state()
        if self.routing is not None:
            self.routing = self.routing.with_engines(lambda arm: make_engine(arm.bundle, self.predictor_url))
        if self.ready and self.routing is not None:
            for arm in (self.routing.champion, self.routing.challenger):
                if arm is not None:
                    m.MODEL_LOAD_SECONDS.labels(self.name, arm.label).set(self.load_seconds)
                    m.CACHE_HIT_RATE.labels(self.name, arm.label).set(0.0)
            self.start_watcher()
            settle_heap()  # a spawned REST worker's own heap, as load() does in the main process
        if self.worker_init is not None:  # inside a spawned REST worker (see server.serve)
            self.worker_init(self)

    # ---- metadata ----------------------------------------------------------------------------------------
    @property
    def bundle(self) -> Bundle | None:
        """The champion's bundle (the one served to everyone outside the canary)."""
        if self.routing is not None:
            return self.routing.champion.bundle
        src = self._sources[CHAMPION]
        return src if isinstance(src, Bundle) else None

    @property
    def model_version(self) -> str:
        return self.routing.champion.model_version if self.routing is not None else ""

    @property
    def model_type(self) -> str:
        return self.routing.champion.model_type if self.routing is not None else ""

    def get_input_types(self) -> list[dict]:
        return [{"name": INPUT_USER, "datatype": "BYTES", "shape": [-1]},
                {"name": INPUT_K, "datatype": "INT32", "shape": [1]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": OUTPUT_IDS, "datatype": "BYTES", "shape": [-1, -1]},
                {"name": OUTPUT_SCORES, "datatype": "FP32", "shape": [-1, -1]}]

    def k_problem(self, k) -> str | None:
        """Why k is not an acceptable number of recommendations (None when it is)."""
        return decode.k_problem(k, self.max_k)

    def arm_for(self, user_id: str) -> Arm:
        return self.routing.arm_of(user_id)

    # ---- the protocol-neutral call (v2 and the friendly API) --------------------------------------------------
    async def recommend(self, user_ids: list[str], k: int, filters: Filters | None = None) -> RoutedRecommendations:
        """Each user's arm, its cached row or its arm's engine, within settings.serve.request_timeout_s
        (RequestTimeout past it)."""
        return await self.batcher.arecommend(self.routing, user_ids, k, filters, self.request_timeout_s)

    def log_impressions(self, request_id: str, user_ids: list[str], rec: RoutedRecommendations) -> None:
        """One `impression` outcome per served item (serve.log_impressions: "canary" = while a challenger is
        served and the split is on, "always", "off")."""
        mode = self.impressions_mode
        if mode == "off" or (mode == "canary" and not self.routing.split):
            return
        self.outcomes.impressions(request_id, user_ids, rec.property_ids, rec.variants, rec.versions)

    def response_parameters(self, rec: RoutedRecommendations) -> dict:
        """model_version / variant: one value when every row agrees, else comma-separated per row."""
        return {"model_version": rec.uniform(rec.versions), "variant": rec.uniform(rec.variants),
                "model_type": self.model_type, "sources": ",".join(rec.sources)}

    # ---- KServe handlers: preprocess → predict → postprocess ----------------------------------------------
    async def preprocess(self, payload, headers: dict | None = None) -> decode.Query:
        """A v2 request → the validated Query (protocol.decode); InvalidInput naming the field otherwise."""
        t0 = time.perf_counter()
        if not isinstance(payload, InferRequest):
            m.requests(self.name, self.variant, m.FAILED).inc()
            raise InvalidInput(f"{self.name} speaks the v2 inference protocol only "
                               f"(POST /v2/models/{self.name}/infer or gRPC ModelInfer)")
        try:
            return decode.decode(payload, default_k=self.default_k, max_k=self.max_k, model_name=self.name, t0=t0)
        except InvalidInput:
            m.requests(self.name, self.variant, m.REJECTED).inc()
            raise

    def validate(self, payload):
        """(KServe's check between preprocess and predict: a Query is validated already.)"""
        return payload if isinstance(payload, decode.Query) else super().validate(payload)

    async def predict(self, query: decode.Query, headers: dict | None = None,
                      response_headers: dict | None = None) -> Answer:
        """A query's recommendations and response parameters, with its metrics and impressions."""
        status, variant = m.FAILED, self.variant
        try:
            try:
                rec = await self.recommend(query.user_ids, query.k, query.filters)
            except RequestTimeout as exc:
                if query.grpc:
                    raise DeadlineExceeded(str(exc)) from None
                raise
            variant = rec.uniform(rec.variants) if len(set(rec.variants)) == 1 else "mixed"
            params = self.response_parameters(rec)
            self.log_impressions(query.request_id, query.user_ids, rec)
            status = m.SUCCESS
        finally:
            m.requests(self.name, variant, status).inc()
            m.duration(self.name, variant, m.GRPC if query.grpc else m.REST).observe(time.perf_counter() - query.t0)
        if response_headers is not None:
            response_headers["x-model-version"] = params["model_version"]
            response_headers["x-variant"] = params["variant"]
        return Answer(query, rec, params)

    async def postprocess(self, answer: Answer, headers: dict | None = None,
                          response_headers: dict | None = None) -> InferResponse:
        """The v2 response (protocol.encode)."""
        rec = answer.rec
        return encode.response(answer.query, self.name, rec.versions[0], answer.params, rec.property_ids, rec.scores)

    async def infer(self, request: InferRequest, response_headers: dict | None = None) -> InferResponse:
        """preprocess → predict → postprocess without KServe's `Model.__call__` around them (the fast paths)."""
        answer = await self.predict(await self.preprocess(request), None, response_headers)
        return await self.postprocess(answer)
