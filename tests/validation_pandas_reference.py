"""FROZEN ORACLE (rentalml/data/validation.py at 5acc59a, the pandas implementation): tests/test_data_at_scale.py
and benchmarks/data_steps.py compare the DuckDB implementation with it. Not imported by the package.

Data validation before training: schema checks, statistics, and drift against the last accepted snapshot.

`validate(dataset, reference)` returns a `ValidationReport` (errors, warnings, statistics, PSI per feature);
`report.ok` is False when an error-level check fails (the pipeline's validate step then fails the run and
prints `report.text()`). `profile(dataset)` is what gets stored as the accepted reference.

Drift is the population stability index (PSI) between the reference and the new data, on binned numeric
distributions (reference deciles) and on categorical shares: < 0.1 stable, 0.1–0.25 a warning, above
`psi_error` (default 0.25) an error.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd

# the report, its constants and the PSI/bin arithmetic are shared with the DuckDB implementation: what is frozen
# here is the pandas computation of the checks, statistics and drift
from rentalml.data.dataset import Dataset, InteractionMatrix
from rentalml.data.validation import (
    _EPS,
    _TOP,
    PSI_ERROR,
    PSI_WARN,
    Check,
    ValidationReport,
    _shares,
    drift_checks,
    psi,
)
from rentalml.schema import EVENT_WEIGHTS, PROPERTY_CATEGORICAL, PROPERTY_NUMERIC

__all__ = ["PSI_ERROR", "PSI_WARN", "_EPS", "Check", "ValidationReport", "profile", "psi", "validate"]


# ------------------------------------------------------------------------------------------ statistics
def _numeric_profile(s: pd.Series) -> dict:
    v = pd.to_numeric(s, errors="coerce")
    finite = v[np.isfinite(v)]
    out = {"kind": "numeric", "null_frac": float(1 - len(finite) / max(1, len(v)))}
    if len(finite):
        edges = np.unique(np.quantile(finite, np.linspace(0, 1, 11)))
        out.update(mean=float(finite.mean()), std=float(finite.std()), min=float(finite.min()),
                   max=float(finite.max()), edges=edges.tolist(), shares=_shares(finite.to_numpy(), edges))
    return out


def _categorical_profile(s: pd.Series) -> dict:
    vc = s.astype(str).value_counts(normalize=True)
    top = vc.head(_TOP)
    shares = {str(k): float(v) for k, v in top.items()}
    if len(vc) > _TOP:
        shares["__other__"] = float(vc.iloc[_TOP:].sum())
    return {"kind": "categorical", "null_frac": float(s.isna().mean()), "shares": shares,
            "distinct": int(s.nunique())}


def profile(ds: Dataset, _pairs: pd.DataFrame | None = None) -> dict:
    """Statistics of a dataset, and the per-feature distributions drift is measured against."""
    df = ds.interactions
    distinct = df.drop_duplicates(["user_id", "property_id"]) if _pairs is None else _pairs
    pairs = InteractionMatrix.build(distinct).binary()
    per_user = np.diff(pairs.indptr)
    per_item = np.asarray(pairs.sum(0)).ravel()
    stats: dict = {
        "dataset": ds.name, "snapshot": ds.snapshot_hash(), "rows": int(len(df)),
        "users": int(df["user_id"].nunique()), "properties": int(df["property_id"].nunique()),
        "pairs": int(pairs.nnz),
        "catalogue": int(len(ds.items)) if ds.items is not None else int(df["property_id"].nunique()),
        "first_event": str(df["timestamp"].min()), "last_event": str(df["timestamp"].max()),
        "pairs_per_user": {q: float(np.quantile(per_user, p)) for q, p in (("p50", .5), ("p90", .9), ("p99", .99))}
        if len(per_user) else {},
        "users_per_property": {q: float(np.quantile(per_item, p)) for q, p in (("p50", .5), ("p90", .9))}
        if len(per_item) else {},
        "features": {},
    }
    feats = stats["features"]
    feats["interactions.pairs_per_user"] = _numeric_profile(pd.Series(per_user))
    feats["interactions.weight"] = _numeric_profile(df["weight"])
    if "event_type" in df.columns:
        feats["interactions.event_type"] = _categorical_profile(df["event_type"])
    if ds.items is not None:
        for col in PROPERTY_NUMERIC:
            if col in ds.items.columns and pd.to_numeric(ds.items[col], errors="coerce").notna().any():
                feats[f"properties.{col}"] = _numeric_profile(ds.items[col])
        for col in PROPERTY_CATEGORICAL:
            if col in ds.items.columns:
                feats[f"properties.{col}"] = _categorical_profile(ds.items[col])
    return stats


def _drift(ref: dict, cur_ds: Dataset, cur: dict) -> dict[str, float]:
    out = {}
    for name, r in ref.get("features", {}).items():
        c = cur["features"].get(name)
        if c is None or r.get("kind") != c.get("kind"):
            continue
        if r["kind"] == "numeric" and "edges" in r:
            table, col = name.split(".", 1)
            if name == "interactions.pairs_per_user":
                pairs = cur_ds.interactions.drop_duplicates(["user_id", "property_id"])
                values = pairs.groupby("user_id").size().to_numpy(float)
            elif table == "interactions":
                values = pd.to_numeric(cur_ds.interactions[col], errors="coerce").to_numpy(float)
            else:
                values = pd.to_numeric(cur_ds.items[col], errors="coerce").to_numpy(float)
            values = values[np.isfinite(values)]
            out[name] = psi(r["shares"], _shares(values, r["edges"]))
        elif r["kind"] == "categorical":
            keys = sorted(set(r["shares"]) | set(c["shares"]))
            out[name] = psi([r["shares"].get(k, 0.0) for k in keys], [c["shares"].get(k, 0.0) for k in keys])
    return out


# ------------------------------------------------------------------------------------------ checks
def _bad_ids(s: pd.Series) -> int:
    # the string checks run over the distinct ids (1M users, not 10M events); rows are counted only when some
    # distinct value is bad
    uniq = pd.Series(pd.unique(s), dtype=object)
    t = uniq.astype(str).str.strip()
    bad = (t.eq("") | t.str.lower().isin({"nan", "none", "null", "<na>"})).to_numpy()
    if not bad.any():
        return 0
    return int(s.isin(uniq[bad]).sum() + (s.isna().sum() if uniq[bad].isna().any() else 0))


def validate(ds: Dataset, reference: dict | None = None, *, min_rows: int = 100, min_users: int = 10,
             psi_error: float = PSI_ERROR, psi_warn: float = PSI_WARN, max_volume_change: float = 5.0,
             now: datetime | None = None) -> ValidationReport:
    """Schema and sanity checks (errors), statistics, and drift against `reference` (a `profile`)."""
    df = ds.interactions
    checks: list[Check] = []

    def check(name: str, ok: bool, message: str, severity: str = "error") -> None:
        checks.append(Check(name, bool(ok), message, severity))

    n = len(df)
    check("rows", n >= min_rows, f"{n} interactions (minimum {min_rows})")
    bad_u, bad_p = _bad_ids(df["user_id"]), _bad_ids(df["property_id"])
    check("user_id", bad_u == 0, f"{bad_u} empty/null user ids" if bad_u else "no empty ids")
    check("property_id", bad_p == 0, f"{bad_p} empty/null property ids" if bad_p else "no empty ids")
    ts = df["timestamp"]
    horizon = pd.Timestamp(now or datetime.now(UTC)) + timedelta(days=1)
    future, missing = int((ts > horizon).sum()), int(ts.isna().sum())
    check("timestamp", future == 0 and missing == 0,
          f"{missing} missing, {future} in the future" if future or missing else f"{ts.min()} → {ts.max()}")
    w = pd.to_numeric(df["weight"], errors="coerce")
    bad_w = int((~np.isfinite(w) | (w < 0)).sum())
    check("weight", bad_w == 0, f"{bad_w} negative or non-finite weights" if bad_w else "finite, non-negative")
    if "event_type" in df.columns:
        unknown = sorted(set(df["event_type"].dropna().astype(str)) - set(EVENT_WEIGHTS))
        check("event_type", not unknown, f"unknown event types {unknown[:5]}" if unknown else
              f"all in {sorted(EVENT_WEIGHTS)}")
    pairs = df.drop_duplicates(["user_id", "property_id"])
    multi = int((pairs.groupby("user_id").size() >= 2).sum())
    check("users with ≥2 properties", multi >= min_users,
          f"{multi} users can be split into train/test (minimum {min_users})")
    dup = int(df.duplicated().sum())
    check("duplicate rows", dup <= 0.05 * max(1, n), f"{dup} exact duplicate rows", "warning")
    if ds.items is not None:
        check("properties.property_id unique", ds.items.index.is_unique,
              "unique" if ds.items.index.is_unique else f"{int(ds.items.index.duplicated().sum())} duplicates")
        covered = float(df["property_id"].isin(ds.items.index).mean()) if n else 1.0
        check("properties coverage", covered >= 0.95,
              f"{covered:.1%} of interactions have a property row (features)", "warning" if covered >= 0.5 else "error")
        if "price" in ds.items.columns:
            price = pd.to_numeric(ds.items["price"], errors="coerce")
            bad = int((price <= 0).sum())
            check("properties.price", bad == 0, f"{bad} non-positive prices" if bad else "positive")
        for col, lo, hi in (("lat", -90, 90), ("lon", -180, 180)):
            if col in ds.items.columns:
                v = pd.to_numeric(ds.items[col], errors="coerce")
                bad = int(((v < lo) | (v > hi)).sum())
                check(f"properties.{col}", bad == 0, f"{bad} out of [{lo}, {hi}]" if bad else "in range")
    stats = profile(ds, pairs)
    drift: dict[str, float] = {}
    ref_snapshot = None
    if reference:
        ref_snapshot = reference.get("snapshot")
        drift = _drift(reference, ds, stats)
        drift_checks(check, drift, reference, n, psi_warn=psi_warn, psi_error=psi_error,
                     max_volume_change=max_volume_change)
    return ValidationReport(checks, stats, drift, ref_snapshot)
