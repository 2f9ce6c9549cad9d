"""Loaders that turn CSVs, MovieLens, Inside Airbnb and saved parquet folders into `Dataset`s."""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from rentalml.data.columns import canonical_names, interactions_frame, require_columns
from rentalml.data.dataset import (
    Dataset,
    _id_hashes,
    _row_hashes,
    load_feature_tables,
    save_feature_tables,
    write_interactions,
)

_ROOM_TYPES = {"entire home/apt": "entire_home", "private room": "private_room",
               "shared room": "shared_room", "hotel room": "hotel_room"}


def _items_frame(path: str | Path) -> pd.DataFrame:
    items = pd.read_csv(path)
    items = items.rename(columns=canonical_names(items.columns))
    require_columns(items, ["item_id"], path)
    items = items.rename(columns={"item_id": "property_id"})
    items["property_id"] = items["property_id"].astype(str)
    return items.drop_duplicates("property_id").set_index("property_id")


def load_csv(interactions_csv: str | Path, item_features_csv: str | Path | None = None,
             name: str | None = None) -> Dataset:
    """CSV with user_id,item_id,timestamp[,weight] (or MovieLens userId,movieId,rating,timestamp).

    Timestamps may be unix seconds or ISO strings; a missing weight is 1.0 (a rating is kept as a column,
    not used as weight: implicit feedback). `item_features_csv` needs an item_id column.
    """
    path = Path(interactions_csv)
    df = interactions_frame(pd.read_csv(path), path)
    items = _items_frame(item_features_csv) if item_features_csv is not None else None
    stem = path.name.split(".")[0]
    return Dataset(df, items, name=name or stem, meta={"source": str(path)})


def load_movielens(directory: str | Path | None = None) -> Dataset:
    """MovieLens (ratings.csv, movies.csv): every rating is a positive interaction of weight 1.0.

    Ratings of movies absent from movies.csv are dropped (count in `meta["dropped_unknown_items"]`).
    """
    d = Path(directory) if directory is not None else _shared("movielens-latest-small")
    ratings = pd.read_csv(d / "ratings.csv")
    df = interactions_frame(ratings, d / "ratings.csv")
    items = None
    if (d / "movies.csv").exists():
        movies = pd.read_csv(d / "movies.csv")
        genres = movies["genres"].fillna("").astype(str)
        movies["genres"] = [[] if g in ("", "(no genres listed)") else g.split("|") for g in genres]
        year = movies["title"].astype(str).str.extract(r"\((\d{4})\)\s*$", expand=False)
        movies["year"] = pd.to_numeric(year, errors="coerce")
        movies["property_id"] = movies.pop("movieId").astype(str)
        items = movies.drop_duplicates("property_id").set_index("property_id")
    meta = {"source": str(d)}
    if items is not None:  # drop ratings of movies missing from movies.csv (none in the original release)
        known = df["property_id"].isin(items.index)
        meta["dropped_unknown_items"] = int((~known).sum())
        df = df[known]
    return Dataset(df, items, name="movielens", meta=meta)


def _parse_price(s: pd.Series) -> pd.Series:
    return pd.to_numeric(s.astype(str).str.replace(r"[$,\s]", "", regex=True), errors="coerce")


def _parse_bathrooms(text: pd.Series) -> pd.Series:
    t = text.fillna("").astype(str).str.lower()
    num = pd.to_numeric(t.str.extract(r"(\d+(?:\.\d+)?)", expand=False), errors="coerce")
    return num.where(num.notna() | ~t.str.contains("half"), 0.5)


def _parse_amenities(raw: object) -> list[str]:
    if not isinstance(raw, str) or not raw.strip():
        return []
    try:
        values = json.loads(raw)
    except ValueError:
        try:
            values = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            values = raw.strip("[]{}").split(",")
    out = []
    for v in values:
        key = re.sub(r"[^0-9a-z]+", "_", str(v).strip().strip("\"'").lower()).strip("_")
        if key:
            out.append(key)
    return list(dict.fromkeys(out))


