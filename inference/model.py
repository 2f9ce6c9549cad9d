"""KServe model `rental-recommender`: the Open Inference Protocol (v2) face of a model bundle.

A thin layer: every recommendation comes from the runtime's one pipeline (`rentalml.runtime.pipeline.Engine`:
history → retrieve → rank → merge live → features → filter → fill). This module validates v2 requests, shapes v2
responses, routes each user to the champion or the challenger (sticky A/B split,
rentalml.evaluation.ab.assign_variant), keeps the recommendation cache in front (rentalml.cache: in-process LRU
or Redis), logs impressions (outcomes.py), enforces the request timeout, hot-reloads new versions (`reload`,
registry watcher) and records the Prometheus metrics.

Interface (contracts.md):
  inputs   user_id      BYTES [N]     marketplace user ids ("u_123"); unknown users get cold-start results
           k            INT32 [1]     optional, 1..settings.serve.max_k (default settings.serve.default_k)
  outputs  property_id  BYTES [N,k]   best first
           score        FP32  [N,k]   non-increasing along each row
  response parameters: model_version, variant (one value when every row agrees, else comma-separated per row),
                       model_type, sources (comma-separated "model"/"cold_start")
  REST response headers: x-model-version, x-variant

When a cold-start user asks for more items than the fallback list holds, the row is padded with property_id ""
and score -FLT_MAX (finite, so JSON stays valid, and still non-increasing).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rentalml.cache import open_cache
from rentalml.config import get_settings
from rentalml.evaluation.ab import CHALLENGER, CHAMPION, assign_variant
from rentalml.runtime.bundle import Bundle, read_meta
from rentalml.runtime.features import FeastFeatures, Filters, LocalFeatures
from rentalml.runtime.interfaces import Recommendations
from rentalml.runtime.pipeline import Engine

from . import MODEL_NAME
from . import metrics as m
from .outcomes import OutcomeLog

log = logging.getLogger("rentalml.inference")

#: request parameters (v2 `parameters`, `/predict` "filters") that set business rules for that request
FILTER_PARAMS = ("budget", "budget_band", "city", "min_bedrooms", "available_only")


def _param_value(v):
    """A v2 request parameter's value: plain over REST; an InferParameter-like message over gRPC."""
    if hasattr(v, "WhichOneof"):
        which = v.WhichOneof("parameter_choice")
        return getattr(v, which) if which else None
    return v

# Quirk: importing kserve runs argparse.parse_known_args() over sys.argv (kserve/model_server.py), so a caller's
# own flags (e.g. `--workers 3`) would silently become ModelServer defaults. Import it with a bare argv.
_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    import kserve
    from grpc_interceptor.exceptions import DeadlineExceeded
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


class RequestTimeout(Exception):
    """The request ran past settings.serve.request_timeout_s (REST 504, gRPC DEADLINE_EXCEEDED)."""


@dataclass(frozen=True, eq=False)
class Arm:
    """One loaded model version behind an A/B arm."""

    arm: str  # "champion" | "challenger"
    label: str  # the variant reported in responses, metrics and outcome events
    bundle: Bundle
    source: str  # bundle directory (or registry alias) it came from
    registry_version: str | None = None  # set when the bundle came from the MLflow registry
    engine: Engine | None = None  # the runtime pipeline of this version (rentalml.runtime.pipeline)

    @property
    def model_version(self) -> str:
        return self.bundle.model_version

    @property
    def model_type(self) -> str:
        return self.bundle.model_type


@dataclass(frozen=True)
class Routing:
    """The arms and the split; replaced as a whole on reload (requests hold the one they started with)."""

    champion: Arm
    challenger: Arm | None = None
    challenger_percent: float = 0.0
    salt: str = ""

    def arm_of(self, user_id: str) -> Arm:
        if self.challenger is None or self.challenger_percent <= 0:
            return self.champion
        return self.challenger if assign_variant(user_id, self.salt, self.challenger_percent) == CHALLENGER \
            else self.champion

    def describe(self) -> dict:
        ch = self.challenger
        return {"champion": {"variant": self.champion.label, "model_version": self.champion.model_version,
                             "source": self.champion.source},
                "challenger": None if ch is None else {"variant": ch.label, "model_version": ch.model_version,
                                                       "source": ch.source},
                "challenger_percent": self.challenger_percent if ch is not None else 0.0}


