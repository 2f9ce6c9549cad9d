"""A Triton Inference Server model repository generated from a bundle (`rentalml export --triton DIR`).

Models (numeric models carry the names of their ONNX files, contracts.md):
  rental-scorer      scorer.onnx with k baked in (settings.export.triton_k): inputs history [L]
                     (+ user_features [Fu]); outputs indices [K], scores [K]
  rental-retrieval   retrieval.onnx: history [L] (+ user_features) → candidates [C], candidate_scores [C]
                     (ANN bundles: → user_embedding [D]; the IVF search runs in the transformer)
  rental-ranker      ranker.onnx: history [L], candidates [C] (+ user_features) → indices [C], scores [C]
  rental-two-stage   ensemble retrieval → ranker (brute-force bundles): history (+ user_features) → indices,
                     scores
All dims exclude the batch dimension (max_batch_size > 0; dynamic batching). `k` is not a Triton input: a
non-batched input cannot ride the dynamic batcher, so the scorer bakes K and the ranker returns all C
candidates sorted; the KServe transformer (user id → history, Python) slices the first k. The transformer
split is described in docs/architecture.md.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from rentalml.export.bundle import read_meta

ONNX_TO_TRITON = {TensorProto.INT64: "TYPE_INT64", TensorProto.FLOAT: "TYPE_FP32", TensorProto.INT32: "TYPE_INT32",
                  TensorProto.FLOAT16: "TYPE_FP16"}
TRITON_TO_NUMPY = {"TYPE_INT64": np.int64, "TYPE_FP32": np.float32, "TYPE_INT32": np.int32,
                   "TYPE_FP16": np.float16}
SCORER, RETRIEVAL, RANKER, ENSEMBLE = "rental-scorer", "rental-retrieval", "rental-ranker", "rental-two-stage"


def bake_k(src: str | Path, dst: str | Path, k: int, history_len: int) -> Path:
    """scorer.onnx with the `k` input replaced by a constant and fixed history/output widths."""
    m = onnx.load(str(src))
    g = m.graph
    k_in = [i for i in g.input if i.name == "k"]
    if not k_in:
        raise ValueError(f"{src} has no input 'k'")
    g.input.remove(k_in[0])
    g.initializer.append(numpy_helper.from_array(np.array([k], dtype=np.int64), name="k"))
    for i in g.input:
        if i.name == "history":
            i.type.tensor_type.shape.dim[1].dim_value = history_len
    for o in g.output:
        o.type.tensor_type.shape.dim[1].dim_value = k
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    return Path(dst)


def _tensor(name: str, dtype: str, dims: list[int]) -> str:
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(str(d) for d in dims)} ] }}'


def _io(kind: str, tensors: list[tuple[str, str, list[int]]]) -> str:
    return f"{kind} [\n" + ",\n".join(_tensor(*t) for t in tensors) + "\n]\n"


def _onnx_config(name: str, inputs, outputs, max_batch_size: int, gpu: bool, instances: int,
                 preferred: list[int], queue_delay_us: int) -> str:
    kind = "KIND_GPU" if gpu else "KIND_CPU"
    text = (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch_size}\n'
            + _io("input", inputs) + _io("output", outputs)
            + f"instance_group [ {{ kind: {kind} count: {instances} }} ]\n"
            + f"dynamic_batching {{ preferred_batch_size: [ {', '.join(map(str, preferred))} ] "
            + f"max_queue_delay_microseconds: {queue_delay_us} }}\n"
            + "version_policy: { latest: { num_versions: 1 } }\n")
    if gpu:  # ONNX Runtime's TensorRT execution provider, fp16; unsupported nodes fall back to CUDA
        text += ('optimization { execution_accelerators { gpu_execution_accelerator : [ {\n'
                 '  name : "tensorrt"\n'
                 '  parameters { key: "precision_mode" value: "FP16" }\n'
                 '  parameters { key: "max_workspace_size_bytes" value: "1073741824" }\n'
                 '} ] } }\n')
    else:
        text += 'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n'
    return text


def _graph_io(path: Path) -> tuple[list, list]:
    """[(name, triton dtype, dims without the batch dim)] of a graph's inputs and outputs (-1 = free)."""
    g = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in g.initializer}

    def conv(v):
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        return v.name, ONNX_TO_TRITON[t.elem_type], dims

    return [conv(i) for i in g.input if i.name not in inits], [conv(o) for o in g.output]


def _fixed(io: list, widths: dict[str, int]) -> list:
    """Triton dims for a graph's tensors: the batch dim dropped, free dims set from `widths` by name."""
    out = []
    for name, dtype, dims in io:
        rest = [widths.get(name, d) if d < 0 else d for d in dims[1:]]
        out.append((name, dtype, rest))
    return out