def load_airbnb(directory: str | Path | None = None, min_user_reviews: int = 1) -> Dataset:
    """Inside Airbnb (listings.csv.gz → property schema, reviews.csv.gz → "lease" events of weight 1.0).

    Only reviews of known listings by reviewers with at least `min_user_reviews` reviews are kept.
    """
    d = Path(directory) if directory is not None else _shared("airbnb-albany")
    listings = pd.read_csv(_first(d, "listings"))
    require_columns(listings, ["id", "price", "room_type", "latitude", "longitude"], d / "listings.csv.gz")
    price = _parse_price(listings["price"])
    room = listings["room_type"].fillna("").astype(str)
    room = room.str.lower().map(_ROOM_TYPES).fillna(room.str.lower().str.replace(r"\W+", "_", regex=True))
    price = price.fillna(price.groupby(room).transform("median")).fillna(price.median())
    baths = listings["bathrooms"] if "bathrooms" in listings else pd.Series(np.nan, index=listings.index)
    if "bathrooms_text" in listings:
        baths = baths.fillna(_parse_bathrooms(listings["bathrooms_text"]))
    baths = baths.fillna(baths.median() if baths.notna().any() else 1.0)
    accommodates = listings.get("accommodates", pd.Series(np.nan, index=listings.index))
    beds = listings.get("bedrooms", pd.Series(np.nan, index=listings.index))
    beds = beds.fillna(np.ceil(accommodates / 2)).fillna(beds.median()).fillna(1).astype(np.int64)
    amenities = listings.get("amenities", pd.Series(None, index=listings.index)).map(_parse_amenities)
    neighbourhood = listings.get("neighbourhood_cleansed", pd.Series(None, index=listings.index))
    first_review = listings.get("first_review", pd.Series(None, index=listings.index))
    items = pd.DataFrame({
        "property_id": listings["id"].astype(str),
        "price": price.astype(float),
        "bedrooms": beds,
        "bathrooms": baths.astype(float),
        "area_sqm": np.nan,
        "lat": listings["latitude"].astype(float),
        "lon": listings["longitude"].astype(float),
        "property_type": listings.get("property_type", pd.Series("", index=listings.index)).fillna("unknown"),
        "room_type": room,
        "city": "Albany",
        "neighbourhood": neighbourhood.fillna("unknown").astype(str),
        "amenities": amenities,
        "pets_allowed": amenities.map(lambda a: "pets_allowed" in a),
        "available_from": None,
        "listed_at": pd.to_datetime(first_review, utc=True, errors="coerce"),
        "accommodates": accommodates,
        # who lets it: the item-item model's side information (features.SIDE_COLUMNS), not a dense feature
        "landlord_id": listings["host_id"].astype("Int64").astype(str).replace("<NA>", None)
        if "host_id" in listings else None,
    }).drop_duplicates("property_id").set_index("property_id")

    reviews = pd.read_csv(_first(d, "reviews"))
    require_columns(reviews, ["listing_id", "id", "date", "reviewer_id"], d / "reviews.csv.gz")
    known = reviews["listing_id"].astype(str).isin(items.index)
    reviews = reviews[known]
    counts = reviews["reviewer_id"].map(reviews["reviewer_id"].value_counts())
    reviews = reviews[counts >= min_user_reviews]
    df = pd.DataFrame({
        "event_id": "r_" + reviews["id"].astype(str),
        "user_id": reviews["reviewer_id"].astype(str),
        "property_id": reviews["listing_id"].astype(str),
        "event_type": "lease",
        "timestamp": pd.to_datetime(reviews["date"], utc=True),
        "weight": 1.0,
    }).sort_values(["timestamp", "event_id"], kind="stable")
    meta = {"source": str(d), "min_user_reviews": min_user_reviews, "dropped_unknown_items": int((~known).sum())}
    return Dataset(df, items, name="airbnb", meta=meta)


def _first(d: Path, stem: str) -> Path:
    for suffix in (".csv.gz", ".csv"):
        if (d / f"{stem}{suffix}").exists():
            return d / f"{stem}{suffix}"
    raise FileNotFoundError(f"{d}/{stem}.csv.gz not found")