@dataclass
class RoutedRecommendations(Recommendations):
    variants: list[str] = field(default_factory=list)  # per row
    versions: list[str] = field(default_factory=list)  # per row
    arms: list[Arm] = field(default_factory=list)  # per row

    def uniform(self, values: list[str]) -> str:
        return values[0] if len(set(values)) == 1 else ",".join(values)


class _Batch:
    """One request's rows: cache lookups first, then the misses through their arm's bundle."""

    __slots__ = ("user_ids", "k", "arms", "rows", "missing", "cache_versions", "filters")

    def __init__(self, model: RecommenderModel, routing: Routing, user_ids: list[str], k: int,
                 filters: Filters | None = None):
        self.user_ids, self.k, self.filters = user_ids, k, filters
        n = len(user_ids)
        if routing.challenger is None or routing.challenger_percent <= 0:
            self.arms = [routing.champion] * n
            groups = {routing.champion: range(n)}
        else:
            self.arms = [routing.arm_of(u) for u in user_ids]
            groups: dict[Arm, list[int]] = {}
            for i, arm in enumerate(self.arms):
                groups.setdefault(arm, []).append(i)
        self.rows: list = [None] * n  # (ids [k] object, scores [k] float32, source) per user
        self.missing: dict[Arm, list[int]] = {}
        self.cache_versions: dict[Arm, str] = {}
        for arm, idx in groups.items():
            if arm.engine.refresh is not None:
                arm.engine.refresh()  # fresh stream state first (rate-limited): it decides the cache version
            self.cache_versions[arm] = version = arm.engine.cache_version
            if filters is not None:  # request-specific business rules: not what the cache holds
                self.missing[arm] = list(idx)
                continue
            hits = model.cache.get_many(version, [user_ids[i] for i in idx], k)
            n_hit = 0
            for i, hit in zip(idx, hits, strict=True):
                if hit is None:
                    self.missing.setdefault(arm, []).append(i)
                else:
                    n_hit += 1
                    self.rows[i] = hit
            model._count_cache(arm.label, n_hit, len(idx) - n_hit)

    def complete(self, model: RecommenderModel) -> RoutedRecommendations:
        run_missing(model, [self])
        return self.result()

    def fill(self, model: RecommenderModel, arm: Arm, idx: list[int], rec, offset: int) -> None:
        """Rows `idx` of this request from rows offset.. of `rec` (the engine's answer for its arm), cached."""
        k = self.k
        kk = min(k, arm.bundle.n_items)
        sc = rec.scores[offset: offset + len(idx)]
        if not np.isfinite(sc).all():  # (empty slots of short lists)
            sc = np.where(np.isfinite(sc), sc, PAD_SCORE).astype(np.float32)
        put = []
        for j, i in enumerate(idx):
            ids, scores = rec.property_ids[offset + j], sc[j]
            if kk < k:
                ids = np.concatenate([ids, np.full(k - kk, "", dtype=object)])
                scores = np.concatenate([scores, np.full(k - kk, PAD_SCORE, dtype=np.float32)])
            self.rows[i] = (np.array(ids, dtype=object), np.array(scores, dtype=np.float32), rec.sources[offset + j])
            put.append((self.user_ids[i], self.rows[i]))
        if self.filters is None:
            model.cache.put_many(self.cache_versions[arm], put, k)

    def result(self) -> RoutedRecommendations:
        k = self.k
        rows = self.rows
        if len(rows) == 1:  # the common case: views, no copies
            ids, scores = rows[0][0].reshape(1, k), rows[0][1].reshape(1, k)
        else:
            ids, scores = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
        return RoutedRecommendations(ids, scores, [r[2] for r in rows],
                                     variants=[a.label for a in self.arms],
                                     versions=[a.model_version for a in self.arms], arms=self.arms)

    @property
    def n_missing(self) -> int:
        return sum(len(v) for v in self.missing.values())


