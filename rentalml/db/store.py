"""The database of record: schema migrations, bulk seeding, incremental writes and the one SQL reader.

`url` arguments default to the settings (`RENTALML_DATABASE_URL`, SQLite under $RENTALML_HOME otherwise);
writers also accept an `Engine` so that a long-running process (the stream processor) keeps its pool.
Every writer is idempotent: properties and users on their primary key, interactions on `event_id`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa

from rentalml.data.columns import canonical_names, interactions_frame
from rentalml.data.dataset import Dataset
from rentalml.db import models as m

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
DEFAULT_CHUNK = 5000


# ------------------------------------------------------------------------------------------ engine
def resolve_url(url: str | None = None) -> str:
    if url is None:
        from rentalml.config import get_settings

        url = get_settings().db_url
    return str(url)


def safe_url(url: str | sa.Engine | None) -> str:
    """The URL with the password masked (for logs, manifests, dataset metadata)."""
    if isinstance(url, sa.Engine):
        return url.url.render_as_string(hide_password=True)
    return sa.engine.make_url(resolve_url(url)).render_as_string(hide_password=True)


def create_engine(url: str | None = None) -> sa.Engine:
    """An engine for the database of record; a SQLite file's parent directory is created."""
    u = sa.engine.make_url(resolve_url(url))
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        Path(u.database).parent.mkdir(parents=True, exist_ok=True)
    return sa.create_engine(u)


@contextlib.contextmanager
def _engine(target: str | sa.Engine | None) -> Iterator[sa.Engine]:
    if isinstance(target, sa.Engine):
        yield target
        return
    eng = create_engine(target)
    try:
        yield eng
    finally:
        eng.dispose()


