"""Data validation before training: schema checks, statistics, and drift against the last accepted snapshot.

`validate(dataset, reference)` returns a `ValidationReport` (errors, warnings, statistics, PSI per feature);
`report.ok` is False when an error-level check fails (the pipeline's validate step then fails the run and
prints `report.text()`). `profile(dataset)` is what gets stored as the accepted reference.

`validate_dir(path, reference)` does the same over a saved dataset directory without loading it: every check
and statistic is one SQL implementation run by DuckDB, over the parquet files there or over the frames of an
in-memory `Dataset` (DuckDB's pandas scan), so 10M interactions never become a pandas frame in the pipeline.

Drift is the population stability index (PSI) between the reference and the new data, on binned numeric
distributions (reference deciles) and on categorical shares: < 0.1 stable, 0.1–0.25 a warning, above
`psi_error` (default 0.25) an error.
"""

from __future__ import annotations

import html
import json
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from rentalml.data.dataset import Dataset, snapshot_hash_dir
from rentalml.schema import EVENT_WEIGHTS, PROPERTY_CATEGORICAL, PROPERTY_NUMERIC

PSI_WARN = 0.1
PSI_ERROR = 0.25
_EPS = 1e-4
_TOP = 20  # categorical values kept per column (the rest is "__other__")


@dataclass
class Check:
    name: str
    ok: bool
    message: str
    severity: str = "error"  # error | warning


@dataclass
class ValidationReport:
    checks: list[Check]
    stats: dict
    drift: dict[str, float] = field(default_factory=dict)
    reference_snapshot: str | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks if c.severity == "error")

    @property
    def errors(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and c.severity == "error"]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and c.severity == "warning"]

    def text(self) -> str:
        s = self.stats
        lines = [f"data validation {'PASSED' if self.ok else 'FAILED'}: {s.get('dataset')} "
                 f"(snapshot {s.get('snapshot')}, {s.get('rows')} interactions, {s.get('users')} users, "
                 f"{s.get('properties')} properties)"]
        if self.reference_snapshot:
            lines.append(f"drift against accepted snapshot {self.reference_snapshot}")
        else:
            lines.append("no accepted snapshot yet: drift not checked")
        for c in self.checks:
            mark = "ok  " if c.ok else ("FAIL" if c.severity == "error" else "WARN")
            lines.append(f"  [{mark}] {c.name}: {c.message}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "checks": [c.__dict__ for c in self.checks], "stats": self.stats,
                "drift": self.drift, "reference_snapshot": self.reference_snapshot}

    def html(self) -> str:
        rows = "".join(
            f"<tr style='background:{'#eaf5ea' if c.ok else ('#fbe3e3' if c.severity == 'error' else '#fff4d6')}'>"
            f"<td>{'ok' if c.ok else c.severity}</td><td>{html.escape(c.name)}</td>"
            f"<td>{html.escape(c.message)}</td></tr>" for c in self.checks)
        drift = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>" for k, v in sorted(self.drift.items()))
        stats = html.escape(json.dumps({k: v for k, v in self.stats.items() if k != "features"}, indent=2,
                                       default=str))
        return ("<html><body style='font-family:sans-serif'>"
                f"<h1>Data validation: {'passed' if self.ok else 'FAILED'}</h1>"
                f"<p>reference snapshot: {html.escape(str(self.reference_snapshot))}</p>"
                f"<table border=1 cellpadding=4><tr><th>status</th><th>check</th><th>detail</th></tr>{rows}</table>"
                f"<h2>Drift (PSI)</h2><table border=1 cellpadding=4><tr><th>feature</th><th>PSI</th></tr>{drift}"
                f"</table><h2>Statistics</h2><pre>{stats}</pre></body></html>")


# ------------------------------------------------------------------------------------------ SQL engine
# One implementation of the checks and statistics: SQL in DuckDB over two relations, `interactions` and
# `properties`, that are either views over the parquet files of a dataset directory (`validate_dir`, the
# pipeline's step: nothing is loaded into pandas, DuckDB streams the row groups and spills to disk past
# `memory_limit`) or scans of the frames of an in-memory `Dataset` (`validate`, through DuckDB's pandas scan,
# no copy).
_QS = [float(q) for q in np.linspace(0, 1, 11)]  # the decile edges (the same floats numpy's quantile gets)
_NUMERIC = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
            "UBIGINT", "FLOAT", "DOUBLE", "DECIMAL")


