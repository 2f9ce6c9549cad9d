"""The v2 decoder: a request → a validated `Query` (user ids, k, business rules), or InvalidInput naming the field.

Two ways in, one set of rules:
  `decode(request)`          KServe's InferRequest (gRPC, KServe's REST stack, or `rest_request` below): the
                             reference validation; every error message a client sees comes from here.
  `rest_head` + `everyday`   the REST body itself, for the everyday request only (binary `user_id` BYTES [N],
                             optionally `k` INT32/INT64 [1], no business rules, every output binary): decoded
                             without building KServe objects; anything `everyday` would have to judge is None and
                             goes the `decode` way, so no second set of messages exists.
  `rest_request`             the REST body → KServe's InferRequest, as `InferRequest.from_bytes` builds it minus
                             its decode/re-encode round trip of binary tensors.
"""

from __future__ import annotations

import math
import os
import struct
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import orjson

from rentalml.runtime.features import Filters

from . import FILTER_PARAMS, INPUT_K, INPUT_USER, INT_TYPES, OUTPUT_IDS, OUTPUT_SCORES, OUTPUTS
from .types import InferInput, InferRequest, InvalidInput, RequestedOutput

HEADER_LEN = "inference-header-content-length"
_LEN = struct.Struct("<I")


@dataclass(slots=True)
class Query:
    """A validated v2 request: what `RecommenderModel.predict` answers and the encoder shapes."""

    user_ids: list[str]
    k: int
    filters: Filters | None = None
    request_id: str = ""
    outputs: tuple[str, ...] = OUTPUTS  # requested outputs (all binary when `request` is None)
    request: InferRequest | None = None  # KServe's request (the encoder's options); None: the everyday REST request
    grpc: bool = False
    t0: float = field(default_factory=time.perf_counter)


def new_request_id() -> str:
    """32 hex characters (uuid4().hex's randomness, a third of its cost)."""
    return os.urandom(16).hex()


def k_problem(k, max_k: int) -> str | None:
    """Why k is not an acceptable number of recommendations (None when it is)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        return f"must be an integer between 1 and {max_k}, got {k!r}"
    if not 1 <= int(k) <= max_k:
        return f"must be between 1 and {max_k}, got {int(k)}"
    return None


def _param_value(v):
    """A v2 request parameter's value: plain over REST; an InferParameter-like message over gRPC."""
    if hasattr(v, "WhichOneof"):
        which = v.WhichOneof("parameter_choice")
        return getattr(v, which) if which else None
    return v


def filters(params: dict | None) -> Filters | None:
    """Business rules from request parameters (`budget`, `budget_band`, `city`, `min_bedrooms`,
    `available_only`); None when the request names none. ValueError names the bad field."""
    given = {k: _param_value(v) for k, v in (params or {}).items() if k in FILTER_PARAMS}
    return Filters.from_request(given) if given else None


