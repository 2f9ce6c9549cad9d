"""The v2 encoder: an answer → KServe's InferResponse (gRPC and KServe's REST stack), and → a v2 REST body.

`response` builds the InferResponse every protocol path shares. `rest_body` writes it as KServe's
`InferResponse.to_rest` (+ its pydantic response model) writes it: the all-binary case (tritonclient's default)
through `binary`, without KServe's per-output dtype/shape checks and numpy iteration; JSON or mixed outputs
through `to_rest`. `binary` alone writes the everyday request's answer (no InferResponse at all).
"""

from __future__ import annotations

import struct

import numpy as np
import orjson

from . import OUTPUT_IDS, OUTPUT_SCORES
from .decode import Query
from .types import InferOutput, InferResponse

_LEN = struct.Struct("<I")


def response(query: Query, model_name: str, model_version: str, parameters: dict, property_ids: np.ndarray,
             scores: np.ndarray) -> InferResponse:
    """KServe's InferResponse of a query's answer: the requested outputs, binary where the request asked."""
    request = query.request
    binary = request.use_binary_outputs if request is not None else True
    arrays = {OUTPUT_IDS: ("BYTES", property_ids), OUTPUT_SCORES: ("FP32", scores)}
    outputs = []
    for name in query.outputs:
        dtype, arr = arrays[name]
        if query.grpc:
            out = InferOutput(name=name, shape=list(arr.shape), datatype=dtype)
            out.set_data_from_numpy(arr, binary_data=binary)
        else:  # REST: InferResponse.to_rest serialises the array once, binary or JSON per requested output
            out = InferOutput(name=name, shape=list(arr.shape), datatype=dtype, data=arr)
        outputs.append(out)
    return InferResponse(response_id=query.request_id, model_name=model_name, model_version=model_version,
                         infer_outputs=outputs, parameters=parameters, use_binary_outputs=binary,
                         requested_outputs=request.request_outputs if request is not None else None,
                         from_grpc=query.grpc)


def rest_body(query: Query, infer_response: InferResponse) -> tuple[bytes, int | None]:
    """(body, JSON header length) of a v2 REST response; the length is None for an all-JSON body (the document
    KServe's endpoint returns through its pydantic response model)."""
    encoded = _all_binary(query, infer_response)
    if encoded is not None:
        return encoded
    payload, json_length = infer_response.to_rest()
    if json_length is None:
        from kserve.protocol.rest.v2_datamodels import InferenceResponse

        return orjson.dumps(InferenceResponse.model_validate(payload).model_dump(mode="json")), None
    return payload, json_length


def _all_binary(query: Query, infer_response: InferResponse) -> tuple[bytes, int] | None:
    """`binary` for a response whose every output is binary; None for anything else (to_rest writes those)."""
    request = query.request
    wanted = request.request_outputs if request is not None else None
    if wanted:
        if not all(o.binary_data for o in wanted):
            return None
        names = [o.name for o in wanted]
    elif request is None or request.use_binary_outputs:
        names = [o.name for o in infer_response.outputs]
    else:
        return None
    outputs = []
    for name in names:
        out = infer_response.get_output_by_name(name)
        if out is None or not isinstance(out.data, np.ndarray) or out.parameters or \
                out.datatype not in ("BYTES", "FP32") or (out.datatype == "FP32" and out.data.dtype != np.float32):
            return None
        outputs.append((name, out.datatype, out.data))
    return binary(infer_response.id, infer_response.model_name, infer_response.model_version,
                  infer_response.parameters, outputs)


def binary(request_id, model_name: str, model_version, parameters, outputs) -> tuple[bytes, int]:
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


def answer_arrays(query: Query, property_ids: np.ndarray, scores: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
    """(name, datatype, array) of a query's requested outputs, for `binary`."""
    arrays = {OUTPUT_IDS: ("BYTES", property_ids), OUTPUT_SCORES: ("FP32", scores)}
    return [(n, *arrays[n]) for n in query.outputs]
