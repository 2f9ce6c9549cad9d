"""The friendly JSON API on the HTTP port, next to KServe's v2 routes:

  POST /predict           recommendations for one user
  POST /explain           why (user, property) would be recommended
  POST /feedback          an A/B outcome (click, save, inquiry) of a served recommendation
  POST /admin/reload      hot reload: load the new version(s), then swap (no request dropped)
  POST /admin/invalidate  drop cached recommendations of users / listing properties
  GET  /health            service health
  GET  /docs              Swagger UI over /openapi.json (these schemas and KServe's v2 routes)

The handlers parse their bodies themselves (api/schemas.py), so a bad body is a 4xx naming the field (FastAPI's
shape plus a one-line `error` like KServe's) and counted as `rejected`; the schemas still reach /openapi.json
through `openapi_extra`. The served model is `app.state.recommender` (`install`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from .. import metrics as m
from ..errors import RequestTimeout
from ..heap import trim_heap
from ..protocol import FILTER_PARAMS, decode
from .schemas import ExplainRequest, FeedbackRequest, InvalidateRequest, PredictRequest, ReloadRequest


def _body(schema: type[BaseModel], required: bool = True) -> dict:
    """The request schema for /openapi.json and /docs (FastAPI cannot infer it from the handlers' signature)."""
    return {"requestBody": {"required": required, "content": {"application/json": {
        "schema": schema.model_json_schema(ref_template="#/components/schemas/{model}")}}}}


#: (path, method, endpoint, add_api_route options) of every route, registered on the app itself by `install`: a
#: router included with `app.include_router` costs ~100 more Python calls a request (FastAPI's included-router
#: scope bookkeeping), a tenth of what /predict spends in Python
ROUTES: list[tuple[str, str, object, dict]] = []


def route(path: str, method: str, **options):
    def register(endpoint):
        ROUTES.append((path, method, endpoint, options))
        return endpoint

    return register


def error(field: str, msg: str, status: int = 422, detail: list | None = None) -> JSONResponse:
    """FastAPI-style validation error naming the field, plus a one-line `error` like KServe's."""
    return JSONResponse(status_code=status, content={
        "error": f"{field}: {msg}", "detail": detail or [{"loc": ["body", field], "msg": msg, "type": "value_error"}]})


async def parse(request: Request, schema: type[BaseModel]):
    """(validated body, None) or (None, 4xx response naming the field)."""
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        return None, error("body", "the request body must be a JSON object", 400)
    try:
        return schema.model_validate(body), None
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        return None, error(field, first["msg"], detail=[
            {"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()])


@route("/predict", "POST", openapi_extra=_body(PredictRequest), summary="Recommendations for one user (friendly JSON)")
async def predict(request: Request):
    model = request.app.state.recommender
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
            return error("user_id", "must be a non-empty string")
        k = model.default_k if req.num_recommendations is None else req.num_recommendations
        problem = model.k_problem(k)
        if problem:
            status = m.REJECTED
            return error("num_recommendations", problem)
        if req.model_type and req.model_type != model.model_type:
            status = m.REJECTED
            return error("model_type", f"'{req.model_type}' is not served here; this server serves "
                                       f"'{model.model_type}' (send null for the served model)")
        try:
            filters = decode.filters(req.filters)
        except ValueError as exc:
            status = m.REJECTED
            field, _, msg = str(exc).partition(": ")
            return error(f"filters.{field}", msg or str(exc))
        if req.filters and filters is None:
            status = m.REJECTED
            return error("filters", f"unknown rule(s) {sorted(req.filters)}; rules: {', '.join(FILTER_PARAMS)}")
        rec = await model.recommend([req.user_id], k, filters)
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


@route("/explain", "POST", openapi_extra=_body(ExplainRequest),
       summary="Explanation of one (user, property) pair with current attributes")
async def explain(request: Request):
    """Why (user, property) would be recommended, with the property's current attributes (Feast online
    features when serve.feature_source=feast) and the user's streamed history."""
    model = request.app.state.recommender
    req, bad = await parse(request, ExplainRequest)
    if bad is not None:
        return bad
    arm = model.arm_for(req.user_id)
    text = await asyncio.get_running_loop().run_in_executor(None, arm.engine.explain, req.user_id, req.property_id)
    return JSONResponse({"user_id": req.user_id, "property_id": req.property_id, "explanation": text,
                         "variant": arm.label, "model_version": arm.model_version})


@route("/feedback", "POST", status_code=202, openapi_extra=_body(FeedbackRequest),
       summary="A/B outcome of a served recommendation: click, save or inquiry")
async def feedback(request: Request):
    model = request.app.state.recommender
    req, bad = await parse(request, FeedbackRequest)
    if bad is not None:
        return bad
    arm = model.arm_for(req.user_id)
    event = model.outcomes.outcome(
        request_id=req.request_id, user_id=req.user_id, property_id=req.property_id,
        variant=req.variant or arm.label, model_version=req.model_version or arm.model_version,
        outcome=req.outcome, timestamp=req.timestamp)
    return JSONResponse(event, status_code=202)


@route("/admin/reload", "POST", openapi_extra=_body(ReloadRequest, required=False),
       summary="Hot reload: load the new version(s), then swap (no request dropped)")
async def reload(request: Request):
    model = request.app.state.recommender
    body = None
    if (await request.body()).strip():
        body, bad = await parse(request, ReloadRequest)
        if bad is not None:
            return bad
    body = body or ReloadRequest()
    for field in ("champion", "challenger"):
        path = getattr(body, field)
        if path is not None and not (Path(path) / "bundle.json").exists():
            return error(field, f"{path} is not a model bundle (no bundle.json)", 400)
    try:
        # in the background: requests keep being answered by the current version meanwhile
        result = await asyncio.get_running_loop().run_in_executor(
            None, lambda: model.reload(body.champion, body.challenger, body.challenger_percent))
    except ConnectionError as exc:  # RegistryUnreachable: the served version(s) keep answering
        return error("reload", f"{exc}; still serving {model.routing.describe() if model.routing else None}", 503)
    except (FileNotFoundError, LookupError, ValueError) as exc:
        return error("reload", str(exc), 409)
    await model.batcher.settled()  # requests that began on the old version are answered before this one
    return JSONResponse(result)


@route("/admin/invalidate", "POST", openapi_extra=_body(InvalidateRequest),
       summary="Drop cached recommendations of users / listing properties")
async def invalidate(request: Request):
    model = request.app.state.recommender
    body, bad = await parse(request, InvalidateRequest)
    if bad is not None:
        return bad
    from rentalml.cache import invalidate as drop

    def dropped() -> int:
        n = drop(body.user_ids, body.property_ids, cache=model.cache)
        trim_heap()  # the key lists of a large invalidation are freed: their pages go back too
        return n

    n = await asyncio.get_running_loop().run_in_executor(None, dropped)
    return JSONResponse({"invalidated": n, "backend": model.cache.backend})


@route("/health", "GET", summary="Service health")
async def health(request: Request):
    model = request.app.state.recommender
    routing = model.routing.describe() if model.routing is not None else None
    body = {"status": "ok" if model.ready else "loading", "model": model.name,
            "model_version": model.model_version, "model_type": model.model_type, "variant": model.variant,
            "routing": routing, "cache": {"backend": model.cache.backend, "hit_rate": model.cache.hit_rate},
            "auth_enabled": request.app.state.auth_enabled}
    if model.registry_mode:
        from ..loading import registry_health

        body["registry"] = registry_health(model.routing)
    return JSONResponse(body, status_code=200 if model.ready else 503)


async def on_timeout(request: Request, exc: RequestTimeout):
    return JSONResponse({"error": str(exc)}, status_code=504)


def install(app: FastAPI, model, *, auth_enabled: bool) -> None:
    """These routes and the 504 answer to a request timeout (v2 REST's too) on `app`, serving `model`."""
    app.state.recommender = model
    app.state.auth_enabled = auth_enabled
    for path, method, endpoint, options in ROUTES:
        app.add_api_route(path, endpoint, methods=[method], tags=["rentalml"], **options)
    app.add_exception_handler(RequestTimeout, on_timeout)
    install_docs(app)


def install_docs(app: FastAPI) -> None:
    """/docs: Swagger UI over /openapi.json. KServe builds its FastAPI app at import from its own argv flag
    `--enable_docs_url`, so the page is added to that app here."""
    from fastapi.openapi.docs import get_swagger_ui_html

    if app.docs_url or any(getattr(r, "path", None) == "/docs" for r in app.routes):
        return

    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="rentalml serve — API")

    app.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False)
