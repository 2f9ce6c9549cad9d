"""Data-parallel training of the two-tower network: `python -m rentalml.training.distributed ...`.

One entrypoint for every launcher:
* single process: `python -m rentalml.training.distributed --data synthetic:2000,1000,50000`
* torchrun: `torchrun --nproc_per_node=N -m rentalml.training.distributed ...` (Kubeflow Trainer v2 TrainJob)
* OpenMPI: `mpirun -np N -x MASTER_ADDR -x MASTER_PORT python -m rentalml.training.distributed ...` (MPIJob):
  rank and world size come from OMPI_COMM_WORLD_RANK/SIZE when torchrun's RANK/WORLD_SIZE are absent.

Every rank loads the same dataset (seeded), builds the same id maps and splits; the active users of the
training split are shuffled per epoch with a seed shared by all ranks and sharded by rank. The network
(rentalml.models.neural.TwoTowerNet, its forward pass is the training loss) is wrapped in
DistributedDataParallel, which averages the gradients (gloo on CPU, NCCL on GPU: `--device cuda|auto`, one card
per local rank, bf16 autocast; the device code is the core's: neural.resolve_device, autocast, Batch.to).
`--batch-size` is the global batch: each rank takes batch_size // world_size users per step, so one optimiser
step sees the same number of users whatever the world size. Validation nDCG@10 is computed on shards and
all-reduced, so every rank takes the same early-stopping decision.

Rank 0 writes a checkpoint (network, optimiser, early-stopping state, history) after every epoch with an
atomic rename; a restarted job (same arguments, same --checkpoint-dir) resumes from it — rank 0 reads it and
broadcasts it, so only rank 0 needs the checkpoint volume. Per-epoch random generators are derived from
(seed, epoch, rank), so a resumed run repeats exactly what an uninterrupted one would have done.

Rank 0 prints Katib StdOut-collector lines: `ndcg_at_10=<validation nDCG@10>` at every validation, and
`test_ndcg_at_10=…`, `samples_per_s=…` at the end (the test split is never the tuning objective).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from rentalml.models.neural import NeuralParams, TwoTower, TwoTowerNet, autocast, make_batch, resolve_device

CHECKPOINT = "checkpoint.pt"
MODELS = {"hybrid": {}, "collaborative": {"use_content": False}, "content": {"use_ids": False}}
#: NeuralParams fields that are command-line options (use_ids/use_content follow from --model). Not `ema`: the
#: weight average is TwoTower.fit's (the collaborative tower's small-data default), and this loop has none, so an
#: `--ema` that would do nothing is refused by the parser instead.
NOT_DISTRIBUTED = {"ema"}
PARAM_FIELDS = [f for f in fields(NeuralParams)
                if f.type in ("int", "float", int, float) and f.name not in NOT_DISTRIBUTED]


# ------------------------------------------------------------------------------------------ launcher env
@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # single | torchrun | openmpi

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Rank/world size from torchrun (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) or OpenMPI
    (OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE); MASTER_ADDR/MASTER_PORT give the rendezvous.

    These are the launchers' own variables (not rentalml settings). Under OpenMPI with every rank on one node
    the rendezvous defaults to 127.0.0.1:29500; across nodes MASTER_ADDR must be set (the MPIJob passes
    rank 0's worker host with `mpirun -x`).
    """
    env = os.environ if environ is None else environ
    addr, port = env.get("MASTER_ADDR"), int(env.get("MASTER_PORT", "29500"))
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(int(env["RANK"]), world, int(env.get("LOCAL_RANK", "0")),
                       int(env.get("LOCAL_WORLD_SIZE", str(world))), addr or "127.0.0.1", port, "torchrun")
    if "OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env:
        world = int(env["OMPI_COMM_WORLD_SIZE"])
        local_world = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", str(world)))
        if addr is None and world > 1 and local_world != world:
            raise RuntimeError("OpenMPI launch across nodes: set MASTER_ADDR (rank 0's host) and pass it to every "
                               "rank with `mpirun -x MASTER_ADDR -x MASTER_PORT`")
        return DistEnv(int(env["OMPI_COMM_WORLD_RANK"]), world, int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")),
                       local_world, addr or "127.0.0.1", port, "openmpi")
    return DistEnv()


