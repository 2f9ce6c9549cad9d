"""Triton Inference Server model repositories generated from a bundle (`rentalml export --triton DIR`).

Layout (one repository per InferenceService holds every published model version; Triton versions are the MLflow
registered-model version numbers, so the transformer can pin each A/B arm to its own graphs):

    DIR/<model>/config.pbtxt          version_policy { all {} }: every version folder present is served
    DIR/<model>/<V>/model.onnx        V = triton_version(bundle) (the MLflow version, or `--version V`)
    DIR/<model>/<V>/rentalml-version.json   marker: object stores drop empty folders (the ensemble's is empty);
                                      it records the sha256 and size of the folder's files (`files`), which
                                      `verify_triton_checksums` checks (the publish step, before any upload)

Models (numeric models carry the names of their ONNX files, contracts.md):
  rental-scorer      scorer.onnx with k baked in (settings.export.triton_k): inputs history [L]
                     (+ user_features [Fu]); outputs indices [K], scores [K]
  rental-retrieval   retrieval.onnx: history [L] (+ user_features) → candidates [C], candidate_scores [C]
                     (ANN bundles: → user_embedding [D]; the IVF search runs in the transformer)
  rental-ranker      ranker.onnx: history [L], candidates [C] (+ user_features) → indices [C], scores [C]
  rental-two-stage   ensemble retrieval → ranker (brute-force bundles): history (+ user_features) → indices,
                     scores. Its steps are pinned to the newest version written (one version folder, policy
                     latest 1): an ensemble config cannot pin per version. The transformer calls retrieval and
                     ranker by version itself.
All dims exclude the batch dimension (max_batch_size > 0; dynamic batching). `k` is not a Triton input: a
non-batched input cannot ride the dynamic batcher, so the scorer bakes K and the ranker returns all C
candidates sorted; the KServe transformer (user id → history, Python) slices the first k. Versions added to an
existing repository must keep every model's inputs and outputs (one config serves all versions).

Cluster configs use the onnxruntime backend (`gpu`: KIND_GPU + ONNX Runtime's TensorRT execution provider,
fp16). `write_python_twin` writes the python-backend twin of a repository (same names, dims, dtypes, batching,
versions; a generated model.py runs the same model.onnx with ONNX Runtime) for the only Triton binary that runs
without a GPU image: the nvidia-pytriton wheel's, which has the python backend only (rentalml.services.start_triton).
Configs are built as Triton's ModelConfig protobuf and written with the protobuf text format.

A repository is only written from a bundle that matches its checksums (rentalml.runtime.bundle.verify_bundle):
a truncated or edited bundle raises BundleIntegrityError before anything is copied.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from rentalml.runtime.bundle import file_sha256, read_meta, verify_bundle

ONNX_TO_TRITON = {TensorProto.INT64: "TYPE_INT64", TensorProto.FLOAT: "TYPE_FP32", TensorProto.INT32: "TYPE_INT32",
                  TensorProto.FLOAT16: "TYPE_FP16"}
TRITON_TO_NUMPY = {"TYPE_INT64": np.int64, "TYPE_FP32": np.float32, "TYPE_INT32": np.int32,
                   "TYPE_FP16": np.float16}
SCORER, RETRIEVAL, RANKER, ENSEMBLE = "rental-scorer", "rental-retrieval", "rental-ranker", "rental-two-stage"
#: the file in every version folder (the ensemble's would otherwise be empty, and object stores drop those)
MARKER = "rentalml-version.json"
#: the twin repository's default location: DIR + TWIN_SUFFIX
TWIN_SUFFIX = "-python"


def triton_version(meta: dict, version: int | str | None = None) -> int:
    """The Triton version of a bundle: `version` when given, else its MLflow registered-model version
    (bundle.json `registry.version` / `model_version`, set by fetch_bundle), else 1 (an unregistered bundle).
    The export and the transformer both use this, so the transformer calls exactly the folders written."""
    for v in (version, (meta.get("registry") or {}).get("version"), meta.get("model_version")):
        if v is None or str(v).strip() == "":
            continue
        if re.fullmatch(r"\d+", str(v).strip()) and int(v) >= 1:
            return int(v)
        if v is version:
            raise ValueError(f"a Triton model version is a positive integer, got {version!r}")
    return 1


def twin_dir(repo: str | Path) -> Path:
    """Where `rentalml export --triton DIR` puts the python-backend twin: DIR-python beside DIR."""
    repo = Path(repo)
    return repo.with_name(repo.name + TWIN_SUFFIX)


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


# ------------------------------------------------------------------------------------------------ configs
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


def write_config(cfg, path: str | Path) -> Path:
    """A ModelConfig written as config.pbtxt (protobuf text format)."""
    from google.protobuf import text_format

    Path(path).write_text(text_format.MessageToString(cfg))
    return Path(path)


def _dtype_name(cfg_tensor) -> str:
    return model_config_pb2().DataType.Name(cfg_tensor.data_type)


def _add_tensors(field, tensors: list[tuple[str, str, list[int]]]) -> None:
    pb = model_config_pb2()
    for name, dtype, dims in tensors:
        t = field.add()
        t.name, t.data_type = name, pb.DataType.Value(dtype)
        t.dims.extend(dims)


def onnx_config(name: str, inputs, outputs, *, max_batch_size: int, gpu: bool, instances: int,
                preferred: list[int], queue_delay_us: int):
    """The cluster's ModelConfig of one ONNX model: onnxruntime backend, dynamic batching, every version served;
    gpu: KIND_GPU + ONNX Runtime's TensorRT execution provider (fp16; nodes it cannot take fall back to CUDA)."""
    pb = model_config_pb2()
    cfg = pb.ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=max_batch_size)
    _add_tensors(cfg.input, inputs)
    _add_tensors(cfg.output, outputs)
    cfg.instance_group.add(kind=pb.ModelInstanceGroup.KIND_GPU if gpu else pb.ModelInstanceGroup.KIND_CPU,
                           count=instances)
    cfg.dynamic_batching.preferred_batch_size.extend(preferred)
    cfg.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    cfg.version_policy.all.SetInParent()
    if gpu:
        acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        acc.parameters["precision_mode"] = "FP16"
        acc.parameters["max_workspace_size_bytes"] = str(1 << 30)
    else:
        cfg.parameters["intra_op_thread_count"].string_value = "1"
    return cfg


