"""Drift monitoring: recent feature and score distributions against the training snapshot.

The reference travels with the model: `write_reference(bundle_dir, dataset)` (called by `write_bundle`) stores
`drift_reference.json` in every bundle — per feature the reference deciles and shares (PSI) and a bounded
seeded sample (KS), and the distribution of the model's own top-1 and mean top-10 scores on the training users.
`check_drift(reference, current, bundle)` measures PSI and the two-sample Kolmogorov–Smirnov statistic per
feature and per score, against the thresholds in `settings.monitor`; `rentalml monitor drift` writes a
JSON + HTML report with plots, exports `ml_feature_drift_psi` / `ml_feature_drift_ks` (textfile, and a
Pushgateway when configured) and, over threshold, triggers retraining (local pipeline run or KFP).
"""

from __future__ import annotations

import base64
import html
import io
import json
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sstats

from rentalml.data.dataset import Dataset
from rentalml.data.validation import _categorical_profile, _numeric_profile, _shares, psi
from rentalml.schema import PROPERTY_CATEGORICAL, PROPERTY_NUMERIC

REFERENCE_FILE = "drift_reference.json"
SAMPLE = 5000  # numeric values kept per feature for the KS test
SCORE_USERS = 500  # users whose top-10 scores describe the model's score distribution


# ------------------------------------------------------------------------------------------ features
def _feature_values(ds: Dataset) -> dict[str, pd.Series]:
    """The monitored features of a dataset: property attributes, interaction mix and per-user activity."""
    out: dict[str, pd.Series] = {}
    inter = ds.interactions
    pairs = inter.drop_duplicates(["user_id", "property_id"])
    out["interactions.pairs_per_user"] = pairs.groupby("user_id").size().astype(float)
    if "event_type" in inter.columns:
        out["interactions.event_type"] = inter["event_type"].astype(str)
    if ds.items is not None:
        # the properties people interact with now, weighted by how often: a catalogue shift in what is viewed
        # shows up here even when the listing table itself is unchanged
        viewed = ds.items.set_index("property_id").reindex(inter["property_id"]) if "property_id" in \
            ds.items.columns else ds.items.reindex(inter["property_id"])
        for col in PROPERTY_NUMERIC:
            if col in viewed.columns:
                v = pd.to_numeric(viewed[col], errors="coerce")
                if v.notna().any():
                    out[f"properties.{col}"] = v.dropna().astype(float)
        for col in ("property_type", "room_type", "city"):
            if col in viewed.columns and col in PROPERTY_CATEGORICAL:
                out[f"properties.{col}"] = viewed[col].dropna().astype(str)
    return out


def _profile_feature(values: pd.Series, rng: np.random.Generator) -> dict:
    if pd.api.types.is_numeric_dtype(values):
        prof = _numeric_profile(values)
        v = values.to_numpy(float)
        v = v[np.isfinite(v)]
        prof["sample"] = (rng.choice(v, SAMPLE, replace=False) if len(v) > SAMPLE else v).round(6).tolist()
        return prof
    return _categorical_profile(values)