# ------------------------------------------------------------------------------------------ arguments
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m rentalml.training.distributed",
                                 description="Data-parallel (DDP) training of the two-tower network.")
    ap.add_argument("--data", default="synthetic:2000,1000,50000", help="dataset spec (rentalml load_dataset)")
    ap.add_argument("--model", choices=sorted(MODELS), default="hybrid",
                    help="two-tower variant: hybrid = ID + content towers, collaborative = IDs, content = features")
    ap.add_argument("--protocol", default="random-75-25")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--valid-frac", type=float, default=0.1, help="validation holdout carved from train")
    ap.add_argument("--max-val-users", type=int, default=3000)
    defaults = NeuralParams()
    for f in PARAM_FIELDS:
        kind = int if f.type in ("int", int) else float
        ap.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=getattr(defaults, f.name),
                        help=f"NeuralParams.{f.name} (default %(default)s)")
    ap.add_argument("--checkpoint-dir", type=Path, default=None, help="rank 0 checkpoints here; resumes from it")
    ap.add_argument("--checkpoint-every", type=int, default=1, help="epochs between checkpoints")
    ap.add_argument("--result-json", type=Path, default=None, help="rank 0 writes the result document here")
    ap.add_argument("--bundle-dir", type=Path, default=None, help="rank 0 writes a model bundle (ONNX) here")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (0: cores / local ranks)")
    ap.add_argument("--no-test", action="store_true", help="skip the test-split evaluation at the end")
    ap.add_argument("--all-data", action="store_true", help="fit on every interaction (no split, no validation)")
    ap.add_argument("--refit-all", action="store_true",
                    help="after the split fit, refit on every interaction for the best epoch count (what ships)")
    ap.add_argument("--output", default=None,
                    help="rank 0 writes eval_model.pkl (the split fit), model.pkl (the refit, with --refit-all) "
                         "and result.json here: a directory or an s3:// / minio:// prefix")
    ap.add_argument("--throttle", type=float, default=0.0, help=argparse.SUPPRESS)  # fault-injection tests
    return ap


def neural_params(args: argparse.Namespace) -> NeuralParams:
    return NeuralParams(**{f.name: getattr(args, f.name) for f in PARAM_FIELDS}, **MODELS[args.model],
                        device=args.device)


# ------------------------------------------------------------------------------------------ data
@dataclass
class Prepared:
    dataset: object
    item_ids: np.ndarray
    user_ids: np.ndarray
    item_x: np.ndarray | None
    user_x: np.ndarray | None
    item_enc: object
    user_enc: object
    train_fit: object  # csr, binary: train split minus the validation holdout (what the network fits)
    valid: object  # csr, binary: validation holdout
    train_all: object  # csr, binary: the whole train split (history for scoring the test split)
    test: object  # DataFrame of held-out test pairs


def prepare(args: argparse.Namespace) -> Prepared:
    """The same on every rank: dataset, protocol split, validation carve-out, id maps and features."""
    from rentalml.data.dataset import InteractionMatrix
    from rentalml.data.loaders import load_dataset
    from rentalml.evaluation.protocols import random_split, split
    from rentalml.training.jobs import local_dataset
    from rentalml.training.trainer import _features, catalogue

    ds = load_dataset(local_dataset(args.data))  # the pipeline's dataset artifact is an object-store URI
    if getattr(args, "all_data", False):
        from rentalml.evaluation.protocols import aggregate_pairs

        train, test = aggregate_pairs(ds.interactions), ds.interactions.iloc[:0]
    else:
        train, test = split(ds.interactions, args.protocol, args.seed)
    item_ids = catalogue(ds, train)
    user_ids = np.array(sorted(train["user_id"].unique()), dtype=object)
    item_enc, item_x, user_enc, user_x = _features(ds, item_ids, user_ids)
    tr, va = random_split(train, 1.0 - args.valid_frac, args.seed + 1) if args.valid_frac > 0 else (train, None)

    def matrix(pairs):
        m = InteractionMatrix.build(pairs, item_ids=item_ids, user_ids=user_ids).matrix
        m.data[:] = 1.0
        return m

    return Prepared(ds, item_ids, user_ids, item_x, user_x, item_enc, user_enc, matrix(tr),
                    matrix(va) if va is not None else None, matrix(train), test)