def ensemble_config(inputs, outputs, max_batch_size: int, version: int):
    """rental-two-stage: retrieval → ranker, both steps pinned to `version`."""
    pb = model_config_pb2()
    cfg = pb.ModelConfig(name=ENSEMBLE, platform="ensemble", max_batch_size=max_batch_size)
    _add_tensors(cfg.input, inputs)
    _add_tensors(cfg.output, outputs)
    cfg.version_policy.latest.num_versions = 1
    user_feats = any(t[0] == "user_features" for t in inputs)
    ret = cfg.ensemble_scheduling.step.add(model_name=RETRIEVAL, model_version=version)
    ret.input_map["history"] = "history"
    ret.output_map["candidates"] = "candidates"
    rank = cfg.ensemble_scheduling.step.add(model_name=RANKER, model_version=version)
    rank.input_map["history"] = "history"
    rank.input_map["candidates"] = "candidates"
    if user_feats:
        ret.input_map["user_features"] = "user_features"
        rank.input_map["user_features"] = "user_features"
    rank.output_map["indices"] = "indices"
    rank.output_map["scores"] = "scores"
    return cfg


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


def _io_signature(cfg) -> tuple:
    """What every version of a model must share: inputs/outputs (name, dtype, dims) and max_batch_size."""
    def ts(field):
        return tuple((t.name, t.data_type, tuple(t.dims)) for t in field)

    return ts(cfg.input), ts(cfg.output), cfg.max_batch_size


def versions(model_dir: str | Path) -> list[int]:
    """The numeric version folders of a model folder, ascending."""
    d = Path(model_dir)
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.is_dir() else []


def _marker(folder: Path, model: str, version: int, meta: dict) -> None:
    """The version folder's marker, with the digests of the files already in the folder."""
    files = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER}
    (folder / MARKER).write_text(json.dumps({
        "model": model, "version": version, "bundle_model_version": str(meta.get("model_version", "")),
        "model_type": meta.get("model_type"), "registry": meta.get("registry"), "files": files}, indent=2) + "\n")