# ------------------------------------------------------------------------------------------ migrations
def alembic_config(connection: sa.Connection | None = None, url: str | None = None):
    """An Alembic Config built in code (no alembic.ini): the migrations shipped in this package."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def init_db(url: str | sa.Engine | None = None, revision: str = "head") -> str | None:
    """Create or upgrade the schema (`alembic upgrade head`); returns the revision now current."""
    from alembic import command

    with _engine(url) as eng, eng.begin() as conn:
        command.upgrade(alembic_config(conn), revision)
    return current_revision(url)


def current_revision(url: str | sa.Engine | None = None) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with _engine(url) as eng, eng.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


# ------------------------------------------------------------------------------------------ value conversion
def _missing(v) -> bool:
    if v is None or v is pd.NaT:
        return True
    if isinstance(v, float | np.floating):
        return math.isnan(v)
    return False


def _jsonable(v):
    """Plain JSON values (numpy scalars and arrays, timestamps as ISO strings, NaN as null)."""
    if isinstance(v, np.ndarray | list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if _missing(v):
        return None
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, datetime | date | pd.Timestamp):
        return v.isoformat()
    return v


def _to_datetime(v, field: str) -> datetime | None:
    if _missing(v):
        return None
    try:
        ts = pd.Timestamp(v)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{field}: not a timestamp: {v!r}") from exc
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return ts.to_pydatetime()


def _to_date(v, field: str) -> date | None:
    if _missing(v):
        return None
    if isinstance(v, date) and not isinstance(v, datetime):
        return v
    try:
        return pd.Timestamp(v).date()
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{field}: not a date: {v!r}") from exc


def _json_value(v):
    if v is None:
        return None
    if isinstance(v, np.ndarray | list | tuple):  # list columns (amenities, preferred_areas): strings
        return [str(x) for x in _jsonable(v)]
    return _jsonable(v)


def _integer(v) -> int:
    f = float(v)
    if not f.is_integer():
        raise ValueError(f"not an integer: {v!r}")
    return int(f)


def _boolean(v) -> bool:
    if isinstance(v, bool):
        return v
    text = str(v).strip().lower()
    if text in ("1", "true", "yes", "1.0"):
        return True
    if text in ("0", "false", "no", "0.0"):
        return False
    raise ValueError(f"not a boolean: {v!r}")


def _converter(column: sa.Column):
    """value → what the column stores; a value that does not fit raises ValueError naming the column."""
    t = column.type
    name = column.name
    if isinstance(t, sa.DateTime):
        return lambda v: _to_datetime(v, name)
    if isinstance(t, sa.Date):
        return lambda v: _to_date(v, name)
    if isinstance(t, sa.JSON):
        return _json_value
    kind, label = ((_boolean, "a boolean") if isinstance(t, sa.Boolean) else (_integer, "an integer")
                   if isinstance(t, sa.Integer) else (float, "a number") if isinstance(t, sa.Float) else (str, "text"))

    def conv(v):
        if _missing(v):
            return None
        try:
            return kind(v.item() if isinstance(v, np.generic) else v)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{name}: expected {label}, got {v!r}") from exc

    return conv


def _rows(df: pd.DataFrame, table: sa.Table, fields: list[str]) -> list[dict]:
    """DataFrame → row dicts for `table`: schema fields converted to the column types, the rest into `extra`."""
    out: dict[str, list] = {}
    for name in fields:
        if name in df.columns:
            conv = _converter(table.c[name])
            out[name] = [conv(v) for v in df[name].tolist()]
    others = [c for c in df.columns if c not in fields]
    if others and "extra" in table.c:
        records = df[others].to_dict("records")
        out["extra"] = [{k: _jsonable(v) for k, v in r.items()} for r in records]
    names = list(out)
    return [dict(zip(names, values, strict=True)) for values in zip(*out.values(), strict=True)]


# ------------------------------------------------------------------------------------------ writers
def _insert_ignore(conn: sa.Connection, table: sa.Table, rows: list[dict], key: str, chunk: int) -> int:
    """Insert rows whose `key` is new; returns how many were inserted (duplicates are skipped, not updated)."""
    dialect = conn.dialect.name
    inserted = 0
    for i in range(0, len(rows), chunk):
        part = rows[i:i + chunk]
        if dialect in ("sqlite", "postgresql"):
            mod = sa.dialects.sqlite if dialect == "sqlite" else sa.dialects.postgresql
            stmt = mod.insert(table).on_conflict_do_nothing(index_elements=[key]).returning(table.c[key])
            inserted += len(conn.execute(stmt, part).all())
        else:  # portable fallback: skip the keys already there
            keys = [r[key] for r in part]
            have = set(conn.execute(sa.select(table.c[key]).where(table.c[key].in_(keys))).scalars())
            new, seen = [], set(have)
            for r in part:
                if r[key] not in seen:
                    seen.add(r[key])
                    new.append(r)
            if new:
                conn.execute(table.insert(), new)
            inserted += len(new)
    return inserted


def _event_ids(df: pd.DataFrame) -> pd.Series:
    """Deterministic ids for interactions that come without one (MovieLens ratings, plain CSVs): a hash of the
    event's fields and its occurrence number, so seeding the same data twice inserts nothing new."""
    cols = [c for c in ("user_id", "property_id", "timestamp", "event_type") if c in df.columns]
    h = pd.util.hash_pandas_object(df[cols], index=False).map("{:016x}".format)
    n = df.groupby(cols, sort=False).cumcount().astype(str)
    return "h_" + h + "_" + n


def interaction_rows(records: pd.DataFrame | Iterable) -> list[dict]:
    """Interaction rows from a DataFrame, `schema.Interaction`s or dicts (weight from the event type when
    absent; event ids derived when absent)."""
    from rentalml.schema import EVENT_WEIGHTS

    if isinstance(records, pd.DataFrame):
        df = records.copy()
    else:
        dicts = [r.model_dump() if hasattr(r, "model_dump") else dict(r) for r in records]
        df = pd.DataFrame(dicts)
    if df.empty:
        return []
    for col in ("user_id", "property_id", "timestamp"):
        if col not in df.columns:
            raise ValueError(f"interactions: missing required field {col!r}")
    if "weight" not in df.columns:
        df["weight"] = df["event_type"].map(EVENT_WEIGHTS) if "event_type" in df.columns else 1.0
    df["weight"] = pd.to_numeric(df["weight"], errors="coerce").fillna(1.0)
    if "event_id" not in df.columns:
        df["event_id"] = _event_ids(df)
    elif df["event_id"].isna().any():
        df["event_id"] = df["event_id"].where(df["event_id"].notna(), _event_ids(df))
    return _rows(df, m.interactions, m.INTERACTION_FIELDS)


