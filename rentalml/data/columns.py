"""The column contract of interactions read from outside: header aliases, required columns, timestamps.

Every reader of external interactions (CSV, MovieLens, parquet in rentalml.data.loaders; SQL tables and
SELECTs in rentalml.db.store) turns its raw frame into `Dataset.interactions` with `interactions_frame`, so a
header such as `userId` / `listing_id` or a unix-millisecond timestamp means the same from every source.
"""

from __future__ import annotations

import pandas as pd

#: accepted headers (lower case, underscores dropped) -> canonical name
ALIASES = {
    "userid": "user_id", "user": "user_id", "itemid": "item_id", "item": "item_id",
    "movieid": "item_id", "propertyid": "item_id", "listingid": "item_id",
}


def canonical_names(columns: pd.Index) -> dict[str, str]:
    """A `DataFrame.rename` mapping: each accepted alias to its canonical name, other headers stripped."""
    return {c: ALIASES.get(str(c).strip().lower().replace("_", ""), str(c).strip()) for c in columns}


def require_columns(df: pd.DataFrame, columns: list[str], source: object) -> None:
    """ValueError naming `source` and the columns found when one of `columns` is missing."""
    for col in columns:
        if col not in df.columns:
            raise ValueError(f"{source}: missing required column {col!r} (found {list(df.columns)})")


def parse_timestamps(s: pd.Series) -> pd.Series:
    """Unix seconds (or milliseconds when the numbers are that large) or ISO-8601 strings → UTC."""
    if pd.api.types.is_numeric_dtype(s):
        unit = "ms" if s.abs().max() > 1e11 else "s"
        return pd.to_datetime(s, unit=unit, utc=True)
    try:
        return pd.to_datetime(s, utc=True, format="ISO8601")
    except (ValueError, TypeError):
        return pd.to_datetime(s, utc=True, format="mixed")


def interactions_frame(df: pd.DataFrame, source: object) -> pd.DataFrame:
    """user_id, property_id (str), timestamp (UTC) and weight (float, 1.0 where missing) from a raw frame with
    user_id, item_id (or an alias) and timestamp columns; other columns are kept."""
    df = df.rename(columns=canonical_names(df.columns))
    require_columns(df, ["user_id", "item_id", "timestamp"], source)
    df = df.rename(columns={"item_id": "property_id"})
    df["user_id"] = df["user_id"].astype(str)
    df["property_id"] = df["property_id"].astype(str)
    df["timestamp"] = parse_timestamps(df["timestamp"])
    df["weight"] = pd.to_numeric(df["weight"], errors="coerce").fillna(1.0) if "weight" in df else 1.0
    return df
