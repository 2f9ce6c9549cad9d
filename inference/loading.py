"""Engine loading: which bundle an arm serves (a directory, a loaded Bundle, or the MLflow registry), the serving
engine built around it as the settings say, the warm-up, and the registry watcher that triggers reloads.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rentalml.config import get_settings
from rentalml.evaluation.ab import CHALLENGER, CHAMPION
from rentalml.runtime.bundle import Bundle
from rentalml.runtime.features import FeastFeatures, LocalFeatures
from rentalml.runtime.pipeline import Engine
from rentalml.services import wait_until

from .routing import Arm, Routing

log = logging.getLogger("rentalml.inference")


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
    if s.serve.fold_in:
        from .freshness import StreamFeed

        feed = StreamFeed(bundle, s, local)
        local.live = feed.live
        return Engine(bundle, stages=stages, features=features, recent=feed.recent, live=feed.live,
                      refresh=feed.refresh, generation=lambda: feed.generation, n_candidates=s.export.n_candidates)
    return Engine(bundle, stages=stages, features=features, n_candidates=s.export.n_candidates)


# ---- the registry -------------------------------------------------------------------------------------------
def pinned_version(alias: str) -> str | None:
    """The registry version pinned for an arm (serve.champion_version / challenger_version, set by the KServe
    deploy step on the transformer), None when the arm follows its alias."""
    serve = get_settings().serve
    v = {CHAMPION: serve.champion_version, CHALLENGER: serve.challenger_version}.get(alias) or ""
    return v.strip() or None


def resolve_alias(alias: str, allow_cache: bool = False) -> tuple[Path, str, bool]:
    """(bundle directory, registry version, from the cache?) of an MLflow alias of settings.model_name, or of the
    version pinned for that arm. `allow_cache` (the first load of a server): when the registry is unreachable, the
    alias's last verified bundle in the local cache (rentalml.registry.cache); otherwise RegistryUnreachable."""
    try:
        from rentalml.registry.cache import bound_client
        from rentalml.registry.mlflow_registry import resolve
    except ImportError as exc:
        raise FileNotFoundError(f"the MLflow registry is unavailable ({exc})") from None
    bound_client()
    got = resolve(alias, version=pinned_version(alias), allow_cache=allow_cache)
    return got.path, got.version, got.cached


def registry_versions(with_challenger: bool, name: str | None = None) -> tuple[str | None, str | None]:
    """The registry versions the arms would serve now (pinned, else the aliases'). RegistryUnreachable when the
    registry cannot be reached (the watcher then keeps the served versions); `ml_registry_up` says which."""
    from rentalml.registry.cache import STATUS, RegistryUnreachable, bound_client
    from rentalml.registry.mlflow_registry import alias_version

    from . import MODEL_NAME
    from . import metrics as m

    bound_client()
    try:
        champ = pinned_version(CHAMPION) or alias_version(CHAMPION)
        chall = (pinned_version(CHALLENGER) or alias_version(CHALLENGER)) if with_challenger else None
    except RegistryUnreachable as exc:
        STATUS.mark(False, str(exc))
        m.REGISTRY_UP.labels(name or MODEL_NAME).set(0)
        raise
    STATUS.mark(True)
    m.REGISTRY_UP.labels(name or MODEL_NAME).set(1)
    return champ, chall


#: `Arm.source` of an arm served from the local bundle cache while the registry was unreachable
CACHED_SOURCE = "cache:"


def from_cache(arm: Arm | None) -> bool:
    return arm is not None and arm.source.startswith(CACHED_SOURCE)


def served_version(arm: Arm | None) -> str | None:
    """An arm's registry version as the watcher compares it: an arm served from the cache never equals the
    registry's answer, so the first check that reaches the registry reloads it from there (same version or not)."""
    if arm is None:
        return None
    return f"{arm.registry_version} (cached)" if from_cache(arm) else arm.registry_version


def mark_registry(name: str, routing: Routing) -> None:
    """After a load in registry mode: `ml_registry_up` and each arm's `ml_model_from_cache`."""
    from rentalml.registry.cache import STATUS

    from . import metrics as m

    if STATUS.up is not None:
        m.REGISTRY_UP.labels(name).set(1 if STATUS.up else 0)
    for arm in (routing.champion, routing.challenger):
        if arm is not None:
            m.MODEL_FROM_CACHE.labels(name, arm.label).set(1 if from_cache(arm) else 0)


def registry_health(routing: Routing | None) -> dict:
    """The `registry` block of GET /health: reachable (as last seen), the error, and the arms served from the
    local cache with their versions."""
    from rentalml.registry.cache import STATUS

    cached = {} if routing is None else {a.arm: a.registry_version for a in (routing.champion, routing.challenger)
                                         if from_cache(a)}
    body = {**STATUS.describe(), "serving_cached": cached}
    if cached:
        body["detail"] = ("registry unreachable, " if STATUS.up is False else "registry back, reloading: ") + \
            ", ".join(f"serving cached {arm} version {v}" for arm, v in cached.items())
    return body


