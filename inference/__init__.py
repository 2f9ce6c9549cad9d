"""rentalml.inference: serve a model bundle with KServe (v2 REST + gRPC) plus a friendly JSON API.

Laid out like KServe's python package: `model.py` (the KServe Model: load / reload, preprocess → predict →
postprocess), `protocol/` (the v2 codec, REST fast path and gRPC servicer), `api/` (the friendly routes and their
schemas), `routing.py`, `batching.py` and `loading.py` (A/B arms, the cache and its batching, bundles and engines),
`server.py` (the ModelServer that runs them).

Kept import-light (the `rentalml` CLI imports `rentalml.inference.cli` on every run); the modules above import
KServe.
"""

MODEL_NAME = "rental-recommender"
