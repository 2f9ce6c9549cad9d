"""The in-memory dataset every part works on, and its sparse user × item view.

`Dataset.interactions` has columns user_id, property_id (str), timestamp (UTC datetime64), weight (float)
and optionally event_type/event_id/session_id. `items` (index property_id) and `users` (index user_id)
are optional feature tables.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp


@dataclass
class Dataset:
    interactions: pd.DataFrame
    items: pd.DataFrame | None = None
    users: pd.DataFrame | None = None
    name: str = "dataset"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        df = self.interactions
        missing = {"user_id", "property_id"} - set(df.columns)
        if missing:
            raise ValueError(f"interactions lack columns {sorted(missing)}")
        df = df.copy(deep=False)  # columns are replaced, never written in place: no copy of a 10M-row frame
        for col in ("user_id", "property_id"):
            if not pd.api.types.is_string_dtype(df[col]):  # object columns of str pass without a copy
                df[col] = df[col].astype(str)
        if "weight" not in df.columns:
            df["weight"] = 1.0
        if "timestamp" not in df.columns:
            df["timestamp"] = pd.Timestamp("1970-01-01", tz="UTC") + pd.to_timedelta(np.arange(len(df)), "s")
        if not isinstance(df["timestamp"].dtype, pd.DatetimeTZDtype) or str(df["timestamp"].dt.tz) != "UTC":
            df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True)
        self.interactions = df.reset_index(drop=True) if not isinstance(df.index, pd.RangeIndex) or \
            df.index.start != 0 or df.index.step != 1 else df
        self.items = _feature_table(self.items, "property_id")
        self.users = _feature_table(self.users, "user_id")

    # ------------------------------------------------------------------ io
    def save(self, directory: str | Path, rows_per_write: int = 1 << 20) -> Path:
        """interactions.parquet (written `rows_per_write` rows at a time: the Arrow copy of a 10M-row frame is
        never whole), properties.parquet, users.parquet. Each file is written aside and renamed into place, so
        a file hard-linked from another directory (`link_interactions`) is replaced, never written through."""
        import pyarrow as pa

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        df = self.interactions
        chunks = (df.iloc[start:start + rows_per_write] for start in range(0, max(1, len(df)), rows_per_write))
        write_interactions(d / "interactions.parquet", chunks, pa.Schema.from_pandas(df, preserve_index=False))
        save_feature_tables(d, self.items, self.users)
        return d

    @classmethod
    def load(cls, directory: str | Path, name: str | None = None) -> Dataset:
        d = Path(directory)
        if not (d / "interactions.parquet").exists():
            raise FileNotFoundError(f"{d}/interactions.parquet not found")
        items, users = load_feature_tables(d)
        return cls(pd.read_parquet(d / "interactions.parquet"), items, users, name=name or d.name)

    def snapshot_hash(self) -> str:
        """Content hash of the interactions (and item ids): lineage for MLflow and bundles."""
        h = hashlib.sha256()
        h.update(_row_hashes(self.interactions))
        if self.items is not None:
            h.update(_id_hashes(self.items.index))
        return h.hexdigest()[:16]

    def subset(self, interactions: pd.DataFrame) -> Dataset:
        return Dataset(interactions, self.items, self.users, name=self.name, meta=dict(self.meta))

    def summary(self) -> dict:
        df = self.interactions
        return {
            "name": self.name,
            "interactions": len(df),
            "users": int(df["user_id"].nunique()),
            "properties": int(df["property_id"].nunique()),
            "catalogue": int(len(self.items)) if self.items is not None else int(df["property_id"].nunique()),
        }


_HASHED = ["user_id", "property_id", "timestamp", "weight"]


def _feature_table(table: pd.DataFrame | None, key: str) -> pd.DataFrame | None:
    """A property/user table indexed by its str id (`key` column or the index)."""
    if table is None:
        return None
    table = table.copy()
    if key in table.columns:
        table = table.set_index(key)
    table.index = table.index.astype(str)
    return table


@contextmanager
def _replacing(path: Path):
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def save_feature_tables(directory: str | Path, items: pd.DataFrame | None, users: pd.DataFrame | None) -> None:
    """properties.parquet and users.parquet of `Dataset.save`."""
    d = Path(directory)
    for table, name in ((items, "properties.parquet"), (users, "users.parquet")):
        if table is not None:
            with _replacing(d / name) as tmp:
                table.reset_index().to_parquet(tmp, index=False)


def load_feature_tables(directory: str | Path) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The properties and users tables of a saved dataset as `Dataset.load` gives them, without its
    interactions."""
    d = Path(directory)
    items = pd.read_parquet(d / "properties.parquet") if (d / "properties.parquet").exists() else None
    users = pd.read_parquet(d / "users.parquet") if (d / "users.parquet").exists() else None
    return _feature_table(items, "property_id"), _feature_table(users, "user_id")


def link_interactions(src_dir: str | Path, dst_dir: str | Path) -> Path:
    """Carry a saved dataset's interactions.parquet into `dst_dir` as it is: a hard link (a copy across file
    systems), never a read and re-write."""
    import os
    import shutil

    src, dst = Path(src_dir) / "interactions.parquet", Path(dst_dir) / "interactions.parquet"
    if not src.exists():
        raise FileNotFoundError(f"{src} not found")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


def _row_hashes(interactions: pd.DataFrame) -> bytes:
    """The per-row hashes `snapshot_hash` digests: a row's hash depends on that row only, so the digest of a
    file's record batches in order is the digest of the whole frame."""
    return pd.util.hash_pandas_object(interactions[_HASHED], index=False).values.tobytes()


def _id_hashes(ids: pd.Index | pd.Series) -> bytes:
    """The property ids' part of `snapshot_hash`."""
    return pd.util.hash_pandas_object(pd.Series(ids), index=False).values.tobytes()