def verify_triton_checksums(repo: str | Path) -> list[str]:
    """Errors (empty = every version folder matches its marker's digests): a file truncated or changed since it
    was written, a listed file missing, a model file the marker does not list, a marker without digests."""
    repo = Path(repo)
    errors: list[str] = []
    for d in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for v in versions(d):
            folder, where = d / str(v), f"{d.name}/{v}"
            try:
                files = json.loads((folder / MARKER).read_text())["files"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                errors.append(f"{where}/{MARKER}: no file checksums to verify against ({type(exc).__name__}: {exc})")
                continue
            for name, want in sorted(files.items()):
                path = folder / name
                if not path.is_file():
                    errors.append(f"{where}/{name}: missing (expected sha256 {want['sha256']})")
                    continue
                got, size = file_sha256(path), path.stat().st_size
                if got != want["sha256"] or size != want["bytes"]:
                    errors.append(f"{where}/{name}: sha256 mismatch: expected {want['sha256']} ({want['bytes']} "
                                  f"bytes), actual {got} ({size} bytes)")
            errors += [f"{where}/{p.name}: not in {MARKER}'s checksums" for p in sorted(folder.glob("*.onnx"))
                       if p.name not in files]
    return errors


def write_triton_repo(bundle_dir: str | Path, out_dir: str | Path, *, version: int | str | None = None,
                      gpu: bool | None = None, max_batch_size: int = 64, instances: int = 1, k: int | None = None,
                      queue_delay_us: int = 500, replace: bool = False) -> Path:
    """Write the bundle's models as version `triton_version(bundle, version)` into the repository `out_dir`
    (created if missing) and return its path. Other versions already there are kept (one repository serves every
    published version) unless `replace`; their configs must describe the same tensors, else ValueError (a
    changed input width needs a new InferenceService). `gpu` defaults to settings.export.triton_gpu."""
    from rentalml.config import get_settings

    bundle = Path(bundle_dir)
    meta = read_meta(bundle)
    verify_bundle(bundle, meta)  # BundleIntegrityError: a corrupt bundle never reaches a repository
    g = meta["graph"]
    n, hist_len = int(g["n_items"]), int(g["history_len"])
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be ≥ 1, got {max_batch_size}")
    s = get_settings().export
    gpu = s.triton_gpu if gpu is None else gpu
    k = max(1, min(int(k or s.triton_k), n))
    ver = triton_version(meta, version)
    out = Path(out_dir)
    if replace and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    preferred = sorted({b for b in (8, 32, max_batch_size) if b <= max_batch_size})
    opts = {"max_batch_size": max_batch_size, "gpu": gpu, "instances": instances, "preferred": preferred,
            "queue_delay_us": queue_delay_us}
    staged: list[tuple[str, Path, object]] = []  # checked first, then moved into place: no half-written version
    tmp = out / f".staging-{ver}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    def add(name: str, src: Path, widths: dict[str, int]) -> tuple[list, list]:
        d = tmp / name
        d.mkdir()
        model = d / "model.onnx"
        if name == SCORER:
            bake_k(src, model, k, hist_len)
        else:
            shutil.copyfile(src, model)
        _marker(d, name, ver, meta)
        ins, outs = _graph_io(model)
        ins, outs = _fixed(ins, widths), _fixed(outs, widths)
        staged.append((name, d, onnx_config(name, ins, outs, **opts)))
        return ins, outs

    try:
        add(SCORER, bundle / g.get("file", "scorer.onnx"), {"history": hist_len})
        ts = meta.get("two_stage")
        ens = None
        if ts:
            c = int(ts["n_candidates"])
            r_ins, _ = add(RETRIEVAL, bundle / ts["retrieval"], {"history": hist_len, "candidates": c,
                                                                 "candidate_scores": c,
                                                                 "user_embedding": int(ts["embedding_dim"])})
            _, k_outs = add(RANKER, bundle / ts["ranker"], {"history": hist_len, "candidates": c, "indices": c,
                                                            "scores": c})
            if ts["mode"] == "brute_force":
                ens = ensemble_config(r_ins, k_outs, max_batch_size, ver)
        for name, _, cfg in staged:
            old = out / name / "config.pbtxt"
            if old.exists() and [v for v in versions(out / name) if v != ver] and \
                    _io_signature(load_config(old)) != _io_signature(cfg):
                raise ValueError(f"{name}: version {ver} changes the inputs/outputs of versions "
                                 f"{[v for v in versions(out / name) if v != ver]} in {out}; one config serves "
                                 "every version (write a new repository, replace=True)")
        for name, d, cfg in staged:
            (out / name).mkdir(exist_ok=True)
            shutil.rmtree(out / name / str(ver), ignore_errors=True)
            d.rename(out / name / str(ver))
            write_config(cfg, out / name / "config.pbtxt")
        if ens is not None:  # the ensemble pins its steps to this version: it keeps only this version's folder
            shutil.rmtree(out / ENSEMBLE, ignore_errors=True)
            (out / ENSEMBLE / str(ver)).mkdir(parents=True)
            _marker(out / ENSEMBLE / str(ver), ENSEMBLE, ver, meta)
            write_config(ens, out / ENSEMBLE / "config.pbtxt")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------- python-backend twin
TWIN_MODEL_PY = '''"""The python-backend twin of an onnxruntime model (generated by rentalml.export.triton).

Runs this folder's model.onnx with ONNX Runtime (CPU, one intra-op thread), one session call per batch of
requests that Triton's dynamic batcher hands over. The python models get their own site folder (numpy<2 for the
stub of the nvidia-pytriton wheel, onnxruntime): `$RENTALML_TRITON_SITE` (set by rentalml.services.start_triton),
put first on sys.path before numpy is imported.
"""

import json
import os
import sys

_site = os.environ.get("RENTALML_TRITON_SITE")
if _site and _site not in sys.path:
    sys.path.insert(0, _site)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        cfg = json.loads(args["model_config"])
        folder = os.path.join(args["model_repository"], args["model_version"])
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(os.path.join(folder, "model.onnx"), so,
                                            providers=["CPUExecutionProvider"])
        self.inputs = [t["name"] for t in cfg["input"]]
        self.outputs = [t["name"] for t in cfg["output"]]

    def execute(self, requests):
        feeds = [{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs} for r in requests]
        sizes = [len(f[self.inputs[0]]) for f in feeds]
        batch = {n: np.concatenate([f[n] for f in feeds]) if len(feeds) > 1 else feeds[0][n] for n in self.inputs}
        res = self.session.run(self.outputs, batch)
        answers, start = [], 0
        for size in sizes:
            answers.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(n, np.ascontiguousarray(a[start:start + size])) for n, a in zip(self.outputs, res)]))
            start += size
        return answers
'''


def twin_config(cfg):
    """The python-backend twin of a cluster ModelConfig: same name, tensors, max_batch_size, dynamic batching,
    version policy and ensemble steps; backend python on CPU (no accelerators, no onnxruntime parameters)."""
    pb = model_config_pb2()
    twin = pb.ModelConfig()
    twin.CopyFrom(cfg)
    if cfg.platform == "ensemble":
        return twin
    twin.ClearField("platform")
    twin.backend = "python"
    twin.ClearField("optimization")
    twin.ClearField("parameters")
    twin.ClearField("instance_group")
    twin.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=max(1, cfg.instance_group[0].count
                                                                            if cfg.instance_group else 1))
    return twin


