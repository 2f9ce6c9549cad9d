"""The numeric side of the cluster split, over the Open Inference Protocol (v2).

In the cluster the InferenceService's predictor is Triton (kserve-tritonserver) on the model repository that
`rentalml export --triton DIR` writes; the transformer (`rentalml serve --role transformer`) resolves users,
fetches features, applies business filters and calls two models of that repository: `rental-retrieval` and
`rental-ranker`. This module has both ends:

* `RemoteStages` — the transformer's client: `rentalml.recommend.Stages` over v2 REST (JSON), so the core
  `recommend()` runs unchanged with the numeric graphs on a remote predictor.
* `RepositoryModel` / `serve_repository` — a v2 predictor for a Triton model repository on ONNX Runtime, for
  laptops and tests where no Triton binary exists (`rentalml serve --role predictor --model-repository DIR`). It
  reads each model's config.pbtxt and enforces its input names, datatypes and dims, as Triton does.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import httpx
import numpy as np

V2_DTYPES = {"TYPE_INT64": ("INT64", np.int64), "TYPE_FP32": ("FP32", np.float32), "TYPE_INT32": ("INT32", np.int32),
             "TYPE_FP16": ("FP16", np.float16)}
NP_TO_V2 = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32"}


class PredictorError(RuntimeError):
    """The predictor answered with an error (its message is kept)."""


class RemoteStages:
    """`rentalml.recommend.Stages` over KServe v2 REST: `rental-retrieval` then `rental-ranker` on a predictor
    (Triton in the cluster). Thread-safe (one pooled httpx client)."""

    def __init__(self, predictor_url: str, n_items: int, *, retrieval: str = "rental-retrieval",
                 ranker: str = "rental-ranker", timeout: float = 5.0, headers: dict | None = None):
        url = predictor_url if "://" in predictor_url else f"http://{predictor_url}"
        self.base = url.rstrip("/")
        self.n_items = n_items
        self.retrieval, self.ranker = retrieval, ranker
        self.client = httpx.Client(timeout=timeout, headers=headers or {})
        self.max_candidates = self._candidates_width()

    def _candidates_width(self) -> int:
        meta = self.client.get(f"{self.base}/v2/models/{self.retrieval}")
        if meta.status_code != 200:
            raise PredictorError(f"{self.retrieval} not ready on {self.base}: {meta.status_code} {meta.text[:200]}")
        outs = {o["name"]: o for o in meta.json().get("outputs", [])}
        shape = outs.get("candidates", {}).get("shape", [-1, self.n_items])
        return int(shape[-1]) if int(shape[-1]) > 0 else self.n_items

    def _infer(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        body = {"inputs": [{"name": k, "shape": list(v.shape), "datatype": NP_TO_V2[v.dtype],
                            "data": v.ravel().tolist()} for k, v in inputs.items()]}
        r = self.client.post(f"{self.base}/v2/models/{model}/infer", json=body,
                             headers={"Content-Type": "application/json"})
        if r.status_code != 200:
            raise PredictorError(f"{model}: HTTP {r.status_code}: {r.text[:300]}")
        out = {}
        for o in r.json()["outputs"]:
            dt = {"INT64": np.int64, "FP32": np.float32, "INT32": np.int32}[o["datatype"]]
            out[o["name"]] = np.asarray(o["data"], dtype=dt).reshape(o["shape"])
        return out

    def _with_uf(self, feed: dict, user_features: np.ndarray | None) -> dict:
        if user_features is not None:
            feed["user_features"] = user_features.astype(np.float32)
        return feed

    def retrieve(self, history: np.ndarray, n: int, user_features: np.ndarray | None = None) -> np.ndarray:
        out = self._infer(self.retrieval, self._with_uf({"history": history.astype(np.int64)}, user_features))
        if "candidates" not in out:
            raise PredictorError(f"{self.retrieval} returned {sorted(out)}; ANN bundles search their index in the "
                                 "transformer: serve them with the in-process stages")
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


# ----------------------------------------------------------------------------------------------- predictor
def _kserve():
    _argv, sys.argv = sys.argv, sys.argv[:1]  # importing kserve parses sys.argv (see model.py)
    try:
        import kserve
        from kserve.errors import InvalidInput
        from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
    finally:
        sys.argv = _argv
    return kserve, InvalidInput, InferOutput, InferRequest, InferResponse


def repository_models(repo: str | Path) -> list:
    """One `RepositoryModel` per ONNX model folder of a Triton repository (ensembles are Triton-only)."""
    from rentalml.export.triton import load_config

    kserve, InvalidInput, InferOutput, InferRequest, InferResponse = _kserve()

    class RepositoryModel(kserve.Model):
        def __init__(self, folder: Path):
            cfg = load_config(folder / "config.pbtxt")
            super().__init__(cfg.name or folder.name)
            self.folder = folder
            self.cfg = cfg
            self.inputs = {t.name: (V2_DTYPES[_dt(t)], list(t.dims)) for t in cfg.input}
            self.outputs = [t.name for t in cfg.output]
            self.session = None
            self.load()

        def load(self) -> bool:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            self.session = ort.InferenceSession(str(self.folder / "1" / "model.onnx"), so,
                                                providers=["CPUExecutionProvider"])
            self.ready = True
            return True

        async def predict(self, payload, headers=None, response_headers=None):
            if not isinstance(payload, InferRequest):
                raise InvalidInput("expected a v2 inference request")
            given = {i.name: i for i in payload.inputs}
            unknown = set(given) - set(self.inputs)
            if unknown:
                raise InvalidInput(f"unexpected input(s) {sorted(unknown)}; {self.name} takes {sorted(self.inputs)}")
            feed = {}
            for name, ((v2, dtype), dims) in self.inputs.items():
                if name not in given:
                    raise InvalidInput(f"missing input '{name}'")
                t = given[name]
                if t.datatype != v2:
                    raise InvalidInput(f"input '{name}': datatype {t.datatype}, expected {v2}")
                arr = np.asarray(t.as_numpy(), dtype=dtype)
                if arr.ndim != len(dims) + 1 or any(d > 0 and d != s for d, s in zip(dims, arr.shape[1:],
                                                                                    strict=True)):
                    raise InvalidInput(f"input '{name}': shape {list(arr.shape)}, expected [-1, "
                                       f"{', '.join(map(str, dims))}]")
                if self.cfg.max_batch_size and arr.shape[0] > self.cfg.max_batch_size:
                    raise InvalidInput(f"input '{name}': batch {arr.shape[0]} > max_batch_size "
                                       f"{self.cfg.max_batch_size}")
                feed[name] = arr
            res = self.session.run(self.outputs, feed)
            outs = []
            for name, arr in zip(self.outputs, res, strict=True):
                o = InferOutput(name=name, shape=list(arr.shape), datatype=NP_TO_V2[arr.dtype])
                o.set_data_from_numpy(arr, binary_data=False)
                outs.append(o)
            return InferResponse(model_name=self.name, infer_outputs=outs, response_id=payload.id or str(uuid.uuid4()))

    models = []
    for folder in sorted(Path(repo).iterdir()):
        if (folder / "config.pbtxt").exists() and (folder / "1" / "model.onnx").exists():
            models.append(RepositoryModel(folder))
    if not models:
        raise FileNotFoundError(f"no ONNX models in {repo} (write one with `rentalml export --triton DIR`)")
    return models


def _dt(cfg_tensor) -> str:
    from rentalml.export.triton import _dtype_name  # reads tritonclient's model_config proto, kserve-safe

    return _dtype_name(cfg_tensor)


def serve_repository(repo: str | Path, http_port: int, grpc_port: int) -> None:
    """Blocking: a KServe ModelServer with every ONNX model of the repository (v2 REST + gRPC)."""
    kserve = _kserve()[0]
    kserve.ModelServer(http_port=http_port, grpc_port=grpc_port, workers=1).start(repository_models(repo))
