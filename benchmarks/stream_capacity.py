"""Stream processor capacity: how fast `rentalml stream run` drains a pre-filled backlog, with one processor and
with two in one consumer group, side by side in one run.

  * Tansu (memory) and Redis are started here; the input topics get --partitions partitions (default 4);
  * pre-fill: the listings of a synthetic marketplace, then interactions stamped "now" (cycled, new event ids),
    with --malformed (default 1 %) malformed records mixed in (streaming.produce.malformed: bad JSON, not UTF-8,
    missing field, bad enum, no time zone, unknown attribute), --events records in all (default 200,000);
  * drains: for each of --rounds rounds, one processor, then two processors in one consumer group (`rentalml
    stream run --idle-exit-s`, subprocesses), each drain with its own consumer group and state-store key prefix,
    so each reads the whole backlog from offset 0 into a fresh state;
  * events/s of a drain = records committed / (last commit − start of the first batch), from the processors'
    per-batch log lines (so the Python start-up and the group join are not counted; a rebalance when the second
    member joins is);
  * every drain must account for every record: processed + dead_letter = records pre-filled (the malformed ones
    and nothing else in dead_letter), no duplicates.

Writes benchmarks/results/stream_capacity.json and prints a markdown row; `uptime` load averages are recorded
before and after (the machine is shared).

    OMP_NUM_THREADS=1 python benchmarks/stream_capacity.py [--events 200000] [--rounds 2]
    python benchmarks/stream_capacity.py --events 50000 --profile /tmp/stream.prof   # cProfile one drain in-process
    python benchmarks/stream_capacity.py --events 50000 --profile -   # the same drain, CPU seconds only
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from streaming_latency import committed_batches, uptime  # the sibling benchmark (benchmarks/ is sys.path[0])

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "stream_capacity.json"


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def prefill(settings, n: int, malformed: float, dataset: str) -> dict:
    from rentalml.streaming.produce import dataset_events, send_events

    from rentalml.kafka import USER_INTERACTIONS

    # send_events adds a malformed record before a good one with probability `malformed`: n records in all
    n_good = round(n / (1 + malformed))
    listings = int(dataset.split(":")[1].split(",")[1]) if ":" in dataset else 0
    count = itertools.count()
    events = itertools.takewhile(lambda te: te[0] != USER_INTERACTIONS or next(count) < n_good - listings,
                                 dataset_events(dataset, timestamps="now", cycle=True))
    return send_events(events, settings, rate=0.0, malformed_fraction=malformed, seed=7)


def drain(env: dict, home: Path, name: str, workers: int, idle_s: float, timeout_s: float,
          services: dict[str, int]) -> dict:
    """`workers` processors in one fresh consumer group over a fresh state prefix until all are idle."""
    tag = f"{name}-{workers}p-{int(time.time() * 1000) % 10**8}"
    penv = {**env, "RENTALML_STREAM__GROUP_ID": f"cap-{tag}", "RENTALML_STREAM__KEY_PREFIX": f"cap:{tag}"}
    logs = [home / f"{tag}-{i}.log" for i in range(workers)]
    load_before = os.getloadavg()
    cpu0 = {name: cpu_s(pid) for name, pid in services.items()} | {"processors": children_cpu_s()}
    procs = [subprocess.Popen([sys.executable, "-m", "rentalml.cli", "stream", "run", "--idle-exit-s", str(idle_s)],
                              env=penv, stdout=subprocess.PIPE, stderr=open(log, "ab"), cwd=str(ROOT))
             for log in logs]
    totals = []
    for p, log in zip(procs, logs, strict=True):
        out, _ = p.communicate(timeout=timeout_s)
        if p.returncode != 0:
            raise RuntimeError(f"processor exited {p.returncode}:\n{log.read_text()[-3000:]}")
        totals.append(json.loads(out.decode().strip().splitlines()[-1]))
    cpu = {k: round(v - cpu0[k], 2) for k, v in
           ({name: cpu_s(pid) for name, pid in services.items()} | {"processors": children_cpu_s()}).items()}
    batches = [committed_batches(log) for log in logs]
    rows = [b for bs in batches for b in bs if b[1]["records"] > 0]
    start = min(t - d["batch_s"] for t, d in rows)
    end = max(t for t, _ in rows)
    records = sum(d["records"] for _, d in rows)
    per = [sum(d["records"] for _, d in bs) for bs in batches]
    keys = ("parse_s", "apply_s", "frames_s", "push_s", "produce_s", "flush_commit_s", "batch_s")
    stages = {k: round(float(np.median([d[k] for _, d in rows])), 4) for k in keys}
    return {"workers": workers, "records": records, "per_worker_records": per, "seconds": round(end - start, 3),
            "events_per_s": round(records / (end - start), 1), "batches": len(rows),
            "batch_records_p50": int(np.median([d["records"] for _, d in rows])), "stage_p50_s": stages,
            "processed": sum(t["processed"] for t in totals), "duplicate": sum(t["duplicate"] for t in totals),
            "dead_letter": sum(t["dead_letter"] for t in totals),
            # CPU seconds each part spent from the processors' start to their exit (start-up and idle exit
            # included for the processors): where the 2 cores went
            "cpu_s": cpu,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def profile_drain(settings, out: str | None, services: dict[str, int], read_ahead: bool = True) -> None:
    """One processor in this process until the backlog is drained: under cProfile (pstats file `out`), or with
    `out` None without it (for a sampling profiler). Prints the process's CPU seconds per record from the start of
    its first batch to its exit (all its threads: kafka-python's I/O threads included; the start-up and group
    join not, as in the events/s of a drain), the broker's and Redis's over the same span, and the batch stages
    summed: CPU time is what load on a shared machine inflates least."""
    import cProfile
    import pstats

    from rentalml.streaming.processor import Processor

    tag = f"prof-{int(time.time())}"
    s = settings.model_copy(update={"stream": settings.stream.model_copy(
        update={"group_id": f"cap-{tag}", "key_prefix": f"cap:{tag}"})})
    batches: list[dict] = []
    proc = Processor(s, log_fn=batches.append)
    proc.read_ahead = read_ahead
    prof = cProfile.Profile() if out else None
    t0 = time.perf_counter()
    first: dict = {}
    process = proc.process

    def timed(records, *rest):  # the CPU clocks start with the first batch
        if not first:
            first.update(c0=time.process_time(), svc0={name: cpu_s(pid) for name, pid in services.items()},
                         t0=time.perf_counter())
        n = process(records, *rest)
        first["t1"] = time.perf_counter()
        return n

    proc.process = timed
    if prof:
        prof.enable()
    totals = proc.run(idle_exit_s=3.0)
    if prof:
        prof.disable()
    cpu, records = time.process_time() - first["c0"], totals["processed"] + totals["dead_letter"] + totals["duplicate"]
    svc0 = first["svc0"]
    rows = [b for b in batches if b.get("records")]
    stages = {k: round(sum(b[k] for b in rows), 3) for k in
              ("parse_s", "apply_s", "frames_s", "push_s", "produce_s", "flush_commit_s", "batch_s")}
    print(json.dumps({"totals": totals, "wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(cpu, 2),
                      "cpu_us_per_record": round(cpu / max(records, 1) * 1e6, 1), "batches": len(rows),
                      # first batch start -> last batch end (wall: moves with the load)
                      "events_per_s": round(records / (first["t1"] - first["t0"]), 1),
                      "services_cpu_us_per_record": {name: round((cpu_s(pid) - svc0[name]) / max(records, 1) * 1e6, 1)
                                                     for name, pid in services.items()},
                      "stages_sum_s": stages, "profiled": bool(prof), "read_ahead": read_ahead,
                      "uptime": uptime()}))
    if prof:
        prof.dump_stats(out)
        pstats.Stats(out).sort_stats("cumulative").print_stats(45)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000, help="records pre-filled (malformed included)")
    ap.add_argument("--malformed", type=float, default=0.01)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="1-processor and 2-processor drains, alternated")
    ap.add_argument("--dataset", default="synthetic:2000,1000,20000")
    ap.add_argument("--idle-s", type=float, default=6.0, help="a processor exits after this long without records")
    ap.add_argument("--profile", help="cProfile one in-process drain into this file instead ('-': no cProfile, "
                    "only the CPU seconds per record)")
    ap.add_argument("--out", type=Path, default=OUT, help="the result JSON")
    ap.add_argument("--no-read-ahead", action="store_true", help="with --profile: the processor without its "
                    "read-ahead (the next batch read while the state step runs), to compare")
    args = ap.parse_args()

    from rentalml.services import start_redis, start_tansu

    tansu, redis = start_tansu(), start_redis()
    home = Path(tempfile.mkdtemp(prefix="rentalml-stream-capacity-"))
    env = {**os.environ, "RENTALML_HOME": str(home), "RENTALML_KAFKA__BOOTSTRAP_SERVERS": tansu.url,
           "RENTALML_REDIS_URL": redis.url, "RENTALML_FEAST__REPO_PATH": str(ROOT / "feature_repo"),
           "RENTALML_KAFKA__PARTITIONS": str(args.partitions),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    os.environ.update({k: v for k, v in env.items() if k.startswith("RENTALML_")})
    try:
        from rentalml.config import get_settings

        get_settings.cache_clear()
        settings = get_settings()
        from rentalml.features.store import apply, open_store

        apply(open_store(settings))
        load0 = uptime()
        t0 = time.perf_counter()
        produced = prefill(settings, args.events, args.malformed, args.dataset)
        produced["prefill_s"] = round(time.perf_counter() - t0, 2)
        print(json.dumps({"prefilled": produced, "uptime": load0}), flush=True)
        total = produced["events"] + produced["malformed"]
        if args.profile:
            profile_drain(settings, None if args.profile == "-" else args.profile,
                          services={"broker": tansu.proc.pid, "redis": redis.proc.pid},
                          read_ahead=not args.no_read_ahead)
            return
        runs = []
        for r in range(args.rounds):
            for workers in (1, 2):
                res = drain(env, home, f"r{r}", workers, args.idle_s, timeout_s=600,
                            services={"broker": tansu.proc.pid, "redis": redis.proc.pid})
                res["round"] = r
                res["complete"] = (res["processed"] + res["dead_letter"] == total and res["duplicate"] == 0
                                   and res["dead_letter"] == produced["malformed"])
                print(json.dumps(res), flush=True)
                runs.append(res)
        one = [x["events_per_s"] for x in runs if x["workers"] == 1]
        two = [x["events_per_s"] for x in runs if x["workers"] == 2]
        ratios = [round(b / a, 2) for a, b in zip(one, two, strict=True)]
        result = {
            "benchmark": "stream_capacity", "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "OMP_NUM_THREADS": env["OMP_NUM_THREADS"]},
            "setup": {"records": total, "malformed": produced["malformed"], "partitions": args.partitions,
                      "dataset": args.dataset, "broker": "Tansu (memory)", "state_store": "Redis (Lua)",
                      "online_store": "Redis (Feast)", "batch_size": settings.stream.batch_size},
            "prefill": produced, "uptime_before": load0, "uptime_after": uptime(), "runs": runs,
            "one_processor_events_per_s": one, "two_processors_events_per_s": two, "speedup_2_vs_1": ratios,
            "all_complete": all(x["complete"] for x in runs),
            "targets": {"one_processor_events_per_s": 20_000, "speedup_2_vs_1": 1.3},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        print(f"| {total:,} ({produced['malformed']:,} malformed), {args.partitions} partitions | "
              f"{' / '.join(f'{x:,.0f}' for x in one)} | {' / '.join(f'{x:,.0f}' for x in two)} | "
              f"{' / '.join(f'{x:.2f}' for x in ratios)} | {result['all_complete']} | "
              f"{load0.split('load average:')[-1].strip()} |")
    finally:
        tansu.stop()
        redis.stop()


if __name__ == "__main__":
    main()
