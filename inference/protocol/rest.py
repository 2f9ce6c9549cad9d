"""v2 over REST: the infer fast path (`FastV2Infer`) and the content-type fix (`JSONInferContentType`), both ASGI
layers around KServe's FastAPI app.

Why the fast path: on this project's 2-core machine KServe 0.21's REST stack (Starlette middlewares incl. its
TimingMiddleware with route-name resolution and two trace-log f-strings per request, FastAPI routing and
dependency solving, dataplane decode/encode, Response objects) costs ~0.5 ms per request, about as much as the
model; a raw uvicorn round trip with tritonclient costs ~0.2 ms (docs/benchmarks.md, "Serving").

What stays the same: the request becomes the same KServe `InferRequest` (`decode.rest_request`), is answered by
the model's own preprocess → predict → postprocess (`RecommenderModel.infer`: validation, routing, cache,
metrics and impression log; KServe's `Model.__call__` around those only adds KServe's own `request_*_seconds`
histograms, which the fast path does not feed — rentalml's `ml_inference_duration_seconds` is recorded either
way), and is written as `InferResponse.to_rest` writes it (`encode.rest_body`), with the same headers
(`inference-header-content-length`, `x-model-version`, `x-variant`). Errors raised while answering go through
the app's own exception handlers (KServe's and rentalml's: 400 naming the input, 504 on timeout, ...).
The everyday request (binary `user_id`, optional `k`, every output binary, no business rules) skips the KServe
objects altogether: `decode.everyday` decodes it, `RecommenderModel.predict` answers it and `encode.binary`
writes it (~0.12 ms less per request in a tight loop). `tests/test_fastpath.py` holds both stacks to the same
answers.

What it does not take: anything it cannot prove well-formed up front — another path or method, a model that is
not ready, a body that does not decode, a request the decoder fails on other than with InvalidInput. Those are
replayed (same body) into the normal stack, so every error message still comes from one place.
`serve.fast_path=false` turns the layer off (the conformance test runs both and compares).
"""

from __future__ import annotations

import inspect

from . import decode, encode
from .types import InvalidInput

_HEADER_LEN = decode.HEADER_LEN.encode()


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
        while True:  # the ASGI request body, message by message
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

        model = self.model
        head = decode.rest_head(scope["headers"], body) if model.ready else None
        if head is None:  # not for this layer: the normal stack answers, errors included
            await self.app(scope, replay, send)
            return
        query = decode.everyday(head, body, default_k=model.default_k, max_k=model.max_k)
        if query is not None:  # the everyday request: no KServe objects on the way in or out
            try:
                answer = await model.predict(query)
            except Exception as exc:
                await self._error(exc, scope, replay, send)
                return
            rec = answer.rec
            data, json_length = encode.binary(query.request_id, model.name, rec.versions[0], answer.params,
                                              encode.answer_arrays(query, rec.property_ids, rec.scores))
            await self._send(send, data, json_length, answer.params["model_version"], answer.params["variant"])
            return
        try:
            request = decode.rest_request(head, body, model.name)
        except Exception as exc:  # noqa: BLE001 - a problem KServe's stack would answer with a 500 (see decode)
            await self._error(exc, scope, replay, send)
            return
        if request is None:  # not provably well-formed: the normal stack answers, errors included
            await self.app(scope, replay, send)
            return
        try:
            query = await model.preprocess(request, head.headers)
        except InvalidInput as exc:  # counted as rejected by preprocess; the 400 naming the field
            await self._error(exc, scope, replay, send)
            return
        except Exception:  # noqa: BLE001 - the normal stack names the problem
            await self.app(scope, replay, send)
            return
        try:
            response_headers: dict = {}
            answer = await model.predict(query, head.headers, response_headers)
            response = await model.postprocess(answer, head.headers, response_headers)
            payload, json_length = encode.rest_body(query, response)
        except Exception as exc:
            await self._error(exc, scope, replay, send)
            return
        await self._send(send, payload, json_length, response_headers.get("x-model-version", ""),
                         response_headers.get("x-variant", ""))

    @staticmethod
    async def _send(send, data: bytes, json_length: int | None, model_version, variant) -> None:
        out = [(b"x-model-version", str(model_version).encode()), (b"x-variant", str(variant).encode())]
        if json_length is None:
            out.append((b"content-type", b"application/json"))
        else:
            out.append((_HEADER_LEN, str(json_length).encode()))  # (KServe 0.21 sends no content-type here)
        out.append((b"content-length", str(len(data)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": out})
        await send({"type": "http.response.body", "body": data})

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
            if not any(k.lower() == _HEADER_LEN for k, _ in headers):
                json_ct = (b"content-type", b"application/json")
                scope = dict(scope, headers=[*(h for h in headers if h[0].lower() != b"content-type"), json_ct])
        await self.app(scope, receive, send)
