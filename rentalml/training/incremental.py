"""Incremental learning: fine-tune the champion on the recent window and register a challenger.

Between full training runs two mechanisms keep recommendations fresh:
1. at serving time, fold-in (rentalml.export.foldin): new users are scored from their streamed history and
   never-seen properties from the content tower — within seconds, no training at all;
2. periodically (`rentalml train-incremental`, a CronJob in the cluster), `finetune_champion` continues training
   the champion's network for a few epochs on its training histories plus the recent window's interactions
   (new users included), refits the item-item part on the combined matrix, compares it with the champion on
   the window's last interaction per user, and registers the result as the `challenger` — it becomes champion
   only through the A/B test (`rentalml ab report|promote`), never directly.
Properties the champion has never seen stay with fold-in until the next full training run (the ID embedding
table is fixed); the combined matrix keeps the champion's catalogue.
"""

from __future__ import annotations

import copy
import pickle
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from rentalml.config import Settings, get_settings
from rentalml.data.dataset import Dataset, InteractionMatrix, pair_indices, session_matrix
from rentalml.evaluation.evaluate import evaluate
from rentalml.evaluation.protocols import aggregate_pairs, temporal_leave_last_n
from rentalml.models.base import TrainData
from rentalml.models.hybrid import Hybrid
from rentalml.models.neural import TwoTower
from rentalml.models.rerank import pair_times


def load_checkpoint(bundle_dir: str | Path):
    path = Path(bundle_dir) / "checkpoint.pkl"
    if not path.exists():
        raise FileNotFoundError(f"{bundle_dir} has no checkpoint.pkl (bundles from before incremental learning): "
                                "run a full training instead")
    with open(path, "rb") as fh:
        return pickle.load(fh)


def extend(fitted, pairs: pd.DataFrame):
    """`fitted` with the recent (user, property) pairs added to its history matrix: unknown users appended as
    new rows, pairs on properties outside the catalogue dropped. The weights are untouched (fold-in)."""
    known = pairs[pd.Index(fitted.item_ids).get_indexer(pairs["property_id"]) >= 0]
    new_users = np.setdiff1d(known["user_id"].unique().astype(object), fitted.user_ids)
    user_ids = np.concatenate([fitted.user_ids, np.sort(new_users).astype(object)])
    recent = InteractionMatrix.build(known, item_ids=fitted.item_ids, user_ids=user_ids).binary()
    old = sp.vstack([fitted.train, sp.csr_matrix((len(new_users), len(fitted.item_ids)))]).tocsr()
    train = ((old + recent) > 0).astype(np.float32).tocsr()
    uf = fitted.user_features
    if uf is not None:
        uf = np.vstack([uf, np.zeros((len(new_users), uf.shape[1]), uf.dtype)])
    times = getattr(fitted, "train_times", None)
    if times is not None:  # the re-ranker's pair times: the recent pairs' own (or now, without a timestamp)
        recent_t = pair_times(known if "timestamp" in known else known.assign(timestamp=pd.Timestamp.now(tz="UTC")),
                              fitted.item_ids, user_ids)
        times = sp.vstack([times, sp.csr_matrix((len(new_users), len(fitted.item_ids)))]).tocsr().maximum(recent_t)
    return replace(fitted, user_ids=user_ids, train=train, user_features=uf, train_times=times)


def finetune(fitted, recent_pairs: pd.DataFrame, epochs: int = 2, lr: float | None = None, seed: int = 42):
    """A copy of `fitted` whose network continued training on training + recent histories, and whose item-item
    part is refit on the combined matrix."""
    t0 = time.perf_counter()
    ext = extend(fitted, recent_pairs)
    model = copy.deepcopy(fitted.model)
    tower = model.tower if isinstance(model, Hybrid) else model if isinstance(model, TwoTower) else None
    # the item-item refit keeps the side information and the sessions it was fit with (checkpoints from before
    # them have none): the window's new pairs form runs of their own after the training runs
    data = TrainData(ext.train, ext.item_features, ext.user_features, seed=seed,
                     item_side=getattr(fitted, "item_side", None), sessions=_sessions(fitted, ext, recent_pairs))
    if tower is not None:
        tower.finetune(data, epochs=epochs, lr=lr)
    if isinstance(model, Hybrid):
        model.itemitem.fit(data)
        model.proxy, model.proxy_w = model._cold_proxies(data)
    elif tower is None and hasattr(model, "fit"):
        model.fit(data)  # item-item / popularity: a refit on the combined matrix is cheap
    params = {**fitted.params, "finetune_epochs": epochs}
    return replace(ext, model=model, fit_seconds=time.perf_counter() - t0, params=params)


