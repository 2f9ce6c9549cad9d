"""Training at marketplace scale (issue #14 point 3): every stage of `rentalml train`, timed, with peak memory.

Default size: the synthetic marketplace at 1M users, 100k properties, 10M events. The stages are the ones
`rentalml train --data synthetic:U,P,E` runs (rentalml.training.workflow.train_and_register), called one by
one so each gets its own wall time and peak RSS:

  generate     the synthetic generator (chunked over users)
  save/load    the parquet round trip (the pipeline's dataset artifact; load is the ingest path, Arrow)
  validate     rentalml.data.validation.validate_dir (the pipeline's step: DuckDB over the parquet)
  split        the protocol's split (random-75-25)
  fit          fit_model(hybrid) on the train split: the validation fit (item-item L2 grid, the tower's
               early stopping, the blend) then the refit on the whole train split; the item-item part and the
               tower are timed separately inside it (itemitem.*, tower.*)
  evaluate     recall/nDCG@k on the test split of the hybrid, popularity and ALS (implicit) over the same
               --eval-users users drawn at random (seeded) from the test users: a sampled-user evaluation
  refit_all    the refit on every interaction with the selected parameters (what ships)
  export       write_bundle: ONNX scorer (+ int8), the ANN retrieval bundle, features
  serve        benchmarks/serving.py --bundle (v2 REST/gRPC p50/p99, req/s with 8 clients, in-process floor)

Peak RSS per stage is sampled by a psutil thread (every 0.2 s; children included for the serve stage, which
runs in a subprocess and reports its own file); `ru_maxrss` is the whole process's peak. The load average is
recorded before and after: the machine may be shared. Writes benchmarks/results/training_scale.json and
prints a markdown table.

    python benchmarks/training_scale.py [--users 1000000 --properties 100000 --events 10000000] \
        [--params '{...}'] [--skip serve,refit_all] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
GB = 1024 ** 3


class Recorder:
    """Wall time and peak RSS per named stage (a sampling thread; nested stages record their own peaks)."""

    def __init__(self, interval: float = 0.2):
        self.proc = psutil.Process()
        self.stages: list[dict] = []
        self._open: list[dict] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self._t.start()

    def _rss(self) -> int:
        return self.proc.memory_info().rss

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            rss = self._rss()
            for s in list(self._open):
                s["_peak"] = max(s["_peak"], rss)

    @contextmanager
    def stage(self, name: str):
        rss = self._rss()
        s = {"stage": name, "_peak": rss, "rss_start_gb": round(rss / GB, 3), "load_start": os.getloadavg()[0]}
        self._open.append(s)
        t0 = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        try:
            yield s
        finally:
            s["seconds"] = round(time.perf_counter() - t0, 2)
            self._open.remove(s)
            s["peak_rss_gb"] = round(max(s.pop("_peak"), self._rss()) / GB, 3)
            s["rss_end_gb"] = round(self._rss() / GB, 3)
            s["load_end"] = os.getloadavg()[0]
            self.stages.append(s)
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {s['seconds']} s, peak {s['peak_rss_gb']} GB", flush=True)

    def close(self) -> None:
        self._stop.set()


def wrap(rec: Recorder, cls, method: str, name: str) -> None:
    """Time every call of cls.method as stage `name.<n>`."""
    orig = getattr(cls, method)
    count = {"n": 0}

    def timed(self, *a, **kw):
        count["n"] += 1
        with rec.stage(f"{name}.{count['n']}"):
            return orig(self, *a, **kw)

    setattr(cls, method, timed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--properties", type=int, default=100_000)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--protocol", default="random-75-25")
    ap.add_argument("--params", default="{}", help="JSON model parameters (as `rentalml train --params`)")
    ap.add_argument("--eval-users", type=int, default=20_000, help="test users drawn for the evaluation (0: all)")
    ap.add_argument("--baselines", default="popularity,als")
    ap.add_argument("--skip", default="", help="comma list of stages to skip: save, validate, refit_all, export, serve")
    ap.add_argument("--itemitem-only", action="store_true",
                    help="only the item-item part: generate, split, then SparseEASE's validation fit (the L2 grid) "
                         "with the scale defaults' neighbours, its phases timed (co-occurrence top-k, Gram, solve)")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (parquet, bundle)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "training_scale.json")
    a = ap.parse_args()
    skip = {s for s in a.skip.split(",") if s}
    work = a.work or Path(tempfile.mkdtemp(prefix="rentalml-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    params = json.loads(a.params)

    from rentalml.data.dataset import Dataset
    from rentalml.data.generator import generate_marketplace
    from rentalml.evaluation.evaluate import evaluate
    from rentalml.evaluation.protocols import split
    from rentalml.models.itemitem import SparseEASE
    from rentalml.models.neural import TwoTower
    from rentalml.training.trainer import fit_model

    rec = Recorder()
    wrap(rec, SparseEASE, "fit", "fit.itemitem")
    wrap(rec, TwoTower, "fit", "fit.tower")
    load0 = os.getloadavg()
    t_all = time.perf_counter()
    result: dict = {"size": {"users": a.users, "properties": a.properties, "events": a.events}, "seed": a.seed,
                    "params": params, "protocol": a.protocol, "k": a.k}

    with rec.stage("generate"):
        ds = generate_marketplace(a.users, a.properties, a.events, seed=a.seed)
    if "save" not in skip:
        with rec.stage("save_parquet"):
            ds.save(work / "data")
        del ds
        with rec.stage("load_parquet"):
            ds = Dataset.load(work / "data", name="synthetic")
    result["dataset"] = ds.summary()
    if "validate" not in skip:
        from rentalml.data.validation import validate, validate_dir

        with rec.stage("validate") as s:  # the pipeline's step: DuckDB over the saved parquet
            report = validate(ds) if "save" in skip else validate_dir(work / "data")
            s["ok"] = report.ok
    with rec.stage("split"):
        train, test = split(ds.interactions, a.protocol, a.seed)
    if a.itemitem_only:
        itemitem_only(rec, ds, train, params, a, result, load0)
        return
    with rec.stage("fit"):
        fitted = fit_model("hybrid", ds, train, params=params, seed=a.seed, progress=False)
    result["selected_params"] = {k: v for k, v in fitted.params.items() if isinstance(v, int | float | str)}
    result["training_curve"] = fitted.training_curve
    with rec.stage("evaluate"):
        from rentalml.evaluation.evaluate import sample_test_users

        sub, _ = sample_test_users(test, a.eval_users, a.seed)
        n_eval = int(sub["user_id"].nunique())
        quality = {"hybrid": evaluate(fitted, sub, a.k)}
        for name in [b for b in a.baselines.split(",") if b]:
            with rec.stage(f"evaluate.{name}") as s:
                base = fit_model(name, ds, train, seed=a.seed, valid_frac=0.0)
                s["fit_seconds"] = round(base.fit_seconds, 2)
                quality[name] = evaluate(base, sub, a.k)
                del base
    result["quality"] = {m: {key: q[key] for key in q if not isinstance(q[key], dict)} for m, q in quality.items()}
    result["eval_users"] = n_eval
    del train, test, sub
    if "refit_all" not in skip:
        with rec.stage("refit_all"):
            fitted = fit_model("hybrid", ds, None, params=fitted.params, seed=a.seed, valid_frac=0.0)
    bundle = work / "bundle"
    if "export" not in skip:
        from rentalml.export.bundle import write_bundle

        with rec.stage("export"):
            write_bundle(fitted, ds, bundle)
        result["bundle_files"] = {p.name: p.stat().st_size for p in sorted(bundle.iterdir()) if p.is_file()}
    # the baselines' fits are the benchmark's, not `rentalml train`'s: their time is reported apart
    baseline_seconds = round(sum(st["seconds"] for st in rec.stages if st["stage"].startswith("evaluate.")), 1)
    train_seconds = round(time.perf_counter() - t_all - baseline_seconds, 1)
    del fitted, ds
    if "serve" not in skip and "export" not in skip:
        out = a.out.with_name(a.out.stem + "_serving.json")
        with rec.stage("serve") as s:
            cmd = [sys.executable, str(ROOT / "benchmarks" / "serving.py"), "--bundle", str(bundle),
                   "--concurrency", "8", "--precisions", "fp32", "--hit-users", "0", "--out", str(out)]
            s["command"] = " ".join(cmd[1:])
            subprocess.run(cmd, check=True, cwd=ROOT)
        result["serving"] = json.loads(out.read_text())
    rec.close()
    result.update({
        "stages": rec.stages,
        "train_command_seconds": train_seconds, "baseline_fit_seconds": baseline_seconds,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 3),
        "load_before": load0, "load_after": os.getloadavg(),
        "machine": {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / GB, 1),
                    "platform": platform.platform()},
        "command": "python benchmarks/training_scale.py " + " ".join(sys.argv[1:]),
    })
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2, default=str))
    print(table(result))


def itemitem_only(rec: Recorder, ds, train, params: dict, a, result: dict, load0) -> None:
    import rentalml.models.itemitem as ii
    from rentalml.data.dataset import InteractionMatrix
    from rentalml.evaluation.protocols import holdout_split
    from rentalml.models.base import TrainData
    from rentalml.training.trainer import SCALE_DEFAULTS, catalogue

    orig_topk = ii.cooccurrence_topk

    def topk(*args, **kw):
        with rec.stage("itemitem.cooccurrence_topk"):
            return orig_topk(*args, **kw)

    ii.cooccurrence_topk = topk
    with rec.stage("itemitem.matrices"):
        items = catalogue(ds, train)
        users = np.array(sorted(train["user_id"].unique()), dtype=object)
        tr, va = holdout_split(train, 0.1, a.seed + 1)
        m_tr = InteractionMatrix.build(tr, item_ids=items, user_ids=users).matrix
        m_va = InteractionMatrix.build(va, item_ids=items, user_ids=users).matrix
    del ds, train, tr, va
    neighbours = int(params.get("neighbours", SCALE_DEFAULTS["neighbours"]))
    with rec.stage("itemitem.fit_with_l2_grid") as s:
        model = ii.SparseEASE(neighbours=neighbours).fit(TrainData(m_tr, valid=m_va, seed=a.seed))
        s.update(neighbours=neighbours, l2=model.l2, nnz_W=int(model.W.nnz), grid=list(ii.SparseEASE.L2_GRID))
    rec.close()
    result.update({"stages": rec.stages, "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                                                * 1024 / GB, 3),
                   "load_before": load0, "load_after": os.getloadavg(), "matrix_nnz": int(m_tr.nnz),
                   "command": "python benchmarks/training_scale.py " + " ".join(sys.argv[1:])})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2, default=str))
    for st in rec.stages:
        print(f"| {st['stage']} | {st['seconds']} | {st['peak_rss_gb']} |")


def table(r: dict) -> str:
    lines = ["| stage | seconds | peak RSS (GB) | load |", "|---|---:|---:|---:|"]
    for s in r["stages"]:
        lines.append(f"| {s['stage']} | {s['seconds']} | {s['peak_rss_gb']} | {s['load_start']:.1f} |")
    lines += ["", "| model | recall@k | nDCG@k |", "|---|---:|---:|"]
    for m, q in r.get("quality", {}).items():
        k = r["k"]
        lines.append(f"| {m} | {q.get(f'recall@{k}', float('nan')):.4f} | {q.get(f'ndcg@{k}', float('nan')):.4f} |")
    lines.append(f"\ntrain command stages: {r['train_command_seconds']} s (baseline fits apart: "
                 f"{r.get('baseline_fit_seconds')} s); process peak RSS {r['peak_rss_gb']} GB")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