_DB: duckdb.DuckDBPyConnection | None = None
_DB_LOCK = threading.Lock()


def _connect(memory_limit: str | None = None) -> duckdb.DuckDBPyConnection:
    """A connection (a cursor: its own views and temp tables) to the process's in-memory DuckDB: opening a
    database costs ~25 ms, a cursor ~1 ms. The memory limit is the database's, so the last one set holds."""
    global _DB
    if memory_limit is None:
        from rentalml.config import get_settings

        memory_limit = get_settings().train.data_memory
    with _DB_LOCK:
        if _DB is None:
            _DB = duckdb.connect()
            _DB.execute("SET preserve_insertion_order = false")
            spill = Path(tempfile.gettempdir()) / "rentalml-duckdb"  # not the working dir (read-only in a pod)
            _DB.execute("SET temp_directory = '" + str(spill).replace("'", "''") + "'")
        con = _DB.cursor()
    con.execute(f"SET memory_limit = '{memory_limit}'")
    return con


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _dlist(values) -> str:
    """A DuckDB DOUBLE[] literal with the exact floats (parsed from their repr, never via DECIMAL)."""
    return "[" + ",".join(f"CAST('{float(v)!r}' AS DOUBLE)" for v in values) + "]::DOUBLE[]"


def _columns(con, rel: str) -> dict[str, str]:
    return {r[0]: r[1] for r in con.execute(f"DESCRIBE {rel}").fetchall()}


def _num(expr: str) -> str:
    return f"TRY_CAST({expr} AS DOUBLE)"


def _label(col: str, dtype: str) -> str:
    """`Series.astype(str)` in SQL: True/False for booleans, None (strings) / nan (numbers) for nulls."""
    c = _ident(col)
    if dtype == "BOOLEAN":
        return f"CASE WHEN {c} IS NULL THEN 'None' WHEN {c} THEN 'True' ELSE 'False' END"
    null = "'nan'" if dtype.startswith(_NUMERIC) else "'None'"
    return f"coalesce(CAST({c} AS VARCHAR), {null})"


def _bin_sql(expr: str, edges) -> str:
    """The bin of `_shares` ((-inf, e1], (e1, e2], ..., (e_last-1, +inf)) as a CASE over the inner edges."""
    inner = [float(e) for e in list(edges)[1:-1]]
    if not inner:
        return "0"
    whens = " ".join(f"WHEN {expr} <= CAST('{e!r}' AS DOUBLE) THEN {i}" for i, e in enumerate(inner))
    return f"CASE {whens} ELSE {len(inner)} END"


def _shares_sql(con, rel: str, expr: str, edges) -> list[float]:
    """`_shares` of the finite values of `expr` in `rel`."""
    k = max(0, len(list(edges)) - 2)
    rows = con.execute(f"SELECT {_bin_sql('v', edges)} AS b, count(*) FROM (SELECT {expr} AS v FROM {rel}) "
                       "WHERE isfinite(v) GROUP BY b").fetchall()
    counts = np.zeros(k + 1)
    for b, c in rows:
        counts[int(b)] = c
    return (counts / max(1.0, counts.sum())).tolist()


def _numeric_profile_sql(con, rel: str, expr: str) -> dict:
    """`_numeric_profile` of the DOUBLE expression `expr` over `rel` (nulls and non-finite values are missing)."""
    n, k, mean, std, lo, hi, qs = con.execute(
        f"SELECT count(*), count(v) FILTER (isfinite(v)), avg(v) FILTER (isfinite(v)), "
        f"stddev_samp(v) FILTER (isfinite(v)), min(v) FILTER (isfinite(v)), max(v) FILTER (isfinite(v)), "
        f"quantile_cont(v, {_dlist(_QS)}) FILTER (isfinite(v)) FROM (SELECT {expr} AS v FROM {rel})").fetchall()[0]
    out = {"kind": "numeric", "null_frac": float(1 - k / max(1, n))}
    if k:
        edges = np.unique(np.asarray(qs, dtype=float))
        out.update(mean=float(mean), std=float("nan") if std is None else float(std), min=float(lo),
                   max=float(hi), edges=edges.tolist(), shares=_shares_sql(con, rel, expr, edges))
    return out


