"""Data-parallel training entrypoint: single process, torchrun (2 processes, gloo), OpenMPI variables, and a
kill -9 in the middle of a torchrun job followed by a resume from rank 0's checkpoint (small synthetic data).

The 1M-interaction 1-vs-2-process comparison is `benchmarks/distributed_training.py`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rentalml.training.distributed import build_parser, dist_env, shard
from rentalml.training.search_space import SEARCH_SPACE

DATA = "synthetic:300,150,6000,1"
ARGS = ["--data", DATA, "--epochs", "6", "--eval-every", "2", "--batch-size", "64", "--threads", "1"]
KATIB_STDOUT = re.compile(r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)")  # Katib's default filter


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT") and not k.startswith("OMPI_")}
    return {**env, "PYTHONWARNINGS": "ignore", **extra}


def _torchrun(tmp, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_port()}",
            "-m", "rentalml.training.distributed", *ARGS, "--result-json", str(tmp / f"{name}.json"), *extra]


def _descendants(pid: int) -> list[int]:
    """Child processes, recursively (torchrun starts its workers in their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _run(cmd: list[str], env: dict | None = None, timeout: float = 120) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("ddp")


@pytest.fixture(scope="module")
def single(work):
    out = _run([sys.executable, "-m", "rentalml.training.distributed", *ARGS,
                "--result-json", str(work / "single.json")])
    return out, json.loads((work / "single.json").read_text())


@pytest.fixture(scope="module")
def two(work):
    out = _run(_torchrun(work, "two"))
    return out, json.loads((work / "two.json").read_text())


def test_single_process_prints_katib_metrics(single):
    out, res = single
    assert res["world_size"] == 1 and res["launcher"] == "single" and res["epochs_run"] == 6
    vals = [float(m[1]) for line in out.splitlines() for m in KATIB_STDOUT.findall(line) if m[0] == "ndcg_at_10"]
    assert len(vals) == 3 and all(0 < v <= 1 for v in vals)
    assert max(vals) == pytest.approx(res["val_ndcg@10"], abs=1e-6)
    assert 0 < res["test"]["ndcg@10"] <= 1 and res["samples_per_s"] > 0
    assert re.search(r"^test_ndcg_at_10=\d\.\d+$", out, re.M)


def test_torchrun_two_processes_matches_single(single, two):
    (_, one), (out, res) = single, two
    assert res["world_size"] == 2 and res["launcher"] == "torchrun" and res["backend"] == "gloo"
    assert "per_rank_batch=32" in out
    assert res["samples"] >= one["samples"]  # every user every epoch (a shard may repeat one user as padding)
    # same global batch, gradients averaged by DDP: quality close to the single process (tiny data: 10 %)
    assert res["test"]["ndcg@10"] == pytest.approx(one["test"]["ndcg@10"], rel=0.10)


def test_kill_and_resume(work, two):
    ckpt = work / "ckpt"
    cmd = _torchrun(work, "resumed", "--checkpoint-dir", str(ckpt))
    proc = subprocess.Popen([*cmd, "--throttle", "1.0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=_env(), start_new_session=True)
    try:
        deadline = time.time() + 90
        for line in proc.stdout:
            if line.startswith("checkpoint epoch=3") or time.time() > deadline:
                break
        assert (ckpt / "checkpoint.pt").exists()
    finally:
        for pid in [proc.pid, *_descendants(proc.pid)]:  # the launcher and both ranks, no clean-up
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    time.sleep(1.0)
    assert not (work / "resumed.json").exists()
    out = _run(cmd)
    m = re.search(r"resumed from checkpoint epoch=(\d+)", out)
    assert m and 3 <= int(m.group(1)) < 6, out
    res = json.loads((work / "resumed.json").read_text())
    ref = two[1]
    assert res["resumed_from_epoch"] == int(m.group(1)) and res["epochs_run"] == 6
    # per-epoch generators derive from (seed, epoch, rank): the resumed run is the uninterrupted run
    assert res["val_ndcg@10"] == pytest.approx(ref["val_ndcg@10"], abs=1e-6)
    assert res["test"]["ndcg@10"] == pytest.approx(ref["test"]["ndcg@10"], abs=1e-6)
    assert [h["loss"] for h in res["history"]] == pytest.approx([h["loss"] for h in ref["history"]], abs=1e-6)


def test_openmpi_variables_launch(work, two):
    """Two plain processes with OpenMPI's variables (what mpirun sets): the same run as torchrun's."""
    port = str(_port())
    procs = []
    for rank in range(2):
        env = _env(OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_LOCAL_RANK=str(rank),
                   OMPI_COMM_WORLD_LOCAL_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "rentalml.training.distributed", *ARGS,
                                       "--result-json", str(work / "mpi.json")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    res = json.loads((work / "mpi.json").read_text())
    assert res["launcher"] == "openmpi" and res["world_size"] == 2
    assert res["test"]["ndcg@10"] == pytest.approx(two[1]["test"]["ndcg@10"], abs=1e-6)


def test_dist_env_parsing():
    assert dist_env({}).world_size == 1
    e = dist_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                  "MASTER_ADDR": "node-0", "MASTER_PORT": "1234"})
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size, e.master_addr, e.master_port, e.launcher) == \
        (3, 4, 1, 2, "node-0", 1234, "torchrun")
    e = dist_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                  "OMPI_COMM_WORLD_LOCAL_SIZE": "1", "MASTER_ADDR": "job-worker-0.job"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == \
        (1, 2, 0, "job-worker-0.job", 29500, "openmpi")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):  # across nodes the rendezvous must be given
        dist_env({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "1"})


def test_sharding_is_a_partition():
    import numpy as np

    perm = np.random.default_rng(0).permutation(11)
    shards = [shard(perm, r, 3) for r in range(3)]
    assert {len(s) for s in shards} == {4}
    assert set(np.concatenate(shards)) == set(perm)


def test_every_search_space_parameter_is_an_option():
    def value(p):
        return p.choices[-1] if p.choices else int(p.high) if p.kind == "int" else p.high

    args = build_parser().parse_args([f"--{p.name.replace('_', '-')}={value(p)}" for p in SEARCH_SPACE])
    for p in SEARCH_SPACE:
        assert getattr(args, p.name) == pytest.approx(value(p))
