"""The v2 REST infer hot path: `POST /v2/models/<model>/infer` answered in front of KServe's FastAPI stack.

Why: on this project's 2-core machine KServe 0.21's REST stack (Starlette middlewares incl. its TimingMiddleware
with route-name resolution and two trace-log f-strings per request, FastAPI routing and dependency solving,
dataplane decode/encode, Response objects) costs ~0.5 ms per request, about as much as the model; a raw uvicorn
round trip with tritonclient costs ~0.2 ms (docs/benchmarks.md, "Serving").

What stays the same: the request becomes the same KServe `InferRequest` (`_request`: `InferRequest.from_bytes`
minus its decode/re-encode round trip of binary tensors), is answered by `RecommenderModel.predict` (its
validation, routing, cache, metrics and impression log; KServe's `Model.__call__` around it only adds identity
pre/postprocess and KServe's own `request_*_seconds` histograms, which the fast path does not feed — rentalml's
`ml_inference_duration_seconds` is recorded either way), and is encoded as `InferResponse.to_rest` encodes it
(`_binary_response` writes the all-binary case itself, the rest goes through to_rest), with the same headers
(`inference-header-content-length`, `x-model-version`, `x-variant`). Errors raised while answering go through
the app's own exception handlers (KServe's and rentalml's: 400 naming the input, 504 on timeout, ...).
`tests/test_fastpath.py` holds both stacks to the same answers.

What it does not take: anything it cannot prove well-formed up front — another path or method, a model that is
not ready, a body that does not decode, a request `RecommenderModel.parse_request` / `parse_filters` refuses.
Those are replayed (same body) into the normal stack, so every error message still comes from one place.
`serve.fast_path=false` turns the layer off (the conformance test runs both and compares).
"""

from __future__ import annotations

import inspect
import logging
import struct

import numpy as np
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
            request, headers, parsed = self._decode(scope, body)
        except Exception as exc:  # noqa: BLE001 - a problem KServe's stack would answer with a 500 (see _decode)
            await self._error(exc, scope, replay, send)
            return
        if request is None:  # not provably well-formed: the normal stack answers, errors included
            await self.app(scope, replay, send)
            return
        try:
            response_headers: dict = {}
            response = await self.model.predict(request, headers, response_headers, parsed=parsed)
            encoded = _binary_response(request, response)
            payload, json_length = encoded if encoded is not None else response.to_rest()
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
        """(InferRequest, headers, parsed) when the request is well-formed and the model takes it (parsed: what
        `RecommenderModel.parse` returned), else Nones."""
        model = self.model
        if not model.ready:
            return None, None, None
        headers = {}
        for k, v in scope["headers"]:
            headers[k.decode("latin-1").lower()] = v.decode("latin-1")
        if "cloudevents" in headers.get("content-type", "") or any(k.startswith("ce-") for k in headers):
            return None, None, None  # CloudEvents are KServe's to unwrap
        try:
            json_length = headers.get(_HEADER_LEN.decode())
            json_length = int(json_length) if json_length is not None else len(body)
            if not 0 < json_length <= len(body):
                return None, None, None
            doc = orjson.loads(body[:json_length])
            if not _well_formed(doc):
                return None, None, None
        except Exception:  # noqa: BLE001 - the normal stack names the problem
            return None, None, None
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
            request = _request(doc, body, json_length, model.name)
            parsed = model.parse(request) if request is not None else None
        except Exception:  # noqa: BLE001 - the normal stack names the problem
            return None, None, None
        return (request, headers, parsed) if parsed is not None else (None, None, None)

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


def _request(doc: dict, body: bytes, json_length: int, model_name: str):
    """`InferRequest.from_bytes` without its round trip: binary tensors stay raw (KServe's InferInput decodes
    them once, in `as_numpy`) instead of being decoded, turned into JSON lists and decoded again (~20 µs a
    request). None where from_bytes would refuse (the normal stack then names the problem)."""
    from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput

    inputs = []
    start = json_length
    for inp in doc["inputs"]:
        params = inp.get("parameters")
        infer_input = InferInput(name=inp["name"], shape=inp["shape"], datatype=inp["datatype"], parameters=params)
        data = inp.get("data")
        if data is not None:
            if infer_input.datatype == "FP16":
                return None
            infer_input.data = data
        elif params and params.get("binary_data_size") is not None:
            end = start + params["binary_data_size"]
            infer_input._raw_data = body[start:end]  # as from_bytes does, before its round trip
            start = end
        else:
            return None
        inputs.append(infer_input)
    outs = doc.get("outputs")
    return InferRequest(model_name=model_name, request_id=doc.get("id"), parameters=doc.get("parameters"),
                        infer_inputs=inputs,
                        request_outputs=None if outs is None else [
                            RequestedOutput(name=o["name"], parameters=o.get("parameters")) for o in outs])


_LEN = struct.Struct("<I")


def _binary_response(request, response) -> tuple[bytes, int] | None:
    """`InferResponse.to_rest` for the common case, every output binary (tritonclient's default): the same JSON
    header and tensor bytes without KServe's per-output dtype/shape checks and numpy iteration (~25 µs a
    request). None for anything else (JSON outputs, other datatypes): to_rest answers those."""
    wanted = request.request_outputs
    if wanted:
        if not all(o.binary_data for o in wanted):
            return None
        names = [o.name for o in wanted]
    elif request.use_binary_outputs:
        names = [o.name for o in response.outputs]
    else:
        return None
    outputs, raws = [], []
    for name in names:
        out = response.get_output_by_name(name)
        if out is None or not isinstance(out.data, np.ndarray) or out.parameters:
            return None
        arr = out.data
        if out.datatype == "BYTES":
            parts = []
            for v in arr.flat:
                b = v if isinstance(v, bytes) else str(v).encode("utf-8")
                parts += (_LEN.pack(len(b)), b)
            raw = b"".join(parts)
        elif out.datatype == "FP32" and arr.dtype == np.float32:
            raw = np.ascontiguousarray(arr).tobytes()
        else:
            return None
        outputs.append({"name": name, "shape": out.shape, "datatype": out.datatype,
                        "parameters": {"binary_data_size": len(raw)}})
        raws.append(raw)
    head = {"id": response.id, "model_name": response.model_name, "model_version": response.model_version,
            "outputs": outputs}
    if response.parameters:
        from kserve.protocol.infer_type import to_http_parameters

        head["parameters"] = to_http_parameters(response.parameters)
    header = orjson.dumps(head)
    return b"".join([header, *raws]), len(header)


def fast_servicer_class(model):
    """KServe's gRPC InferenceServicer with ModelInfer of `model` answered by `RecommenderModel.predict` directly
    (the request validation and conversion KServe's servicer does, then no dataplane model lookup and no
    `Model.__call__`); other models, versions or a model that is not ready take KServe's path. Errors propagate to
    the server's interceptors exactly as before (InvalidInput → INVALID_ARGUMENT, timeout → DEADLINE_EXCEEDED)."""
    from kserve.protocol.grpc.servicer import InferenceServicer
    from kserve.protocol.infer_type import InferRequest

    class FastInferenceServicer(InferenceServicer):
        async def ModelInfer(self, request, context):  # noqa: N802 - the gRPC method name
            if request.model_name != model.name or request.model_version or not model.ready:
                return await super().ModelInfer(request, context)
            self.validate_grpc_request(request)
            response = await model.predict(InferRequest.from_grpc(request))
            return response.to_grpc()

    return FastInferenceServicer
