"""PyTorch two-tower recommenders: collaborative (ID embeddings), content (feature towers) and hybrid.

Item tower: item vector = ID embedding (collaborative) + MLP(property features) (content); a never-seen
property still gets a vector from its features. During training a fraction of items have their ID part
dropped so the content tower learns to stand alone (cold start).
User tower: the user's history is encoded as the normalised sum of input-side item vectors (so a new user
is folded in from recent interactions with no retraining), optionally concatenated with user features,
then an MLP. Score = <user, item> + item bias.
Loss: multinomial log-likelihood with input dropout (Mult-DAE style), either over the full catalogue
(`softmax="full"`, O(batch x catalogue) per step) or as a sampled softmax (`softmax="sampled"`): each user's
softmax runs over its own positives and `negatives` items drawn once per step by popularity and shared by the
whole batch (a negative that is the user's own positive is masked), every logit corrected by -log q(item)
(logQ, q = the probability of being drawn), so the logits per interaction do not grow with the batch. The
sampled step touches only the items in it: the content MLPs run over those items' features, the ID embeddings
and biases are gathered rows updated by a row-wise (lazy) Adam, and batches are cut from the CSR index arrays.
Its cost grows with the batch, not the catalogue. `softmax="auto"` (default) fits both on a catalogue of up to
`full_softmax_limit` items when a validation holdout is given and keeps the better one by validation nDCG
(selected_params carries the choice to the refit); above the limit, or without a holdout, auto is sampled
above the limit and full below it.

Device (`NeuralParams.device`, `rentalml train --device`): "cpu" (default), "cuda" or "auto" (cuda when
available). On CUDA the network, the batches, RowAdam's moments and logQ live on the card and the forward pass
runs under bf16 autocast (`autocast`); the softmax/log-sum-exp is taken in float32. After fit the network comes
back to the CPU in float32, so scoring, fold-in and the ONNX export are the same whatever the training device.
The CPU path is the original one, step for step (same seed, same weights). The distributed trainer
(rentalml.training.distributed) uses the same `resolve_device`, `autocast` and `Batch.to`.

Weight EMA (`NeuralParams.ema`, off by default): torch's AveragedModel keeps an exponential moving average of the
weights, updated after every step; validation, early stopping and the fitted model use the average. Small
batches (the collaborative tower's 128 users per step) make the last weights noisy, and the average smooths
that. Each update touches every parameter, so its cost grows with the catalogue: SCALE_DEFAULTS keep it off.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from rentalml.models.base import Recommender, TrainData, validation_ndcg


@dataclass
class NeuralParams:
    dim: int = 200
    hidden: int = 256
    layers: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    epochs: int = 200
    patience: int = 30
    eval_every: int = 5
    input_dropout: float = 0.5
    id_dropout: float = 0.2
    negatives: int = 512
    full_softmax_limit: int = 50_000
    softmax: str = "auto"  # auto | full | sampled (see the module docstring)
    sampled_batch_size: int = 512  # users per step of the sampled trainer
    sampled_lr: float = 4e-3
    sample_alpha: float = 1.0  # negatives drawn with q ∝ (popularity + 1) ** sample_alpha
    use_ids: bool = True
    use_content: bool = True
    device: str = "cpu"  # cpu | cuda | auto (cuda when available), see resolve_device
    ema: float = 0.0  # weight EMA decay per step (0: off); validation, early stopping and the result use the average


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str, index: int | None = None, flag: str = "--device") -> torch.device:
    """The torch device of a device setting: cpu, cuda (an error naming `flag` when this machine has no CUDA)
    or auto (cuda when available). `index` picks the card (the local rank under torchrun)."""
    if name not in DEVICES:
        raise ValueError(f"{flag} must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        why = ("this torch build has no CUDA support" if torch.version.cuda is None
               else "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES)")
        raise ValueError(f"{flag} cuda: CUDA is not available on this machine ({why}, torch {torch.__version__}); "
                         f"use {flag} cpu or {flag} auto")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device() if index is None else index)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; on the CPU no autocast (the float32 path, unchanged)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A host tensor on `device` (itself on the CPU); None stays None. Non-blocking: from pageable memory the
    copy is staged at once and the host does not wait for the card's queued work."""
    return None if t is None else t.to(device, non_blocking=True)