def write_triton_repo(bundle_dir: str | Path, out_dir: str | Path, *, gpu: bool = False, max_batch_size: int = 64,
                      instances: int = 1, k: int | None = None, queue_delay_us: int = 500) -> Path:
    """Write the repository (one folder per model: config.pbtxt, 1/model.onnx) and return its path."""
    from rentalml.config import get_settings

    bundle = Path(bundle_dir)
    meta = read_meta(bundle)
    g = meta["graph"]
    n, hist_len = int(g["n_items"]), int(g["history_len"])
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be ≥ 1, got {max_batch_size}")
    k = max(1, min(int(k or get_settings().export.triton_k), n))
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    preferred = sorted({b for b in (8, 32, max_batch_size) if b <= max_batch_size})
    cfg = {"max_batch_size": max_batch_size, "gpu": gpu, "instances": instances, "preferred": preferred,
           "queue_delay_us": queue_delay_us}

    def add(name: str, src: Path, widths: dict[str, int]) -> tuple[list, list]:
        d = out / name / "1"
        d.mkdir(parents=True)
        model = d / "model.onnx"
        if name == SCORER:
            bake_k(src, model, k, hist_len)
        else:
            shutil.copyfile(src, model)
        ins, outs = _graph_io(model)
        ins, outs = _fixed(ins, widths), _fixed(outs, widths)
        (out / name / "config.pbtxt").write_text(_onnx_config(name, ins, outs, **cfg))
        return ins, outs

    add(SCORER, bundle / g.get("file", "scorer.onnx"), {"history": hist_len})
    ts = meta.get("two_stage")
    if ts:
        c = int(ts["n_candidates"])
        r_ins, r_outs = add(RETRIEVAL, bundle / ts["retrieval"], {"history": hist_len, "candidates": c,
                                                                  "candidate_scores": c,
                                                                  "user_embedding": int(ts["embedding_dim"])})
        k_ins, k_outs = add(RANKER, bundle / ts["ranker"], {"history": hist_len, "candidates": c, "indices": c,
                                                           "scores": c})
        if ts["mode"] == "brute_force":
            (out / ENSEMBLE / "1").mkdir(parents=True)
            (out / ENSEMBLE / "config.pbtxt").write_text(_ensemble_config(r_ins, k_outs, max_batch_size))
    return out


def _ensemble_config(inputs, outputs, max_batch_size: int) -> str:
    user_feats = any(t[0] == "user_features" for t in inputs)
    uf = ' input_map { key: "user_features" value: "user_features" }' if user_feats else ""
    return (f'name: "{ENSEMBLE}"\nplatform: "ensemble"\nmax_batch_size: {max_batch_size}\n'
            + _io("input", inputs) + _io("output", outputs)
            + "ensemble_scheduling {\n  step [\n"
            + f'    {{ model_name: "{RETRIEVAL}" model_version: -1\n'
            + f'      input_map {{ key: "history" value: "history" }}{uf}\n'
            + '      output_map { key: "candidates" value: "candidates" } },\n'
            + f'    {{ model_name: "{RANKER}" model_version: -1\n'
            + f'      input_map {{ key: "history" value: "history" }}{uf}\n'
            + '      input_map { key: "candidates" value: "candidates" }\n'
            + '      output_map { key: "indices" value: "indices" }\n'
            + '      output_map { key: "scores" value: "scores" } }\n  ]\n}\n')


# ------------------------------------------------------------------------------------------------ validation
def model_config_pb2():
    """tritonclient's `model_config_pb2` without importing `tritonclient.grpc` (its package also registers
    grpc_service.proto, whose `inference.*` messages clash with KServe's v2 proto in one process: the KServe
    predictor/transformer must read config.pbtxt too). Registered under its canonical module name, so a later
    `import tritonclient.grpc` reuses it instead of adding model_config.proto twice."""
    import importlib.util
    import sys

    name = "tritonclient.grpc.model_config_pb2"
    if name not in sys.modules:
        import tritonclient  # the top-level package is light

        path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def load_config(path: str | Path):
    """Parse a config.pbtxt with the protobuf text format into Triton's ModelConfig (tritonclient's proto)."""
    from google.protobuf import text_format

    return text_format.Parse(Path(path).read_text(), model_config_pb2().ModelConfig())


def _dtype_name(cfg_tensor) -> str:
    return model_config_pb2().DataType.Name(cfg_tensor.data_type)


def validate_triton_repo(repo: str | Path, run: bool = True) -> list[str]:
    """Errors (empty = valid): every config parses as a ModelConfig, names/dtypes/dims match the ONNX graph
    (batch dim excluded when max_batch_size > 0), ensembles wire existing tensors; with run=True every ONNX
    model is run by ONNX Runtime on a batch of 2 built from exactly the config's dims."""
    repo = Path(repo)
    errors: list[str] = []
    configs = {}
    for d in sorted(p for p in repo.iterdir() if p.is_dir()):
        try:
            configs[d.name] = load_config(d / "config.pbtxt")
        except Exception as exc:  # noqa: BLE001 - a parse error of any kind is the finding
            errors.append(f"{d.name}/config.pbtxt: {exc}")
            continue
        if configs[d.name].name != d.name:
            errors.append(f"{d.name}: config name {configs[d.name].name!r} differs from the folder")
    for name, cfg in configs.items():
        if cfg.platform == "onnxruntime_onnx":
            errors += _check_onnx_model(repo / name, cfg, run)
        elif cfg.platform == "ensemble":
            errors += _check_ensemble(cfg, configs)
        else:
            errors.append(f"{name}: unexpected platform {cfg.platform!r}")
    return errors