def decode(request: InferRequest, *, default_k: int, max_k: int, model_name: str = "",
           t0: float | None = None) -> Query:
    """The validated Query of a KServe InferRequest; InvalidInput naming the input, output or parameter."""
    inputs = {}
    for inp in request.inputs:
        if inp.name in inputs:
            raise InvalidInput(f"input '{inp.name}' is given more than once")
        inputs[inp.name] = inp
    unexpected = sorted(set(inputs) - {INPUT_USER, INPUT_K})
    if unexpected:
        raise InvalidInput(f"unexpected input '{unexpected[0]}': {model_name} takes inputs "
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

    k = default_k
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
        problem = k_problem(k, max_k)
        if problem:
            raise InvalidInput(f"input '{INPUT_K}' {problem}")

    outputs = OUTPUTS
    if request.request_outputs:
        for out in request.request_outputs:
            if out.name not in OUTPUTS:
                raise InvalidInput(f"requested output '{out.name}' does not exist; "
                                   f"outputs are '{OUTPUT_IDS}' and '{OUTPUT_SCORES}'")
        outputs = tuple(o.name for o in request.request_outputs)
    try:
        rules = filters(request.parameters)
    except ValueError as exc:
        raise InvalidInput(f"request parameter {exc}") from None
    return Query(user_ids, k, rules, request.id or new_request_id(), outputs, request,
                 bool(getattr(request, "from_grpc", False)), time.perf_counter() if t0 is None else t0)


# ---- the REST body --------------------------------------------------------------------------------------
class RestHead(NamedTuple):
    headers: dict[str, str]
    json_length: int
    binary: bool  # binary tensors follow the JSON header
    doc: object  # the JSON header


def rest_head(raw_headers, body: bytes) -> RestHead | None:
    """The JSON header of a v2 REST infer body; None for CloudEvents (KServe's to unwrap) and a JSON header that
    does not parse (KServe's stack names the problem)."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw_headers}
    if "cloudevents" in headers.get("content-type", "") or any(k.startswith("ce-") for k in headers):
        return None
    binary = HEADER_LEN in headers
    try:
        json_length = int(headers[HEADER_LEN]) if binary else len(body)
        if not 0 < json_length <= len(body):
            return None
        return RestHead(headers, json_length, binary, orjson.loads(body[:json_length]))
    except ValueError:  # (orjson.JSONDecodeError is a ValueError)
        return None


def everyday(head: RestHead, body: bytes, *, default_k: int, max_k: int) -> Query | None:
    """The Query of the everyday request, decided without building KServe objects: binary `user_id` BYTES [N]
    and optionally `k` INT32/INT64 [1], nothing else, no business-rule parameters, every output binary.
    Anything else — and anything this check would have to judge (a k out of range, bytes that are not UTF-8,
    sizes that do not add up) — is None: the `decode` way, which names the problem."""
    t0 = time.perf_counter()
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
        names = OUTPUTS
    else:
        if not isinstance(outs, list) or not outs:
            return None
        names = []
        for o in outs:
            if not (isinstance(o, dict) and o.keys() <= {"name", "parameters"} and o.get("name") in OUTPUTS
                    and o.get("parameters") == {"binary_data": True} and o["name"] not in names):
                return None
            names.append(o["name"])
        names = tuple(names)
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
    k = default_k
    if INPUT_K in tensors:
        dtype, shape, raw = tensors[INPUT_K]
        if shape != [1] or (dtype, len(raw)) not in (("INT32", 4), ("INT64", 8)):
            return None
        k = int.from_bytes(raw, "little", signed=True)
        if k_problem(k, max_k):
            return None
    return Query(user_ids, k, None, request_id or new_request_id(), names, None, False, t0)


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


def rest_request(head: RestHead, body: bytes, model_name: str) -> InferRequest | None:
    """KServe's InferRequest of a REST body that is provably well-formed, as `InferRequest.from_bytes` builds it
    without its round trip: binary tensors stay raw (KServe's InferInput decodes them once, in `as_numpy`)
    instead of being decoded, turned into JSON lists and decoded again (~20 µs a request). None where KServe's
    stack would refuse the body (it then names the problem). InvalidInput when the binary tensors do not fill the
    rest of the body exactly: KServe 0.21 does not check that, and a short tensor fails deep in its BYTES decoder
    with a 500 (still so with serve.fast_path=false); here it is a 400."""
    _, json_length, _, doc = head
    if not _well_formed(doc):
        return None
    declared = {i["name"]: int((i.get("parameters") or {}).get("binary_data_size", 0)) for i in doc["inputs"]}
    if sum(declared.values()) != len(body) - json_length:
        sizes = ", ".join(f"'{n}' {b}" for n, b in declared.items() if b)
        raise InvalidInput(f"binary tensor data: the inputs declare {sum(declared.values())} bytes "
                           f"(binary_data_size: {sizes or 'none'}) but {len(body) - json_length} bytes follow "
                           f"the {json_length}-byte JSON header")
    try:
        inputs = []
        start = json_length
        for inp in doc["inputs"]:
            params = inp.get("parameters")
            infer_input = InferInput(name=inp["name"], shape=inp["shape"], datatype=inp["datatype"],
                                     parameters=params)
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
    except Exception:  # noqa: BLE001 - KServe's stack names the problem
        return None