# ------------------------------------------------------------------------------------------ scores
def _histories_in(bundle, ds: Dataset, max_users: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Histories (bundle item indices, oldest → newest) of up to max_users users of `ds` with a known item."""
    inter = ds.interactions.sort_values("timestamp")
    idx = bundle.property_index.get_indexer(inter["property_id"])
    inter = inter.assign(_i=idx)[idx >= 0]
    users = inter["user_id"].unique()
    if len(users) > max_users:
        users = rng.choice(users, max_users, replace=False)
    sub = inter[inter["user_id"].isin(set(users))]
    return [g.to_numpy(np.int64) for _, g in sub.groupby("user_id", sort=True)["_i"]]


def score_distribution(bundle, ds: Dataset, seed: int = 0) -> dict[str, list[float]]:
    """The model's top-1 and mean top-10 scores for a sample of the dataset's users."""
    rng = np.random.default_rng(seed)
    hist = _histories_in(bundle, ds, SCORE_USERS, rng)
    if not hist:
        return {"score.top1": [], "score.mean_top10": []}
    feats = (np.zeros((len(hist), bundle.user_feature_dim), np.float32) if bundle.user_feature_dim else None)
    _, sc = bundle.score_histories(hist, min(10, bundle.n_items), feats)
    sc = np.where(np.isfinite(sc), sc, np.nan)
    return {"score.top1": np.round(sc[:, 0], 6).tolist(),
            "score.mean_top10": np.round(np.nanmean(sc, axis=1), 6).tolist()}


# ------------------------------------------------------------------------------------------ reference
def build_reference(ds: Dataset, bundle=None, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feats = {name: _profile_feature(v, rng) for name, v in _feature_values(ds).items()}
    if bundle is not None:
        for name, values in score_distribution(bundle, ds, seed).items():
            if values:
                feats[name] = _profile_feature(pd.Series(values, dtype=float), rng)
    return {"created_at": datetime.now(UTC).isoformat(), "dataset": ds.name, "snapshot": ds.snapshot_hash(),
            "features": feats}


def write_reference(bundle_dir: str | Path, ds: Dataset) -> Path:
    """Store the drift reference of the training data (and the model's scores on it) inside a bundle."""
    from rentalml.runtime.bundle import Bundle

    out = Path(bundle_dir) / REFERENCE_FILE
    bundle = Bundle(bundle_dir)
    ref = build_reference(ds, bundle if bundle.model_type != "popularity" else None)
    out.write_text(json.dumps(ref))
    return out


def load_reference(path: str | Path) -> dict:
    """A reference from a bundle directory or a JSON file (a `build_reference` or a validation `profile`)."""
    p = Path(path)
    if p.is_dir():
        p = p / REFERENCE_FILE
    if not p.exists():
        raise FileNotFoundError(f"no drift reference at {p}: bundles written before drift monitoring have none; "
                                "pass --reference with a dataset to build one")
    return json.loads(p.read_text())


# ------------------------------------------------------------------------------------------ check
@dataclass
class FeatureDrift:
    feature: str
    kind: str
    psi: float
    ks: float | None = None
    ks_pvalue: float | None = None
    n_current: int = 0
    drifted: bool = False
    reason: str = ""


@dataclass
class DriftReport:
    features: list[FeatureDrift]
    thresholds: dict
    reference: dict
    current_name: str
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    plots: dict[str, str] = field(default_factory=dict)  # feature -> base64 PNG

    @property
    def drifted(self) -> list[FeatureDrift]:
        return [f for f in self.features if f.drifted]

    @property
    def over_threshold(self) -> bool:
        return bool(self.drifted)

    def to_dict(self) -> dict:
        return {"created_at": self.created_at, "over_threshold": self.over_threshold,
                "drifted": [f.feature for f in self.drifted], "thresholds": self.thresholds,
                "reference": {k: self.reference.get(k) for k in ("dataset", "snapshot", "created_at")},
                "current": self.current_name, "features": [f.__dict__ for f in self.features]}

    def html(self) -> str:
        rows = "".join(
            f"<tr style='background:{'#fbe3e3' if f.drifted else '#eaf5ea'}'><td>{html.escape(f.feature)}</td>"
            f"<td>{f.psi:.4f}</td><td>{'' if f.ks is None else f'{f.ks:.4f}'}</td>"
            f"<td>{'' if f.ks_pvalue is None else f'{f.ks_pvalue:.2g}'}</td><td>{f.n_current}</td>"
            f"<td>{html.escape(f.reason)}</td></tr>" for f in self.features)
        imgs = "".join(f"<h3>{html.escape(k)}</h3><img src='data:image/png;base64,{v}'/>" for k, v in
                       self.plots.items())
        t = self.thresholds
        return ("<html><body style='font-family:sans-serif'>"
                f"<h1>Drift: {'OVER THRESHOLD' if self.over_threshold else 'within thresholds'}</h1>"
                f"<p>reference {html.escape(str(self.reference.get('dataset')))} "
                f"(snapshot {html.escape(str(self.reference.get('snapshot')))}), current "
                f"{html.escape(self.current_name)}; PSI &gt; {t['psi']} or KS &gt; {t['ks']} "
                f"(p &lt; {t['ks_alpha']}) is drift</p>"
                "<table border=1 cellpadding=4><tr><th>feature</th><th>PSI</th><th>KS</th><th>KS p</th>"
                f"<th>n</th><th>why</th></tr>{rows}</table>{imgs}</body></html>")


def _plot(name: str, ref: dict, cur: pd.Series) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.6))
    if ref["kind"] == "numeric":
        both = np.concatenate([np.asarray(ref.get("sample", []), float), cur.to_numpy(float)])
        bins = np.histogram_bin_edges(both[np.isfinite(both)], bins=30) if len(both) else 10
        ax.hist(ref.get("sample", []), bins=bins, alpha=0.55, density=True, label="reference")
        ax.hist(cur.to_numpy(float), bins=bins, alpha=0.55, density=True, label="current")
    else:
        cur_sh = cur.astype(str).value_counts(normalize=True)
        keys = list(dict.fromkeys([*ref["shares"], *cur_sh.index[:10]]))[:15]
        x = np.arange(len(keys))
        ax.bar(x - 0.2, [ref["shares"].get(k, 0) for k in keys], 0.4, label="reference")
        ax.bar(x + 0.2, [float(cur_sh.get(k, 0)) for k in keys], 0.4, label="current")
        ax.set_xticks(x, keys, rotation=45, ha="right", fontsize=7)
    ax.set_title(name, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def check_drift(reference: dict, current: Dataset, bundle=None, *, psi_threshold: float = 0.25,
                ks_threshold: float = 0.2, ks_alpha: float = 0.01, min_samples: int = 50,
                plots: bool = True) -> DriftReport:
    """PSI (binned on the reference deciles / category shares) and two-sample KS per feature and score."""
    values = _feature_values(current)
    if bundle is not None and any(k.startswith("score.") for k in reference.get("features", {})):
        values.update({k: pd.Series(v, dtype=float) for k, v in score_distribution(bundle, current).items()})
    out: list[FeatureDrift] = []
    plot_data: dict[str, str] = {}
    for name, ref in reference.get("features", {}).items():
        cur = values.get(name)
        if cur is None or len(cur) == 0:
            continue
        n = int(len(cur))
        if ref["kind"] == "numeric" and "edges" in ref:
            v = cur.to_numpy(float)
            v = v[np.isfinite(v)]
            p = psi(ref["shares"], _shares(v, ref["edges"]))
            ks = pv = None
            if ref.get("sample") and len(v):
                res = sstats.ks_2samp(np.asarray(ref["sample"], float), v)
                ks, pv = float(res.statistic), float(res.pvalue)
            fd = FeatureDrift(name, "numeric", round(p, 6), ks, pv, n)
        elif ref["kind"] == "categorical":
            cur_sh = cur.astype(str).value_counts(normalize=True)
            keys = sorted(set(ref["shares"]) | set(cur_sh.index[:20]))
            p = psi([ref["shares"].get(k, 0.0) for k in keys], [float(cur_sh.get(k, 0.0)) for k in keys])
            fd = FeatureDrift(name, "categorical", round(p, 6), None, None, n)
        else:
            continue
        reasons = []
        if n < min_samples:
            fd.reason = f"only {n} current values (< {min_samples}): not judged"
        else:
            if fd.psi > psi_threshold:
                reasons.append(f"PSI {fd.psi:.3f} > {psi_threshold}")
            if fd.ks is not None and fd.ks > ks_threshold and (fd.ks_pvalue or 0) < ks_alpha:
                reasons.append(f"KS {fd.ks:.3f} > {ks_threshold} (p={fd.ks_pvalue:.2g})")
            fd.drifted = bool(reasons)
            fd.reason = "; ".join(reasons)
        out.append(fd)
        if plots:
            plot_data[name] = _plot(name, ref, cur)
    return DriftReport(out, {"psi": psi_threshold, "ks": ks_threshold, "ks_alpha": ks_alpha,
                             "min_samples": min_samples}, reference, current.name, plots=plot_data)


def recent(ds: Dataset, days: float | None) -> Dataset:
    """The interactions of the last `days` days (relative to the newest event) — the monitored window."""
    if not days:
        return ds
    ts = pd.to_datetime(ds.interactions["timestamp"], utc=True)
    keep = ts >= ts.max() - timedelta(days=days)
    return Dataset(ds.interactions[keep.to_numpy()].reset_index(drop=True), ds.items, ds.users,
                   name=f"{ds.name}[last {days:g}d]", meta=ds.meta)


# ------------------------------------------------------------------------------------------ outputs
def export_metrics(report: DriftReport, textfile: Path, pushgateway: str | None = None,
                   job: str = "rentalml-drift") -> None:
    """`ml_feature_drift_psi` / `ml_feature_drift_ks` gauges per feature (+ `ml_feature_drift_detected`), as a
    Prometheus textfile (node-exporter textfile collector) and, when configured, pushed to a Pushgateway."""
    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, write_to_textfile

    reg = CollectorRegistry()
    g_psi = Gauge("ml_feature_drift_psi", "population stability index vs the training snapshot", ["feature"],
                  registry=reg)
    g_ks = Gauge("ml_feature_drift_ks", "two-sample KS statistic vs the training snapshot", ["feature"],
                 registry=reg)
    g_any = Gauge("ml_feature_drift_detected", "1 when any feature is over the drift threshold", registry=reg)
    for f in report.features:
        g_psi.labels(f.feature).set(f.psi)
        if f.ks is not None:
            g_ks.labels(f.feature).set(f.ks)
    g_any.set(1 if report.over_threshold else 0)
    textfile.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(textfile), reg)
    if pushgateway:
        push_to_gateway(pushgateway, job=job, registry=reg)


