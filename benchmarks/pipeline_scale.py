"""The kfp.local training pipeline at marketplace scale (issue #14 point 3): wall time and peak RSS per step.

Runs `rentalml pipeline run --local` (every step a subprocess of kfp.local's SubprocessRunner, as
`make demo` and the tests do) on a dataset source: the synthetic generator by default, or the parquet directory
that `benchmarks/training_scale.py --work DIR` saved (DIR/data: 1M users, 100k properties, 10M events), so the
ingest step streams parquet. A psutil thread samples the process tree every 0.5 s: each step process is
recognised by the `--function_to_execute <component>` argument kfp puts on its command line, and its peak RSS is
recorded (steps shorter than the interval show none). Each step's wall time is read from kfp.local's own log
("Executing task" → "finished"). `peak_tree_rss_gb` is the largest sum over all processes at one instant (the
steps run one after another, so it is the run's peak). The load average is recorded: the machine may be shared.

    python benchmarks/pipeline_scale.py --source /tmp/scale/w/data [--params '{}'] [--threads 2] \
        [--work DIR] [--out benchmarks/results/pipeline_scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
GB = 1024 ** 3


def step_name(cmdline: list[str]) -> str | None:
    """The component a kfp.local step process runs (kfp's `--function_to_execute NAME`), else None."""
    for i, arg in enumerate(cmdline[:-1]):
        if arg == "--function_to_execute":
            return cmdline[i + 1]
    return None


class TreeSampler:
    """Peak RSS per kfp step (GB), and the peak of the whole tree's RSS (bytes)."""

    def __init__(self, root: psutil.Process, interval: float = 0.5):
        self.root, self.interval = root, interval
        self.steps: dict[str, float] = {}
        self.peak_tree = 0
        self._names: dict[int, str | None] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        per_step: dict[str, int] = {}
        for p in procs:
            try:
                rss = p.memory_info().rss
                if p.pid not in self._names:
                    self._names[p.pid] = step_name(p.cmdline())
            except psutil.Error:
                continue
            total += rss
            name = self._names[p.pid]
            if name:  # a step and the processes it starts (torch workers, servers) count for that step
                per_step[name] = per_step.get(name, 0) + rss
        self.peak_tree = max(self.peak_tree, total)
        for name, rss in per_step.items():
            self.steps[name] = max(self.steps.get(name, 0.0), round(rss / GB, 3))

    def close(self) -> None:
        self._stop.set()
        self._t.join()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TASK = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) - INFO - (?:Executing task '([^']+)'|Task '([^']+)' finished with "
                   r"status (\w+))")


def task_times(log: str) -> dict[str, dict]:
    """Per task: seconds between kfp.local's "Executing task" and "finished with status" lines, and the status."""
    def secs(t: str) -> float:
        h, m, rest = t.split(":")
        return int(h) * 3600 + int(m) * 60 + float(rest)

    out: dict[str, dict] = {}
    for line in _ANSI.sub("", log).splitlines():
        m = _TASK.match(line)
        if not m:
            continue
        if m.group(2):
            out[m.group(2)] = {"start": secs(m.group(1))}
        elif m.group(3) in out:
            t = out[m.group(3)]
            t["seconds"] = round((secs(m.group(1)) - t.pop("start")) % 86400, 1)
            t["status"] = m.group(4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="synthetic:1000000,100000,10000000,42")
    ap.add_argument("--params", default="{}", help="the pipeline's model parameters (JSON); {} = the trainer's "
                    "own defaults, its scale profile at this size")
    ap.add_argument("--threads", type=int, default=2, help="OMP/torch threads per step")
    ap.add_argument("--work", type=Path, default=None, help="RENTALML_HOME and the pipeline root")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pipeline_scale.json")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="rentalml-pipeline-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    summary_path = work / "run.json"
    cmd = [sys.executable, "-c", "from rentalml.cli import app; app()", "pipeline", "run", "--local",
           "--source", a.source, "--params", a.params, "--deploy-mode", "none", "--threads", str(a.threads),
           "--pipeline-root", str(work / "kfp-local"), "--json", str(summary_path)]
    env = {**os.environ, "RENTALML_HOME": str(work / "home")}
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    with open(work / "pipeline.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        sampler = TreeSampler(psutil.Process(proc.pid))
        rc = proc.wait()
        sampler.close()
    seconds = round(time.perf_counter() - t0, 1)
    run = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    times = task_times((work / "pipeline.log").read_text(errors="replace"))
    peaks = {name.replace("_", "-"): peak for name, peak in sampler.steps.items()}
    steps = [{"step": task, "seconds": t.get("seconds"), "status": t.get("status"),
              "peak_rss_gb": peaks.get(task)} for task, t in times.items()]  # too short to sample: None
    result = {
        "command": "python benchmarks/pipeline_scale.py " + " ".join(sys.argv[1:]),
        "pipeline_command": " ".join(cmd[3:]), "exit_code": rc, "seconds": seconds,
        "pipeline_seconds": run.get("seconds"), "steps": steps,
        "peak_step_rss_gb": max((s["peak_rss_gb"] for s in steps if s["peak_rss_gb"]), default=None),
        "peak_tree_rss_gb": round(sampler.peak_tree / GB, 3), "scores": run.get("scores"),
        "gate": run.get("gate"), "load_before": load0, "load_after": os.getloadavg(),
        "machine": {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / GB, 1)},
        "log": str(work / "pipeline.log"),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2, default=str))
    print("| step | seconds | peak RSS (GB) |\n|---|---:|---:|")
    for s in steps:
        print(f"| {s['step']} | {s['seconds']} | {s['peak_rss_gb']} |")
    print(f"\npipeline {seconds} s (kfp.local: {run.get('seconds')} s), exit {rc}; peak step RSS "
          f"{result['peak_step_rss_gb']} GB, peak tree RSS {result['peak_tree_rss_gb']} GB; "
          f"test nDCG@10 {(run.get('scores') or {}).get('ndcg@10')}")
    if rc:
        sys.exit(f"the pipeline failed (exit {rc}): see {work / 'pipeline.log'}")


if __name__ == "__main__":
    main()
