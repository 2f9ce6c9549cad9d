"""Turn a property (or user) feature table into a dense float matrix for the content towers.

Generic over datasets: numeric columns are log-scaled when skewed and standardised, string columns are
one-hot over their most frequent values, list columns (amenities, genres, preferred_areas) are multi-hot
over their most frequent tokens, booleans are 0/1. The fitted spec is JSON so a bundle can encode a
never-seen property at serving time exactly as in training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

SKIP = {"property_id", "user_id", "item_id", "listed_at", "available_from", "title", "name", "description",
        "landlord_id"}

#: property columns whose equal values make two properties alike for the item-item model's side information
#: (side_information): who lets it (a landlord or manager's listings draw the same tenants) and where it is.
SIDE_COLUMNS = ("landlord_id", "neighbourhood")
#: the edge of the square geo cell (lat/lon → one cell id) that joins SIDE_COLUMNS
SIDE_CELL_KM = 1.0


def _is_list_col(s: pd.Series) -> bool:
    sample = s.dropna().head(50)
    return len(sample) > 0 and all(isinstance(v, (list, tuple, np.ndarray)) for v in sample)


Z_CLIP = 5.0


@dataclass
class FeatureEncoder:
    numeric: dict[str, tuple[float, float, bool]] = field(default_factory=dict)  # col -> (mean, std, log)
    categorical: dict[str, list[str]] = field(default_factory=dict)
    tokens: dict[str, list[str]] = field(default_factory=dict)
    boolean: list[str] = field(default_factory=list)

    @classmethod
    def fit(cls, df: pd.DataFrame, max_categories: int = 64, max_tokens: int = 128) -> FeatureEncoder:
        enc = cls()
        for col in df.columns:
            if col in SKIP:
                continue
            s = df[col]
            if s.dtype == bool:
                enc.boolean.append(col)
            elif pd.api.types.is_numeric_dtype(s):
                v = s.astype(float)
                log = bool(v.min() >= 0 and v.max() > 50 * max(v.median(), 1e-9))
                if log:
                    v = np.log1p(v)
                med = float(v.median()) if v.notna().any() else 0.0
                v = v.fillna(med)
                enc.numeric[col] = (float(v.mean()), float(v.std() or 1.0), log)
            elif _is_list_col(s):
                counts = pd.Series([t for lst in s.dropna() for t in lst]).value_counts()
                enc.tokens[col] = [str(t) for t in counts.index[:max_tokens]]
            elif s.dtype == object or isinstance(s.dtype, pd.CategoricalDtype):
                counts = s.astype(str).value_counts()
                if len(counts) > 1:
                    enc.categorical[col] = [str(t) for t in counts.index[:max_categories]]
        return enc

    @property
    def dim(self) -> int:
        return (len(self.numeric) + len(self.boolean) + sum(len(v) for v in self.categorical.values())
                + sum(len(v) for v in self.tokens.values()))

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        n = len(df)
        blocks: list[np.ndarray] = []
        for col, (mean, std, log) in self.numeric.items():
            raw = df[col] if col in df else pd.Series(np.nan, index=df.index)
            v = pd.to_numeric(raw, errors="coerce").astype(float)
            if log:
                v = np.log1p(v.clip(lower=0))
            # z-scores clipped to ±Z_CLIP: a never-seen property with an absurd value (a typo'd price) must not
            # get an extreme content vector; training data is essentially unaffected
            z = ((v.fillna(mean) - mean) / std).clip(-Z_CLIP, Z_CLIP)
            blocks.append(z.to_numpy(dtype=np.float32)[:, None])
        for col in self.boolean:
            v = df[col].fillna(False).astype(bool) if col in df else pd.Series(False, index=df.index)
            blocks.append(v.to_numpy(dtype=np.float32)[:, None])
        for col, cats in self.categorical.items():
            out = np.zeros((n, len(cats)), dtype=np.float32)
            if col in df:
                idx = pd.Index(cats).get_indexer(df[col].astype(str))
                ok = idx >= 0
                out[np.flatnonzero(ok), idx[ok]] = 1.0
            blocks.append(out)
        for col, toks in self.tokens.items():
            out = np.zeros((n, len(toks)), dtype=np.float32)
            if col in df:
                lookup = {t: j for j, t in enumerate(toks)}
                for i, lst in enumerate(df[col].tolist()):
                    if isinstance(lst, (list, tuple, np.ndarray)):
                        for t in lst:
                            j = lookup.get(str(t))
                            if j is not None:
                                out[i, j] = 1.0
                norm = out.sum(1, keepdims=True)
                out = out / np.sqrt(np.maximum(norm, 1.0))
            blocks.append(out)
        if not blocks:
            return np.zeros((n, 0), dtype=np.float32)
        return np.concatenate(blocks, axis=1).astype(np.float32)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FeatureEncoder:
        return cls(numeric={k: tuple(v) for k, v in d["numeric"].items()}, categorical=d["categorical"],
                   tokens=d["tokens"], boolean=list(d["boolean"]))


def side_information(items: pd.DataFrame | None, item_ids: np.ndarray, columns: tuple[str, ...] = SIDE_COLUMNS,
                     cell_km: float | None = SIDE_CELL_KM):
    """The item × attribute-value indicator matrix T (scipy CSR, float32) for the item-item model's side
    information (collective EASE, Jeunen et al., RecSys 2020: the Gram matrix becomes XᵀX + α·TTᵀ).

    One column per value of each of `columns` that at least two catalogue items share, plus one per square geo
    cell of `cell_km` (from lat/lon) that holds two or more items; a value only one item has links nothing and
    is dropped. Missing values ("", "unknown", NaN) link nothing. None when the table has none of these."""
    import scipy.sparse as sp

    if items is None:
        return None
    frame = items.reindex(item_ids)
    keys: list[pd.Series] = []
    for col in columns:
        if col in frame:
            v = frame[col].astype(object).where(frame[col].notna(), None)
            v = v.map(lambda x: None if x is None or str(x).strip().lower() in ("", "unknown", "nan") else str(x))
            keys.append(col + "=" + v.dropna())
    if cell_km and {"lat", "lon"} <= set(frame.columns):
        lat, lon = frame["lat"].astype(float), frame["lon"].astype(float)
        ok = lat.notna() & lon.notna()
        km_lat = 111.32
        km_lon = 111.32 * np.cos(np.radians(lat[ok]))
        cell = (np.floor(lat[ok] * km_lat / cell_km).astype(np.int64).astype(str) + "_"
                + np.floor(lon[ok] * km_lon / cell_km).astype(np.int64).astype(str))
        keys.append("cell=" + cell)
    if not keys:
        return None
    pos = pd.Series(np.arange(len(frame)), index=frame.index)
    flat = pd.concat(keys)
    flat = flat[flat.map(flat.value_counts()) >= 2]
    if flat.empty:
        return None
    codes, uniques = pd.factorize(flat, sort=True)
    rows = pos.loc[flat.index].to_numpy()
    return sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, codes)), shape=(len(frame), len(uniques)))
