"""The Feast feature store of rentalml: configuration from Settings, offline tables from a Dataset, point-in-time
training frames, online reads and pushes (the stream processor's and serving's entry points).

Layout under `$RENTALML_HOME/feast/` (derived from Settings by `open_store`):
  repo/feature_store.yaml   generated from Settings on every open (no machine paths are committed); passwords are
                            redacted in the file, the live store gets its config in memory
  repo/features.py          a copy of the definitions in `settings.feast.repo_path` (feature_repo/), and
  repo/repo.py              which builds them with the data directory below, so `feast -c <home>/feast/repo …` works
  data/<view>.parquet       the batch sources (written by `build_offline_tables`, appended to by offline pushes)
  registry.db, online.db    file registry and SQLite online store (defaults; SQL registry / Redis by setting)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from rentalml.config import Settings, get_settings
from rentalml.features import feast_import, formulas

feast_import.lean()  # before the process's first Feast import (the module says why: ~4.5 CPU-s, ~180 MB less)

if TYPE_CHECKING:
    from feast import FeatureStore

    from rentalml.data.dataset import Dataset

DEFINITIONS_MODULE = "rentalml_feature_definitions"
_DAY = formulas.DAY
# the feature formulas (windows, weights) are defined once in rentalml.features.formulas; the tables below are
# their exact, vectorised batch form (tests/test_feature_formulas.py holds them to the reference)
_TASTE_WINDOW_DAYS = formulas.TASTE_WINDOW_S // _DAY


# ------------------------------------------------------------------------------------------ configuration
def feast_home(settings: Settings | None = None) -> Path:
    return (settings or get_settings()).home_dir / "feast"


def definitions_source(settings: Settings | None = None) -> Path:
    """The definitions folder: settings.feast.repo_path (absolute, or relative to the working directory), else the
    `feature_repo/` of the source checkout this package runs from."""
    s = settings or get_settings()
    candidates = [Path(s.feast.repo_path)]
    if not Path(s.feast.repo_path).is_absolute():
        candidates.append(Path(__file__).resolve().parents[2] / s.feast.repo_path)
    for c in candidates:
        if (c / "features.py").is_file():
            return c.resolve()
    raise FileNotFoundError(f"feast.repo_path: no features.py in {' or '.join(str(c) for c in candidates)} "
                            "(set RENTALML_FEAST__REPO_PATH to the feature_repo folder)")


def redis_connection_string(redis_url: str) -> str:
    """redis://[user:password@]host:port/db (rediss:// for TLS) -> Feast's 'host:port,db=N[,password=…][,ssl=true]'."""
    u = urlparse(redis_url)
    if u.scheme not in ("redis", "rediss") or not u.hostname:
        raise ValueError(f"redis_url: expected redis://host:port/db, got {redis_url!r}")
    parts = [f"{u.hostname}:{u.port or 6379}"]
    db = (u.path or "/0").strip("/") or "0"
    if not db.isdigit():
        raise ValueError(f"redis_url: the database must be a number, got {db!r}")
    parts.append(f"db={db}")
    if u.password:
        parts.append(f"password={unquote(u.password)}")
    if u.username and u.username != "default":
        parts.append(f"username={unquote(u.username)}")
    if u.scheme == "rediss":
        parts.append("ssl=true")
    return ",".join(parts)


def online_redis_url(settings: Settings | None = None) -> str | None:
    """The online store's Redis: feast.redis_url, else redis_url (one Redis for state, cache and features)."""
    s = settings or get_settings()
    return s.feast.redis_url or s.redis_url


def online_store_kind(settings: Settings | None = None) -> str:
    s = settings or get_settings()
    kind = s.feast.online_store or ("redis" if online_redis_url(s) else "sqlite")
    if kind not in ("sqlite", "redis"):
        raise ValueError(f"feast.online_store must be 'sqlite' or 'redis' (got {kind!r})")
    if kind == "redis" and not online_redis_url(s):
        raise ValueError("feast.online_store is 'redis' but redis_url is not set (RENTALML_REDIS_URL)")
    return kind


