"""The transformer's client of the numeric half of the cluster split: Triton, over the Open Inference Protocol (v2).

In the cluster the InferenceService's predictor is Triton (kserve-tritonserver) on the model repository that
`rentalml export --triton DIR` writes, holding every published model version (Triton version = MLflow version,
rentalml.export.triton.triton_version). The transformer (`rentalml serve --role transformer`) resolves users,
fetches features, applies business filters and calls two models of that repository, `rental-retrieval` and
`rental-ranker`, **of the version of the user's A/B arm**: `POST /v2/models/<model>/versions/<V>/infer`, so
version N's id maps never meet version M's graphs (issue 11, defect 13). Tensors travel in the v2 binary tensor
extension (tritonclient's request/response codec) over one pooled, thread-safe httpx client.

Tests run this against a real Triton (the nvidia-pytriton wheel's tritonserver on the python-backend twin of the
repository: rentalml.services.start_triton).
"""

from __future__ import annotations

import httpx
import numpy as np

from rentalml.runtime.interfaces import Stages

NP_TO_V2 = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32",
            np.dtype(np.float16): "FP16"}


class PredictorError(RuntimeError):
    """The predictor answered with an error (its message is kept), or with another version than asked."""


class RemoteStages(Stages):
    """`rentalml.runtime.interfaces.Stages` over KServe v2 REST: `rental-retrieval` then `rental-ranker` of model
    version `version` on a predictor (Triton in the cluster). `version=None` lets the predictor choose (its version
    policy), which only a single-version repository makes safe. Thread-safe (one pooled httpx client).
    Not exact (retrieval then ranking, two calls), not in process, and the graphs take the full history width."""

    exact = False
    in_process = False

    def __init__(self, predictor_url: str, n_items: int, *, version: int | None = None,
                 retrieval: str = "rental-retrieval", ranker: str = "rental-ranker", timeout: float = 5.0,
                 headers: dict | None = None):
        url = predictor_url if "://" in predictor_url else f"http://{predictor_url}"
        self.base = url.rstrip("/")
        self.n_items = n_items
        self.version = None if version is None else int(version)
        self.retrieval, self.ranker = retrieval, ranker
        self.client = httpx.Client(timeout=timeout, headers=headers or {})
        self.outputs: dict[str, list[str]] = {}
        self.max_batch: dict[str, int] = {}  # rows per call (the config's max_batch_size; 0 = unlimited)
        meta = self._metadata(retrieval)
        self._metadata(ranker)
        outs = {o["name"]: o for o in meta.get("outputs", [])}
        shape = outs.get("candidates", {}).get("shape", [-1, self.n_items])
        self._max_candidates = int(shape[-1]) if int(shape[-1]) > 0 else self.n_items

    @property
    def max_candidates(self) -> int:
        """The retrieval graph's candidates dim (the ranker's fixed width)."""
        return self._max_candidates

    def model_url(self, model: str) -> str:
        v = f"/versions/{self.version}" if self.version is not None else ""
        return f"{self.base}/v2/models/{model}{v}"

    def _metadata(self, model: str) -> dict:
        r = self.client.get(self.model_url(model))
        if r.status_code != 200:
            raise PredictorError(f"{model} version {self.version} is not served by {self.base}: "
                                 f"{r.status_code} {r.text[:200]}")
        ready = self.client.get(f"{self.model_url(model)}/ready")
        if ready.status_code != 200:
            raise PredictorError(f"{model} version {self.version} is not ready on {self.base}: {ready.status_code}")
        meta = r.json()
        self.outputs[model] = [o["name"] for o in meta.get("outputs", [])]
        cfg = self.client.get(f"{self.model_url(model)}/config")  # Triton's model configuration extension
        self.max_batch[model] = int(cfg.json().get("max_batch_size") or 0) if cfg.status_code == 200 else 0
        return meta

    def _infer(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call, or several of at most max_batch_size rows each (bulk requests), concatenated."""
        rows = len(next(iter(inputs.values())))
        limit = self.max_batch.get(model) or rows
        if rows <= limit:
            return self._infer_once(model, inputs)
        parts = [self._infer_once(model, {k: v[i:i + limit] for k, v in inputs.items()})
                 for i in range(0, rows, limit)]
        return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}

    def _infer_once(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput

        ins = []
        for name, arr in inputs.items():
            arr = np.ascontiguousarray(arr)
            i = InferInput(name, list(arr.shape), NP_TO_V2[arr.dtype])
            i.set_data_from_numpy(arr, binary_data=True)
            ins.append(i)
        outs = [InferRequestedOutput(n, binary_data=True) for n in self.outputs[model]]
        body, json_size = InferenceServerClient.generate_request_body(ins, outputs=outs)
        headers = {"Content-Type": "application/octet-stream"}
        if json_size is not None:
            headers["Inference-Header-Content-Length"] = str(json_size)
        r = self.client.post(f"{self.model_url(model)}/infer", content=body, headers=headers)
        if r.status_code != 200:
            raise PredictorError(f"{model} v{self.version}: HTTP {r.status_code}: {r.text[:300]}")
        length = r.headers.get("Inference-Header-Content-Length")
        res = InferenceServerClient.parse_response_body(r.content, header_length=int(length) if length else None)
        got = str(res.get_response().get("model_version", ""))
        if self.version is not None and got != str(self.version):  # never hand one arm another version's answer
            raise PredictorError(f"{model}: asked for version {self.version}, the predictor answered with {got!r}")
        return {n: res.as_numpy(n) for n in self.outputs[model]}

    def _with_uf(self, feed: dict, user_features: np.ndarray | None) -> dict:
        if user_features is not None:
            feed["user_features"] = user_features.astype(np.float32)
        return feed

    def retrieve(self, history: np.ndarray, n: int, user_features: np.ndarray | None = None) -> np.ndarray:
        if "candidates" not in self.outputs[self.retrieval]:
            raise PredictorError(f"{self.retrieval} returns {self.outputs[self.retrieval]}; ANN bundles search "
                                 "their index in the transformer: serve them with the in-process stages")
        out = self._infer(self.retrieval, self._with_uf({"history": history.astype(np.int64)}, user_features))
        return out["candidates"][:, :n]

    def rank(self, history: np.ndarray, candidates: np.ndarray,
             user_features: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        width = self.max_candidates
        if candidates.shape[1] < width:  # the ranker's candidates dim is fixed: pad with n_items (ranked last)
            pad = np.full((len(candidates), width - candidates.shape[1]), self.n_items, np.int64)
            candidates = np.concatenate([candidates, pad], axis=1)
        out = self._infer(self.ranker, self._with_uf({"history": history.astype(np.int64),
                                                      "candidates": candidates.astype(np.int64)}, user_features))
        return out["indices"], out["scores"]
