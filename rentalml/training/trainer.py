"""Fit any rentalml model on a Dataset: id maps, features, validation carve-out, early stopping, refit."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from rentalml.data.dataset import Dataset, InteractionMatrix, session_matrix
from rentalml.data.features import FeatureEncoder, side_information
from rentalml.evaluation.protocols import aggregate_pairs, holdout_split
from rentalml.models.base import Popularity, Recommender, TrainData
from rentalml.models.hybrid import Hybrid
from rentalml.models.neural import NeuralParams, TwoTower
from rentalml.models.rerank import pair_times

MODEL_NAMES = ("popularity", "collaborative", "content", "hybrid")
NEURAL_KEYS = set(NeuralParams.__dataclass_fields__)

#: at or above this many training rows (user-property pairs after the split) the trainer runs its
#: marketplace-scale profile: the network takes SCALE_DEFAULTS for every parameter the caller did not set (the
#: sampled trainer at the tuned size, a few epochs, validation every epoch), and (refit=None) the model selected
#: on the validation holdout is kept instead of being refit on the whole of train: at 10M events a second fit
#: would double the time for a 10 % larger training set. The item-item part keeps 64 neighbours per item (its
#: solve costs n·M³: 256 → 64 is 64× less) and no side information (a neighbourhood of thousands of properties
#: would add a dense block of their pairs to the Gram matrix and one more solve per α tried), and no session
#: weight (one more gather and solve, not measured at 100k properties). The shipped model
#: is still refit on everything (refit_all).
#: input_dropout 0.5 is NeuralParams' own default, stated so COLLABORATIVE_DEFAULTS' 0.2 stays a small-data choice.
SCALE_MIN_ROWS = 500_000
SCALE_DEFAULTS = {"softmax": "sampled", "dim": 64, "hidden": 128, "sampled_batch_size": 1024, "sampled_lr": 8e-3,
                  "negatives": 512, "input_dropout": 0.5, "epochs": 3, "eval_every": 1, "patience": 1,
                  "neighbours": 64, "ema": 0.0, "side": 0.0, "session": 0.0}


#: the collaborative (ID-only) tower's own defaults, under any parameter the caller (or SCALE_DEFAULTS) sets. On a
#: small dataset the shared 512 users per step leave it undertrained: ml-latest-small has ~550 training users, so
#: an epoch is two steps and the validation curve still rises at epoch 200. 128 users per step and input dropout
#: 0.2 lift it (docs/benchmarks.md, issue 14 point 2, "Levers tried"); the hybrid and content towers keep the
#: shared defaults (input dropout 0.2 hurt the Albany hybrid). A weight EMA (0.95 per step) smooths what those small
#: steps leave noisy (docs/benchmarks.md, issue 14 point 2). At scale SCALE_DEFAULTS win (batch, dropout, no EMA:
#: its update touches every row of the tables, a cost that grows with the catalogue).
COLLABORATIVE_DEFAULTS = {"sampled_batch_size": 128, "input_dropout": 0.2, "ema": 0.95}


def build_model(name: str, params: dict | None = None, progress: bool = False) -> Recommender:
    params = dict(params or {})
    nn_kw = {k: v for k, v in params.items() if k in NEURAL_KEYS}
    if name == "popularity":
        return Popularity()
    if name == "collaborative":
        return TwoTower(name="collaborative", progress=progress,
                        **{**COLLABORATIVE_DEFAULTS, **nn_kw, "use_content": False})
    if name == "content":
        return TwoTower(name="content", progress=progress, **{**nn_kw, "use_ids": False})
    if name == "hybrid":
        keys = ("l2", "neighbours", "dropout", "beta", "side", "rerank", "session")
        ii_kw = {k: params[k] for k in keys if k in params}
        return Hybrid(progress=progress, **ii_kw, **nn_kw)
    if name == "itemitem":
        from rentalml.models.itemitem import SparseEASE

        return SparseEASE(**{k: params[k] for k in ("l2", "neighbours", "dropout", "side", "session") if k in params})
    if name == "ease":
        from rentalml.models.baselines import EASE

        return EASE(params.get("l2", 200.0))
    if name == "itemknn":
        from rentalml.models.baselines import ItemKNN

        return ItemKNN(params.get("neighbours", 100))
    if name == "als":
        from rentalml.models.baselines import ImplicitALS

        return ImplicitALS(seed=params.get("seed", 42))
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)} "
                     "(or itemitem, ease, itemknn, als)")


@dataclass
class Fitted:
    """A trained model together with everything needed to use it outside index space."""

    name: str
    model: Recommender
    item_ids: np.ndarray
    user_ids: np.ndarray
    train: sp.csr_matrix  # users × items, binary history used for scoring and masking
    item_features: np.ndarray | None
    user_features: np.ndarray | None
    item_encoder: FeatureEncoder | None
    user_encoder: FeatureEncoder | None
    fit_seconds: float
    params: dict = field(default_factory=dict)
    item_side: sp.csr_matrix | None = None  # the item-item model's side information (TrainData.item_side)
    train_times: sp.csr_matrix | None = None  # each training pair's time in years (the re-ranker's), or None
    sessions: sp.csr_matrix | None = None  # the item-item part's training sessions when its σ > 0 (for finetune)

    @property
    def training_curve(self) -> list[dict]:
        """Per-epoch loss / validation nDCG of the network part (empty for models without one)."""
        return getattr(getattr(self.model, "tower", self.model), "history_", [])

    def first_stage_scores(self, users: np.ndarray) -> np.ndarray:
        """The model's scores over the catalogue before any re-ranker: what the exported graphs compute."""
        uf = self.user_features[users] if self.user_features is not None else None
        return self.model.score(users, self.train[users], uf)

    def score_users(self, users: np.ndarray) -> np.ndarray:
        """Scores over the catalogue; a model with a learned re-ranker (Hybrid.ranker) re-orders each user's
        top candidates among the unseen properties, as the runtime's rank step does when serving."""
        scores = self.first_stage_scores(users)
        times = getattr(self, "train_times", None)  # checkpoints from before the re-ranker have none
        if getattr(self.model, "ranker", None) is not None and times is not None:
            scores = self.model.rerank_rows(scores, times[users])
        return scores


