"""`rentalml serve`: KServe ModelServer (REST v2 + gRPC v2) plus the friendly JSON API on the same HTTP port.

HTTP port:  /v2/... (Open Inference Protocol), /v1/..., /metrics (KServe's, default Prometheus registry, so the
            ml_* metrics of rentalml.inference.metrics are there too), and ours: POST /predict, POST /feedback,
            GET /health, POST /admin/reload, POST /admin/invalidate.
gRPC port:  inference.GRPCInferenceService (ModelInfer, ModelReady, ModelMetadata, ServerReady, ...).
Auth (settings.auth.enabled): JWT bearer on everything but health/metrics/readiness (inference/auth.py), REST by
ASGI middleware, gRPC by a server interceptor.

KServe 0.21 builds its REST app from the module-level FastAPI object `kserve.model_server:app` (imported by
string in every REST worker), so extra routes go on that object before `ModelServer.start`. With `--workers N`
the REST workers are *spawned* processes that unpickle the model; the model re-installs these routes there
(`RecommenderModel.worker_init`, set to `worker_init` here), because a spawned worker re-imports a pristine
`kserve.model_server`. The routes themselves live in api/ (friendly JSON) and protocol/ (v2 fast paths).
"""


import copy
import logging
import os
import sys
from pathlib import Path

from rentalml.config import get_settings
from rentalml.services import wait_until

log = logging.getLogger("rentalml.inference")


def _sanitize_argv() -> None:
    # kserve.model_server runs argparse.parse_known_args() on sys.argv at import time (and so does every spawned
    # REST worker, which inherits sys.argv): our own flags such as `--workers` would silently leak into it.
    sys.argv = sys.argv[:1]


def log_level() -> str:
    return os.environ.get("KSERVE_LOGLEVEL", "INFO").upper()


def log_config() -> dict:
    """KServe's logging config with uvicorn (incl. the per-request access log) following KSERVE_LOGLEVEL too:
    stock KServe 0.21 pins uvicorn and uvicorn.access at INFO whatever KSERVE_LOGLEVEL says."""
    from kserve.logging import KSERVE_LOG_CONFIG

    cfg = copy.deepcopy(KSERVE_LOG_CONFIG)
    level = log_level()
    for name in ("kserve", "kserve.trace", "uvicorn", "uvicorn.error", "uvicorn.access"):
        cfg["loggers"].setdefault(name, {})["level"] = level
    cfg["loggers"]["rentalml"] = {"handlers": ["kserve"], "level": level, "propagate": False}
    return cfg