def write_python_twin(repo: str | Path, out_dir: str | Path | None = None) -> Path:
    """The python-backend twin of a cluster repository (default location twin_dir(repo)), replaced as a whole:
    every model and version of `repo`, each version folder holding the same model.onnx, a generated model.py
    running it with ONNX Runtime, and the marker."""
    repo = Path(repo)
    out = Path(out_dir) if out_dir is not None else twin_dir(repo)
    if out.resolve() == repo.resolve():
        raise ValueError("the twin repository must differ from the cluster repository")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for d in sorted(p for p in repo.iterdir() if (p / "config.pbtxt").exists()):
        cfg = load_config(d / "config.pbtxt")
        (out / d.name).mkdir()
        write_config(twin_config(cfg), out / d.name / "config.pbtxt")
        for v in versions(d):
            dst = out / d.name / str(v)
            dst.mkdir()
            for f in (d / str(v)).iterdir():
                if f.is_file():
                    shutil.copyfile(f, dst / f.name)
            if cfg.platform != "ensemble":
                (dst / "model.py").write_text(TWIN_MODEL_PY)
    return out


def compare_twin(repo: str | Path, twin: str | Path) -> list[str]:
    """Differences (empty = twins) between a cluster repository and its python twin: model set, versions,
    tensor names/dtypes/dims, max_batch_size, dynamic batching, version policy, ensemble steps."""
    repo, twin = Path(repo), Path(twin)
    errs: list[str] = []
    names = sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").exists())
    t_names = sorted(p.name for p in twin.iterdir() if (p / "config.pbtxt").exists())
    if names != t_names:
        return [f"models {names} != twin {t_names}"]
    for name in names:
        a, b = load_config(repo / name / "config.pbtxt"), load_config(twin / name / "config.pbtxt")
        if a.platform != "ensemble" and b.backend != "python":
            errs.append(f"{name}: twin backend {b.backend!r}, expected 'python'")
        for what in ("name", "max_batch_size", "input", "output", "dynamic_batching", "version_policy",
                     "ensemble_scheduling"):
            if getattr(a, what) != getattr(b, what):
                errs.append(f"{name}: {what} differs: {getattr(a, what)} != twin {getattr(b, what)}")
        if versions(repo / name) != versions(twin / name):
            errs.append(f"{name}: versions {versions(repo / name)} != twin {versions(twin / name)}")
    return errs


