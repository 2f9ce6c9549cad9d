"""The Open Inference Protocol (KServe v2) face of `rental-recommender`: the wire contract and its codec.

Laid out like KServe's own `kserve.protocol` package, apart from the model and the server:
  types.py   KServe's v2 types (InferRequest, InferResponse, ...), imported once with a bare argv (quirk below)
  decode.py  the decoder: a v2 request (KServe's InferRequest, or the REST body itself) → a validated `Query`
  encode.py  the encoder: an answer → KServe's InferResponse, and a v2 REST body (binary tensors or JSON)
  rest.py    the REST fast path: `POST /v2/models/<model>/infer` answered in front of KServe's FastAPI stack
  grpc.py    the gRPC servicer (ModelInfer answered by the model directly) and the gRPC server that runs it

Interface (contracts.md):
  inputs   user_id      BYTES [N]     marketplace user ids ("u_123"); unknown users get cold-start results
           k            INT32 [1]     optional, 1..settings.serve.max_k (default settings.serve.default_k)
  outputs  property_id  BYTES [N,k]   best first
           score        FP32  [N,k]   non-increasing along each row
  request parameters: business rules `budget`, `budget_band`, `city`, `min_bedrooms`, `available_only`
  response parameters: model_version, variant (one value when every row agrees, else comma-separated per row),
                       model_type, sources (comma-separated "model"/"cold_start")
  REST response headers: x-model-version, x-variant

When a cold-start user asks for more items than the fallback list holds, the row is padded with property_id ""
and score -FLT_MAX (`PAD_SCORE`: finite, so JSON stays valid, and still non-increasing).
"""

import numpy as np

INPUT_USER = "user_id"
INPUT_K = "k"
OUTPUT_IDS = "property_id"
OUTPUT_SCORES = "score"
OUTPUTS = (OUTPUT_IDS, OUTPUT_SCORES)
INT_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
PAD_SCORE = np.float32(np.finfo(np.float32).min)
#: request parameters (v2 `parameters`, `/predict` "filters") that set business rules for that request
FILTER_PARAMS = ("budget", "budget_band", "city", "min_bedrooms", "available_only")