def store_config(settings: Settings | None = None) -> dict:
    """The feature_store.yaml content for these Settings."""
    s = settings or get_settings()
    home = feast_home(s)
    if s.feast.registry_url:
        registry = {"registry_type": "sql", "path": s.feast.registry_url, "cache_ttl_seconds": 60,
                    "sqlalchemy_config_kwargs": {"pool_pre_ping": True}}
    else:
        registry = {"registry_type": "file", "path": str(home / "registry.db"), "cache_ttl_seconds": 10}
    if online_store_kind(s) == "redis":
        # fail fast (Feast passes the string's key=value pairs, JSON-decoded, to redis.Redis): socket timeouts, and
        # retry=null (one immediate retry) instead of redis-py's default 3 retries backing off 1-10 s, longer than
        # any request's feature deadline; the stream processor retries failed pushes itself, with backoff
        conn = redis_connection_string(online_redis_url(s))
        t = float(s.feast.redis_socket_timeout_s)
        host, _, rest = conn.partition(",")
        timeouts = f"socket_timeout={t},socket_connect_timeout={t}," if t > 0 else ""
        conn = f"{host},{timeouts}retry=null,{rest}"
        online = {"type": "redis", "connection_string": conn}
    else:
        online = {"type": "sqlite", "path": str(home / "online.db")}
    return {"project": s.feast.project, "provider": "local", "registry": registry, "online_store": online,
            "offline_store": {"type": "duckdb"}, "entity_key_serialization_version": 3}


def _redacted(cfg: dict) -> dict:
    import copy
    import re

    out = copy.deepcopy(cfg)
    conn = out["online_store"].get("connection_string")
    if conn:
        out["online_store"]["connection_string"] = re.sub(r"password=[^,]*", "password=<from RENTALML_REDIS_URL>",
                                                          conn)
    if out["registry"]["registry_type"] == "sql":
        u = urlparse(out["registry"]["path"])
        if u.password:
            out["registry"]["path"] = out["registry"]["path"].replace(f":{u.password}@", ":<redacted>@", 1)
    return out