# ------------------------------------------------------------------------------------------------ validation
def validate_triton_repo(repo: str | Path, run: bool = True) -> list[str]:
    """Errors (empty = valid): every config parses as a ModelConfig, every model has a version folder with its
    marker, names/dtypes/dims of every version's graph match the config (batch dim excluded when
    max_batch_size > 0), ensembles wire existing tensors of existing, pinned versions; with run=True every ONNX
    model is run by ONNX Runtime on a batch of 2 built from exactly the config's dims."""
    repo = Path(repo)
    errors: list[str] = []
    configs = {}
    for d in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            configs[d.name] = load_config(d / "config.pbtxt")
        except Exception as exc:  # noqa: BLE001 - a parse error of any kind is the finding
            errors.append(f"{d.name}/config.pbtxt: {exc}")
            continue
        if configs[d.name].name != d.name:
            errors.append(f"{d.name}: config name {configs[d.name].name!r} differs from the folder")
        if not versions(d):
            errors.append(f"{d.name}: no version folder")
        for v in versions(d):
            if not (d / str(v) / MARKER).is_file():
                errors.append(f"{d.name}/{v}: no {MARKER} (an empty version folder is dropped by object stores)")
    for name, cfg in configs.items():
        if cfg.platform == "onnxruntime_onnx":
            for v in versions(repo / name):
                errors += _check_onnx_model(repo / name, v, cfg, run)
        elif cfg.platform == "ensemble":
            errors += _check_ensemble(cfg, configs, repo)
        else:
            errors.append(f"{name}: unexpected platform {cfg.platform!r}")
    return errors


def _check_onnx_model(folder: Path, version: int, cfg, run: bool) -> list[str]:
    errs: list[str] = []
    model = folder / str(version) / "model.onnx"
    if not model.exists():
        return [f"{cfg.name}: missing {version}/model.onnx"]
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


def _check_ensemble(cfg, configs: dict, repo: Path) -> list[str]:
    errs: list[str] = []
    avail = {t.name: (t.data_type, list(t.dims)) for t in cfg.input}
    for step in cfg.ensemble_scheduling.step:
        sub = configs.get(step.model_name)
        if sub is None:
            errs.append(f"{cfg.name}: step model {step.model_name!r} is not in the repository")
            continue
        if step.model_version > 0 and step.model_version not in versions(repo / step.model_name):
            errs.append(f"{cfg.name}: step {step.model_name} pins version {step.model_version}, the repository "
                        f"has {versions(repo / step.model_name)}")
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


def ensemble_reference(repo: str | Path, history: np.ndarray, user_features: np.ndarray | None = None,
                       version: int | None = None):
    """Run the rental-two-stage ensemble's steps with ONNX Runtime as Triton would (for tests and docs);
    `version`: the steps' version (default: the one the ensemble pins)."""
    import onnxruntime as ort

    repo = Path(repo)
    if version is None:
        version = load_config(repo / ENSEMBLE / "config.pbtxt").ensemble_scheduling.step[0].model_version
    feed = {"history": history}
    if user_features is not None:
        feed["user_features"] = user_features
    ret = ort.InferenceSession(str(repo / RETRIEVAL / str(version) / "model.onnx"),
                               providers=["CPUExecutionProvider"])
    cand, _ = ret.run(None, feed)
    rank = ort.InferenceSession(str(repo / RANKER / str(version) / "model.onnx"), providers=["CPUExecutionProvider"])
    return rank.run(None, {**feed, "candidates": cand})