def _categorical_profile_sql(con, rel: str, col: str, dtype: str, prefer=()) -> dict:
    """`_categorical_profile` of column `col`: the top `_TOP` labels by share, the rest `__other__`. Ties at the
    cut go to the labels in `prefer` (the reference's), then by label: the same data gives the same bins as
    its reference, so a PSI of 0 (pandas' value_counts left such ties in arbitrary order)."""
    rows = con.execute(f"SELECT {_label(col, dtype)} AS k, count(*) AS c FROM {rel} GROUP BY k").fetchall()
    prefer = set(prefer)
    rows.sort(key=lambda r: (-r[1], r[0] not in prefer, r[0]))
    total = float(sum(c for _, c in rows))
    shares = {str(k): c / total for k, c in rows[:_TOP]}
    if len(rows) > _TOP:
        shares["__other__"] = float(sum(c for _, c in rows[_TOP:]) / total)
    nulls, distinct = con.execute(f"SELECT count(*) - count({_ident(col)}), count(DISTINCT {_ident(col)}) "
                                  f"FROM {rel}").fetchall()[0]
    return {"kind": "categorical", "null_frac": float(nulls / total) if total else float("nan"),
            "shares": shares, "distinct": int(distinct)}


def _frame_profile(s: pd.Series, numeric: bool) -> dict:
    """A profile of one in-memory series (the monitoring reference's features)."""
    con = _connect()
    try:
        con.register("s", pd.DataFrame({"v": s.to_numpy(dtype=float) if numeric else s.astype(object)}))
        if numeric:
            return _numeric_profile_sql(con, "s", "v")
        return _categorical_profile_sql(con, "s", "v", _columns(con, "s")["v"])
    finally:
        con.close()


# ------------------------------------------------------------------------------------------ statistics
def _numeric_profile(s: pd.Series) -> dict:
    """Profile of a numeric series (the monitoring reference uses it too): same SQL as the validation."""
    return _frame_profile(pd.to_numeric(s, errors="coerce"), numeric=True)


def _categorical_profile(s: pd.Series) -> dict:
    return _frame_profile(s, numeric=False)


def _shares(values: np.ndarray, edges: list | np.ndarray) -> list[float]:
    """Shares of `values` in the bins (-inf, e1], (e1, e2], ..., (e_last-1, +inf) of the reference edges."""
    inner = np.asarray(edges, dtype=float)[1:-1]
    idx = np.searchsorted(inner, values, side="left")
    counts = np.bincount(idx, minlength=len(inner) + 1).astype(float)
    return (counts / max(1.0, counts.sum())).tolist()


class _Tables:
    """The two relations of one validation run and what is known about them."""

    def __init__(self, con: duckdb.DuckDBPyConnection, name: str, snapshot: Callable[[], str], has_items: bool):
        self.con, self.name, self.snapshot, self.has_items = con, name, snapshot, has_items
        self.cols = _columns(con, "interactions")
        self.item_cols = _columns(con, "properties") if has_items else {}
        # distinct (user, property) pairs per user: the 10M-row step, done once (DuckDB spills past its limit)
        con.execute("CREATE TEMP TABLE per_user AS SELECT user_id, count(DISTINCT property_id) AS n "
                    "FROM interactions WHERE user_id IS NOT NULL GROUP BY user_id")

    def one(self, sql: str):
        return self.con.execute(sql).fetchall()[0]