def shared_data_dir() -> Path | None:
    """`<repo root>/../shared/data` (the repo root holds the rentalml package), or None if absent."""
    root = Path(__file__).resolve().parents[2]
    candidate = root.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def _shared(name: str) -> Path:
    base = shared_data_dir()
    if base is None or not (base / name).is_dir():
        raise FileNotFoundError(f"shared data set {name!r} not found (looked for ../shared/data/{name})")
    return base / name


def load_parquet(path: str | Path, name: str | None = None) -> Dataset:
    """One parquet file of interactions, columns as for `load_csv` (user_id, item_id/property_id, timestamp)."""
    path = Path(path)
    df = pd.read_parquet(path)
    if "property_id" in df.columns and "item_id" not in df.columns:
        df = df.rename(columns={"property_id": "item_id"})
    return Dataset(interactions_frame(df, path), name=name or path.name.split(".")[0], meta={"source": str(path)})


def _parquet_source(spec: str) -> tuple[Path, str, bool] | None:
    """(interactions file, dataset name, is a saved dataset dir) when `spec` is parquet `ingest_parquet` takes."""
    path = Path(spec)
    if path.is_dir() and (path / "interactions.parquet").exists():
        import pyarrow.parquet as pq

        names = pq.read_schema(path / "interactions.parquet").names
        props = path / "properties.parquet"
        if {"timestamp", "user_id", "property_id"} <= set(names) and \
                (not props.exists() or "property_id" in pq.read_schema(props).names):
            return path / "interactions.parquet", path.name, True
        return None  # timestamps filled by position, ids in an index column: the whole-frame path
    if path.is_file() and path.name.lower().endswith(".parquet"):
        return path, path.name.split(".")[0], False
    return None


def ingest_parquet(spec: str | Path, out_dir: str | Path, batch_rows: int = 1 << 20) -> dict | None:
    """`load_dataset(spec).save(out_dir)` for a parquet file or a saved dataset directory, streamed: pyarrow
    record batches of `batch_rows` are normalised one at a time (`interactions_frame` for a file, `Dataset`'s
    column rules for both) and appended to out_dir/interactions.parquet, so the table is never one frame.
    Returns what `ingest` reports (the summary, `snapshot`, `source`), or None when `spec` is not parquet."""
    import duckdb
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    found = _parquet_source(str(spec))
    if found is None:
        return None
    src, name, is_dir = found
    pf = pq.ParquetFile(src)
    unit = None
    if not is_dir:  # the timestamp unit of load_csv's rule (ms when any value is that large) is a file-wide choice
        ts = {canonical_names(pd.Index(pf.schema_arrow.names)).get(n): n for n in pf.schema_arrow.names}.get(
            "timestamp")
        if ts is not None and (pa.types.is_integer(pf.schema_arrow.field(ts).type) or
                               pa.types.is_floating(pf.schema_arrow.field(ts).type)):
            top = pc.max_element_wise(*(pc.abs(pc.min_max(pq.read_table(src, columns=[ts]).column(0))[k])
                                        for k in ("min", "max")))
            unit = "ms" if top.as_py() is not None and top.as_py() > 1e11 else "s"
    items, users = load_feature_tables(src.parent) if is_dir else (None, None)
    if pf.metadata.num_rows == 0:  # an empty file: the whole-frame path writes its schema
        return None

    def normalised(batch) -> pd.DataFrame:
        df = batch.to_pandas()
        if not is_dir:
            if "property_id" in df.columns and "item_id" not in df.columns:
                df = df.rename(columns={"property_id": "item_id"})
            df = df.rename(columns=canonical_names(df.columns))
            if unit is not None:
                df["timestamp"] = pd.to_datetime(df["timestamp"], unit=unit, utc=True)
            df = interactions_frame(df, src)
        return Dataset(df).interactions

    batches = (normalised(b) for b in pf.iter_batches(batch_size=batch_rows))
    first = next(batches)
    schema = pa.Schema.from_pandas(first, preserve_index=False)
    for i, f in enumerate(schema):  # a column null throughout the first batch: the source's type
        if pa.types.is_null(f.type) and f.name in pf.schema_arrow.names:
            schema = schema.set(i, pa.field(f.name, pf.schema_arrow.field(f.name).type))
    h = hashlib.sha256()

    def hashed(frames):
        for df in frames:
            h.update(_row_hashes(df))
            yield df

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "interactions.parquet"
    write_interactions(target, hashed(itertools.chain([first], batches)), schema)
    save_feature_tables(out, items, users)
    if items is not None:
        h.update(_id_hashes(items.index))
    q = "'" + str(target).replace("'", "''") + "'"
    rows, n_users, n_props = duckdb.connect().execute(
        f"SELECT count(*), count(DISTINCT user_id), count(DISTINCT property_id) FROM read_parquet({q})").fetchone()
    return {"name": name, "interactions": int(rows), "users": int(n_users), "properties": int(n_props),
            "catalogue": int(len(items)) if items is not None else int(n_props), "snapshot": h.hexdigest()[:16],
            "source": str(spec) if is_dir else str(src)}