def _check_onnx_model(folder: Path, cfg, run: bool) -> list[str]:
    errs: list[str] = []
    model = folder / "1" / "model.onnx"
    if not model.exists():
        return [f"{cfg.name}: missing 1/model.onnx"]
    g_ins, g_outs = _graph_io(model)
    batched = cfg.max_batch_size > 0
    for kind, cfg_ts, graph_ts in (("input", cfg.input, g_ins), ("output", cfg.output, g_outs)):
        graph = {t[0]: t for t in graph_ts}
        if {t.name for t in cfg_ts} != set(graph):
            errs.append(f"{cfg.name}: {kind}s {sorted(t.name for t in cfg_ts)} != graph {sorted(graph)}")
            continue
        for t in cfg_ts:
            _, dtype, dims = graph[t.name]
            if _dtype_name(t) != dtype:
                errs.append(f"{cfg.name}.{t.name}: data_type {_dtype_name(t)} != graph {dtype}")
            if batched:
                if dims and dims[0] > 0:
                    errs.append(f"{cfg.name}.{t.name}: graph batch dim is fixed ({dims[0]}) but max_batch_size > 0")
                dims = dims[1:]
            cd = list(t.dims)
            if len(cd) != len(dims) or any(g >= 0 and c != g for c, g in zip(cd, dims, strict=False)):
                errs.append(f"{cfg.name}.{t.name}: dims {cd} do not match graph {dims}")
    if run and not errs:
        errs += _run_with_config_dims(model, cfg)
    return errs


def _run_with_config_dims(model: Path, cfg, batch: int = 2) -> list[str]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    lead = [batch] if cfg.max_batch_size > 0 else []
    feed = {}
    for t in cfg.input:
        if any(d < 0 for d in t.dims):
            return [f"{cfg.name}.{t.name}: free dims {list(t.dims)} (the batcher needs fixed widths)"]
        feed[t.name] = np.zeros(lead + list(t.dims), dtype=TRITON_TO_NUMPY[_dtype_name(t)])
    try:
        outs = sess.run([t.name for t in cfg.output], feed)
    except Exception as exc:  # noqa: BLE001
        return [f"{cfg.name}: ONNX Runtime failed on the config's dims: {exc}"]
    errs = []
    for t, o in zip(cfg.output, outs, strict=True):
        want = lead + list(t.dims)
        if list(o.shape) != want or o.dtype != TRITON_TO_NUMPY[_dtype_name(t)]:
            errs.append(f"{cfg.name}.{t.name}: ran to {o.dtype}{list(o.shape)}, config says "
                        f"{_dtype_name(t)}{want}")
    return errs


def _check_ensemble(cfg, configs: dict) -> list[str]:
    errs: list[str] = []
    avail = {t.name: (t.data_type, list(t.dims)) for t in cfg.input}
    for step in cfg.ensemble_scheduling.step:
        sub = configs.get(step.model_name)
        if sub is None:
            errs.append(f"{cfg.name}: step model {step.model_name!r} is not in the repository")
            continue
        sub_in = {t.name: (t.data_type, list(t.dims)) for t in sub.input}
        sub_out = {t.name: (t.data_type, list(t.dims)) for t in sub.output}
        if set(step.input_map) != set(sub_in):
            errs.append(f"{cfg.name}: step {step.model_name} maps {sorted(step.input_map)}, model takes "
                        f"{sorted(sub_in)}")
        for key, tensor in step.input_map.items():
            if tensor not in avail:
                errs.append(f"{cfg.name}: step {step.model_name} reads {tensor!r}, which nothing produced")
            elif key in sub_in and avail[tensor] != sub_in[key]:
                errs.append(f"{cfg.name}: {tensor!r} {avail[tensor]} feeds {step.model_name}.{key} {sub_in[key]}")
        for key, tensor in step.output_map.items():
            if key not in sub_out:
                errs.append(f"{cfg.name}: step {step.model_name} has no output {key!r}")
            else:
                avail[tensor] = sub_out[key]
    for t in cfg.output:
        if avail.get(t.name) != (t.data_type, list(t.dims)):
            errs.append(f"{cfg.name}: output {t.name} {(t.data_type, list(t.dims))} is produced as "
                        f"{avail.get(t.name)}")
    return errs


def ensemble_reference(repo: str | Path, history: np.ndarray, user_features: np.ndarray | None = None):
    """Run the rental-two-stage ensemble's steps with ONNX Runtime as Triton would (for tests and docs)."""
    import onnxruntime as ort

    repo = Path(repo)
    feed = {"history": history}
    if user_features is not None:
        feed["user_features"] = user_features
    ret = ort.InferenceSession(str(repo / RETRIEVAL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    cand, _ = ret.run(None, feed)
    rank = ort.InferenceSession(str(repo / RANKER / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return rank.run(None, {**feed, "candidates": cand})