def write_interactions(path: Path, frames: Iterable[pd.DataFrame], schema) -> None:
    """Interaction frames appended one after another to the parquet file `path` (pyarrow `schema`), written aside
    and renamed into place: the file is never one Arrow table, and a hard link at `path` is never written
    through."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _replacing(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for df in frames:
            writer.write_table(pa.Table.from_pandas(df, schema=schema, preserve_index=False))


def snapshot_hash_dir(directory: str | Path, batch_rows: int = 1 << 20) -> str:
    """`Dataset.load(directory).snapshot_hash()` without loading the directory: the interactions stream through
    pyarrow record batches of `batch_rows` (each normalised as `Dataset` does), the properties' ids are read
    alone. Same value for the same data."""
    import pyarrow.parquet as pq

    d = Path(directory)
    pf = pq.ParquetFile(d / "interactions.parquet")
    names = set(pf.schema_arrow.names)
    props = d / "properties.parquet"
    if not set(_HASHED) <= names or (props.exists() and "property_id" not in pq.read_schema(props).names):
        return Dataset.load(d).snapshot_hash()  # defaults filled by position / ids in an index column: rare
    h = hashlib.sha256()
    for batch in pf.iter_batches(batch_size=batch_rows, columns=_HASHED):
        h.update(_row_hashes(Dataset(batch.to_pandas()).interactions))
    if props.exists():
        h.update(_id_hashes(pq.read_table(props, columns=["property_id"]).column(0).to_pandas().astype(str)))
    return h.hexdigest()[:16]


def pair_indices(pairs: pd.DataFrame, item_ids: np.ndarray, user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pair's row (its user_id's position in `user_ids`) and column (its property_id's in `item_ids`); -1 where
    the id is not in the map. What every users × items matrix built from pairs indexes by."""
    return pd.Index(user_ids).get_indexer(pairs["user_id"]), pd.Index(item_ids).get_indexer(pairs["property_id"])


@dataclass
class InteractionMatrix:
    """Users × items CSR with the id maps that give dense indices (indices exist only inside models)."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    matrix: sp.csr_matrix  # weights (summed over repeated events)

    @classmethod
    def build(cls, train: pd.DataFrame, item_ids: np.ndarray | None = None,
              user_ids: np.ndarray | None = None) -> InteractionMatrix:
        if item_ids is None:
            item_ids = np.array(sorted(train["property_id"].unique()), dtype=object)
        if user_ids is None:
            user_ids = np.array(sorted(train["user_id"].unique()), dtype=object)
        rows, cols = pair_indices(train, item_ids, user_ids)
        keep = (rows >= 0) & (cols >= 0)
        w = train["weight"].to_numpy(dtype=np.float32)[keep]
        m = sp.csr_matrix((w, (rows[keep], cols[keep])), shape=(len(user_ids), len(item_ids)), dtype=np.float32)
        m.sum_duplicates()
        return cls(np.asarray(user_ids, dtype=object), np.asarray(item_ids, dtype=object), m)

    @property
    def n_users(self) -> int:
        return self.matrix.shape[0]

    @property
    def n_items(self) -> int:
        return self.matrix.shape[1]

    def binary(self) -> sp.csr_matrix:
        b = self.matrix.copy()
        b.data[:] = 1.0
        return b

    def item_index(self) -> pd.Index:
        return pd.Index(self.item_ids)

    def user_index(self) -> pd.Index:
        return pd.Index(self.user_ids)


#: a session is a run of at most this many consecutive pairs of one user in time order. Measured on
#: ml-latest-small (seed 1, collective EASE on test): runs of 10 / 20 / 40 gave 0.4119 / 0.4130 / 0.4083 against
#: EASE's 0.3900, a 30-minute gap 0.4018 and a one-day gap 0.3950 (docs/benchmarks.md, issue 14 point 2)
SESSION_LENGTH = 20


def session_matrix(pairs: pd.DataFrame, item_ids: np.ndarray, user_ids: np.ndarray,
                   length: int = SESSION_LENGTH, always: bool = False) -> sp.csr_matrix | None:
    """Sessions × items (0/1, float32 CSR): each user's pairs in time order (ties by property id), cut into runs
    of `length`. Items a user touched in one run are co-used more tightly than two items anywhere in the same
    history: the item-item model adds this matrix's Gram to XᵀX (models.itemitem, `session`). None when no user
    has more than `length` pairs (every run is the whole history, so it would add nothing; `always`: the runs
    even then, for a window appended to earlier runs) or the pairs have no timestamp. Pairs outside the id maps
    are dropped."""
    if "timestamp" not in pairs or not len(pairs):
        return None
    rows, cols = pair_indices(pairs, item_ids, user_ids)
    keep = (rows >= 0) & (cols >= 0)
    rows, cols = rows[keep], cols[keep]
    t = pd.to_datetime(pairs["timestamp"], utc=True).dt.tz_localize(None).to_numpy("datetime64[ns]")[keep]
    order = np.lexsort((cols, t, rows))
    rows, cols = rows[order], cols[order]
    starts = np.r_[0, np.flatnonzero(rows[1:] != rows[:-1]) + 1]
    sizes = np.diff(np.r_[starts, len(rows)])
    if not len(sizes) or (sizes.max() <= length and not always):
        return None
    pos = np.arange(len(rows)) - np.repeat(starts, sizes)
    run = np.repeat(np.cumsum(np.r_[0, (sizes[:-1] + length - 1) // length]), sizes) + pos // length
    s = sp.csr_matrix((np.ones(len(rows), np.float32), (run, cols)), shape=(int(run.max()) + 1, len(item_ids)))
    s.data[:] = 1.0  # a property repeated inside one run (pairs are usually aggregated already) counts once
    return s
