"""The v2 REST infer hot path: `POST /v2/models/<model>/infer` answered in front of KServe's FastAPI stack.

Why: on this project's 2-core machine KServe 0.21's REST stack (Starlette middlewares incl. its TimingMiddleware
with route-name resolution and two trace-log f-strings per request, FastAPI routing and dependency solving,
dataplane decode/encode, Response objects) costs ~0.5 ms per request, about as much as the model; a raw uvicorn
round trip with tritonclient costs ~0.2 ms (docs/benchmarks.md, "Serving").

What stays the same: the request is decoded by KServe's own `InferRequest.from_bytes` (binary tensors, JSON
data, `parameters`, requested `outputs`), answered by the model's `Model.__call__` (so `RecommenderModel.predict`
with its validation, routing, cache, metrics and impression log, and KServe's own predict histograms), encoded
by `InferResponse.to_rest` and sent with the same headers (`inference-header-content-length`,
`x-model-version`, `x-variant`). Errors raised while answering go through the app's own exception handlers
(KServe's and rentalml's: 400 naming the input, 504 on timeout, ...).

What it does not take: anything it cannot prove well-formed up front — another path or method, a model that is
not ready, a body that does not decode, a request `RecommenderModel.parse_request` / `parse_filters` refuses.
Those are replayed (same body) into the normal stack, so every error message still comes from one place.
`serve.fast_path=false` turns the layer off (the conformance test runs both and compares).
"""

from __future__ import annotations

import inspect
import logging

import orjson

log = logging.getLogger("rentalml.inference")

_HEADER_LEN = b"inference-header-content-length"


def _well_formed(doc) -> bool:
    """The JSON header's shape as the v2 protocol (and KServe's pydantic InferenceRequest) defines it."""
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        return False
    for inp in doc["inputs"]:
        if not (isinstance(inp, dict) and isinstance(inp.get("name"), str) and isinstance(inp.get("datatype"), str)
                and isinstance(inp.get("shape"), list) and all(type(d) is int for d in inp["shape"])):
            return False
        params = inp.get("parameters")
        if params is not None and not (isinstance(params, dict) and type(params.get("binary_data_size", 0)) is int):
            return False
    outs = doc.get("outputs")
    if outs is not None and not (isinstance(outs, list) and all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in outs)):
        return False
    return (doc.get("parameters") is None or isinstance(doc["parameters"], dict)) and \
        (doc.get("id") is None or isinstance(doc["id"], str))


class FastV2Infer:
    """ASGI layer: the v2 REST infer of one model (see the module docstring); everything else passes through."""

    def __init__(self, app, model, handlers_of):
        self.app = app  # the normal (KServe) stack
        self.model = model
        self.path = f"/v2/models/{model.name}/infer"
        self._handlers_of = handlers_of  # () -> {exception class: handler}: the FastAPI app's handlers

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            request, headers = self._decode(scope, body)
        except Exception as exc:  # noqa: BLE001 - a problem KServe's stack would answer with a 500 (see _decode)
            await self._error(exc, scope, replay, send)
            return
        if request is None:  # not provably well-formed: the normal stack answers, errors included
            await self.app(scope, replay, send)
            return
        try:
            response_headers: dict = {}
            response = await self.model.predict(request, headers, response_headers)
            payload, json_length = response.to_rest()
        except Exception as exc:
            await self._error(exc, scope, replay, send)
            return
        out = [(b"x-model-version", str(response_headers.get("x-model-version", "")).encode()),
               (b"x-variant", str(response_headers.get("x-variant", "")).encode())]
        if json_length is None:  # the JSON document KServe's endpoint returns (its pydantic response model)
            from kserve.protocol.rest.v2_datamodels import InferenceResponse

            data = orjson.dumps(InferenceResponse.model_validate(payload).model_dump(mode="json"))
            out.append((b"content-type", b"application/json"))
        else:
            data = payload
            out.append((_HEADER_LEN, str(json_length).encode()))  # (KServe 0.21 sends no content-type here)
        out.append((b"content-length", str(len(data)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": out})
        await send({"type": "http.response.body", "body": data})

    def _decode(self, scope, body: bytes):
        """(InferRequest, headers) when the request is well-formed and the model will take it, else (None, None)."""
        model = self.model
        if not model.ready:
            return None, None
        headers = {}
        for k, v in scope["headers"]:
            headers[k.decode("latin-1").lower()] = v.decode("latin-1")
        if "cloudevents" in headers.get("content-type", "") or any(k.startswith("ce-") for k in headers):
            return None, None  # CloudEvents are KServe's to unwrap
        try:
            from kserve.protocol.infer_type import InferRequest

            json_length = headers.get(_HEADER_LEN.decode())
            json_length = int(json_length) if json_length is not None else len(body)
            if not 0 < json_length <= len(body):
                return None, None
            doc = orjson.loads(body[:json_length])
            if not _well_formed(doc):
                return None, None
        except Exception:  # noqa: BLE001 - the normal stack names the problem
            return None, None
        # the binary tensors must fill the rest of the body exactly. KServe 0.21 does not check: a short tensor
        # fails deep in its BYTES decoder with a 500 (still so with serve.fast_path=false); here it is a 400
        declared = {i["name"]: int((i.get("parameters") or {}).get("binary_data_size", 0)) for i in doc["inputs"]}
        if sum(declared.values()) != len(body) - json_length:
            from kserve.errors import InvalidInput

            sizes = ", ".join(f"'{n}' {b}" for n, b in declared.items() if b)
            raise InvalidInput(f"binary tensor data: the inputs declare {sum(declared.values())} bytes "
                               f"(binary_data_size: {sizes or 'none'}) but {len(body) - json_length} bytes follow "
                               f"the {json_length}-byte JSON header")
        try:
            request = InferRequest.from_bytes(body, json_length, model.name)
            model.parse_request(request)
            model.parse_filters(request.parameters)
        except Exception:  # noqa: BLE001 - the normal stack names the problem
            return None, None
        return request, headers

    async def _error(self, exc: Exception, scope, receive, send) -> None:
        """The app's own exception handler for `exc` (KServe's InvalidInput → 400, rentalml's timeout → 504, ...)."""
        from starlette.requests import Request

        handlers = self._handlers_of()
        handler = next((handlers[c] for c in type(exc).__mro__ if c in handlers), None)
        if handler is None:
            raise exc
        response = handler(Request(scope, receive), exc)
        if inspect.isawaitable(response):
            response = await response
        await response(scope, receive, send)
