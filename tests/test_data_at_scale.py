"""The data steps without whole-table pandas frames (issue #14.3): validation is one SQL implementation run by
DuckDB over the parquet files (`validate_dir`) or over a Dataset's frames (`validate`), and its report equals
the pandas implementation it replaced (frozen in tests/validation_pandas_reference.py) on clean, broken and
drifted data; the snapshot hash streams over record batches with the same value; build_features carries the
interactions file over without re-writing it; ingest of parquet streams record batches to the same tables.
Peak memory at scale is measured by benchmarks/data_steps.py, not here."""

from __future__ import annotations

import json
import math
import os
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest
import validation_pandas_reference as old
from rentalml.components import steps

from rentalml.data import validation as v
from rentalml.data.dataset import Dataset, snapshot_hash_dir
from rentalml.data.generator import generate_marketplace
from rentalml.data.loaders import ingest_parquet, load_dataset

NOW = datetime(2024, 6, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def clean():
    return generate_marketplace(n_users=300, n_properties=150, n_events=5000, seed=3)


def _broken(ds: Dataset) -> Dataset:
    df = ds.interactions.copy()
    df.loc[:4, "user_id"] = ""
    df.loc[5:6, "user_id"] = " nan "
    df.loc[7, "property_id"] = "None"
    df.loc[10:14, "weight"] = -1.0
    df.loc[15, "weight"] = np.nan
    df.loc[16, "weight"] = np.inf
    df.loc[20:22, "event_type"] = "click"
    df.loc[30:31, "timestamp"] = pd.Timestamp("2100-01-01", tz="UTC")
    df = pd.concat([df, df.iloc[100:400]], ignore_index=True)  # 300 exact duplicates: over the 5 % warning
    items = ds.items.iloc[10:].copy()  # interactions of 10 properties lose their feature row
    items.loc[items.index[:3], "price"] = -5.0
    items.loc[items.index[3], "lat"] = 123.0
    items = pd.concat([items, items.iloc[:2]])  # two duplicated property ids
    return Dataset(df, items, ds.users, name="broken")


def _drifted(ds: Dataset) -> Dataset:
    df = ds.interactions
    half = df["user_id"].isin(df["user_id"].unique()[::2])
    df = pd.concat([df[half], df[~half].drop_duplicates("user_id")])  # half the users with one property only
    items = ds.items.assign(price=ds.items["price"] * 3)  # rents tripled: a broken feed
    return Dataset(df, items, ds.users, name="drifted")


def _close(a, b, path: str = "") -> None:
    """Equal, floats to 1e-9 (DuckDB sums in another order than numpy; 1e-6 where pandas summed in float32);
    categorical shares equal as values,
    their labels equal except among labels tied at the top-20 cut (pandas left those in arbitrary order)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if path.endswith(".shares"):
            assert sorted(a.values()) == pytest.approx(sorted(b.values()), rel=1e-9, abs=1e-12), path
            cut = min(x for k, x in a.items() if k != "__other__")
            assert {k for k, x in a.items() if x > cut} == {k for k, x in b.items() if x > cut}, path
            return
        assert list(a) == list(b), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        assert math.isnan(b), path
    elif isinstance(a, float) or isinstance(b, float):  # users_per_property: pandas took float32 matrix sums
        assert a == pytest.approx(b, rel=1e-6 if "users_per_property" in path else 1e-9, abs=1e-12), path
    else:
        assert a == b, path


def _same_report(want: old.ValidationReport, got: v.ValidationReport) -> None:
    assert [c.__dict__ for c in got.checks] == [c.__dict__ for c in want.checks]
    assert got.ok == want.ok and got.reference_snapshot == want.reference_snapshot
    _close(want.stats, got.stats, "stats")
    _close(want.drift, got.drift, "drift")


@pytest.mark.parametrize("case", ["clean", "broken", "drifted"])
def test_duckdb_validation_reports_what_the_pandas_one_did(case, clean, tmp_path):
    ref = None
    ds = {"clean": lambda: clean, "broken": lambda: _broken(clean), "drifted": lambda: _drifted(clean)}[case]()
    if case == "drifted":  # the reference the pandas implementation accepted, as stored (JSON)
        ref = json.loads(json.dumps(old.validate(clean, now=NOW).stats, default=str))
    d = ds.save(tmp_path / case)
    loaded = Dataset.load(d)
    want = old.validate(loaded, ref, now=NOW)
    by_dir = v.validate_dir(d, ref, now=NOW)
    _same_report(want, by_dir)
    _same_report(want, v.validate(loaded, ref, now=NOW))
    assert by_dir.stats["snapshot"] == loaded.snapshot_hash()
    if case == "broken":
        failed = {c.name for c in by_dir.errors}
        assert {"user_id", "property_id", "weight", "event_type", "timestamp", "properties.property_id unique",
                "properties.price", "properties.lat"} <= failed
        assert "7 empty/null user ids" in by_dir.text() and "300 exact duplicate rows" in by_dir.text()
    if case == "drifted":
        assert by_dir.drift["properties.price"] > 0.25 and by_dir.drift["interactions.pairs_per_user"] > 0
        assert not by_dir.ok


def test_a_pandas_accepted_reference_shows_no_drift_on_the_same_data(clean, tmp_path):
    """The upgrade path: the reference on disk was written by the pandas implementation; the same data now
    validates with PSI 0 everywhere (categorical ties at the cut resolve to the reference's labels)."""
    ref = json.loads(json.dumps(old.validate(clean, now=NOW).stats, default=str))
    report = v.validate_dir(clean.save(tmp_path / "ds"), ref, now=NOW)
    assert report.ok and max(report.drift.values()) == pytest.approx(0.0, abs=1e-12)
    assert set(report.drift) == set(ref["features"])


def test_snapshot_hash_streams_with_the_same_value(clean, tmp_path):
    d = clean.save(tmp_path / "ds")
    want = Dataset.load(d).snapshot_hash()
    assert want == clean.snapshot_hash()
    assert snapshot_hash_dir(d) == snapshot_hash_dir(d, batch_rows=777) == want
    other = clean.subset(clean.interactions.assign(weight=clean.interactions["weight"] + 1))
    assert snapshot_hash_dir(other.save(tmp_path / "other")) != want


def test_build_features_carries_the_interactions_without_rewriting(clean, tmp_path):
    src = clean.save(tmp_path / "ds")
    out = tmp_path / "features"
    views = steps.build_features(src, out)
    assert "property_features" in views
    a, b = src / "interactions.parquet", out / "interactions.parquet"
    assert a.read_bytes() == b.read_bytes()  # the file itself: no pandas round trip
    assert os.path.samefile(a, b)  # a hard link (same file system); a copy across file systems
    pd.testing.assert_frame_equal(Dataset.load(out).interactions, Dataset.load(src).interactions)
    assert Dataset.load(out).snapshot_hash() == clean.snapshot_hash()
    clean.subset(clean.interactions.head(100)).save(out)  # a save over the link replaces it, never writes through
    assert not os.path.samefile(a, b) and Dataset.load(src).snapshot_hash() == clean.snapshot_hash()


def _ingest_old(spec, out) -> dict:
    ds = load_dataset(spec)
    ds.save(out)
    return {**ds.summary(), "snapshot": ds.snapshot_hash(), "source": ds.meta.get("source", spec)}


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_ingest_streams_parquet_to_the_same_tables(kind, clean, tmp_path):
    if kind == "file":  # aliased headers, unix-second timestamps, one weight missing: load_parquet's rules
        raw = clean.interactions.rename(columns={"user_id": "userId", "property_id": "listing_id"})
        raw = raw.assign(timestamp=raw["timestamp"].astype("int64") // 10**9,
                         weight=raw["weight"].where(raw.index != 3))
        spec = tmp_path / "events.parquet"
        raw.to_parquet(spec)
    else:
        spec = clean.save(tmp_path / "saved")
    want = _ingest_old(str(spec), tmp_path / "old")
    got = steps.ingest(str(spec), tmp_path / "new")
    assert got == want
    a, b = Dataset.load(tmp_path / "old"), Dataset.load(tmp_path / "new")
    pd.testing.assert_frame_equal(b.interactions, a.interactions)
    for x, y in ((a.items, b.items), (a.users, b.users)):
        assert (x is None and y is None) or x.equals(y)
    assert got["snapshot"] == b.snapshot_hash() == snapshot_hash_dir(tmp_path / "new")
    assert ingest_parquet(str(spec), tmp_path / "small", batch_rows=701) == want  # many record batches


def test_ingest_of_other_sources_is_not_streamed(tmp_path):
    assert ingest_parquet("synthetic:50,20,300", tmp_path) is None
    assert not (tmp_path / "interactions.parquet").exists()