def _features(dataset: Dataset, item_ids: np.ndarray, user_ids: np.ndarray):
    item_enc = user_enc = None
    item_x = user_x = None
    if dataset.items is not None and len(dataset.items.columns):
        item_enc = FeatureEncoder.fit(dataset.items)
        if item_enc.dim:
            item_x = item_enc.transform(dataset.items.reindex(item_ids))
        else:
            item_enc = None
    if dataset.users is not None and len(dataset.users.columns):
        user_enc = FeatureEncoder.fit(dataset.users)
        if user_enc.dim:
            user_x = user_enc.transform(dataset.users.reindex(user_ids))
        else:
            user_enc = None
    return item_enc, item_x, user_enc, user_x


def catalogue(dataset: Dataset, *frames: pd.DataFrame) -> np.ndarray:
    ids = set(dataset.interactions["property_id"].unique())
    if dataset.items is not None:
        ids |= set(dataset.items.index)
    for f in frames:
        ids |= set(f["property_id"].unique())
    return np.array(sorted(ids), dtype=object)


def fit_model(name: str, dataset: Dataset, train: pd.DataFrame | None = None, params: dict | None = None,
              seed: int = 42, valid_frac: float = 0.1, refit: bool | None = None, progress: bool = False,
              on_validate=None) -> Fitted:
    """Fit `name` on `train` pairs (default: all of the dataset's interactions).

    A per-user validation holdout (valid_frac) is carved from train for early stopping and model selection;
    with refit=True the model is then refit on the whole of train with the selected epoch count and blend
    (refit=None: below SCALE_MIN_ROWS training rows only; at scale SCALE_DEFAULTS also apply, see above).
    """
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    train = aggregate_pairs(dataset.interactions) if train is None else train
    at_scale = len(train) >= SCALE_MIN_ROWS
    if refit is None:
        refit = not at_scale
    if at_scale and name in ("collaborative", "content", "hybrid"):
        params = {**SCALE_DEFAULTS, **(params or {})}
    item_ids = catalogue(dataset, train)
    user_ids = np.array(sorted(train["user_id"].unique()), dtype=object)
    item_enc, item_x, user_enc, user_x = _features(dataset, item_ids, user_ids)
    full = InteractionMatrix.build(train, item_ids=item_ids, user_ids=user_ids).matrix
    params = dict(params or {})
    # only the item-item models read it, and only when their side weight is not fixed at 0 (SCALE_DEFAULTS)
    side = (side_information(dataset.items, item_ids)
            if name in ("hybrid", "itemitem") and params.get("side", None) != 0 else None)
    # the hybrid's re-ranker (models.rerank) is considered only where the catalogue has side information (not
    # MovieLens, not the at-scale profile) and not switched off
    rerank = name == "hybrid" and side is not None and side.shape[1] > 0 and params.get("rerank", None) is not False
    item_table = dataset.items.reindex(item_ids) if rerank and dataset.items is not None else None
    times = (lambda pairs: pair_times(pairs, item_ids, user_ids)) if rerank else (lambda pairs: None)
    # the item-item part's sessions (runs of each history in time order), unless its session weight is fixed at 0
    use_sessions = name in ("hybrid", "itemitem") and params.get("session", None) != 0
    sessions = (lambda pairs: session_matrix(pairs, item_ids, user_ids)) if use_sessions else (lambda pairs: None)
    def data_for(matrix: sp.csr_matrix, pairs: pd.DataFrame, valid: sp.csr_matrix | None = None) -> TrainData:
        return TrainData(matrix, item_x, user_x, valid=valid, seed=seed, item_side=side, times=times(pairs),
                         item_table=item_table, sessions=sessions(pairs))

    model = build_model(name, params, progress)
    if on_validate is not None:
        model.on_validate = on_validate
    full_data = None  # all of train's TrainData, built once: for the (re)fit and for what Fitted keeps of it
    if valid_frac > 0 and type(model).selected_params is not Recommender.selected_params:
        tr, va = holdout_split(train, valid_frac, seed + 1)
        m_tr = InteractionMatrix.build(tr, item_ids=item_ids, user_ids=user_ids).matrix
        m_va = InteractionMatrix.build(va, item_ids=item_ids, user_ids=user_ids).matrix
        model.fit(data_for(m_tr, tr, m_va))
        if refit:
            chosen = {**params, **model.selected_params()}
            model = build_model(name, chosen, progress)
            full_data = data_for(full, train)
            model.fit(full_data)
            params = chosen
    else:
        full_data = data_for(full, train)
        model.fit(full_data)
    full_bin = full.copy()
    full_bin.data[:] = 1.0
    keep_times = getattr(model, "ranker", None) is not None
    keep_sessions = bool(getattr(getattr(model, "itemitem", model), "session", None))  # σ > 0
    if full_data is None and (keep_times or keep_sessions):
        full_data = data_for(full, train)
    return Fitted(name, model, item_ids, user_ids, full_bin, item_x, user_x, item_enc, user_enc,
                  time.perf_counter() - t0, params, side,
                  full_data.times if keep_times else None, full_data.sessions if keep_sessions else None)


