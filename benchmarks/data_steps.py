"""The pipeline's first three steps, old (one pandas frame per copy) against new (DuckDB / Arrow streaming),
side by side on one dataset directory (issue #14 point 3): wall time and peak RSS, each variant in a fresh
subprocess so one's memory never counts in another's.

  ingest    old: load_dataset(dir) + interactions.to_parquet whole   new: steps.ingest (record batches)
  validate  old: Dataset.load + the pandas validation (the frozen      new: steps.validate (validation.validate_dir,
            oracle tests/validation_pandas_reference.py)                  DuckDB over the parquet files)
  features  old: Dataset.load + save + encoders                        new: steps.build_features (hard link)

`peak_rss_mb` is the child's ru_maxrss; `base_rss_mb` its RSS after the imports (DuckDB started), before the
step, so
`step_rss_mb` (the difference) is what the step itself added. The report is checked to be the same for both
validate variants (checks and stats keys). The load average is recorded: the machine may be shared.

    python benchmarks/data_steps.py --make synthetic:1000000,100000,10000000,42 --dir /tmp/ds1m \\
        [--steps ingest,validate,features] [--memory 2GB] [--out benchmarks/results/data_steps.json]

`--make` generates and saves the dataset first (skipped when --dir already holds interactions.parquet).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "data_steps.json"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(step: str, variant: str, src: str, work: str) -> dict:
    """Runs in the subprocess: one step, one variant."""
    sys.path.insert(0, str(ROOT / "tests"))
    import duckdb
    import pandas as pd  # noqa: F401  (both variants pay the same imports before the baseline)
    import validation_pandas_reference as old
    from rentalml.components import steps

    from rentalml.data import validation
    from rentalml.data.dataset import Dataset
    from rentalml.data.features import FeatureEncoder
    from rentalml.data.loaders import load_dataset

    duckdb.connect().execute("SELECT 1").fetchall()  # the library's fixed cost is paid before the baseline
    base = _rss_mb()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    out: dict = {}
    if step == "ingest":
        if variant == "old":
            ds = load_dataset(src)
            ds.interactions.to_parquet(Path(work) / "interactions.parquet", index=False)
            out["rows"] = len(ds.interactions)
        else:
            out["rows"] = steps.ingest(src, work)["interactions"]
    elif step == "validate":
        if variant == "old":
            rep = old.validate(Dataset.load(src))
        else:
            rep = validation.validate_dir(src)
        out["report"] = {"checks": [(c.name, c.ok, c.message) for c in rep.checks], "stats": sorted(rep.stats),
                         "snapshot": rep.stats["snapshot"]}
    elif step == "features":
        if variant == "old":
            ds = Dataset.load(src)
            ds.interactions.to_parquet(Path(work) / "interactions.parquet", index=False)
            for table in (ds.items, ds.users):
                if table is not None and len(table.columns):
                    FeatureEncoder.fit(table)
        else:
            steps.build_features(src, work)
    out.update(wall_s=round(time.perf_counter() - t0, 3), base_rss_mb=round(base, 1),
               peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               peak_before_mb=round(peak_before, 1))
    out["step_rss_mb"] = round(out["peak_rss_mb"] - base, 1)
    return out


def _run(step: str, variant: str, src: str, memory: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"data_steps_{step}_{variant}_") as work:
        env = {**os.environ, "RENTALML_TRAIN__DATA_MEMORY": memory, "RENTALML_HOME": work + "/home"}
        proc = subprocess.run([sys.executable, __file__, "--child", step, variant, src, work], env=env,
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{step}/{variant} failed:\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="a saved dataset directory (interactions.parquet, ...)")
    ap.add_argument("--make", default=None, help="dataset spec to generate into --dir first (synthetic:u,p,e,seed)")
    ap.add_argument("--steps", default="ingest,validate,features")
    ap.add_argument("--memory", default="2GB", help="DuckDB memory limit for the new validate")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    d = Path(args.dir)
    if args.make and not (d / "interactions.parquet").exists():
        from rentalml.data.loaders import load_dataset

        load_dataset(args.make).save(d)
    load_before = os.getloadavg()
    results: dict = {}
    for step in [s for s in args.steps.split(",") if s]:
        results[step] = {variant: _run(step, variant, str(d), args.memory) for variant in ("old", "new")}
        o, n = results[step]["old"], results[step]["new"]
        if step == "validate":
            assert o.pop("report") == n.pop("report"), "old and new validation reports differ"
        results[step]["ratio"] = {"wall": round(o["wall_s"] / max(n["wall_s"], 1e-9), 2),
                                  "step_rss": round(o["step_rss_mb"] / max(n["step_rss_mb"], 1.0), 2)}
        print(f"{step:9s} old {o['wall_s']:8.2f}s {o['step_rss_mb']:8.1f} MB | "
              f"new {n['wall_s']:8.2f}s {n['step_rss_mb']:8.1f} MB", flush=True)
    doc = {"dataset": str(d), "spec": args.make, "duckdb_memory": args.memory, "cpus": os.cpu_count(),
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "steps": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    return doc


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(_child(*sys.argv[2:6])))
    else:
        main()