class _QuietInvalidInput(logging.Filter):
    """KServe logs every InvalidInput (a client's malformed request, answered 400 / INVALID_ARGUMENT) at ERROR
    with a traceback; keep one WARNING line instead so log-based alerting sees real server errors only."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and type(exc).__name__ == "InvalidInput":
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args, record.exc_info, record.exc_text = f"rejected request: {exc}", (), None, None
            return logging.getLogger("kserve").isEnabledFor(logging.WARNING)
        return True


def configure_logging() -> None:
    from kserve.logging import configure_logging as kserve_configure

    # once the kserve logger has handlers, KServe's own configure_logging(None) (ModelServer.__init__, each
    # spawned REST worker) leaves the configuration alone
    kserve_configure(log_config())
    kserve_logger = logging.getLogger("kserve")
    if not any(isinstance(f, _QuietInvalidInput) for f in kserve_logger.filters):
        kserve_logger.addFilter(_QuietInvalidInput())
    # FastAPI deprecates ORJSONResponse, KServe's app default: one warning per process, nothing to act on here
    import warnings

    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")


def worker_init(model) -> None:
    """Runs in every spawned REST worker (`--workers N`) when it unpickles the model (RecommenderModel.worker_init)."""
    configure_logging()
    install_rest(model)


def install_rest(model, app=None) -> None:
    """Our parts of KServe's REST app (idempotent): the friendly API and /docs (api/), the 504 timeout answer,
    the v2 content-type fix and the v2 infer fast path (protocol/rest.py), and the JWT middleware outermost
    (settings.auth)."""
    from .api import routes as api
    from .auth import JWTMiddleware, Verifier
    from .protocol.rest import FastV2Infer, JSONInferContentType

    if app is None:
        from kserve.model_server import app
    if getattr(app.state, "rentalml_routes", False):
        return
    app.state.rentalml_routes = True
    verifier = Verifier()
    api.install(app, model, auth_enabled=verifier.enabled)
    app.add_middleware(JSONInferContentType)
    # outermost layers, around the stack Starlette builds on the first request (after KServe added its own):
    # JWT for every path, then the v2 REST infer fast path
    fast = get_settings().serve.fast_path
    build_stack = app.build_middleware_stack

    def build_middleware_stack():
        stack = build_stack()
        if fast:
            stack = FastV2Infer(stack, model, lambda: app.exception_handlers)
        return JWTMiddleware(stack, verifier) if verifier.enabled else stack

    app.build_middleware_stack = build_middleware_stack


def resolve_bundle(bundle: Path | None, alias: str) -> Path:
    if bundle is not None:
        if not (Path(bundle) / "bundle.json").exists():
            raise FileNotFoundError(f"{bundle} is not a model bundle (no bundle.json)")
        return Path(bundle)
    from .loading import resolve_alias

    return resolve_alias(alias)[0]


def serve(bundle: Path | None = None, *, alias: str = "champion", variant: str | None = None,
          http_port: int | None = None, grpc_port: int | None = None, workers: int = 1,
          grpc_threads: int = 4, challenger: Path | None = None, challenger_percent: float | None = None,
          predictor_url: str | None = None, model_name: str | None = None) -> None:
    """Load the bundle(s) and serve until SIGTERM/SIGINT (KServe handles both and shuts down gracefully).

    No `bundle`: the registry's `champion` (and `challenger` when challenger_percent > 0), re-read on
    POST /admin/reload and every serve.reload_poll_s. `alias` other than champion serves that one alias only."""
    settings = get_settings().serve
    http_port = int(http_port if http_port is not None else settings.http_port)
    grpc_port = int(grpc_port if grpc_port is not None else settings.grpc_port)
    if bundle is not None and not (Path(bundle) / "bundle.json").exists():
        raise FileNotFoundError(f"{bundle} is not a model bundle (no bundle.json)")
    if challenger is not None and not (Path(challenger) / "bundle.json").exists():
        raise FileNotFoundError(f"{challenger} is not a model bundle (no bundle.json)")
    if bundle is None and alias != "champion":
        bundle = resolve_bundle(None, alias)
    _sanitize_argv()
    configure_logging()
    from .heap import tune_malloc

    tune_malloc()  # before the model and the servers' threads allocate (inference/heap.py)

    from . import MODEL_NAME
    from .auth import Verifier, grpc_interceptor
    from .auth import log_state as log_auth_state
    from .model import RecommenderModel
    from .protocol import grpc as v2_grpc

    model = RecommenderModel(bundle, name=model_name or MODEL_NAME, variant=variant or alias, challenger=challenger,
                             challenger_percent=challenger_percent, predictor_url=predictor_url)
    model.load()
    log.info("loaded %s in %.2fs: %s", model.name, model.load_seconds, model.routing.describe())
    install_rest(model)
    if workers > 1:  # spawned REST workers unpickle the model, then install their routes with this
        model.worker_init = worker_init
    verifier = Verifier()
    log_auth_state(verifier)  # a WARNING when auth is off
    v2_grpc.install(grpc_interceptor(verifier) if verifier.enabled else None, model if settings.fast_path else None)
    server = _model_server_class()(
        http_port=http_port, grpc_port=grpc_port, workers=workers, max_threads=grpc_threads, enable_docs_url=False,
        enable_latency_logging=logging.getLogger("kserve.trace").isEnabledFor(logging.INFO))
    try:
        server.start([model])
    finally:
        model.outcomes.flush(5.0)
        _reap_rest_workers(server)


def _model_server_class():
    import asyncio
    import math
    import signal

    from kserve import ModelServer

    class RentalModelServer(ModelServer):
        """KServe's ModelServer with signal handling that is safe during start-up.

        Quirk (KServe 0.21): ModelServer.stop() on SIGTERM/SIGINT stops the gRPC server at once; when the signal
        lands while the servers are still starting (e.g. while `--workers N` REST processes are being spawned,
        ~2 s each) the gRPC server is stopped mid-start, the process dies with SIGSEGV and the REST workers are
        left behind as orphans. Here a signal received before start-up completes is held until both the REST
        side and the gRPC server answer, then handled as usual.
        """

        _started = False
        _pending_signal = None

        def register_signal_handler(self):
            def handler(sig, frame):
                if self._started:
                    self.stop(sig)
                elif self._pending_signal is None:
                    log.info("signal %s during start-up: stopping once started", sig)
                    self._pending_signal = sig

            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
                signal.signal(sig, handler)

        async def _serve(self):
            tasks = [asyncio.ensure_future(s) for s in self.servers]
            loop = asyncio.get_running_loop()

            async def state() -> str | None:
                if any(t.done() for t in tasks):
                    return "ended"
                return "started" if await self._startup_complete() else None

            # the one wait loop (rentalml.services.wait_until), in a thread: each check runs on this loop
            outcome = await asyncio.to_thread(
                wait_until, lambda: asyncio.run_coroutine_threadsafe(state(), loop).result(), math.inf,
                interval=0.05, what="the REST and gRPC servers to start")
            if outcome == "started":
                log.info("serving %s on http :%s, grpc :%s", ", ".join(self.registered_models.get_models()),
                         self.http_port, self.grpc_port if self.enable_grpc else "-")
            self._started = True
            if self._pending_signal is not None:
                self.stop(self._pending_signal)
            await asyncio.gather(*tasks)

        async def _startup_complete(self) -> bool:
            if self._rest_multiprocess_server is not None:
                if len(self._rest_multiprocess_server._processes) < self.workers:
                    return False
            elif self._rest_server is not None and not self._rest_server._server.started:
                return False
            if not self.enable_grpc:
                return True
            if self._grpc_server is None or self._grpc_server._server is None:
                return False
            import grpc
            from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
            from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
                    await pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest(), timeout=0.5)
                return True
            except grpc.RpcError:
                return False

    return RentalModelServer


def _reap_rest_workers(server, grace_s: float = 10.0) -> None:
    """Quirk (KServe 0.21, --workers > 1): a SIGTERM that lands while ModelServer.start is still spawning the REST
    workers ends the parent without terminating the workers it already started (they would live on as orphans
    holding the port). Terminate whatever is still alive once ModelServer.start returns."""
    multi = getattr(server, "_rest_multiprocess_server", None)
    procs = [getattr(p, "_process", None) for p in getattr(multi, "_processes", [])] if multi else []
    alive = [p for p in procs if p is not None and p.is_alive()]
    if not alive:
        return
    for p in alive:
        log.warning("terminating REST worker %s left running after shutdown", p.pid)
        p.terminate()
    try:
        wait_until(lambda: not any(p.is_alive() for p in alive), grace_s, interval=0.1, what="the REST workers to end")
    except TimeoutError:
        for p in alive:
            if p.is_alive():
                p.kill()