# ---- arms -------------------------------------------------------------------------------------------------
def open_bundle(path) -> Bundle:
    """A bundle directory at `serve.precision` (int8: its scorer.int8.onnx)."""
    precision = get_settings().serve.precision
    if precision not in ("fp32", "int8"):
        raise ValueError(f"serve.precision must be 'fp32' or 'int8', got {precision!r}")
    if precision == "int8" and not (Path(path) / "scorer.int8.onnx").exists():
        raise FileNotFoundError(f"serve.precision=int8 but {path} has no scorer.int8.onnx")
    return Bundle(path, int8=precision == "int8")


def load_arm(arm: str, source, *, label: str, warm_k: int, predictor_url: str | None = None,
             allow_cache: bool = False) -> Arm:
    """An arm serving `source`: a loaded Bundle, a bundle directory, or None (the registry alias `arm`, or the
    version pinned for it; `allow_cache`: from the local cache when the registry is unreachable). The ONNX
    Runtime session is built and the graph (and the cold-start path) run once, so that the first request pays
    nothing extra."""
    if isinstance(source, Bundle):
        bundle, where, reg = source, str(source.path), None
    elif source is None:
        path, reg, cached = resolve_alias(arm, allow_cache)
        where = f"models:/{get_settings().model_name}@{arm}"
        bundle, where = open_bundle(path), (f"{CACHED_SOURCE}{path} ({where} version {reg})" if cached else where)
    else:
        if not (Path(source) / "bundle.json").exists():
            raise FileNotFoundError(f"{source} is not a model bundle (no bundle.json)")
        bundle, where, reg = open_bundle(source), str(source), None
    k = min(warm_k, bundle.n_items)
    bundle.score_histories([np.zeros(1, dtype=np.int64)], k)
    engine = make_engine(bundle, predictor_url)
    engine.recommend([""], k)
    return Arm(arm, label, bundle, where, reg, engine)


def load_routing(champion, challenger, percent: float, *, variant: str, salt: str, warm_k: int,
                 registry_mode: bool, predictor_url: str | None = None,
                 allow_cache: bool = False) -> tuple[Routing, float]:
    """(routing, seconds it took) over newly loaded arms. The challenger is loaded when percent > 0 and there is
    one (a source, or the registry's alias: none there means no canary, logged, not fatal). On a remote predictor
    the two arms must be different Triton model versions."""
    t0 = time.perf_counter()
    champ = load_arm(CHAMPION, champion, label=variant, warm_k=warm_k, predictor_url=predictor_url,
                     allow_cache=allow_cache)
    chall = None
    if percent > 0 and (challenger is not None or registry_mode):
        try:
            chall = load_arm(CHALLENGER, challenger, label=CHALLENGER, warm_k=warm_k, predictor_url=predictor_url,
                             allow_cache=allow_cache)
        except LookupError as exc:
            log.warning("no challenger to serve (%s): all traffic to the champion", exc)
        except ConnectionError as exc:  # RegistryUnreachable, at start only: none cached → champion only
            if not allow_cache:
                raise
            log.warning("no challenger to serve (%s): all traffic to the champion", exc)
    if chall is not None and predictor_url:
        from rentalml.export.triton import triton_version

        if triton_version(chall.bundle.meta) == triton_version(champ.bundle.meta) and \
                chall.bundle.path != champ.bundle.path:
            raise ValueError(f"champion {champ.source} and challenger {chall.source} resolve to the same Triton "
                             f"model version {triton_version(champ.bundle.meta)}: give them their MLflow "
                             "versions (bundle.json model_version)")
    seconds = champ.bundle.load_seconds + (chall.bundle.load_seconds if chall else 0) + (time.perf_counter() - t0)
    return Routing(champ, chall, percent if chall is not None else 0.0, salt), seconds


# ---- the watcher ------------------------------------------------------------------------------------------
class RegistryWatcher:
    """Reload when the registry would serve other versions than the ones served (an alias moved, a pin changed).

    A daemon thread checks every `interval_s` through `wait_until` (rentalml.services: the one wait loop; `clock`
    and `sleep` injectable). A failed check or reload is logged and the current versions keep serving; the next
    round tries again. `stop()` ends the thread at its next wake-up.
    """

    def __init__(self, serving: Callable[[], tuple], latest: Callable[[], tuple], reload: Callable[[], object],
                 interval_s: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] | None = None):
        self.serving, self.latest, self.reload = serving, latest, reload
        self.interval_s = interval_s
        self.clock = clock
        self._stop = threading.Event()
        self.sleep = sleep or self._stop.wait  # (wakes at once on stop())
        self._thread: threading.Thread | None = None

    def moved(self) -> bool:
        """Whether the registry's versions differ from the served ones (False when the registry cannot say)."""
        if self._stop.is_set():
            return True
        try:
            return self.latest() != self.serving()
        except Exception as exc:  # noqa: BLE001 - keep serving the current version; try again next round
            log.warning("registry watch: %s", exc)
            return False

    def run(self) -> None:
        while not self._stop.is_set():
            # the first check one interval after the (re)load, as each later one
            self.sleep(self.interval_s)
            wait_until(self.moved, math.inf, interval=self.interval_s, what="a registry change", clock=self.clock,
                       sleep=self.sleep)
            if self._stop.is_set():
                return
            try:
                self.reload()
            except Exception as exc:  # noqa: BLE001 - keep serving the current version; try again next round
                log.warning("registry watch: %s", exc)

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="registry-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