def run_missing(model: RecommenderModel, batches: list[_Batch]) -> list[BaseException | None]:
    """The cache misses of several requests in as few engine calls as possible: rows of the same arm and k
    without request-specific business rules go through one `Engine.recommend` (one ONNX Runtime call: the
    catalogue's item vectors are read once for all of them); filtered requests run on their own. Returns, per
    batch, the exception that failed it (None: its rows are filled)."""
    groups: dict[tuple, list[tuple[int, _Batch, list[int]]]] = {}
    for n, b in enumerate(batches):
        for arm, idx in b.missing.items():
            key = (arm, min(b.k, arm.bundle.n_items)) if b.filters is None else (arm, n)
            groups.setdefault(key, []).append((n, b, idx))
    errors: list[BaseException | None] = [None] * len(batches)
    for (arm, _), members in groups.items():
        b0 = members[0][1]
        try:
            rec = arm.engine.recommend([b.user_ids[i] for _, b, idx in members for i in idx],
                                       min(b0.k, arm.bundle.n_items), b0.filters)
            offset = 0
            for _, b, idx in members:
                b.fill(model, arm, idx, rec, offset)
                offset += len(idx)
        except Exception as exc:  # noqa: BLE001 - handed to the requests of this group
            for n, _, _ in members:
                errors[n] = exc
    for b in batches:
        b.missing = {}
    return errors


class _LoopBatcher:
    """Cache misses answered on the event loop, batched (the in-process counterpart of Triton's dynamic batching).

    A request's misses are queued and flushed by a callback scheduled with `call_soon` a few loop turns later
    (`_flush_after`): every request whose handler reaches this point meanwhile (under load: the requests uvicorn
    and grpc.aio read in those polls) is answered by one engine call per arm; a lone request waits for nothing
    (`alone`: no other callback is ready). Running on the
    loop avoids two thread wake-ups per request (~0.25 ms on the 2-core machine, docs/benchmarks.md) and the
    GIL hand-over; it is used only for engines that do no I/O (graphs and features in process) and for small
    requests (`INLINE_MAX_ROWS`), so the loop is never blocked by a network call or a bulk request."""

    INLINE_MAX_ROWS = 16
    FLUSH_TURNS = 3  # loop turns a batch waits for company at most (docs/architecture.md, "Serving hot path")

    def __init__(self, model: RecommenderModel):
        self.model = model
        self.pending: list[tuple[_Batch, asyncio.Future]] = []

    def takes(self, batch: _Batch) -> bool:
        return batch.n_missing <= self.INLINE_MAX_ROWS and all(arm.engine.in_process for arm in batch.missing)

    def submit(self, batch: _Batch) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.pending.append((batch, fut))
        if len(self.pending) == 1:
            self._flush_after(loop, self.FLUSH_TURNS)
        return fut

    def _flush_after(self, loop, turns: int) -> None:
        """Flush now when nothing else is ready to run (no other request can join: saves loop turns, ~50 µs at
        concurrency 1), else after up to `turns` more loop turns, each of which lets the requests read in that turn
        reach submit() and join (8 clients on the 2-core machine: 2.0 → 4.1 rows a flush, +25 % requests/s)."""
        if turns <= 0 or self.alone(loop):
            self.flush()
        else:
            loop.call_soon(self._flush_after, loop, turns - 1)

    @staticmethod
    def alone(loop) -> bool:
        """No other callback is ready to run in this loop iteration (so no other request can reach submit()
        before a deferred flush would). asyncio's loop keeps them in `_ready`; other loops: assume company."""
        ready = getattr(loop, "_ready", None)
        return ready is not None and len(ready) == 0

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        try:
            errors = run_missing(self.model, [b for b, _ in pending])
        except Exception as exc:  # noqa: BLE001 - never leave a request waiting
            errors = [exc] * len(pending)
        for (batch, fut), err in zip(pending, errors, strict=True):
            if fut.done():  # the request went away (client disconnect, cancellation)
                continue
            if err is not None:
                fut.set_exception(err)
            else:
                fut.set_result(batch.result())


def new_request_id() -> str:
    """32 hex characters (uuid4().hex's randomness, a third of its cost)."""
    return os.urandom(16).hex()