def _load_definitions(path: Path) -> ModuleType:
    """Import the definitions file under one stable module name (re-imported when the file changes)."""
    path = path.resolve()
    key = (str(path), path.stat().st_mtime_ns)
    mod = sys.modules.get(DEFINITIONS_MODULE)
    if mod is not None and getattr(mod, "__rentalml_key__", None) == key:
        return mod
    spec = importlib.util.spec_from_file_location(DEFINITIONS_MODULE, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[DEFINITIONS_MODULE] = mod
    spec.loader.exec_module(mod)
    mod.__rentalml_key__ = key
    return mod


def _write_if_changed(path: Path, content: bytes) -> None:
    """Atomic replace (processes sharing a home open the store concurrently), skipped when unchanged."""
    if path.exists() and path.read_bytes() == content:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(content)
    tmp.replace(path)


_REPO_PY = '''"""Generated by rentalml.features.store.open_store: the definitions with this home's data directory.

Run the feast CLI against this folder (`feast -c {repo} …`); edit feature_repo/, not this copy."""
from pathlib import Path

import features

globals().update(features.build(Path({data!r})))
'''


def open_store(settings: Settings | None = None) -> FeatureStore:
    """Write `$RENTALML_HOME/feast/repo/` (feature_store.yaml from Settings, the definitions) and return the store.

    Nothing is registered yet: call `apply(store)` (or `rentalml features apply`) once per definitions change."""
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    s = settings or get_settings()
    home = feast_home(s)
    repo, data = home / "repo", home / "data"
    repo.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    src = definitions_source(s)
    for f in sorted(src.glob("*.py")):
        if f.name != "repo.py":
            _write_if_changed(repo / f.name, f.read_bytes())
    _write_if_changed(repo / "repo.py", _REPO_PY.format(repo=repo, data=str(data)).encode())
    cfg = store_config(s)
    _write_if_changed(repo / "feature_store.yaml", ("# generated from Settings by rentalml.features.store.open_store\n"
                                                    + yaml.safe_dump(_redacted(cfg), sort_keys=False)).encode())
    _load_definitions(repo / "features.py")
    return FeatureStore(repo_path=str(repo), config=RepoConfig(repo_path=repo, **cfg))


def definitions(store: FeatureStore) -> ModuleType:
    """The definitions module of an opened store (FEATURES_VERSION, VIEWS, PUSH_SOURCES, columns(), build())."""
    return _load_definitions(Path(store.repo_path) / "features.py")


def data_dir(store: FeatureStore) -> Path:
    return Path(store.repo_path).parent / "data"


def objects(store: FeatureStore) -> dict[str, object]:
    return definitions(store).build(data_dir(store))


# ------------------------------------------------------------------------------------------ tables
def _arrow_type(dtype) -> pa.DataType:
    name = str(dtype)
    return {"Float64": pa.float64(), "Float32": pa.float32(), "Int64": pa.int64(), "Int32": pa.int32(),
            "String": pa.string(), "Bool": pa.bool_(), "UnixTimestamp": pa.timestamp("us", tz="UTC")}[name]


def table_schema(defs: ModuleType, view: str) -> pa.Schema:
    """Arrow schema of a view's batch table: join key, event_timestamp, features (in definition order)."""
    entity, fields, _, _ = defs.VIEWS[view]
    return pa.schema([(entity.join_key, pa.string()), (defs.TIMESTAMP, pa.timestamp("us", tz="UTC")),
                      *((f.name, _arrow_type(f.dtype)) for f in fields)])


def _to_arrow(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    cols = {}
    for f in schema:
        s = df[f.name] if f.name in df else pd.Series([None] * len(df), dtype=object)
        if pa.types.is_timestamp(f.type):
            s = pd.to_datetime(s, utc=True)
        elif pa.types.is_integer(f.type):
            s = pd.to_numeric(s, errors="raise").round().astype("Int64")
        elif pa.types.is_floating(f.type):
            s = pd.to_numeric(s, errors="raise").astype(float)
        elif pa.types.is_string(f.type):
            s = s.astype(object).where(s.notna(), None).map(lambda v: v if v is None else str(v))
        cols[f.name] = pa.array(s.tolist() if pa.types.is_string(f.type) else s, type=f.type, from_pandas=True)
    return pa.table(cols, schema=schema)


def _attribute_table(ds: Dataset, end: pd.Timestamp) -> pd.DataFrame:
    inter = ds.interactions
    first_seen = inter.groupby("property_id")["timestamp"].min()
    if ds.items is not None:
        items = ds.items.copy()
    else:
        items = pd.DataFrame(index=pd.Index(sorted(first_seen.index), name="property_id"))
    ts = pd.Series(inter["timestamp"].min() if len(inter) else end, index=items.index)
    if "listed_at" in items:
        ts = pd.to_datetime(items["listed_at"], utc=True).fillna(ts)
    ts = pd.concat([ts, first_seen.reindex(items.index)], axis=1).min(axis=1)  # attributes exist before any event
    out = pd.DataFrame({"property_id": items.index.astype(str), "event_timestamp": ts.to_numpy()})
    for col in formulas.ATTRIBUTE_FEATURES:
        if col != "available":
            out[col] = items[col].to_numpy() if col in items else None
    out["available"] = items["available"].astype(int).to_numpy() if "available" in items else 1
    return out


def _snapshots(ts_s: np.ndarray, end_s: int, horizon_days: int) -> tuple[np.ndarray, np.ndarray]:
    """For each event second: the snapshot times (UTC midnights before end, and `end`) within (t, t+horizon]."""
    k0 = ts_s // _DAY + 1
    last_midnight = ((end_s - 1) // _DAY) * _DAY
    ev = np.repeat(np.arange(len(ts_s)), horizon_days)
    snap = (np.repeat(k0, horizon_days) + np.tile(np.arange(horizon_days), len(ts_s))) * _DAY
    keep = snap <= last_midnight
    ev, snap = ev[keep], snap[keep]
    tail = np.flatnonzero(ts_s > end_s - horizon_days * _DAY)
    return np.concatenate([ev, tail]), np.concatenate([snap, np.full(len(tail), end_s, dtype=np.int64)])


def _engagement_table(ds: Dataset, end_s: int) -> pd.DataFrame:
    inter = ds.interactions
    codes, uniq = pd.factorize(inter["property_id"])
    ts = inter["timestamp"].astype("int64").to_numpy() // 10**9
    etype = inter["event_type"].astype(str).to_numpy() if "event_type" in inter else np.full(len(inter), "view")
    ev, snap = _snapshots(ts, end_s, 8)
    pairs = pd.DataFrame({"p": codes[ev], "d": snap}).drop_duplicates().sort_values(["p", "d"])
    p, d = pairs["p"].to_numpy(np.int64), pairs["d"].to_numpy(np.int64)
    big = np.int64(1) << 34
    out = {"property_id": np.asarray(uniq, dtype=object)[p], "event_timestamp": pd.to_datetime(d, unit="s", utc=True)}
    for col, w in formulas.ENGAGEMENT_WINDOWS.items():
        m = etype == w.event_type
        keys = np.sort(codes[m].astype(np.int64) * big + ts[m])
        out[col] = np.searchsorted(keys, p * big + d) - np.searchsorted(keys, p * big + d - w.window_s)
    keys = np.sort(codes.astype(np.int64) * big + ts)
    last = keys[np.searchsorted(keys, p * big + d) - 1] - p * big
    out["last_event_ts"] = pd.to_datetime(last, unit="s", utc=True)
    return pd.DataFrame(out)


def _taste_table(ds: Dataset, end_s: int) -> pd.DataFrame:
    inter = ds.interactions
    items = ds.items if ds.items is not None else pd.DataFrame(index=pd.Index([], name="property_id"))
    ts = inter["timestamp"].astype("int64").to_numpy() // 10**9
    ev, snap = _snapshots(ts, end_s, _TASTE_WINDOW_DAYS)
    # events strictly inside [D - 30 d, D): the snapshot list already holds only D in (t, t + 30 d]
    # the event weight of the formula (the stream's too): by event type where the data has one
    w = (inter["event_type"].astype(str).map(formulas.EVENT_WEIGHTS).fillna(inter["weight"])
         if "event_type" in inter else inter["weight"]).to_numpy(dtype=float)
    x = pd.DataFrame({"user_id": inter["user_id"].to_numpy()[ev], "d": snap, "t": ts[ev], "w": w[ev]})
    pid = inter["property_id"].to_numpy()[ev]
    for col in ("price", "bedrooms", "lat", "lon", "city"):
        x[col] = items[col].reindex(pid).to_numpy() if col in items else np.nan
    x = x[x["t"] < x["d"]]
    g = x.groupby(["user_id", "d"], sort=True)
    out = pd.DataFrame({"n_events_7d": (x["t"] >= x["d"] - formulas.TASTE_COUNT_WINDOW_S)
                        .groupby([x["user_id"], x["d"]]).sum(),
                        "median_price": g["price"].median()})
    for col, name in formulas.TASTE_MEANS.items():
        v = pd.to_numeric(x[col], errors="coerce")
        wv = (v * x["w"]).groupby([x["user_id"], x["d"]]).sum(min_count=1)
        ww = x["w"].where(v.notna()).groupby([x["user_id"], x["d"]]).sum(min_count=1)
        out[name] = wv / ww
    cities = x.dropna(subset=["city"]).groupby(["user_id", "d", "city"])["w"].sum().reset_index()
    cities = cities.sort_values(["user_id", "d", "w", "city"], ascending=[True, True, False, True])
    top = cities.drop_duplicates(["user_id", "d"]).set_index(["user_id", "d"])["city"]
    out["top_city"] = top.reindex(out.index)
    out = out.reset_index()
    out["event_timestamp"] = pd.to_datetime(out.pop("d"), unit="s", utc=True)
    return out


def dataset_end(ds: Dataset) -> pd.Timestamp:
    """The snapshot time of a dataset: one second after its last event (every event counts at that time)."""
    last = ds.interactions["timestamp"].max()
    return (last.floor("s") + pd.Timedelta(seconds=1)) if pd.notna(last) else pd.Timestamp.now(tz="UTC").floor("s")


def build_offline_tables(dataset: Dataset, out_dir: str | Path, *, defs: ModuleType | None = None,
                         keep_newer: bool = True) -> dict[str, int]:
    """Write the batch source tables of every view from a Dataset into `out_dir` (`<view>.parquet`):

    * property_attributes: one row per property at its listing time (`listed_at`, never after its first event);
    * property_engagement: per property, counts over the 1 h / 24 h / 7 d windows ending at every UTC midnight of
      the data (while the property had events in the previous 8 days) and at the dataset's end;
    * user_taste: per user, the same snapshots over the user's events of the last 30 days.

    Rows already in a table with a timestamp after the dataset's end (streamed pushes) are kept (`keep_newer`).
    Returns the row count per view."""
    if defs is None:
        defs = _load_definitions(definitions_source() / "features.py")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    end = dataset_end(dataset)
    end_s = int(end.timestamp())
    frames = {"property_attributes": _attribute_table(dataset, end),
              "property_engagement": _engagement_table(dataset, end_s),
              "user_taste": _taste_table(dataset, end_s)}
    counts = {}
    for view, df in frames.items():
        schema = table_schema(defs, view)
        table = _to_arrow(df, schema)
        path = out / f"{view}.parquet"
        if keep_newer and path.exists():
            old = pq.read_table(path)
            if old.schema.names == schema.names:
                old = old.cast(schema).to_pandas()
                newer = old[old[defs.TIMESTAMP] > end]
                if len(newer):
                    table = pa.concat_tables([table, _to_arrow(newer, schema)])
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
        counts[view] = table.num_rows
    return counts


def ensure_tables(store: FeatureStore) -> None:
    """Empty batch tables for views that have none yet (so pushes to the offline store and reads work)."""
    defs = definitions(store)
    for view in defs.VIEWS:
        path = data_dir(store) / f"{view}.parquet"
        if not path.exists():
            pq.write_table(table_schema(defs, view).empty_table(), path)


# ------------------------------------------------------------------------------------------ registry, online
def apply(store: FeatureStore) -> list[str]:
    """Register (or update) every entity, source and view of the definitions. Returns the view names."""
    from feast import FeatureView
    from feast.on_demand_feature_view import OnDemandFeatureView

    ensure_tables(store)
    objs = list(objects(store).values())
    store.apply(objs)
    return sorted(o.name for o in objs if isinstance(o, (FeatureView, OnDemandFeatureView)))


def materialize(store: FeatureStore, end: datetime | None = None, *, start: datetime | None = None,
                views: list[str] | None = None) -> dict:
    """Load the latest batch row per entity with a timestamp in [start, end] (default: all time up to now) of each
    view into the online store."""
    end = pd.Timestamp(end or datetime.now(UTC))
    end = (end.tz_localize("UTC") if end.tzinfo is None else end.tz_convert("UTC")).to_pydatetime()
    start = start or datetime(1970, 1, 2, tzinfo=UTC)
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    views = views or list(definitions(store).VIEWS)
    with contextlib.redirect_stdout(sys.stderr):  # Feast prints its progress; stdout stays the caller's (JSON)
        store.materialize(start_date=start, end_date=end, feature_views=views)
    return {"views": views, "start": start.isoformat(), "end": end.isoformat()}


def feature_refs(store: FeatureStore, views: list[str]) -> list[str]:
    """'view:feature' for every feature of the named (on-demand) views; 'view:feature' entries pass through."""
    refs: list[str] = []
    for v in views:
        if ":" in v:
            refs.append(v)
            continue
        try:
            fv = store.get_feature_view(v)
        except Exception:
            try:
                fv = store.get_on_demand_feature_view(v)
            except Exception as exc:
                raise ValueError(f"views: unknown feature view {v!r} (apply the feature repo first?)") from exc
        refs += [f"{v}:{f.name}" for f in fv.features]
    return refs


def training_frame(store: FeatureStore, entity_df: pd.DataFrame, views: list[str] | None = None) -> pd.DataFrame:
    """Point-in-time join (`get_historical_features`): for each entity row the latest feature values at or before
    its `event_timestamp` (within the view's TTL). Same rows, same order as `entity_df`, plus the features."""
    defs = definitions(store)
    if views is None:
        keys = set(entity_df.columns)
        views = [v for v, (ent, *_) in defs.VIEWS.items() if ent.join_key in keys]
    missing = [c for c in ("event_timestamp",) if c not in entity_df]
    needed = {defs.VIEWS[v][0].join_key for v in views if v in defs.VIEWS}
    if "user_property_match" in views:
        needed |= {"user_id", "property_id"}
    if "property_derived" in views:
        needed.add("property_id")
    missing += sorted(needed - set(entity_df.columns))
    if missing:
        raise ValueError(f"entity_df lacks columns {missing}")
    edf = entity_df.copy()
    edf["event_timestamp"] = pd.to_datetime(edf["event_timestamp"], utc=True)
    for key in needed:
        edf[key] = edf[key].astype(str)
    edf["__row"] = np.arange(len(edf))
    out = store.get_historical_features(entity_df=edf, features=feature_refs(store, views)).to_df()
    out = out.sort_values("__row").drop(columns="__row").reset_index(drop=True)
    if len(out) != len(entity_df):
        raise RuntimeError(f"point-in-time join returned {len(out)} rows for {len(entity_df)} entity rows")
    return out


def online_features(store: FeatureStore, user_ids: list[str] | None = None, property_ids: list[str] | None = None,
                    features: list[str] | None = None) -> pd.DataFrame:
    """Online feature values. Users only: user_taste; properties only: property_attributes, property_engagement,
    property_derived; both: one row per (user, property) pair with all of them and user_property_match.
    `features` (view names or 'view:feature') overrides the default. Unknown entities give nulls."""
    users = [str(u) for u in user_ids or []]
    props = [str(p) for p in property_ids or []]
    if not users and not props:
        raise ValueError("online_features: give user_ids and/or property_ids")
    if users and props:
        rows = [{"user_id": u, "property_id": p} for u in users for p in props]
        default = ["user_taste", "property_attributes", "property_engagement", "property_derived",
                   "user_property_match"]
    elif users:
        rows, default = [{"user_id": u} for u in users], ["user_taste"]
    else:
        rows, default = [{"property_id": p} for p in props], ["property_attributes", "property_engagement",
                                                              "property_derived"]
    refs = feature_refs(store, features or default)
    df = store.get_online_features(features=refs, entity_rows=rows).to_df()
    keys = [k for k in ("user_id", "property_id") if k in df]
    names = list(dict.fromkeys(r.split(":", 1)[1] for r in refs))
    return df[keys + [n for n in names if n in df] + [c for c in df.columns if c not in keys and c not in names]]


def push(store: FeatureStore, source_name: str, df: pd.DataFrame, *, to: str = "online_and_offline",
         fill_missing: bool = True) -> int:
    """Push rows to a push source (`property_attributes_push`, `property_engagement_push`, `user_taste_push`).

    `df` needs the join key and `event_timestamp` (tz-aware, or UTC when naive); feature columns it lacks (a
    partial update such as a `property_data` "updated" event) are filled from the current online values when
    `fill_missing`, else left null; extra columns are ignored. `to`: "online", "offline" or "online_and_offline".
    Returns the number of rows pushed."""
    from feast.data_source import PushMode

    defs = definitions(store)
    if source_name not in defs.PUSH_SOURCES:
        raise ValueError(f"source_name: unknown push source {source_name!r} (one of {sorted(defs.PUSH_SOURCES)})")
    modes = {"online": PushMode.ONLINE, "offline": PushMode.OFFLINE, "online_and_offline": PushMode.ONLINE_AND_OFFLINE}
    if to not in modes:
        raise ValueError(f"to: must be one of {sorted(modes)} (got {to!r})")
    view = defs.PUSH_SOURCES[source_name]
    cols = defs.columns(view)
    key = cols[0]
    missing = [c for c in (key, defs.TIMESTAMP) if c not in df]
    if missing:
        raise ValueError(f"{source_name}: rows lack columns {missing}")
    if df[key].isna().any() or df[defs.TIMESTAMP].isna().any():
        raise ValueError(f"{source_name}: {key} and {defs.TIMESTAMP} must not be null")
    df = df.copy()
    df[key] = df[key].astype(str)
    absent = [c for c in cols[2:] if c not in df]
    if absent and fill_missing:
        current = online_features(store, **{f"{key.split('_')[0]}_ids": df[key].tolist()},
                                  features=[f"{view}:{c}" for c in absent])
        for c in absent:
            df[c] = current[c].to_numpy()
    try:
        table = _to_arrow(df, table_schema(defs, view))
    except (ValueError, TypeError, pa.ArrowInvalid) as exc:
        raise ValueError(f"{source_name}: bad value types for {cols}: {exc}") from exc
    store.push(source_name, table.to_pandas(), to=modes[to])
    return table.num_rows


# ------------------------------------------------------------------------------------------ training, lineage
def views_used(store: FeatureStore, views: list[str]) -> list[str]:
    """Lineage entries `view:FEATURES_VERSION` (the version tag registered with each view)."""
    out = []
    for v in views:
        try:
            fv = store.get_feature_view(v)
        except Exception:
            fv = store.get_on_demand_feature_view(v)
        out.append(f"{v}:{fv.tags.get('version', definitions(store).FEATURES_VERSION)}")
    return out


#: the property columns the Feast view provides to the models' property feature table
ATTRIBUTE_COLUMNS = ("price", "bedrooms", "bathrooms", "city", "lat", "lon", "property_type")


def dataset_with_features(dataset: Dataset, settings: Settings | None = None, *,
                          materialize_online: bool = True) -> tuple[Dataset, list[str]]:
    """The training path through Feast: write the dataset's batch tables, apply the definitions, take the property
    attributes point in time at the dataset's end (`training_frame`) and put them into the items table the model's
    encoder reads (other item columns unchanged). Optionally refresh the online store. Returns the dataset and the
    lineage entries of the views used (`view:version`; none when the dataset has no such attributes, e.g.
    MovieLens)."""
    store = open_store(settings)
    build_offline_tables(dataset, data_dir(store), defs=definitions(store))
    apply(store)
    end = dataset_end(dataset)
    if materialize_online:
        materialize(store, end.to_pydatetime())
    ids = (dataset.items.index if dataset.items is not None
           else pd.Index(sorted(dataset.interactions["property_id"].unique())))
    entity_df = pd.DataFrame({"property_id": ids.astype(str), "event_timestamp": end})
    frame = training_frame(store, entity_df, ["property_attributes"]).set_index("property_id")
    items = dataset.items.copy() if dataset.items is not None else pd.DataFrame(index=ids.rename("property_id"))
    used = False
    for col in ATTRIBUTE_COLUMNS:
        if frame[col].notna().any():
            used = True
            values = frame[col].reindex(items.index)
            if col in items:
                values = values.where(values.notna(), items[col]).astype(items[col].dtype)
            items[col] = values
    if not used:
        return dataset, []
    from rentalml.data.dataset import Dataset as _Dataset

    out = _Dataset(dataset.interactions, items, dataset.users, name=dataset.name, meta=dict(dataset.meta))
    return out, views_used(store, ["property_attributes"])
