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
(RecommenderModel.__setstate__), because a spawned worker re-imports a pristine `kserve.model_server`.
"""


import copy
import logging
import os
import sys
import time
import uuid
from pathlib import Path

from rentalml.config import get_settings

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
    """Runs in every spawned REST worker (`--workers N`) when it unpickles the model."""
    configure_logging()
    install_routes(model)


def _error(field: str, msg: str, status: int = 422, detail: list | None = None):
    """FastAPI-style validation error naming the field, plus a one-line `error` like KServe's."""
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={
        "error": f"{field}: {msg}", "detail": detail or [{"loc": ["body", field], "msg": msg, "type": "value_error"}]})


class JSONInferContentType:
    """ASGI middleware. Quirk (KServe 0.21): a v2 REST infer body that is not sent as `application/json` and has
    no `Inference-Header-Content-Length` is taken for binary tensor data and refused (400 "received byte inputs,
    but the 'inference-header-content-length' header is missing"). tritonclient.http sends exactly that when every
    input is JSON (binary_data=False), and so does `curl -d` (form content type). Without that header the body
    can only be JSON, so say so."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith("/infer"):
            headers = scope["headers"]
            if not any(k.lower() == b"inference-header-content-length" for k, _ in headers):
                json_ct = (b"content-type", b"application/json")
                scope = dict(scope, headers=[*(h for h in headers if h[0].lower() != b"content-type"), json_ct])
        await self.app(scope, receive, send)


def install_routes(model, app=None) -> None:
    """Add POST /predict, POST /feedback, GET /health, POST /admin/reload, POST /admin/invalidate, the JWT
    middleware (settings.auth), the 504 timeout answer and JSONInferContentType to KServe's app (idempotent)."""
    import asyncio
    from datetime import datetime
    from typing import Literal

    import orjson
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel, ConfigDict, Field, ValidationError

    from . import metrics as m
    from .auth import JWTMiddleware, Verifier
    from .model import RequestTimeout

    if app is None:
        from kserve.model_server import app
    if getattr(app.state, "rentalml_routes", False):
        return
    app.state.rentalml_routes = True

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")
        user_id: str
        num_recommendations: int = model.default_k
        model_type: str | None = None
        include_explanations: bool = False
        # business rules for this request: budget, budget_band [lo, hi], city, min_bedrooms, available_only
        filters: dict | None = None

    class ExplainRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        user_id: str = Field(min_length=1)
        property_id: str = Field(min_length=1)

    class FeedbackRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")
        user_id: str = Field(min_length=1)
        property_id: str = Field(min_length=1)
        outcome: Literal["click", "save", "inquiry"]
        request_id: str | None = None
        variant: str | None = None
        model_version: str | None = None
        timestamp: datetime | None = None

    class ReloadRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        champion: str | None = None
        challenger: str | None = None
        challenger_percent: float | None = Field(default=None, ge=0, le=100)

    class InvalidateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        user_ids: list[str] = []
        property_ids: list[str] = []

    async def parse(request: Request, schema):
        """(validated body, None) or (None, 4xx response naming the field)."""
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            return None, _error("body", "the request body must be a JSON object", 400)
        try:
            return schema.model_validate(body), None
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "body"
            return None, _error(field, first["msg"], detail=[
                {"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()])

    async def predict(request: Request):
        t0 = time.perf_counter()
        status = m.FAILED
        variant = model.variant
        try:
            req, bad = await parse(request, PredictRequest)
            if bad is not None:
                status = m.REJECTED
                return bad
            if not req.user_id:
                status = m.REJECTED
                return _error("user_id", "must be a non-empty string")
            problem = model.k_problem(req.num_recommendations)
            if problem:
                status = m.REJECTED
                return _error("num_recommendations", problem)
            k = req.num_recommendations
            if req.model_type and req.model_type != model.model_type:
                status = m.REJECTED
                return _error("model_type", f"'{req.model_type}' is not served here; this server serves "
                                            f"'{model.model_type}' (send null for the served model)")
            try:
                filters = model.parse_filters(req.filters)
            except ValueError as exc:
                status = m.REJECTED
                field, _, msg = str(exc).partition(": ")
                return _error(f"filters.{field}", msg or str(exc))
            if req.filters and filters is None:
                status = m.REJECTED
                return _error("filters", f"unknown rule(s) {sorted(req.filters)}; rules: budget, budget_band, city, "
                                         "min_bedrooms, available_only")
            rec = await model.arecommend([req.user_id], k, filters)
            arm, variant, version = rec.arms[0], rec.variants[0], rec.versions[0]
            items = []
            for rank, (pid, score) in enumerate(zip(rec.property_ids[0], rec.scores[0], strict=True), start=1):
                if not pid:  # padding past the end of a short cold-start list
                    break
                item = {"property_id": pid, "score": float(score), "rank": rank}
                if req.include_explanations:
                    item["explanation"] = arm.engine.explain(req.user_id, pid)
                items.append(item)
            request_id = uuid.uuid4().hex
            model.log_impressions(request_id, [req.user_id], rec)
            status = m.SUCCESS
            return Response(orjson.dumps(
                {"user_id": req.user_id, "recommendations": items, "model_version": version,
                 "model_type": arm.model_type, "variant": variant, "source": rec.sources[0],
                 "request_id": request_id}), media_type="application/json",
                headers={"x-model-version": version, "x-variant": variant})
        finally:
            m.requests(model.name, variant, status).inc()
            if status != m.REJECTED:
                m.duration(model.name, variant, m.JSON).observe(time.perf_counter() - t0)

    async def explain(request: Request):
        """Why (user, property) would be recommended, with the property's current attributes (Feast online
        features when serve.feature_source=feast) and the user's streamed history."""
        req, bad = await parse(request, ExplainRequest)
        if bad is not None:
            return bad
        arm = model.arm_for(req.user_id)
        text = await asyncio.get_running_loop().run_in_executor(
            None, arm.engine.explain, req.user_id, req.property_id)
        return JSONResponse({"user_id": req.user_id, "property_id": req.property_id, "explanation": text,
                             "variant": arm.label, "model_version": arm.model_version})

    async def feedback(request: Request):
        req, bad = await parse(request, FeedbackRequest)
        if bad is not None:
            return bad
        arm = model.arm_for(req.user_id)
        event = model.outcomes.outcome(
            request_id=req.request_id, user_id=req.user_id, property_id=req.property_id,
            variant=req.variant or arm.label, model_version=req.model_version or arm.model_version,
            outcome=req.outcome, timestamp=req.timestamp)
        return JSONResponse(event, status_code=202)

    async def reload(request: Request):
        body = None
        if (await request.body()).strip():
            body, bad = await parse(request, ReloadRequest)
            if bad is not None:
                return bad
        body = body or ReloadRequest()
        for field in ("champion", "challenger"):
            path = getattr(body, field)
            if path is not None and not (Path(path) / "bundle.json").exists():
                return _error(field, f"{path} is not a model bundle (no bundle.json)", 400)
        try:
            # in the background: requests keep being answered by the current version meanwhile
            result = await asyncio.get_running_loop().run_in_executor(
                None, lambda: model.reload(body.champion, body.challenger, body.challenger_percent))
        except (FileNotFoundError, LookupError, ValueError) as exc:
            return _error("reload", str(exc), 409)
        await model.settled()  # requests that began on the old version are answered before this one
        return JSONResponse(result)

    async def invalidate(request: Request):
        body, bad = await parse(request, InvalidateRequest)
        if bad is not None:
            return bad
        from rentalml.cache import invalidate as drop

        n = await asyncio.get_running_loop().run_in_executor(
            None, lambda: drop(body.user_ids, body.property_ids, cache=model.cache))
        return JSONResponse({"invalidated": n, "backend": model.cache.backend})

    async def health():
        routing = model.routing.describe() if model.routing is not None else None
        body = {"status": "ok" if model.ready else "loading", "model": model.name,
                "model_version": model.model_version, "model_type": model.model_type, "variant": model.variant,
                "routing": routing, "cache": {"backend": model.cache.backend, "hit_rate": model.cache.hit_rate},
                "auth_enabled": verifier.enabled}
        return JSONResponse(body, status_code=200 if model.ready else 503)

    async def on_timeout(request: Request, exc: RequestTimeout):
        return JSONResponse({"error": str(exc)}, status_code=504)

    app.add_exception_handler(RequestTimeout, on_timeout)
    app.add_middleware(JSONInferContentType)
    # outermost layers, around the stack Starlette builds on the first request (after KServe added its own):
    # JWT for every path, then the v2 REST infer fast path (fastpath.py)
    verifier = Verifier()
    fast = get_settings().serve.fast_path
    build_stack = app.build_middleware_stack

    def build_middleware_stack():
        stack = build_stack()
        if fast:
            from .fastpath import FastV2Infer

            stack = FastV2Infer(stack, model, lambda: app.exception_handlers)
        return JWTMiddleware(stack, verifier) if verifier.enabled else stack

    def body(schema: type[BaseModel], required: bool = True) -> dict:
        """The request schema for /openapi.json and /docs: the handlers parse the body themselves (a 4xx naming
        the field, counted as `rejected`), so FastAPI cannot infer it from their signature."""
        return {"requestBody": {"required": required, "content": {"application/json": {
            "schema": schema.model_json_schema(ref_template="#/components/schemas/{model}")}}}}

    app.build_middleware_stack = build_middleware_stack
    app.add_api_route("/predict", predict, methods=["POST"], tags=["rentalml"], openapi_extra=body(PredictRequest),
                      summary="Recommendations for one user (friendly JSON)")
    app.add_api_route("/explain", explain, methods=["POST"], tags=["rentalml"], openapi_extra=body(ExplainRequest),
                      summary="Explanation of one (user, property) pair with current attributes")
    app.add_api_route("/feedback", feedback, methods=["POST"], tags=["rentalml"], status_code=202,
                      openapi_extra=body(FeedbackRequest),
                      summary="A/B outcome of a served recommendation: click, save or inquiry")
    app.add_api_route("/admin/reload", reload, methods=["POST"], tags=["rentalml"],
                      openapi_extra=body(ReloadRequest, required=False),
                      summary="Hot reload: load the new version(s), then swap (no request dropped)")
    app.add_api_route("/admin/invalidate", invalidate, methods=["POST"], tags=["rentalml"],
                      openapi_extra=body(InvalidateRequest),
                      summary="Drop cached recommendations of users / listing properties")
    app.add_api_route("/health", health, methods=["GET"], tags=["rentalml"], summary="Service health")


def resolve_bundle(bundle: Path | None, alias: str) -> Path:
    if bundle is not None:
        if not (Path(bundle) / "bundle.json").exists():
            raise FileNotFoundError(f"{bundle} is not a model bundle (no bundle.json)")
        return Path(bundle)
    from .model import resolve_alias

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

    from . import MODEL_NAME
    from .auth import Verifier, grpc_interceptor
    from .auth import log_state as log_auth_state
    from .model import RecommenderModel

    model = RecommenderModel(bundle, name=model_name or MODEL_NAME, variant=variant or alias, challenger=challenger,
                             challenger_percent=challenger_percent, predictor_url=predictor_url)
    model.load()
    log.info("loaded %s in %.2fs: %s", model.name, model.load_seconds, model.routing.describe())
    install_routes(model)
    _install_docs()
    model.install_routes_on_unpickle = workers > 1
    verifier = Verifier()
    log_auth_state(verifier)  # a WARNING when auth is off
    _install_grpc_server(grpc_interceptor(verifier) if verifier.enabled else None,
                         model if settings.fast_path else None)
    server = _model_server_class()(
        http_port=http_port, grpc_port=grpc_port, workers=workers, max_threads=grpc_threads, enable_docs_url=False,
        enable_latency_logging=logging.getLogger("kserve.trace").isEnabledFor(logging.INFO))
    try:
        server.start([model])
    finally:
        model.outcomes.flush(5.0)
        _reap_rest_workers(server)


def _install_docs() -> None:
    """/docs: Swagger UI over /openapi.json (the friendly API's schemas and KServe's v2 routes). KServe builds its
    FastAPI app at import from its own argv flag `--enable_docs_url`, so the page is added to that app here."""
    import kserve.model_server as ms
    from fastapi.openapi.docs import get_swagger_ui_html

    app = ms.app
    if app.docs_url or any(getattr(r, "path", None) == "/docs" for r in app.routes):
        return

    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="rentalml serve — API")

    app.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False)


GRPC_MAX_METADATA_BYTES = 64 * 1024


def _install_grpc_server(interceptor=None, fast_model=None) -> None:
    """KServe 0.21 builds its grpc.aio server with fixed interceptors and servicer (GRPCServer.start): swap in a
    subclass whose server runs `interceptor` first (JWT on every method but ServerLive/ServerReady/ModelReady)
    and, with `fast_model`, answers that model's ModelInfer without KServe's dataplane
    (fastpath.fast_servicer_class). Neither: KServe's own server."""
    if interceptor is None and fast_model is None:
        return
    from concurrent import futures

    import kserve.model_server as ms
    from grpc import aio
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
    from kserve.protocol.grpc.server import GRPCServer
    from kserve.protocol.grpc.servicer import InferenceServicer

    from .fastpath import fast_servicer_class

    servicer_class = InferenceServicer if fast_model is None else fast_servicer_class(fast_model)
    interceptors = (*((interceptor,) if interceptor is not None else ()), LoggingInterceptor(),
                    ExceptionToStatusInterceptor())

    class RentalGRPCServer(GRPCServer):
        async def start(self, max_workers):
            servicer = servicer_class(self._data_plane, self._model_repository_extension)
            self._server = aio.server(
                futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=interceptors,
                options=[("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                         ("grpc.max_receive_message_length", self._kwargs.get("grpc_max_receive_message_length")),
                         # request metadata up to 64 KiB reaches the JWT interceptor, which refuses a token over
                         # auth.max_token_bytes (8 KiB) as UNAUTHENTICATED; gRPC's default soft limit (8 KiB)
                         # would answer RESOURCE_EXHAUSTED first. Over 64 KiB: RESOURCE_EXHAUSTED, always.
                         ("grpc.max_metadata_size", GRPC_MAX_METADATA_BYTES),
                         ("grpc.absolute_max_metadata_size", GRPC_MAX_METADATA_BYTES)])
            grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
            self._server.add_insecure_port(f"[::]:{self._port}")
            await self._server.start()
            await self._server.wait_for_termination()

    ms.GRPCServer = RentalGRPCServer


def _model_server_class():
    import asyncio
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
            while not self._started and not any(t.done() for t in tasks):
                if await self._startup_complete():
                    self._started = True
                    log.info("serving %s on http :%s, grpc :%s", ", ".join(self.registered_models.get_models()),
                             self.http_port, self.grpc_port if self.enable_grpc else "-")
                else:
                    await asyncio.sleep(0.05)
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
    for p in alive:
        log.warning("terminating REST worker %s left running after shutdown", p.pid)
        p.terminate()
    deadline = time.monotonic() + grace_s
    for p in alive:
        p.join(timeout=max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