def _profile_sql(t: _Tables, reference: dict | None = None) -> dict:
    con = t.con
    ref_feats = (reference or {}).get("features", {})

    def prefer(name: str) -> list[str]:
        return list(ref_feats.get(name, {}).get("shares", {}))

    rows, users, props, ts_min, ts_max = t.one(
        "SELECT count(*), count(DISTINCT user_id), count(DISTINCT property_id), "
        "epoch_ns(min(timestamp)), epoch_ns(max(timestamp)) FROM interactions")
    pairs = int(t.one("SELECT coalesce(sum(n), 0) FROM per_user")[0])
    per_item = "(SELECT count(DISTINCT user_id) AS n FROM interactions WHERE property_id IS NOT NULL " \
               "GROUP BY property_id)"
    stats: dict = {
        "dataset": t.name, "snapshot": t.snapshot(), "rows": int(rows), "users": int(users),
        "properties": int(props), "pairs": pairs,
        "catalogue": int(t.one("SELECT count(*) FROM properties")[0]) if t.has_items else int(props),
        "first_event": _ts_str(ts_min), "last_event": _ts_str(ts_max), "features": {},
    }
    if users:
        q = t.one(f"SELECT quantile_cont(n, {_dlist([.5, .9, .99])}) FROM per_user")[0]
        stats["pairs_per_user"] = dict(zip(("p50", "p90", "p99"), map(float, q), strict=True))
    else:
        stats["pairs_per_user"] = {}
    q = t.one(f"SELECT quantile_cont(n, {_dlist([.5, .9])}) FROM {per_item}")[0] if props else None
    stats["users_per_property"] = dict(zip(("p50", "p90"), map(float, q), strict=True)) if q else {}
    stats = {k: stats[k] for k in ("dataset", "snapshot", "rows", "users", "properties", "pairs", "catalogue",
                                   "first_event", "last_event", "pairs_per_user", "users_per_property",
                                   "features")}  # the key order of the reports before
    feats = stats["features"]
    feats["interactions.pairs_per_user"] = _numeric_profile_sql(con, "per_user", "CAST(n AS DOUBLE)")
    feats["interactions.weight"] = _numeric_profile_sql(con, "interactions", _num("weight"))
    if "event_type" in t.cols:
        feats["interactions.event_type"] = _categorical_profile_sql(con, "interactions", "event_type",
                                                                    t.cols["event_type"],
                                                                    prefer("interactions.event_type"))
    for col in PROPERTY_NUMERIC:
        v = _num(_ident(col))
        if col in t.item_cols and t.one(f"SELECT count({v}) FILTER (NOT isnan({v})) FROM properties")[0]:
            feats[f"properties.{col}"] = _numeric_profile_sql(con, "properties", _num(_ident(col)))
    for col in PROPERTY_CATEGORICAL:
        if col in t.item_cols:
            feats[f"properties.{col}"] = _categorical_profile_sql(con, "properties", col, t.item_cols[col],
                                                                        prefer(f"properties.{col}"))
    return stats


def _ts_str(ns: int | None) -> str:
    return str(pd.Timestamp(ns, tz="UTC")) if ns is not None else str(pd.NaT)


def psi(expected: list[float] | np.ndarray, actual: list[float] | np.ndarray) -> float:
    e = np.clip(np.asarray(expected, dtype=float), _EPS, None)
    a = np.clip(np.asarray(actual, dtype=float), _EPS, None)
    return float(np.sum((a - e) * np.log(a / e)))


def _drift_sql(ref: dict, t: _Tables, cur: dict) -> dict[str, float]:
    out = {}
    for name, r in ref.get("features", {}).items():
        c = cur["features"].get(name)
        if c is None or r.get("kind") != c.get("kind"):
            continue
        if r["kind"] == "numeric" and "edges" in r:
            table, col = name.split(".", 1)
            if name == "interactions.pairs_per_user":
                rel, expr = "per_user", "CAST(n AS DOUBLE)"
            else:
                rel, expr = table, _num(_ident(col))
            out[name] = psi(r["shares"], _shares_sql(t.con, rel, expr, r["edges"]))
        elif r["kind"] == "categorical":
            keys = sorted(set(r["shares"]) | set(c["shares"]))
            out[name] = psi([r["shares"].get(k, 0.0) for k in keys], [c["shares"].get(k, 0.0) for k in keys])
    return out


# ------------------------------------------------------------------------------------------ checks
def drift_checks(check: Callable[..., None], drift: dict[str, float], reference: dict, n: int, *, psi_warn: float,
                 psi_error: float, max_volume_change: float) -> None:
    """The checks a reference adds: one per drifted feature (a warning past `psi_warn`, an error past
    `psi_error`) and the volume against the accepted snapshot's rows."""
    for name, value in sorted(drift.items()):
        sev = "error" if value > psi_error else "warning"
        check(f"drift {name}", value <= psi_warn, f"PSI {value:.3f} (warn > {psi_warn}, fail > {psi_error})", sev)
    ratio = n / max(1, reference.get("rows", n))
    check("volume", 1 / max_volume_change <= ratio <= max_volume_change,
          f"{n} rows vs {reference.get('rows')} in the accepted snapshot (×{ratio:.2f})")


def _bad_ids(t: _Tables, col: str) -> int:
    # the string tests run over the distinct ids (1M users, not 10M events), rows counted per distinct value
    c = _ident(col)
    return int(t.one(
        f"SELECT coalesce(sum(k), 0) FROM (SELECT {c} AS v, count(*) AS k FROM interactions GROUP BY {c}) "
        r"WHERE v IS NULL OR lower(regexp_replace(CAST(v AS VARCHAR), '^\s+|\s+$', '', 'g')) "
        "IN ('', 'nan', 'none', 'null', '<na>')")[0])