def write_report(report: DriftReport, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "drift.json").write_text(json.dumps(report.to_dict(), indent=2, default=str))
    (out_dir / "drift.html").write_text(report.html())
    return {"json": out_dir / "drift.json", "html": out_dir / "drift.html"}


def retrain_command(mode: str, source: str | None, extra: list[str] | None = None) -> list[str]:
    """The pipeline run that drift triggers: local (kfp.local) or a KFP submission. Through the CLI, because the
    core never imports the pipelines deployable."""
    if mode not in ("local", "kfp"):
        raise ValueError(f"monitor.retrain must be 'local', 'kfp' or 'off', got {mode!r}")
    cmd = [sys.executable, "-m", "rentalml.cli", "pipeline", "run" if mode == "local" else "submit"]
    if mode == "local":
        cmd += ["--local"]
    if source:
        cmd += ["--source", source]
    return cmd + list(extra or [])


def trigger_retraining(mode: str, source: str | None, extra: list[str] | None = None,
                       log: Path | None = None) -> dict:
    cmd = retrain_command(mode, source, extra)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if log is not None:
        log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    if proc.returncode != 0:
        raise RuntimeError(f"retraining run failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return {"command": cmd, "returncode": proc.returncode, "stdout_tail": proc.stdout[-1500:]}
