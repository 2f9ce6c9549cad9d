"""rentalml.inference: serve a model bundle with KServe (v2 REST + gRPC) plus a friendly JSON API.

Kept import-light (the `rentalml` CLI imports `rentalml.inference.cli` on every run); import
`rentalml.inference.model` / `rentalml.inference.server` for the KServe parts.
"""

MODEL_NAME = "rental-recommender"