def _mlp(d_in: int, hidden: int, d_out: int, layers: int) -> nn.Module:
    if layers <= 0:
        return nn.Linear(d_in, d_out)
    mods: list[nn.Module] = []
    d = d_in
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.Tanh()]
        d = hidden
    mods.append(nn.Linear(d, d_out))
    return nn.Sequential(*mods)


class TwoTowerNet(nn.Module):
    def __init__(self, n_items: int, item_feat_dim: int, user_feat_dim: int, p: NeuralParams):
        super().__init__()
        self.n_items = n_items
        self.use_ids = p.use_ids
        self.use_content = p.use_content and item_feat_dim > 0
        if not (self.use_ids or self.use_content):
            raise ValueError("a content model needs item features; this dataset has none")
        d = p.dim
        if self.use_ids:
            self.item_id = nn.Embedding(n_items, d)
            self.input_id = nn.Embedding(n_items, d)
            nn.init.normal_(self.item_id.weight, std=0.01)
            nn.init.normal_(self.input_id.weight, std=0.01)
        if self.use_content:
            self.item_content = _mlp(item_feat_dim, p.hidden, d, 1)
            self.input_content = _mlp(item_feat_dim, p.hidden, d, 1)
        self.user_feat_dim = user_feat_dim
        self.user_tower = _mlp(d + user_feat_dim, p.hidden, d, p.layers)
        self.item_bias = nn.Parameter(torch.zeros(n_items))

    def tables(self, feats: torch.Tensor | None, id_keep: torch.Tensor | None = None):
        """(input-side item vectors [n, d], output-side item vectors [n, d])."""
        parts_in, parts_out = [], []
        if self.use_ids:
            out_id = self.item_id.weight
            if id_keep is not None:
                out_id = out_id * id_keep[:, None]
            parts_in.append(self.input_id.weight)
            parts_out.append(out_id)
        if self.use_content:
            parts_in.append(self.input_content(feats))
            parts_out.append(self.item_content(feats))
        return sum(parts_in), sum(parts_out)

    def user_vectors(self, hist: torch.Tensor, table_in: torch.Tensor, user_feats: torch.Tensor | None):
        """hist: sparse [B, n] (binary); returns [B, d]."""
        cnt = torch.sparse.sum(hist, dim=1).to_dense().clamp(min=1.0)
        with torch.autocast(hist.device.type, enabled=False):  # the sparse product in float32, also under bf16
            h = torch.sparse.mm(hist, table_in.float()) / cnt.sqrt()[:, None]
        if self.user_feat_dim:
            h = torch.cat([h, user_feats], dim=1)
        return self.user_tower(torch.tanh(h))

    def forward(self, hist: torch.Tensor, target: torch.Tensor, feats: torch.Tensor | None = None,
                user_feats: torch.Tensor | None = None, cand: torch.Tensor | None = None,
                id_keep: torch.Tensor | None = None, log_q: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss of one batch (see `make_batch`): multinomial log-likelihood over the catalogue, or
        sampled softmax with logQ correction over `cand`. A forward pass so DDP can wrap the network."""
        t_in, t_out = self.tables(feats, id_keep)
        u = self.user_vectors(hist, t_in, user_feats)
        if cand is None:
            logits = u @ t_out.T + self.item_bias
        else:
            logits = u @ t_out[cand].T + self.item_bias[cand] - log_q[cand]
        return -(torch.log_softmax(logits.float(), dim=1) * target).sum(1).mean()

    def sampled_loss(self, sb: SampledBatch, feats: torch.Tensor | None, user_feats: torch.Tensor | None,
                     rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sampled-softmax loss of one step over the step's items only.

        `rows` holds the gathered rows of the ID tables and the bias for `sb.items` (leaf tensors: their
        gradients are applied row-wise by RowAdam). The input side is needed only for the positives
        (`sb.items[:sb.n_pos]`, the only items a history can contain)."""
        B = sb.n_users
        parts_in, parts_out = [], []
        if self.use_ids:
            parts_in.append(rows["input_id"][:sb.n_pos])
            out_id = rows["item_id"]
            parts_out.append(out_id if sb.id_keep is None else out_id * sb.id_keep[:, None])
        if self.use_content:
            f = feats.index_select(0, sb.items)
            parts_in.append(self.input_content(f[:sb.n_pos]))
            parts_out.append(self.item_content(f))
        t_in, t_out = sum(parts_in), sum(parts_out)
        h = torch.zeros((B, t_in.shape[1]), dtype=t_in.dtype, device=t_in.device).index_add_(
            0, sb.in_rows, t_in.index_select(0, sb.in_cols))
        h = h * sb.in_norm[:, None]
        if self.user_feat_dim:
            h = torch.cat([h, user_feats], dim=1)
        u = self.user_tower(torch.tanh(h))
        off = rows["item_bias"] - sb.log_q  # [U] bias with the logQ correction
        # shared negatives: one [B, N] product; the user's own positives: P row-wise dot products
        # (bf16 under CUDA autocast: the products are cast back, the log-sum-exp below runs in float32)
        ln = torch.addmm(off.index_select(0, sb.neg), u, t_out.index_select(0, sb.neg).T).float()
        if len(sb.hit_rows):  # a negative that is the user's own positive counts once, as a positive
            ln = ln.index_put((sb.hit_rows, sb.hit_cols), ln.new_full((), -math.inf))  # (no host copy on a card)
        lp = ((u.index_select(0, sb.pos_rows) * t_out.index_select(0, sb.pos_cols)).sum(1).float()
              + off.index_select(0, sb.pos_cols))
        with torch.no_grad():
            mx = ln.max(1).values.scatter_reduce(0, sb.pos_rows, lp, "amax")
        s = torch.exp(ln - mx[:, None]).sum(1).index_add(0, sb.pos_rows,
                                                         torch.exp(lp - mx.index_select(0, sb.pos_rows)))
        return -(lp.sum() - ((torch.log(s) + mx) * sb.pos_count).sum()) / B


@dataclass
class Batch:
    """One training batch: the dropped-out input history, the full target rows, sampled candidates."""

    xin: sp.csr_matrix  # input history after input dropout
    hist: torch.Tensor  # xin as a sparse torch tensor
    target: torch.Tensor  # [B, n_items] (full softmax) or [B, len(cand)]
    cand: torch.Tensor | None  # candidate item indices (sampled softmax), None for the full catalogue
    id_keep: torch.Tensor | None  # per-item ID keep mask (ID dropout), None when off

    def to(self, device: torch.device) -> Batch:
        """The batch's tensors on `device` (the same object on the CPU)."""
        if device.type == "cpu":
            return self
        return replace(self, hist=_to(self.hist, device), target=_to(self.target, device),
                       cand=_to(self.cand, device), id_keep=_to(self.id_keep, device))


def make_batch(xb: sp.csr_matrix, rng: np.random.Generator, p: NeuralParams, n_items: int, full: bool,
               id_dropout: bool = True) -> Batch:
    """Input dropout, ID dropout and negative sampling for the binary history rows `xb` (CSR, users × items).

    The random draws happen in a fixed order (input dropout, ID dropout, negatives) so a seeded generator
    gives the same batch on every run.
    """
    keep = rng.random(xb.nnz) >= p.input_dropout
    # copies of indices/indptr: eliminate_zeros works in place and must not alter xb, which is the target
    xin = sp.csr_matrix((xb.data * keep, xb.indices.copy(), xb.indptr.copy()), shape=xb.shape)
    xin.eliminate_zeros()
    id_keep = None
    if id_dropout and p.id_dropout > 0:
        id_keep = torch.from_numpy((rng.random(n_items) >= p.id_dropout).astype(np.float32))
    if full:
        return Batch(xin, _to_torch_sparse(xin), torch.from_numpy(xb.toarray()), None, id_keep)
    cand = np.unique(np.concatenate([xb.indices, rng.integers(0, n_items, p.negatives)]))
    return Batch(xin, _to_torch_sparse(xin), torch.from_numpy(xb[:, cand].toarray()), torch.from_numpy(cand), id_keep)


@dataclass
class SampledBatch:
    """One step of the sampled trainer, in local item indices: items[:n_pos] are the batch's positives
    (sorted), items[n_pos:] the shared negatives that are nobody's positive in the batch. Each user's softmax
    runs over its own positives and the shared negatives `neg` (a negative that is the user's own positive,
    an accidental hit, is masked at (hit_rows, hit_cols) of the [B, len(neg)] negative logits)."""

    n_users: int
    items: torch.Tensor  # [U] catalogue indices of the step's items
    n_pos: int
    pos_rows: torch.Tensor  # [P] batch row of each positive (target)
    pos_cols: torch.Tensor  # [P] local item index of each positive
    pos_count: torch.Tensor  # [B] number of positives of each user (float)
    in_rows: torch.Tensor  # [I] batch row of each kept history item (input after dropout)
    in_cols: torch.Tensor  # [I] local item index of each kept history item
    in_norm: torch.Tensor  # [B] 1 / sqrt(number of kept history items), 1 for an empty input
    neg: torch.Tensor  # [N] local item index of each (distinct) shared negative
    hit_rows: torch.Tensor  # [H] accidental hits: batch row ...
    hit_cols: torch.Tensor  # [H] ... and column in neg
    log_q: torch.Tensor  # [U] log probability that each item is a candidate of the step (logQ correction)
    id_keep: torch.Tensor | None  # [U] ID dropout keep mask, None when off
    n_interactions: int

    def to(self, device: torch.device) -> SampledBatch:
        """The step's tensors on `device` (the same object on the CPU)."""
        if device.type == "cpu":
            return self
        moved = {f: _to(getattr(self, f), device) for f, v in self.__dataclass_fields__.items()
                 if v.type in ("torch.Tensor", "torch.Tensor | None")}
        return replace(self, **moved)


class BatchSampler:
    """Builds SampledBatch-es straight from a CSR matrix's index arrays (no scipy slicing per step).

    Negatives are drawn by inverse CDF from q ∝ (popularity + 1) ** alpha, precomputed once, so a step costs
    O(batch + negatives · log n). Draw order per step: input dropout, negatives, ID dropout (seeded rng ->
    the same batches on every run)."""

    def __init__(self, x: sp.csr_matrix, p: NeuralParams, id_dropout: bool):
        self.indptr = x.indptr.astype(np.int64)
        self.indices = x.indices.astype(np.int64)
        self.p, self.id_dropout = p, id_dropout
        pop = np.diff(sp.csc_matrix(x).indptr).astype(np.float64) + 1.0
        q = pop ** p.sample_alpha
        q /= q.sum()
        self.cdf = np.cumsum(q)
        self.cdf[-1] = 1.0
        self.log1m_q = np.log1p(-np.minimum(q, 1 - 1e-12))

    def batch(self, ub: np.ndarray, rng: np.random.Generator) -> SampledBatch:
        p = self.p
        starts = self.indptr[ub]
        lens = self.indptr[ub + 1] - starts
        total = int(lens.sum())
        rows = np.repeat(np.arange(len(ub)), lens)
        offs = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
        items = self.indices[np.repeat(starts, lens) + offs]
        keep = rng.random(total) >= p.input_dropout
        pos, cols = np.unique(items, return_inverse=True)
        negs = np.searchsorted(self.cdf, rng.random(p.negatives), side="right")
        negs = np.unique(np.minimum(negs, len(self.cdf) - 1))
        at = np.searchsorted(pos, negs)
        is_pos = at < len(pos)
        is_pos[is_pos] = pos[at[is_pos]] == negs[is_pos]
        extra = negs[~is_pos]
        uniq = np.concatenate([pos, extra])
        neg = np.empty(len(negs), dtype=np.int64)  # local index of each negative
        neg[is_pos] = at[is_pos]
        neg[~is_pos] = len(pos) + np.arange(len(extra))
        neg_col = np.full(len(uniq), -1, dtype=np.int64)  # local item -> column among the negatives
        neg_col[neg] = np.arange(len(neg))
        hit = neg_col[cols] >= 0
        id_keep = None
        if self.id_dropout and p.id_dropout > 0:
            id_keep = torch.from_numpy((rng.random(len(uniq)) >= p.id_dropout).astype(np.float32))
        t = torch.from_numpy
        # logQ: log of the probability that an item is among the step's negatives (p.negatives draws from q),
        # subtracted from every logit, the positives' included (as TF's sampled_softmax_loss). On a small
        # catalogue every item is (almost) surely drawn, the correction vanishes and the loss is the full
        # softmax.
        log_q = np.log(-np.expm1(p.negatives * self.log1m_q[uniq])).astype(np.float32)
        n_in = np.bincount(rows[keep], minlength=len(ub))
        in_norm = (1.0 / np.sqrt(np.maximum(n_in, 1))).astype(np.float32)
        cols = cols.astype(np.int64)
        return SampledBatch(len(ub), t(uniq), len(pos), t(rows), t(cols), t(lens.astype(np.float32)),
                            t(rows[keep]), t(cols[keep]), t(in_norm), t(neg), t(rows[hit]),
                            t(neg_col[cols[hit]]), t(log_q), id_keep, total)


class RowAdam:
    """Adam over the rows of embedding tables that a step touched (lazy / row-wise Adam, as torch's
    SparseAdam): the step costs O(rows touched x dim); untouched rows and their moments do not move.
    Bias correction uses the global step count."""

    def __init__(self, tables: dict[str, torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        self.tables = tables
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, betas[0], betas[1], eps, weight_decay
        self.m = {k: torch.zeros_like(v) for k, v in tables.items()}
        self.v = {k: torch.zeros_like(v) for k, v in tables.items()}
        self.t = 0

    def gather(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v.detach().index_select(0, idx).requires_grad_() for k, v in self.tables.items()}

    @torch.no_grad()
    def step(self, idx: torch.Tensor, rows: dict[str, torch.Tensor]) -> None:
        self.t += 1
        bc1, bc2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for k, leaf in rows.items():
            g = leaf.grad
            if g is None:
                continue
            w = self.tables[k].data
            if self.wd:
                g = g + self.wd * leaf.detach()
            m = self.m[k].index_select(0, idx).mul_(self.b1).add_(g, alpha=1 - self.b1)
            v = self.v[k].index_select(0, idx).mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            self.m[k].index_copy_(0, idx, m)
            self.v[k].index_copy_(0, idx, v)
            w.index_copy_(0, idx, leaf.detach() - self.lr * (m / bc1) / ((v / bc2).sqrt() + self.eps))


def _to_torch_sparse(m: sp.csr_matrix) -> torch.Tensor:
    coo = m.tocoo()
    idx = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64, copy=True))
    return torch.sparse_coo_tensor(idx, torch.from_numpy(coo.data.astype(np.float32, copy=True)), m.shape,
                                   check_invariants=False).coalesce()


class TwoTower(Recommender):
    """Collaborative (use_content=False), content (use_ids=False) or hybrid (both) two-tower model."""

    def __init__(self, params: NeuralParams | None = None, name: str = "hybrid", progress: bool = False,
                 **overrides):
        self.params = replace(params or NeuralParams(), **overrides)
        self.name = name
        self.progress = progress
        self.history_: list[dict] = []
        self.on_validate = None  # callable(epoch, val_ndcg) — tuning reports/prunes through it

    # -------------------------------------------------------------------------------- training
    def fit(self, data: TrainData) -> TwoTower:
        """Train with early stopping on data.valid. softmax="auto" on a catalogue within full_softmax_limit
        and with a holdout trains both losses from the same seed and keeps the better by validation nDCG."""
        p = self.params
        n_items = data.n_items
        mode = p.softmax
        if mode not in ("auto", "full", "sampled"):
            raise ValueError(f"softmax must be auto, full or sampled, got {mode!r}")
        resolve_device(p.device)  # a bad or unavailable device fails here, before any work
        if mode == "auto":
            if n_items > p.full_softmax_limit:
                mode = "sampled"
            elif data.valid is None:
                mode = "full"
        if mode != "auto":
            self._fit_mode(data, mode)
            self.softmax_ = mode
            return self
        runs = {}
        for m in ("sampled", "full"):
            self.history_ = []
            self._fit_mode(data, m)
            runs[m] = (self.best_val, self.best_epoch, self.history_, copy.deepcopy(self.net.state_dict()))
        chosen = max(runs, key=lambda m: runs[m][0])  # ties: sampled (first), the cheaper one
        self.softmax_scores_ = {m: r[0] for m, r in runs.items()}
        self.best_val, self.best_epoch, self.history_, state = runs[chosen]
        self.net.load_state_dict(state)
        self.softmax_ = chosen
        self._freeze()
        return self

    def _fit_mode(self, data: TrainData, mode: str) -> None:
        p = self.params
        dev = resolve_device(p.device)
        torch.manual_seed(data.seed)
        rng = np.random.default_rng(data.seed)
        x = data.binary()
        n_users, n_items = x.shape
        self.feats = torch.from_numpy(data.item_features) if data.item_features is not None else None
        self.user_feats = (torch.from_numpy(data.user_features.astype(np.float32))
                           if data.user_features is not None else None)
        feat_dim = 0 if self.feats is None else self.feats.shape[1]
        user_dim = 0 if self.user_feats is None else self.user_feats.shape[1]
        self.net = TwoTowerNet(n_items, feat_dim, user_dim, p).to(dev)  # initialised on the CPU: same weights
        active = np.flatnonzero(np.diff(x.indptr) > 0)
        if not 0.0 <= p.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {p.ema}")
        self._ema = (AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(p.ema), use_buffers=True)
                     if p.ema else None)
        step = self._make_step(x, mode, p.lr if mode == "full" else p.sampled_lr, dev)
        best, best_state, bad = -1.0, None, 0
        self.samples_seen = 0
        bar = tqdm(range(p.epochs), desc=f"train {self.name} ({mode})", disable=not self.progress, leave=False)
        for epoch in bar:
            seen, t0 = self.samples_seen, time.perf_counter()
            rec = {"epoch": epoch + 1, "loss": step(active, rng)}  # (the loss is read back: the step has run)
            rec["samples"], rec["seconds"] = self.samples_seen - seen, round(time.perf_counter() - t0, 4)
            if data.valid is not None and ((epoch + 1) % p.eval_every == 0 or epoch + 1 == p.epochs):
                rec["val_ndcg@10"] = self._validate(x, data.valid)
                if self.on_validate is not None:
                    self.on_validate(epoch + 1, rec["val_ndcg@10"])
                if rec["val_ndcg@10"] > best:
                    best, bad = rec["val_ndcg@10"], 0
                    best_state = copy.deepcopy(self._scored_net().state_dict())
                    self.best_epoch = epoch + 1
                else:
                    bad += p.eval_every
                    if bad >= p.patience:
                        self.history_.append(rec)
                        break
            self.history_.append(rec)
            bar.set_postfix({k: round(v, 4) for k, v in rec.items() if k in ("loss", "val_ndcg@10")})
        if best_state is not None:
            self.net.load_state_dict(best_state)
        else:
            if self._ema is not None:  # no holdout: the average of the last steps
                self.net.load_state_dict(self._ema.module.state_dict())
            self.best_epoch = len(self.history_)
        self._ema = None
        self.best_val = best
        self.net.cpu()  # scoring and export: the CPU float32 network, whatever the training device
        self._freeze()

    def _make_step(self, x: sp.csr_matrix, mode: str, lr: float, dev: torch.device):
        """A callable (active users, rng) -> mean loss of one epoch, with its optimizer state (on `dev`, where
        the network already is)."""
        p = self.params
        id_dropout = p.use_ids and self.net.use_content
        feats = _to(self.feats, dev)
        if mode == "full":
            opt = torch.optim.Adam(self.net.parameters(), lr=lr, weight_decay=p.weight_decay)
            pop = np.asarray(x.sum(0)).ravel() + 1.0
            log_q = torch.from_numpy(np.log(pop / pop.sum()).astype(np.float32)).to(dev)
            return lambda active, rng: self._train_epoch(x, active, rng, opt, log_q, True, feats, dev)
        net = self.net
        tables = {"item_bias": net.item_bias}
        if net.use_ids:
            tables.update(input_id=net.input_id.weight, item_id=net.item_id.weight)
        table_ids = {id(t) for t in tables.values()}
        dense = [q for q in net.parameters() if id(q) not in table_ids]
        opt = torch.optim.Adam(dense, lr=lr, weight_decay=p.weight_decay)
        row_opt = RowAdam(tables, lr=lr, weight_decay=p.weight_decay)
        sampler = BatchSampler(x, p, id_dropout)
        return lambda active, rng: self._train_epoch_sampled(sampler, active, rng, opt, row_opt, feats, dev)

    def _train_epoch_sampled(self, sampler: BatchSampler, active: np.ndarray, rng: np.random.Generator, opt,
                             row_opt: RowAdam, feats: torch.Tensor | None, dev: torch.device) -> float:
        """One pass of the sampled trainer over the active users; returns the mean loss per user. The loss is
        summed on the device (float64, the same sum as Python floats) and read back once per epoch, so a CUDA
        epoch does not wait for the card at every step."""
        p = self.params
        self.net.train()
        perm = rng.permutation(active)
        total = torch.zeros((), dtype=torch.float64, device=dev)
        bs = p.sampled_batch_size
        for s in range(0, len(perm), bs):
            ub = perm[s:s + bs]
            b = sampler.batch(ub, rng).to(dev)
            self.samples_seen += b.n_interactions
            rows = row_opt.gather(b.items)
            uf = (_to(self.user_feats.index_select(0, torch.from_numpy(ub)), dev)
                  if self.user_feats is not None else None)
            with autocast(dev):
                loss = self.net.sampled_loss(b, feats, uf, rows)
            opt.zero_grad()
            loss.backward()
            opt.step()
            row_opt.step(b.items, rows)
            self._average()
            total += loss.detach().double() * len(ub)
        return float(total) / max(1, len(perm))

    def _train_epoch(self, x: sp.csr_matrix, active: np.ndarray, rng: np.random.Generator, opt, log_q: torch.Tensor,
                     full: bool, feats: torch.Tensor | None, dev: torch.device) -> float:
        """One pass of the full-softmax trainer (the original one) over the active users in random batches;
        returns the mean loss."""
        p = self.params
        self.net.train()
        perm = rng.permutation(active)
        total = torch.zeros((), dtype=torch.float64, device=dev)
        for s in range(0, len(perm), p.batch_size):
            ub = perm[s:s + p.batch_size]
            xb = x[ub]
            self.samples_seen += xb.nnz
            b = make_batch(xb, rng, p, x.shape[1], full, id_dropout=p.use_ids and self.net.use_content).to(dev)
            uf = _to(self.user_feats[ub], dev) if self.user_feats is not None else None
            with autocast(dev):
                loss = self.net(b.hist, b.target, feats, uf, cand=b.cand, id_keep=b.id_keep, log_q=log_q)
            opt.zero_grad()
            loss.backward()
            opt.step()
            self._average()
            total += loss.detach().double() * len(ub)
        return float(total) / max(1, len(perm))

    def _average(self) -> None:
        """After a step: fold the weights into the EMA (when `ema` is on and fit is running)."""
        if getattr(self, "_ema", None) is not None:
            self._ema.update_parameters(self.net)

    def _scored_net(self) -> nn.Module:
        """The network that validation scores and early stopping keeps: the EMA's copy when it is on."""
        return self._ema.module if getattr(self, "_ema", None) is not None else self.net

    def finetune(self, data: TrainData, epochs: int = 2, lr: float | None = None,
                 device: str | None = None) -> TwoTower:
        """Continue training the fitted network on `data` (same catalogue; users may differ: the user tower is
        history-encoded, so rows are just histories) for a few epochs — the incremental update of
        rentalml.training.incremental — with the loss the model was selected with. No early stopping: the
        caller evaluates and registers a challenger. `device` defaults to the training device, where a model
        trained on "cuda" fine-tunes on "auto" (a CPU-only job can update a model trained on a card)."""
        p = self.params
        dev = resolve_device(device or ("auto" if p.device == "cuda" else p.device))
        if data.n_items != self.net.n_items:
            raise ValueError(f"fine-tuning needs the trained catalogue ({self.net.n_items} items), got {data.n_items}")
        rng = np.random.default_rng(data.seed)
        torch.manual_seed(data.seed)
        x = data.binary()
        self.user_feats = (torch.from_numpy(data.user_features.astype(np.float32))
                           if data.user_features is not None else None)
        mode = getattr(self, "softmax_", None) or ("full" if data.n_items <= p.full_softmax_limit else "sampled")
        self.net.to(dev)
        step = self._make_step(x, mode, lr or (p.lr if mode == "full" else p.sampled_lr) * 0.3, dev)
        active = np.flatnonzero(np.diff(x.indptr) > 0)
        self.samples_seen = getattr(self, "samples_seen", 0)
        for epoch in range(epochs):
            loss = step(active, rng)
            self.history_.append({"epoch": len(self.history_) + 1, "loss": loss, "finetune": epoch + 1})
        self.net.cpu()
        self._freeze()
        return self

    def _validate(self, x: sp.csr_matrix, valid: sp.csr_matrix) -> float:
        if getattr(self, "_ema", None) is None:
            self._freeze()
            return validation_ndcg(self, x, valid)
        trained, self.net = self.net, self._ema.module  # score the average, then train on
        try:
            self._freeze()
            return validation_ndcg(self, x, valid)
        finally:
            self.net = trained

    def selected_params(self) -> dict:
        chosen = {"epochs": max(1, self.best_epoch)}
        if getattr(self, "softmax_", None):
            chosen["softmax"] = self.softmax_
        return chosen

    def _freeze(self) -> None:
        """The item tables for scoring, float32 on the network's device (the CPU once fit has returned)."""
        self.net.eval()
        with torch.no_grad():
            t_in, t_out = self.net.tables(_to(self.feats, self.net.item_bias.device))
        self.table_in, self.table_out = t_in.detach(), t_out.detach()

    # -------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def user_embedding(self, history: sp.csr_matrix, user_features: np.ndarray | None = None) -> torch.Tensor:
        dev = self.table_in.device
        h = history.copy()
        h.data[:] = 1.0
        uf = torch.from_numpy(user_features.astype(np.float32)) if user_features is not None else None
        if uf is None and self.net.user_feat_dim:
            uf = torch.zeros((h.shape[0], self.net.user_feat_dim))
        return self.net.user_vectors(_to_torch_sparse(h).to(dev), self.table_in, _to(uf, dev))

    @torch.no_grad()
    def score(self, users, history, user_features=None):
        if user_features is None and self.user_feats is not None and users is not None:
            user_features = self.user_feats[users].numpy()
        u = self.user_embedding(history, user_features)
        return (u @ self.table_out.T + self.net.item_bias).cpu().numpy()

    def describe(self) -> dict:
        return {"name": self.name, **asdict(self.params), "best_epoch": getattr(self, "best_epoch", None),
                "softmax_selected": getattr(self, "softmax_", None)}


def n_params(model: TwoTower) -> int:
    return sum(math.prod(p.shape) for p in model.net.parameters())