def insert_interactions(target: str | sa.Engine | None, records: pd.DataFrame | Iterable,
                        chunk: int = DEFAULT_CHUNK) -> int:
    """Append interactions; an `event_id` already stored is skipped. Returns the number inserted."""
    rows = interaction_rows(records)
    if not rows:
        return 0
    with _engine(target) as eng, eng.begin() as conn:
        return _insert_ignore(conn, m.interactions, rows, "event_id", chunk)


def upsert_property(target: str | sa.Engine | None, property_id: str, attributes: dict | None = None, *,
                    available: bool | None = None, updated_at: datetime | str | None = None) -> None:
    """Create or update one listing (a `property_data` event): only the given attributes change; `available`
    False marks it delisted. Attribute names are those of the property schema (unknown names are an error)."""
    attributes = dict(attributes or {})
    unknown = sorted(set(attributes) - set(m.PROPERTY_FIELDS) - {"available"})
    if unknown:
        raise ValueError(f"property {property_id}: unknown attribute(s) {unknown} (schema: {m.PROPERTY_FIELDS})")
    attributes.pop("property_id", None)
    if available is not None:
        attributes["available"] = available
    values = {k: _converter(m.properties.c[k])(v) for k, v in attributes.items()}
    values["updated_at"] = _to_datetime(updated_at, "updated_at") if updated_at is not None else datetime.now(UTC)
    with _engine(target) as eng, eng.begin() as conn:
        dialect = conn.dialect.name
        if dialect in ("sqlite", "postgresql"):
            mod = sa.dialects.sqlite if dialect == "sqlite" else sa.dialects.postgresql
            stmt = mod.insert(m.properties).values(property_id=str(property_id), **values)
            conn.execute(stmt.on_conflict_do_update(index_elements=["property_id"], set_=values))
        else:
            res = conn.execute(sa.update(m.properties).where(m.properties.c.property_id == str(property_id))
                               .values(**values))
            if res.rowcount == 0:
                conn.execute(sa.insert(m.properties).values(property_id=str(property_id), **values))


def seed(url: str | sa.Engine | None, dataset: Dataset, chunk: int = DEFAULT_CHUNK, migrate: bool = True) -> dict:
    """Bulk-load a Dataset (properties, users, interactions) in one transaction; rows already present (same
    primary key / event_id) are skipped, so seeding twice changes nothing. Returns rows inserted per table."""
    if migrate:
        init_db(url)
    tables = []
    if dataset.items is not None:
        tables.append((m.properties, _rows(dataset.items.reset_index(names="property_id"), m.properties,
                                           m.PROPERTY_FIELDS), "property_id"))
    if dataset.users is not None:
        tables.append((m.users, _rows(dataset.users.reset_index(names="user_id"), m.users, m.USER_FIELDS),
                       "user_id"))
    tables.append((m.interactions, interaction_rows(dataset.interactions), "event_id"))
    out = {}
    with _engine(url) as eng, eng.begin() as conn:
        for table, rows, key in tables:
            out[table.name] = _insert_ignore(conn, table, rows, key, chunk) if rows else 0
    return out


def stats(url: str | sa.Engine | None = None) -> dict:
    """Row counts per table and the schema revision."""
    with _engine(url) as eng:
        with eng.connect() as conn:
            present = set(sa.inspect(conn).get_table_names())
            counts = {t.name: int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one())
                      for t in m.metadata.sorted_tables if t.name in present}
        return {"url": safe_url(eng), "revision": current_revision(eng), "head": head_revision(), "rows": counts}


# ------------------------------------------------------------------------------------------ reader
def _frame(conn: sa.Connection, table: sa.Table, where=None, order=None) -> pd.DataFrame:
    stmt = sa.select(table)
    if where is not None:
        stmt = stmt.where(where)
    if order is not None:
        stmt = stmt.order_by(*order)
    res = conn.execute(stmt)
    return pd.DataFrame(res.all(), columns=list(res.keys()))


