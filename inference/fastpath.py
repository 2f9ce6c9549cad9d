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
The everyday request (binary `user_id`, optional `k`, every output binary, no business rules) skips the KServe
objects altogether: `_common` decodes it, `RecommenderModel.answer` (predict after parsing) answers it and
`_encode_binary` writes it (~0.12 ms less per request in a tight loop); anything `_common` would have to judge
goes the general way. `tests/test_fastpath.py` holds both stacks to the same answers.

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

from .model import INPUT_K, INPUT_USER, OUTPUT_IDS, OUTPUT_SCORES, OUTPUTS, new_request_id

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

        head = self._head(scope, body)
        if head is None:  # not for this layer: the normal stack answers, errors included
            await self.app(scope, replay, send)
            return
        common = self._common(head, body)
        if common is not None:  # the everyday request: no KServe objects on the way in or out
            user_ids, k, request_id, names = common
            try:
                rec, params = await self.model.answer(user_ids, k, None, request_id)
            except Exception as exc:
                await self._error(exc, scope, replay, send)
                return
            arrays = {OUTPUT_IDS: ("BYTES", rec.property_ids), OUTPUT_SCORES: ("FP32", rec.scores)}
            data, json_length = _encode_binary(request_id, self.model.name, rec.versions[0], params,
                                               [(n, *arrays[n]) for n in names])
            await self._send(send, data, json_length, params["model_version"], params["variant"])
            return
        try:
            request, headers, parsed = self._decode(head, body)
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
        if json_length is None:  # the JSON document KServe's endpoint returns (its pydantic response model)
            from kserve.protocol.rest.v2_datamodels import InferenceResponse

            payload = orjson.dumps(InferenceResponse.model_validate(payload).model_dump(mode="json"))
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

    def _common(self, head, body: bytes):
        """(user ids, k, request id, output names) of the everyday request, decided without building KServe
        objects: binary `user_id` BYTES [N] and optionally `k` INT32/INT64 [1], nothing else, no business-rule
        parameters, every output binary. Anything else — and anything this check would have to judge (a k out of
        range, bytes that are not UTF-8, sizes that do not add up) — is None: the general path, where
        `RecommenderModel.parse` names the problem."""
        model = self.model
        _, json_length, binary, doc = head
        if not binary:
            return None
        if not isinstance(doc, dict) or not doc.keys() <= {"id", "inputs", "outputs", "parameters"}:
            return None
        params = doc.get("parameters")
        request_id = doc.get("id")
        if not (params is None or (isinstance(params, dict) and params.keys() <= {"binary_data_output"})) or \
                not (request_id is None or (isinstance(request_id, str) and request_id)):
            return None
        outs = doc.get("outputs")
        if outs is None:
            if not (params and params.get("binary_data_output") is True):
                return None
            names = list(OUTPUTS)
        else:
            if not isinstance(outs, list) or not outs:
                return None
            names = []
            for o in outs:
                if not (isinstance(o, dict) and o.keys() <= {"name", "parameters"} and o.get("name") in OUTPUTS
                        and o.get("parameters") == {"binary_data": True} and o["name"] not in names):
                    return None
                names.append(o["name"])
        inputs = doc.get("inputs")
        if not isinstance(inputs, list) or not 1 <= len(inputs) <= 2:
            return None
        tensors, start = {}, json_length
        for inp in inputs:
            if not (isinstance(inp, dict) and inp.keys() == {"name", "shape", "datatype", "parameters"}
                    and isinstance(inp["parameters"], dict) and inp["parameters"].keys() == {"binary_data_size"}):
                return None
            size = inp["parameters"]["binary_data_size"]
            if type(size) is not int or size < 0 or inp["name"] in tensors:
                return None
            tensors[inp["name"]] = (inp["datatype"], inp["shape"], body[start: start + size])
            start += size
        if start != len(body) or not tensors.keys() <= {INPUT_USER, INPUT_K} or INPUT_USER not in tensors:
            return None
        dtype, shape, raw = tensors[INPUT_USER]
        if dtype != "BYTES" or not (isinstance(shape, list) and len(shape) == 1 and type(shape[0]) is int
                                    and shape[0] >= 1):
            return None
        user_ids, off = [], 0
        try:
            while off < len(raw):
                (n,) = _LEN.unpack_from(raw, off)
                user_ids.append(raw[off + 4: off + 4 + n].decode("utf-8"))
                off += 4 + n
        except (struct.error, UnicodeDecodeError):
            return None
        if off != len(raw) or len(user_ids) != shape[0]:
            return None
        k = model.default_k
        if INPUT_K in tensors:
            dtype, shape, raw = tensors[INPUT_K]
            if shape != [1] or (dtype, len(raw)) not in (("INT32", 4), ("INT64", 8)):
                return None
            k = int.from_bytes(raw, "little", signed=True)
            if model.k_problem(k):
                return None
        return user_ids, k, request_id or new_request_id(), names

    def _head(self, scope, body: bytes):
        """(headers, JSON header length, whether binary tensors follow it, the JSON header) of a request this layer
        may answer; None for a model that is not ready, CloudEvents (KServe's to unwrap) and a JSON header that
        does not parse (the normal stack names the problem)."""
        if not self.model.ready:
            return None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if "cloudevents" in headers.get("content-type", "") or any(k.startswith("ce-") for k in headers):
            return None
        binary = _HEADER_LEN.decode() in headers
        try:
            json_length = int(headers[_HEADER_LEN.decode()]) if binary else len(body)
            if not 0 < json_length <= len(body):
                return None
            return headers, json_length, binary, orjson.loads(body[:json_length])
        except ValueError:  # (orjson.JSONDecodeError is a ValueError)
            return None

    def _decode(self, head, body: bytes):
        """(InferRequest, headers, parsed) when the request decodes (parsed: what `RecommenderModel.parse` returned,
        None when it refused the request: predict then raises the same InvalidInput), else Nones."""
        model = self.model
        headers, json_length, _, doc = head
        if not _well_formed(doc):
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
        except Exception:  # noqa: BLE001 - the normal stack names the problem
            return None, None, None
        if request is None:
            return None, None, None
        from kserve.errors import InvalidInput

        try:
            parsed = model.parse(request)
        except InvalidInput:  # predict parses again: counts the request as rejected and raises the 400 naming it
            return request, headers, None
        except Exception:  # noqa: BLE001 - the normal stack names the problem
            return None, None, None
        return request, headers, parsed

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
    """`InferResponse.to_rest` for the common case, every output binary (tritonclient's default), through
    `_encode_binary` instead of KServe's per-output dtype/shape checks and numpy iteration. None for anything else
    (JSON outputs, other datatypes): to_rest answers those."""
    wanted = request.request_outputs
    if wanted:
        if not all(o.binary_data for o in wanted):
            return None
        names = [o.name for o in wanted]
    elif request.use_binary_outputs:
        names = [o.name for o in response.outputs]
    else:
        return None
    outputs = []
    for name in names:
        out = response.get_output_by_name(name)
        if out is None or not isinstance(out.data, np.ndarray) or out.parameters or \
                out.datatype not in ("BYTES", "FP32") or (out.datatype == "FP32" and out.data.dtype != np.float32):
            return None
        outputs.append((name, out.datatype, out.data))
    return _encode_binary(response.id, response.model_name, response.model_version, response.parameters, outputs)


def _encode_binary(request_id, model_name: str, model_version, parameters, outputs) -> tuple[bytes, int]:
    """A v2 REST binary response as `InferResponse.to_rest` writes it: the JSON header (id, model_name,
    model_version, outputs with binary_data_size, parameters), then each tensor's bytes. `outputs`: (name,
    "BYTES" | "FP32", array)."""
    heads, raws = [], []
    for name, datatype, arr in outputs:
        if datatype == "BYTES":
            parts = []
            for v in arr.flat:
                b = v if isinstance(v, bytes) else str(v).encode("utf-8")
                parts += (_LEN.pack(len(b)), b)
            raw = b"".join(parts)
        else:
            raw = np.ascontiguousarray(arr).tobytes()
        heads.append({"name": name, "shape": list(arr.shape), "datatype": datatype,
                      "parameters": {"binary_data_size": len(raw)}})
        raws.append(raw)
    head = {"id": request_id, "model_name": model_name, "model_version": model_version, "outputs": heads}
    if parameters:
        from kserve.protocol.infer_type import to_http_parameters

        head["parameters"] = to_http_parameters(parameters)
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