def make_engine(bundle: Bundle, predictor_url: str | None = None) -> Engine:
    """The serving engine of a bundle, as the settings say: the graphs in process or on a remote v2 predictor
    (`serve.predictor_url`: the transformer role, Triton in the cluster), candidate features from the bundle or
    the Feast online store (`serve.feature_source`), fresh history and new listings from the stream state."""
    s = get_settings()
    stages = None
    predictor_url = predictor_url or s.serve.predictor_url
    if predictor_url:  # the arm's own model version on Triton (pinned: versions never mix, issue 11 defect 13)
        from rentalml.export.triton import triton_version

        from .predictor import RemoteStages

        stages = RemoteStages(predictor_url, bundle.n_items, version=triton_version(bundle.meta),
                              timeout=s.serve.request_timeout_s)
    local = LocalFeatures(bundle)
    features = local
    if s.serve.feature_source == "feast":
        from rentalml.features.store import open_store

        features = FeastFeatures(open_store(s), fallback=local)
    elif s.serve.feature_source != "bundle":
        raise ValueError(f"serve.feature_source must be 'bundle' or 'feast', got {s.serve.feature_source!r}")
    recent = live = refresh = None
    if s.serve.fold_in:
        from .freshness import StreamFeed

        feed = StreamFeed(bundle, s, local)
        recent, live, refresh = feed.recent, feed.live, feed.refresh
        local.live = live
        return Engine(bundle, stages=stages, features=features, recent=recent, live=live, refresh=refresh,
                      generation=lambda: feed.generation, n_candidates=s.export.n_candidates)
    return Engine(bundle, stages=stages, features=features, n_candidates=s.export.n_candidates)


def pinned_version(alias: str) -> str | None:
    """The registry version pinned for an arm (serve.champion_version / challenger_version, set by the KServe
    deploy step on the transformer), None when the arm follows its alias."""
    serve = get_settings().serve
    v = {"champion": serve.champion_version, "challenger": serve.challenger_version}.get(alias) or ""
    return v.strip() or None


def resolve_alias(alias: str) -> tuple[Path, str]:
    """(bundle directory, registry version) of an MLflow alias of settings.model_name, or of the version pinned
    for that arm."""
    try:
        from rentalml.registry.mlflow_registry import fetch_bundle
    except ImportError as exc:
        raise FileNotFoundError(f"the MLflow registry is unavailable ({exc})") from None
    pinned = pinned_version(alias)
    path = Path(fetch_bundle(version=pinned) if pinned else fetch_bundle(alias=alias))
    return path, str(read_meta(path)["model_version"])