def _expand(df: pd.DataFrame, schema_fields: list[str], drop: tuple[str, ...] = ()) -> pd.DataFrame:
    """Our tables → Dataset columns: `extra` spread back into columns, bookkeeping columns dropped, schema
    columns that are empty in every row dropped (a source without that attribute)."""
    df = df.drop(columns=[c for c in drop if c in df.columns])
    if "extra" in df.columns:
        extra = df.pop("extra")
        if extra.notna().any():
            spread = pd.DataFrame([e if isinstance(e, dict) else {} for e in extra], index=df.index)
            df = df.join(spread[[c for c in spread.columns if c not in df.columns]])
    empty = [c for c in schema_fields[1:] if c in df.columns and df[c].isna().all()]
    return df.drop(columns=empty)


def _reflect(conn: sa.Connection, name: str, model: sa.Table) -> tuple[sa.Table, bool]:
    """(table to select from, whether it has this package's schema): a table of the same name created by
    something else (a hand-made SQL source) is read as reflected, column for column."""
    reflected = sa.Table(name, sa.MetaData(), autoload_with=conn)
    ours = name == model.name and {c.name for c in model.columns} <= set(reflected.c.keys())
    return (model if ours else reflected), ours


def _since_clause(table: sa.Table, since) -> sa.ColumnElement:
    col = table.c.get("timestamp")
    if col is None:
        raise ValueError(f"since: table {table.name!r} has no timestamp column")
    ts = _to_datetime(since, "since")
    if isinstance(col.type, sa.Integer | sa.Float | sa.Numeric):
        return col >= ts.timestamp()
    if isinstance(col.type, sa.DateTime):
        return col >= ts
    return col >= ts.isoformat()  # ISO-8601 text


def load_from_db(url: str | sa.Engine | None = None, since: datetime | str | None = None, *,
                 source: str = "interactions", items_table: str = "properties", users_table: str = "users",
                 name: str = "db") -> Dataset:
    """The Dataset in the database of record (or any SQL database).

    `source` is the interactions table or a SELECT (columns as for `load_csv`: user_id, item_id/property_id,
    timestamp[, weight...]); `since` keeps the interactions at or after that time (incremental ingest). The
    `properties`/`users` tables are read as feature tables when they exist. Tables with this package's schema
    give back exactly what `seed` stored (list columns as lists, UTC timestamps, `extra` as columns).
    """
    is_query = source.lstrip().lower().startswith(("select", "with"))
    if is_query and since is not None:
        raise ValueError("since: not applicable to a SELECT source (put the condition in the query)")
    with _engine(url) as eng:
        with eng.connect() as conn:
            present = set(sa.inspect(conn).get_table_names())
            if is_query:
                res = conn.execute(sa.text(source))
                df = pd.DataFrame(res.all(), columns=list(res.keys()))
            else:
                if source not in present:
                    raise LookupError(f"{safe_url(eng)}: no table {source!r} (run `rentalml db init` / `db seed`)")
                table, ours = _reflect(conn, source, m.interactions)
                where = _since_clause(table, since) if since is not None else None
                df = _frame(conn, table, where, [table.c.id] if ours else None)
                if ours:
                    df = _expand(df.drop(columns=["id"]), ["event_id", *m.INTERACTION_FIELDS[1:]])
            items = users = None
            if items_table in present:
                t, ours = _reflect(conn, items_table, m.properties)
                items = _frame(conn, t, order=[t.c.property_id] if ours else None)
                if ours:
                    items = _expand(items, m.PROPERTY_FIELDS, drop=("available", "updated_at"))
                    if "listed_at" in items.columns:
                        items["listed_at"] = pd.to_datetime(items["listed_at"], utc=True)
                items = items.rename(columns=canonical_names(items.columns)).rename(columns={"item_id": "property_id"})
            if users_table in present:
                t, ours = _reflect(conn, users_table, m.users)
                users = _frame(conn, t, order=[t.c.user_id] if ours else None)
                if ours:
                    users = _expand(users, m.USER_FIELDS, drop=("updated_at",))
        safe = safe_url(eng)
    items = items if items is not None and len(items) else None  # an empty feature table is no feature table
    users = users if users is not None and len(users) else None
    if "property_id" in df.columns and "item_id" not in df.columns:
        df = df.rename(columns={"property_id": "item_id"})
    meta = {"source": f"{safe} {source}"}
    if since is not None:
        meta["since"] = _to_datetime(since, "since").isoformat()
    return Dataset(interactions_frame(df, f"sql:{source}"), items, users, name=name, meta=meta)