def _validate(t: _Tables, reference: dict | None, **kw) -> ValidationReport:
    try:
        return _checks(t, reference, **kw)
    finally:
        t.con.close()  # its temp table and views go with it


def _checks(t: _Tables, reference: dict | None, *, min_rows: int, min_users: int, psi_error: float,
            psi_warn: float, max_volume_change: float, now: datetime | None) -> ValidationReport:
    checks: list[Check] = []

    def check(name: str, ok: bool, message: str, severity: str = "error") -> None:
        checks.append(Check(name, bool(ok), message, severity))

    n = int(t.one("SELECT count(*) FROM interactions")[0])
    check("rows", n >= min_rows, f"{n} interactions (minimum {min_rows})")
    bad_u, bad_p = _bad_ids(t, "user_id"), _bad_ids(t, "property_id")
    check("user_id", bad_u == 0, f"{bad_u} empty/null user ids" if bad_u else "no empty ids")
    check("property_id", bad_p == 0, f"{bad_p} empty/null property ids" if bad_p else "no empty ids")
    horizon = pd.Timestamp(now or datetime.now(UTC)) + timedelta(days=1)
    horizon = horizon.tz_localize("UTC") if horizon.tzinfo is None else horizon
    future, missing, ts_min, ts_max = t.one(
        f"SELECT count(*) FILTER (epoch_ns(timestamp) > {int(horizon.value)}), count(*) - count(timestamp), "
        "epoch_ns(min(timestamp)), epoch_ns(max(timestamp)) FROM interactions")
    check("timestamp", future == 0 and missing == 0,
          f"{missing} missing, {future} in the future" if future or missing else
          f"{_ts_str(ts_min)} → {_ts_str(ts_max)}")
    bad_w = int(t.one(f"SELECT count(*) FILTER (w IS NULL OR NOT isfinite(w) OR w < 0) "
                      f"FROM (SELECT {_num('weight')} AS w FROM interactions)")[0])
    check("weight", bad_w == 0, f"{bad_w} negative or non-finite weights" if bad_w else "finite, non-negative")
    if "event_type" in t.cols:
        seen = {r[0] for r in t.con.execute("SELECT DISTINCT CAST(event_type AS VARCHAR) FROM interactions "
                                            "WHERE event_type IS NOT NULL").fetchall()}
        unknown = sorted(seen - set(EVENT_WEIGHTS))
        check("event_type", not unknown, f"unknown event types {unknown[:5]}" if unknown else
              f"all in {sorted(EVENT_WEIGHTS)}")
    multi = int(t.one("SELECT count(*) FROM per_user WHERE n >= 2")[0])
    check("users with ≥2 properties", multi >= min_users,
          f"{multi} users can be split into train/test (minimum {min_users})")
    dup = n - int(t.one("SELECT count(*) FROM (SELECT DISTINCT * FROM interactions)")[0])
    check("duplicate rows", dup <= 0.05 * max(1, n), f"{dup} exact duplicate rows", "warning")
    if t.has_items:
        n_items, distinct = t.one("SELECT count(*), count(DISTINCT property_id) FROM properties")
        unique = n_items == distinct
        check("properties.property_id unique", unique, "unique" if unique else f"{n_items - distinct} duplicates")
        hit = int(t.one("SELECT count(*) FROM interactions WHERE property_id IN "
                        "(SELECT property_id FROM properties)")[0])
        covered = hit / n if n else 1.0
        check("properties coverage", covered >= 0.95,
              f"{covered:.1%} of interactions have a property row (features)", "warning" if covered >= 0.5 else "error")
        if "price" in t.item_cols:
            bad = int(t.one(f"SELECT count(*) FILTER ({_num('price')} <= 0) FROM properties")[0])
            check("properties.price", bad == 0, f"{bad} non-positive prices" if bad else "positive")
        for col, lo, hi in (("lat", -90, 90), ("lon", -180, 180)):
            if col in t.item_cols:
                v = _num(_ident(col))
                bad = int(t.one(f"SELECT count(*) FILTER ({v} < {lo} OR {v} > {hi}) FROM properties")[0])
                check(f"properties.{col}", bad == 0, f"{bad} out of [{lo}, {hi}]" if bad else "in range")
    stats = _profile_sql(t, reference)
    drift: dict[str, float] = {}
    ref_snapshot = None
    if reference:
        ref_snapshot = reference.get("snapshot")
        drift = _drift_sql(reference, t, stats)
        drift_checks(check, drift, reference, n, psi_warn=psi_warn, psi_error=psi_error,
                     max_volume_change=max_volume_change)
    return ValidationReport(checks, stats, drift, ref_snapshot)