class RecommenderModel(kserve.Model):
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
        self.routing: Routing | None = None
        self.load_seconds = 0.0
        self.reloads = 0
        self._init_process_state()
        # set by the server when REST runs in spawned worker processes: they rebuild the friendly routes
        self.install_routes_on_unpickle = False

    def _init_process_state(self) -> None:
        """What does not pickle: the cache (locks, sockets), the outcome log, the reload lock and watcher."""
        self.cache = open_cache(size=self._cache_size, ttl_s=self._cache_ttl_s)
        self.outcomes = OutcomeLog()
        self._reload_lock = threading.Lock()
        self._cache_counts: dict[str, list[int]] = {}
        self._watcher: threading.Thread | None = None
        self._batcher = _LoopBatcher(self)

    # ---- lifecycle -------------------------------------------------------------------------------------
    def _arm(self, arm: str, source) -> Arm:
        label = self.variant if arm == CHAMPION else CHALLENGER
        if isinstance(source, Bundle):
            bundle, where, reg = source, str(source.path), None
        elif source is None:
            path, reg = resolve_alias(arm)
            bundle, where = self._open_bundle(path), f"models:/{get_settings().model_name}@{arm}"
        else:
            if not (Path(source) / "bundle.json").exists():
                raise FileNotFoundError(f"{source} is not a model bundle (no bundle.json)")
            bundle, where, reg = self._open_bundle(source), str(source), None
        # build the ONNX Runtime session and run the graph (and the cold-start path) once, so that the first
        # request pays nothing extra
        k = min(self.default_k, bundle.n_items)
        bundle.score_histories([np.zeros(1, dtype=np.int64)], k)
        engine = make_engine(bundle, self.predictor_url)
        engine.recommend([""], k)
        return Arm(arm, label, bundle, where, reg, engine)

    @staticmethod
    def _open_bundle(path) -> Bundle:
        precision = get_settings().serve.precision
        if precision not in ("fp32", "int8"):
            raise ValueError(f"serve.precision must be 'fp32' or 'int8', got {precision!r}")
        if precision == "int8" and not (Path(path) / "scorer.int8.onnx").exists():
            raise FileNotFoundError(f"serve.precision=int8 but {path} has no scorer.int8.onnx")
        return Bundle(path, int8=precision == "int8")

    def _build_routing(self, champion, challenger, percent: float) -> Routing:
        t0 = time.perf_counter()
        champ = self._arm(CHAMPION, champion)
        chall = None
        if percent > 0:
            if challenger is not None or self.registry_mode:
                try:
                    chall = self._arm(CHALLENGER, challenger)
                except LookupError as exc:  # no challenger alias: no canary (logged, not fatal)
                    log.warning("no challenger to serve (%s): all traffic to the champion", exc)
        if chall is not None and self.predictor_url:
            from rentalml.export.triton import triton_version

            if triton_version(chall.bundle.meta) == triton_version(champ.bundle.meta) and \
                    chall.bundle.path != champ.bundle.path:
                raise ValueError(f"champion {champ.source} and challenger {chall.source} resolve to the same Triton "
                                 f"model version {triton_version(champ.bundle.meta)}: give them their MLflow "
                                 "versions (bundle.json model_version)")
        seconds = champ.bundle.load_seconds + (chall.bundle.load_seconds if chall else 0) + \
            (time.perf_counter() - t0)
        self.load_seconds = seconds
        for arm in (champ, chall):
            if arm is not None:
                m.MODEL_LOAD_SECONDS.labels(self.name, arm.label).set(seconds)
                m.CACHE_HIT_RATE.labels(self.name, arm.label).set(0.0)
        return Routing(champ, chall, percent if chall is not None else 0.0, self.salt)

    def load(self) -> bool:
        self.routing = self._build_routing(self._sources[CHAMPION], self._sources[CHALLENGER],
                                           self.challenger_percent)
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
            routing = self._build_routing(champ_src, chall_src, percent)
            self.routing = routing  # the swap: one reference assignment
            self.challenger_percent = percent
            if champion is not None:
                self._sources[CHAMPION] = champion
            if challenger is not None:
                self._sources[CHALLENGER] = challenger
            if self.cache.backend == "memory":  # versions may repeat across bundle directories
                self.cache.clear()
            self.reloads += 1
            m.MODEL_RELOADS.labels(self.name).inc()
            after = routing.describe()
            log.info("reloaded in %.2fs: %s", time.perf_counter() - t0, after)
            return {"before": before, "after": after, "seconds": round(time.perf_counter() - t0, 3)}

    async def settled(self, grace_s: float = 0.05) -> None:
        """Return once the cache misses queued on the event loop when called have been answered, their requests
        have written their responses (after a swap: the requests that began on the old version) and `grace_s`
        has passed for those answers to reach their clients — a reload is confirmed after the last old-version
        answer, not beside it (tests/test_reload.py checks that order from the client's clock; a reload takes
        ~1 s, 50 ms is noise to it)."""
        queued = [fut for _, fut in self._batcher.pending]
        if queued:
            await asyncio.wait(queued)
        await asyncio.sleep(0)  # the woken request tasks run (and send) before the caller goes on
        await asyncio.sleep(grace_s)

    def registry_versions(self) -> tuple[str | None, str | None]:
        from rentalml.registry.mlflow_registry import alias_version

        champ = pinned_version(CHAMPION) or alias_version(CHAMPION)
        if self.challenger_percent <= 0:
            return champ, None
        return champ, pinned_version(CHALLENGER) or alias_version(CHALLENGER)

    def start_watcher(self) -> None:
        """Registry mode with serve.reload_poll_s > 0: reload when an alias points to another version."""
        if not (self.registry_mode and self.reload_poll_s > 0) or (self._watcher and self._watcher.is_alive()):
            return

        def watch():
            while True:
                time.sleep(self.reload_poll_s)
                try:
                    r = self.routing
                    current = (r.champion.registry_version, r.challenger.registry_version if r.challenger else None)
                    if self.registry_versions() != current:
                        self.reload()
                except Exception as exc:  # keep serving the current version; try again next round
                    log.warning("registry watch: %s", exc)

        self._watcher = threading.Thread(target=watch, name="registry-watch", daemon=True)
        self._watcher.start()

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in ("cache", "outcomes", "_reload_lock", "_cache_counts", "_watcher", "_batcher"):
            state.pop(key, None)
        r = state.get("routing")
        if r is not None:  # engines hold connections (predictor, Feast, stream state): rebuilt per process
            state["routing"] = dataclasses.replace(
                r, champion=dataclasses.replace(r.champion, engine=None),
                challenger=None if r.challenger is None else dataclasses.replace(r.challenger, engine=None))
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_process_state()
        r = self.routing
        if r is not None:
            self.routing = dataclasses.replace(
                r, champion=dataclasses.replace(r.champion, engine=make_engine(r.champion.bundle, self.predictor_url)),
                challenger=None if r.challenger is None else dataclasses.replace(
                    r.challenger, engine=make_engine(r.challenger.bundle, self.predictor_url)))
        if self.ready and self.routing is not None:
            for arm in (self.routing.champion, self.routing.challenger):
                if arm is not None:
                    m.MODEL_LOAD_SECONDS.labels(self.name, arm.label).set(self.load_seconds)
                    m.CACHE_HIT_RATE.labels(self.name, arm.label).set(0.0)
            self.start_watcher()
        if self.install_routes_on_unpickle:  # inside a spawned REST worker (see server.serve)
            from .server import worker_init

            worker_init(self)

    def log_impressions(self, request_id: str, user_ids: list[str], rec: RoutedRecommendations) -> None:
        """One `impression` outcome per served item (serve.log_impressions: "canary" = while a challenger is
        served and the split is on, "always", "off")."""
        mode = self.impressions_mode
        routing = self.routing
        if mode == "off" or (mode == "canary" and (routing.challenger is None or routing.challenger_percent <= 0)):
            return
        self.outcomes.impressions(request_id, user_ids, rec.property_ids, rec.variants, rec.versions)

    def _count_cache(self, label: str, hits: int, misses: int) -> None:
        if not self.cache.enabled:
            return
        c = self._cache_counts.setdefault(label, [0, 0])
        c[0] += hits
        c[1] += misses
        m.CACHE_HIT_RATE.labels(self.name, label).set(c[0] / (c[0] + c[1]) if c[0] + c[1] else 0.0)

    # ---- metadata --------------------------------------------------------------------------------------
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

    # ---- core call (shared by v2 and the friendly API) -------------------------------------------------
    def k_problem(self, k) -> str | None:
        """Why k is not an acceptable number of recommendations (None when it is)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            return f"must be an integer between 1 and {self.max_k}, got {k!r}"
        if not 1 <= int(k) <= self.max_k:
            return f"must be between 1 and {self.max_k}, got {int(k)}"
        return None

    def arm_for(self, user_id: str) -> Arm:
        return self.routing.arm_of(user_id)

    def recommend(self, user_ids: list[str], k: int, routing: Routing | None = None,
                  filters: Filters | None = None) -> RoutedRecommendations:
        """Each user's arm (sticky A/B split), its cached row or its arm's engine (the runtime pipeline); pads short
        rows (see module docstring)."""
        return _Batch(self, routing or self.routing, user_ids, int(k), filters).complete(self)

    @staticmethod
    def parse_filters(params: dict | None) -> Filters | None:
        """Business rules from request parameters (`budget`, `budget_band`, `city`, `min_bedrooms`,
        `available_only`); None when the request names none. ValueError names the bad field."""
        given = {k: _param_value(v) for k, v in (params or {}).items() if k in FILTER_PARAMS}
        return Filters.from_request(given) if given else None

    async def arecommend(self, user_ids: list[str], k: int, filters: Filters | None = None) -> RoutedRecommendations:
        """recommend() within settings.serve.request_timeout_s. In-process cache hits are answered on the event
        loop; so are the misses of small requests to an engine that does no I/O, batched across the requests of
        one loop iteration (_LoopBatcher). Other misses (remote predictor, Feast, stream state, bulk requests)
        and Redis lookups run on the loop's thread pool, so the loop never waits on a network call."""
        routing = self.routing
        loop = asyncio.get_running_loop()
        limit = self.request_timeout_s
        t0 = time.perf_counter()
        if self.cache.backend == "memory":
            batch = _Batch(self, routing, user_ids, int(k), filters)
            if not batch.missing:
                return batch.result()
            if self._batcher.takes(batch):  # in-process engine, small request: batched on the loop
                rec = await self._batcher.submit(batch)
                if limit <= 0 or time.perf_counter() - t0 <= limit:
                    return rec
                self._timed_out(limit)
            fut = loop.run_in_executor(None, batch.complete, self)
        else:
            fut = loop.run_in_executor(None, self.recommend, user_ids, k, routing, filters)
        if limit <= 0:
            return await fut
        try:
            rec = await asyncio.wait_for(fut, limit)
            # a result that lands after the limit (the worker thread won the race with the timer) is late too
            if time.perf_counter() - t0 <= limit:
                return rec
        except TimeoutError:
            pass
        self._timed_out(limit)

    def _timed_out(self, limit: float):
        m.TIMEOUTS.labels(self.name).inc()
        raise RequestTimeout(f"the request took longer than the {limit:g} s limit (serve.request_timeout_s)")

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
            if math.prod(kshape) != 1 or len(kshape) > 1:
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

    def response_parameters(self, rec: RoutedRecommendations | None = None) -> dict:
        """model_version / variant: one value when every row agrees, else comma-separated per row."""
        if rec is None:
            return {"model_version": self.model_version, "variant": self.variant, "model_type": self.model_type}
        return {"model_version": rec.uniform(rec.versions), "variant": rec.uniform(rec.variants),
                "model_type": self.model_type, "sources": ",".join(rec.sources)}

    # ---- KServe handler --------------------------------------------------------------------------------
    def parse(self, payload: InferRequest) -> tuple[list[str], int, Filters | None]:
        """(user ids, k, business rules) of a v2 request; InvalidInput naming the field otherwise."""
        user_ids, k = self.parse_request(payload)
        try:
            filters = self.parse_filters(payload.parameters)
        except ValueError as exc:
            raise InvalidInput(f"request parameter {exc}") from None
        return user_ids, k, filters

    async def predict(self, payload: InferRequest, headers: dict | None = None,
                      response_headers: dict | None = None, parsed: tuple | None = None) -> InferResponse:
        """The v2 answer. `parsed`: what `parse(payload)` returned, when the caller has already validated it
        (the REST fast path)."""
        t0 = time.perf_counter()
        grpc = bool(getattr(payload, "from_grpc", False))
        if not isinstance(payload, InferRequest):
            m.requests(self.name, self.variant, m.FAILED).inc()
            raise InvalidInput(f"{self.name} speaks the v2 inference protocol only "
                               f"(POST /v2/models/{self.name}/infer or gRPC ModelInfer)")
        try:
            user_ids, k, filters = parsed if parsed is not None else self.parse(payload)
        except InvalidInput:
            m.requests(self.name, self.variant, m.REJECTED).inc()
            raise
        request_id = payload.id or new_request_id()
        rec, params = await self.answer(user_ids, k, filters, request_id, grpc, t0)
        binary = payload.use_binary_outputs
        requested = [o.name for o in payload.request_outputs] if payload.request_outputs else list(OUTPUTS)
        arrays = {OUTPUT_IDS: ("BYTES", rec.property_ids), OUTPUT_SCORES: ("FP32", rec.scores)}
        outputs = []
        for name in requested:
            dtype, arr = arrays[name]
            if grpc:
                out = InferOutput(name=name, shape=list(arr.shape), datatype=dtype)
                out.set_data_from_numpy(arr, binary_data=binary)
            else:  # REST: InferResponse.to_rest serialises the array once, binary or JSON per requested output
                out = InferOutput(name=name, shape=list(arr.shape), datatype=dtype, data=arr)
            outputs.append(out)
        if response_headers is not None:
            response_headers["x-model-version"] = params["model_version"]
            response_headers["x-variant"] = params["variant"]
        return InferResponse(response_id=request_id, model_name=self.name, model_version=rec.versions[0],
                             infer_outputs=outputs, parameters=params, use_binary_outputs=binary,
                             requested_outputs=payload.request_outputs, from_grpc=payload.from_grpc)

    async def answer(self, user_ids: list[str], k: int, filters: Filters | None, request_id: str,
                     grpc: bool = False, t0: float | None = None) -> tuple[RoutedRecommendations, dict]:
        """A validated request's recommendations and response parameters, with its metrics and impressions (what
        every v2 answer shares: `predict`, and the REST fast path's common case)."""
        t0 = time.perf_counter() if t0 is None else t0
        status, variant = m.FAILED, self.variant
        try:
            try:
                rec = await self.arecommend(user_ids, k, filters)
            except RequestTimeout as exc:
                if grpc:
                    raise DeadlineExceeded(str(exc)) from None
                raise
            variant = rec.uniform(rec.variants) if len(set(rec.variants)) == 1 else "mixed"
            params = self.response_parameters(rec)
            self.log_impressions(request_id, user_ids, rec)
            status = m.SUCCESS
            return rec, params
        finally:
            m.requests(self.name, variant, status).inc()
            m.duration(self.name, variant, m.GRPC if grpc else m.REST).observe(time.perf_counter() - t0)