def shard(perm: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Equal-sized shards (the permutation is padded by wrapping around, like DistributedSampler)."""
    per = math.ceil(len(perm) / world)
    return np.resize(perm, per * world)[rank::world]


# ------------------------------------------------------------------------------------------ training
class Trainer:
    def __init__(self, args: argparse.Namespace, env: DistEnv, data: Prepared):
        self.args, self.env, self.data = args, env, data
        self.p = neural_params(args)
        self.device = resolve_device(args.device, env.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        torch.manual_seed(args.seed)
        x = data.train_fit
        self.n_items = x.shape[1]
        self.feats = torch.from_numpy(data.item_x).to(self.device) if data.item_x is not None else None
        self.user_feats = (torch.from_numpy(data.user_x.astype(np.float32)).to(self.device)
                           if data.user_x is not None else None)
        feat_dim = 0 if data.item_x is None else data.item_x.shape[1]
        user_dim = 0 if data.user_x is None else data.user_x.shape[1]
        self.net = TwoTowerNet(self.n_items, feat_dim, user_dim, self.p).to(self.device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=self.p.lr, weight_decay=self.p.weight_decay)
        pop = np.asarray(x.sum(0)).ravel() + 1.0
        self.log_q = torch.from_numpy(np.log(pop / pop.sum()).astype(np.float32)).to(self.device)
        self.full = self.n_items <= self.p.full_softmax_limit
        self.active = np.flatnonzero(np.diff(x.indptr) > 0)
        self.state = {"epoch": 0, "best": -1.0, "best_epoch": 0, "bad": 0, "best_state": None, "history": [],
                      "samples": 0, "train_seconds": 0.0, "stopped": False}
        self.resumed_from = 0

    # -------------------------------------------------------------- checkpoints
    def fingerprint(self) -> dict:
        a = self.args
        params = {k: v for k, v in asdict(self.p).items() if k != "device"}  # a checkpoint resumes on any device
        return {"data": a.data, "model": a.model, "protocol": a.protocol, "seed": a.seed,
                "valid_frac": a.valid_frac, "params": params}

    def save(self) -> None:
        if self.env.rank != 0 or self.args.checkpoint_dir is None:
            return
        d = self.args.checkpoint_dir
        d.mkdir(parents=True, exist_ok=True)
        doc = {"fingerprint": self.fingerprint(), "net": {k: v.cpu() for k, v in self.net.state_dict().items()},
               "opt": self.opt.state_dict(), "state": self.state, "world_size": self.env.world_size}
        tmp = d / f".{CHECKPOINT}.tmp"
        torch.save(doc, tmp)
        os.replace(tmp, d / CHECKPOINT)  # atomic: a kill leaves the previous checkpoint or the new one

    def load(self) -> None:
        doc = None
        if self.env.rank == 0 and self.args.checkpoint_dir is not None:
            path = self.args.checkpoint_dir / CHECKPOINT
            if path.exists():
                doc = torch.load(path, map_location="cpu", weights_only=False)
                if doc["fingerprint"] != self.fingerprint():
                    raise SystemExit(f"{path} was written by a different run (data/model/params differ); "
                                     f"use another --checkpoint-dir or delete it")
        if self.env.distributed:
            box = [doc]
            torch.distributed.broadcast_object_list(box, src=0)
            doc = box[0]
        if doc is None:
            return
        self.net.load_state_dict(doc["net"])
        self.opt.load_state_dict(doc["opt"])
        self.state = doc["state"]
        self.resumed_from = self.state["epoch"]
        log(self.env, f"resumed from checkpoint epoch={self.resumed_from} (written by world_size="
                      f"{doc['world_size']})")

    # -------------------------------------------------------------- evaluation
    def recommender(self) -> TwoTower:
        """A core TwoTower around a CPU copy of the network (scoring, ONNX export)."""
        model = TwoTower(self.p, name=self.args.model)
        model.net = copy.deepcopy(self.net).cpu()
        model.feats = self.feats.cpu() if self.feats is not None else None
        model.user_feats = self.user_feats.cpu() if self.user_feats is not None else None
        model._freeze()
        return model

    def validation_ndcg(self) -> float:
        """Mean nDCG@k over the first max_val_users validation users, computed on rank shards, all-reduced."""
        from rentalml.evaluation.metrics import ranking_metrics, topk_indices

        x, valid, k = self.data.train_fit, self.data.valid, self.args.k
        users = np.flatnonzero(np.diff(valid.indptr) > 0)[: self.args.max_val_users]
        mine = users[self.env.rank::self.env.world_size]
        model = self.recommender()
        total = 0.0
        for s in range(0, len(mine), 512):
            ub = mine[s:s + 512]
            scores = model.score(ub, x[ub])
            scores[x[ub].nonzero()] = -np.inf
            total += float(ranking_metrics(topk_indices(scores, k), valid[ub], k)["ndcg"].sum())
        acc = torch.tensor([total, float(len(mine))], dtype=torch.float64)
        self.all_reduce(acc)
        return float(acc[0] / max(1.0, float(acc[1])))

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.env.distributed:
            dist = torch.distributed
            buf = t.to(self.device)
            dist.all_reduce(buf, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
            t.copy_(buf.cpu())
        return t

    # -------------------------------------------------------------- loop
    def fit(self) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        p, env, st = self.p, self.env, self.state
        x = self.data.train_fit
        module = self.net
        if env.distributed:
            module = DDP(self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        local_bs = max(1, p.batch_size // env.world_size)
        id_dropout = p.use_ids and self.net.use_content
        while st["epoch"] < p.epochs and not st["stopped"]:
            epoch = st["epoch"] + 1
            module.train()
            perm = np.random.default_rng([self.args.seed, epoch]).permutation(self.active)
            mine = shard(perm, env.rank, env.world_size)
            rng = np.random.default_rng([self.args.seed, epoch, 1000 + env.rank])
            t0 = time.perf_counter()
            dev = self.device
            loss_sum, seen = torch.zeros((), dtype=torch.float64, device=dev), 0  # read back once per epoch
            for s in range(0, len(mine), local_bs):
                ub = mine[s:s + local_bs]
                xb = x[ub]
                seen += xb.nnz
                b = make_batch(xb, rng, p, self.n_items, self.full, id_dropout=id_dropout).to(dev)
                uf = self.user_feats[torch.from_numpy(ub).to(dev)] if self.user_feats is not None else None
                with autocast(dev):
                    loss = module(b.hist, b.target, self.feats, uf, cand=b.cand, id_keep=b.id_keep, log_q=self.log_q)
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
                loss_sum += loss.detach().double() * len(ub)
            loss_sum = float(loss_sum)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            acc = self.all_reduce(torch.tensor([loss_sum, float(len(mine)), float(seen)], dtype=torch.float64))
            epoch_seconds = float(self.all_reduce(torch.tensor([dt], dtype=torch.float64), "max")[0])  # slowest rank
            st["samples"] += int(acc[2])
            st["train_seconds"] += epoch_seconds
            rec = {"epoch": epoch, "loss": float(acc[0] / max(1.0, float(acc[1]))),
                   "samples": int(acc[2]), "seconds": round(epoch_seconds, 3),
                   "samples_per_s": round(float(acc[2]) / max(epoch_seconds, 1e-9), 1)}
            if self.data.valid is not None and (epoch % p.eval_every == 0 or epoch == p.epochs):
                rec["val_ndcg@10"] = self.validation_ndcg()
                if rec["val_ndcg@10"] > st["best"]:
                    st["best"], st["bad"], st["best_epoch"] = rec["val_ndcg@10"], 0, epoch
                    st["best_state"] = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
                else:
                    st["bad"] += p.eval_every
                    st["stopped"] = st["bad"] >= p.patience
            st["history"].append(rec)
            st["epoch"] = epoch
            line = f"epoch={epoch} loss={rec['loss']:.5f} samples_per_s={rec['samples_per_s']}"
            if "val_ndcg@10" in rec:
                line += f"\n{metric_key(self.args.k)}={rec['val_ndcg@10']:.6f}"
            log(env, line)
            if epoch % self.args.checkpoint_every == 0 or epoch == p.epochs or st["stopped"]:
                self.save()
                log(env, f"checkpoint epoch={epoch}")
                if self.args.throttle:
                    time.sleep(self.args.throttle)
        if st["best_state"] is not None:
            self.net.load_state_dict(st["best_state"])
        else:
            st["best_epoch"] = st["epoch"]


def metric_key(k: int) -> str:
    return f"ndcg_at_{k}"


def log(env: DistEnv, msg: str) -> None:
    if env.rank == 0:
        print(msg, flush=True)


# ------------------------------------------------------------------------------------------ main
def run(argv: list[str] | None = None) -> dict | None:
    parser = build_parser()
    args = parser.parse_args(argv)
    env = dist_env()
    try:
        device = resolve_device(args.device, env.local_rank)  # no CUDA for --device cuda: a usage error, now
    except ValueError as exc:
        parser.error(str(exc))
    threads = args.threads or max(1, (os.cpu_count() or 1) // env.local_world_size)
    torch.set_num_threads(threads)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if env.distributed:
        import torch.distributed as dist

        dist.init_process_group(backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                                rank=env.rank, world_size=env.world_size, timeout=timedelta(minutes=30))
    try:
        t0 = time.perf_counter()
        data = prepare(args)
        trainer = Trainer(args, env, data)
        log(env, f"rentalml.training.distributed launcher={env.launcher} world_size={env.world_size} "
                 f"backend={backend if env.distributed else 'none'} device={trainer.device} threads={threads} "
                 f"users={data.train_fit.shape[0]} items={data.train_fit.shape[1]} "
                 f"train_pairs={int(data.train_fit.nnz)} batch={trainer.p.batch_size} "
                 f"per_rank_batch={max(1, trainer.p.batch_size // env.world_size)}")
        trainer.load()
        trainer.fit()
        st = trainer.state
        result = {"launcher": env.launcher, "world_size": env.world_size, "backend": backend if env.distributed
                  else "none", "device": str(trainer.device), "threads_per_process": threads,
                  "model": args.model, "data": args.data, "params": asdict(trainer.p), "seed": args.seed,
                  "epochs_run": st["epoch"], "best_epoch": st["best_epoch"], "resumed_from_epoch": trainer.resumed_from,
                  "val_ndcg@10": st["best"], "samples": st["samples"], "train_seconds": round(st["train_seconds"], 3),
                  "samples_per_s": round(st["samples"] / max(st["train_seconds"], 1e-9), 1),
                  "train_pairs": int(data.train_fit.nnz), "history": st["history"]}
        fitted = finish(args, data, trainer, result) if env.rank == 0 else None
        refit = None
        if args.refit_all and not args.all_data:
            # the shipped model: every interaction, the split fit's parameters and best epoch count
            args2 = copy.copy(args)
            args2.all_data, args2.valid_frac, args2.no_test, args2.bundle_dir = True, 0.0, True, None
            args2.epochs = max(1, trainer.state["best_epoch"])
            args2.checkpoint_dir = args.checkpoint_dir / "all-data" if args.checkpoint_dir else None
            data2 = prepare(args2)
            trainer2 = Trainer(args2, env, data2)
            trainer2.load()
            trainer2.fit()
            log(env, f"refit on all data: epochs={args2.epochs}")
            refit = finish(args2, data2, trainer2, {}) if env.rank == 0 else None
        if env.rank == 0:
            result["total_seconds"] = round(time.perf_counter() - t0, 2)
            print(f"samples_per_s={result['samples_per_s']}", flush=True)
            if args.result_json:
                args.result_json.parent.mkdir(parents=True, exist_ok=True)
                args.result_json.write_text(json.dumps(result, indent=2, default=str))
            if args.output:
                write_output(args.output, fitted, refit, result)
            from rentalml.monitoring.training_metrics import push

            push("distributed-train", seconds=result["total_seconds"])  # RENTALML_MONITOR__PUSHGATEWAY_URL
        if env.distributed:
            torch.distributed.barrier()
        return result if env.rank == 0 else None
    finally:
        if env.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def write_output(output: str, fitted, refit, result: dict) -> None:
    """eval_model.pkl / model.pkl (pickled rentalml Fitted, what the pipeline's evaluate and export load) and
    result.json, into a directory or an object-store prefix."""
    import pickle
    import tempfile

    from rentalml.training import jobs

    remote = jobs.is_remote(output)
    out = Path(tempfile.mkdtemp(prefix="rentalml-out-")) if remote else Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for name, obj in (("eval_model.pkl", fitted), ("model.pkl", refit)):
        if obj is not None:
            with open(out / name, "wb") as fh:
                pickle.dump(obj, fh)
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    if remote:
        jobs.upload(out, output)


def finish(args, data: Prepared, trainer: Trainer, result: dict):
    """Rank 0: test-split metrics with the core evaluator, optional bundle."""
    from rentalml.training.trainer import Fitted

    fitted = Fitted(args.model, trainer.recommender(), data.item_ids, data.user_ids, data.train_all, data.item_x,
                    data.user_x, data.item_enc, data.user_enc, trainer.state["train_seconds"],
                    {**asdict(trainer.p), "epochs": max(1, trainer.state["best_epoch"])})
    if not args.no_test:
        from rentalml.evaluation.evaluate import evaluate

        metrics = evaluate(fitted, data.test, args.k)
        result["test"] = metrics
        for name in ("ndcg", "recall"):
            print(f"test_{name}_at_{args.k}={metrics[f'{name}@{args.k}']:.6f}", flush=True)
    if args.bundle_dir is not None:
        from rentalml.export.bundle import write_bundle

        result["bundle"] = str(write_bundle(fitted, data.dataset, args.bundle_dir, metrics=result.get("test")))
    return fitted


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