def _frame_tables(ds: Dataset, memory_limit: str | None = None) -> _Tables:
    con = _connect(memory_limit)
    con.register("interactions", ds.interactions)
    if ds.items is not None:
        keep = [c for c in (*PROPERTY_NUMERIC, *PROPERTY_CATEGORICAL) if c in ds.items.columns]
        con.register("properties", ds.items[keep].rename_axis("property_id").reset_index())
    return _Tables(con, ds.name, ds.snapshot_hash, ds.items is not None)


def _dir_tables(directory: str | Path, name: str | None = None, memory_limit: str | None = None) -> _Tables:
    d = Path(directory)
    if not (d / "interactions.parquet").exists():
        raise FileNotFoundError(f"{d}/interactions.parquet not found")
    con = _connect(memory_limit)

    def path(p: Path) -> str:
        return "'" + str(p).replace("'", "''") + "'"

    con.execute(f"CREATE TEMP VIEW interactions AS SELECT * FROM read_parquet({path(d / 'interactions.parquet')})")
    has_items = (d / "properties.parquet").exists()
    if has_items:
        con.execute(f"CREATE TEMP VIEW properties AS SELECT * FROM read_parquet({path(d / 'properties.parquet')})")
        if "property_id" not in _columns(con, "properties"):  # ids in the index column: the frame path knows it
            con.close()
            return _frame_tables(Dataset.load(d, name), memory_limit)
    return _Tables(con, name or d.name, lambda: snapshot_hash_dir(d), has_items)


def profile(ds: Dataset) -> dict:
    """Statistics of a dataset, and the per-feature distributions drift is measured against."""
    t = _frame_tables(ds)
    try:
        return _profile_sql(t)
    finally:
        t.con.close()


def validate(ds: Dataset, reference: dict | None = None, *, min_rows: int = 100, min_users: int = 10,
             psi_error: float = PSI_ERROR, psi_warn: float = PSI_WARN, max_volume_change: float = 5.0,
             now: datetime | None = None) -> ValidationReport:
    """Schema and sanity checks (errors), statistics, and drift against `reference` (a `profile`) of an
    in-memory dataset (the same SQL as `validate_dir`, over DuckDB scans of its frames)."""
    return _validate(_frame_tables(ds), reference, min_rows=min_rows, min_users=min_users, psi_error=psi_error,
                     psi_warn=psi_warn, max_volume_change=max_volume_change, now=now)


def validate_dir(directory: str | Path, reference: dict | None = None, *, name: str | None = None,
                 min_rows: int = 100, min_users: int = 10, psi_error: float = PSI_ERROR, psi_warn: float = PSI_WARN,
                 max_volume_change: float = 5.0, now: datetime | None = None,
                 memory_limit: str | None = None) -> ValidationReport:
    """`validate` of a saved dataset directory (`Dataset.save`), without loading it: DuckDB reads the parquet
    files (its memory bounded by `memory_limit`, default settings.train.data_memory, i.e.
    RENTALML_TRAIN__DATA_MEMORY, 2GB; it spills to disk past it) and the snapshot hash streams over record
    batches. Same report as `validate(Dataset.load(directory))`."""
    return _validate(_dir_tables(directory, name, memory_limit), reference, min_rows=min_rows,
                     min_users=min_users, psi_error=psi_error, psi_warn=psi_warn,
                     max_volume_change=max_volume_change, now=now)


# ------------------------------------------------------------------------------------------ reference store
def reference_path(directory: str | Path) -> Path:
    return Path(directory) / "accepted.json"


def load_reference(directory: str | Path) -> dict | None:
    p = reference_path(directory)
    return json.loads(p.read_text()) if p.exists() else None


def accept(report: ValidationReport, directory: str | Path) -> Path:
    """Store the validated statistics as the accepted reference (and keep a copy per snapshot)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    doc = json.dumps(report.stats, indent=2, default=str)
    (d / f"{report.stats['snapshot']}.json").write_text(doc)
    tmp = d / ".accepted.json.tmp"
    tmp.write_text(doc)
    tmp.replace(reference_path(d))
    return reference_path(d)