def load_sql(source: str = "interactions", url: str | None = None, items_table: str = "properties",
             users_table: str = "users", name: str = "sql") -> Dataset:
    """Interactions from a SQL database: `source` is a table name or a SELECT statement (columns as for
    `load_csv`); the `properties`/`users` tables are read as feature tables when they exist.

    The URL defaults to the database of record (settings: RENTALML_DATABASE_URL, which a Kubernetes secret
    provides in the cluster), so credentials never appear in a dataset spec. One reader for every SQL source:
    `rentalml.db.store.load_from_db`.
    """
    from rentalml.db.store import load_from_db

    return load_from_db(url, source=source, items_table=items_table, users_table=users_table, name=name)


#: SQLAlchemy URL schemes accepted as a dataset spec (the database of record at that URL)
_SQL_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "mssql", "oracle")


def load_dataset(spec: str) -> Dataset:
    """"synthetic[:n_users,n_properties,n_events[,seed]]" | "movielens" | "airbnb" | parquet dir | CSV |
    parquet file | "db" or "sql:<table or SELECT>" (the database of record from the settings) | a SQLAlchemy
    URL such as "postgresql+psycopg://host/db" or "sqlite:///path.db" (a database with the rentalml schema)."""
    spec = str(spec).strip()
    head, _, args = spec.partition(":")
    if spec == "db":
        return load_sql("interactions", name="db")
    if head == "sql":
        return load_sql(args.strip() or "interactions")
    if "://" in spec and head.split("+")[0].lower() in _SQL_SCHEMES:
        return load_sql("interactions", url=spec, name="db")
    if head == "synthetic":
        from rentalml.data.generator import generate_marketplace

        keys = ["n_users", "n_properties", "n_events", "seed"]
        values = [int(v.replace("_", "")) for v in args.split(",") if v.strip()] if args else []
        if len(values) > len(keys):
            raise ValueError(f"too many synthetic parameters in {spec!r} (expected {','.join(keys)})")
        return generate_marketplace(**dict(zip(keys, values, strict=False)))
    if spec == "movielens":
        return load_movielens()
    if spec == "airbnb":
        return load_airbnb()
    path = Path(spec)
    if path.is_dir():
        if (path / "interactions.parquet").exists():
            return Dataset.load(path)
        if (path / "ratings.csv").exists():
            return load_movielens(path)
        if (path / "reviews.csv.gz").exists() or (path / "reviews.csv").exists():
            return load_airbnb(path)
        raise FileNotFoundError(f"{path}: no interactions.parquet, ratings.csv or reviews.csv(.gz)")
    if path.is_file() and path.name.lower().endswith((".csv", ".csv.gz")):
        return load_csv(path)
    if path.is_file() and path.name.lower().endswith(".parquet"):
        return load_parquet(path)
    raise ValueError(f"unknown dataset spec {spec!r}: use synthetic[:u,p,e], movielens, airbnb, a dir, a CSV, "
                     "db, sql:<table> or a database URL")