def _sessions(fitted, ext, recent_pairs: pd.DataFrame) -> sp.csr_matrix | None:
    """The training runs plus runs of the window's pairs that are not already in a training history (an item
    stays in one run per user, as the item-item model's normalisation assumes); None without training runs."""
    old = getattr(fitted, "sessions", None)
    if old is None:
        return None
    rows, cols = pair_indices(recent_pairs, fitted.item_ids, ext.user_ids)
    ok = (rows >= 0) & (cols >= 0)
    seen = np.zeros(len(recent_pairs), dtype=bool)
    known = ok & (rows < fitted.train.shape[0])
    seen[known] = np.asarray(fitted.train[rows[known], cols[known]]).ravel() > 0
    new = session_matrix(recent_pairs[ok & ~seen], fitted.item_ids, ext.user_ids, always=True)
    return old if new is None else sp.vstack([old, new]).tocsr()


def history_dataset(bundle, fitted, recent: Dataset) -> Dataset:
    """A Dataset the bundle writer can use: the champion's ordered training histories (as events before the
    window) plus the recent interactions, with the champion's property table updated by the recent one."""
    start = pd.to_datetime(recent.interactions["timestamp"], utc=True).min() - timedelta(days=1)
    rows = [(u, bundle.property_ids[i], start - timedelta(seconds=len(h) - j))
            for u, h in zip(bundle.user_index, bundle.user_history, strict=True) for j, i in enumerate(h)]
    old = pd.DataFrame(rows, columns=["user_id", "property_id", "timestamp"])
    inter = pd.concat([old, recent.interactions[["user_id", "property_id", "timestamp"]]], ignore_index=True)
    items = bundle.properties.drop(columns=["index"]).set_index("property_id")
    if recent.items is not None:
        items = pd.concat([items, recent.items[recent.items.index.isin(items.index)]])
        items = items[~items.index.duplicated(keep="last")]
    return Dataset(inter, items.reindex(fitted.item_ids), recent.users, name=f"{recent.name}+champion-histories")


def finetune_champion(recent: Dataset, *, window_days: float | None = 7.0, epochs: int = 2,
                      settings: Settings | None = None, seed: int = 42) -> dict:
    """Fine-tune the registry's champion on the recent window and register the result as challenger.

    Returns the evaluation of both on the window's held-out last interaction per user and the registration."""
    from rentalml.export.bundle import write_bundle
    from rentalml.monitoring.drift import recent as last_days
    from rentalml.registry.mlflow_registry import fetch_bundle, log_training_run, register
    from rentalml.runtime.bundle import Bundle

    s = settings or get_settings()
    champ_dir = fetch_bundle("champion", settings=s)
    champ_bundle = Bundle(champ_dir)
    champion = load_checkpoint(champ_dir)
    window = last_days(recent, window_days)
    pairs = aggregate_pairs(window.interactions)
    train_pairs, test_pairs = temporal_leave_last_n(pairs, 1)
    base = extend(champion, train_pairs)  # champion + the window folded in: what serving does without training
    tuned = finetune(champion, train_pairs, epochs=epochs, seed=seed)
    m_base, m_tuned = evaluate(base, test_pairs), evaluate(tuned, test_pairs)
    final = finetune(champion, pairs, epochs=epochs, seed=seed)  # what ships sees the whole window
    metrics = {**{k: v for k, v in m_tuned.items() if isinstance(v, float)},
               "champion_foldin_ndcg@10": m_base["ndcg@10"]}
    with tempfile.TemporaryDirectory() as tmp:
        ds = history_dataset(champ_bundle, final, window)
        bundle_dir = write_bundle(final, ds, Path(tmp) / "bundle", model_name=s.model_name, metrics=metrics,
                                  feature_views=champ_bundle.meta.get("feature_views"))
        lineage = {"data_snapshot": window.snapshot_hash(), "dataset": window.name, "protocol": "finetune-window",
                   "finetuned_from": str(champ_bundle.meta.get("model_version")),
                   "window": f"{window_days}d until {pd.to_datetime(window.interactions['timestamp']).max()}",
                   "feature_views": champ_bundle.meta.get("feature_views", [])}
        run_id = log_training_run(model_type=final.name, params=final.params, metrics=metrics,
                                  bundle_dir=bundle_dir, lineage=lineage, settings=s,
                                  run_name=f"finetune-{datetime.now(UTC):%Y%m%dT%H%M%S}")
    reg = register(run_id, settings=s, promote=False)
    return {"champion_version": str(champ_bundle.meta.get("model_version")), "window_users":
            int(window.interactions["user_id"].nunique()), "new_users": int(len(final.user_ids) -
                                                                           len(champion.user_ids)),
            "test_users": m_tuned["users"], "champion_foldin": {"ndcg@10": m_base["ndcg@10"],
                                                              "recall@10": m_base["recall@10"]},
            "finetuned": {"ndcg@10": m_tuned["ndcg@10"], "recall@10": m_tuned["recall@10"]},
            "registered": reg, "run_id": run_id}
