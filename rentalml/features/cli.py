"""`rentalml features apply|materialize|show|training-set`: the Feast feature store (rentalml.features.store)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import typer


def _read_table(path: Path):
    import pandas as pd

    if not path.exists():
        raise typer.BadParameter(f"{path} not found", param_hint="--entities")
    return pd.read_parquet(path) if path.suffix in (".parquet", ".pq") else pd.read_csv(path)


def _parse_ts(value: str | None, hint: str) -> datetime | None:
    if value is None:
        return None
    import pandas as pd

    try:
        ts = pd.Timestamp(value)
    except ValueError as exc:
        raise typer.BadParameter(f"not a timestamp: {value!r}", param_hint=hint) from exc
    return (ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")).to_pydatetime()


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Feast feature store: definitions, offline tables, online features", no_args_is_help=True)
    app.add_typer(group, name="features")

    @group.command("apply")
    def apply_cmd() -> None:
        """Generate feature_store.yaml from the settings and register the definitions of feature_repo/."""
        from rentalml.features import store as fs

        st = fs.open_store()
        views = fs.apply(st)
        cfg = fs.store_config()
        typer.echo(json.dumps({"project": st.project, "views": views, "version": fs.definitions(st).FEATURES_VERSION,
                               "repo": str(st.repo_path), "registry": cfg["registry"]["registry_type"],
                               "online_store": cfg["online_store"]["type"]}))

    @group.command("materialize")
    def materialize_cmd(
        dataset: str | None = typer.Option(None, help="first rebuild the offline tables from this dataset spec "
                                           "(dir, synthetic:u,p,e[,seed], CSV, db...)"),
        end: str | None = typer.Option(None, help="latest event time to load (ISO-8601; default: now)"),
        start: str | None = typer.Option(None, help="earliest event time to load (default: all)"),
    ) -> None:
        """Load the latest offline values per entity into the online store (SQLite, or Redis by setting)."""
        from rentalml.features import store as fs

        st = fs.open_store()
        out: dict = {}
        if dataset:
            from rentalml.data.loaders import load_dataset

            ds = load_dataset(dataset)
            out["rows"] = fs.build_offline_tables(ds, fs.data_dir(st), defs=fs.definitions(st))
        fs.apply(st)
        out.update(fs.materialize(st, _parse_ts(end, "--end"), start=_parse_ts(start, "--start")))
        typer.echo(json.dumps(out))

    @group.command("show")
    def show_cmd(
        user: list[str] = typer.Option([], "--user", help="user id (repeatable)"),
        prop: list[str] = typer.Option([], "--property", help="property id (repeatable)"),
        feature: list[str] = typer.Option([], "--feature", help="view or view:feature (repeatable; default: all "
                                          "views of the entities given)"),
    ) -> None:
        """Print online features as JSON (one record per user, property, or user × property pair)."""
        from rentalml.features import store as fs

        if not user and not prop:
            raise typer.BadParameter("give --user and/or --property", param_hint="--user/--property")
        df = fs.online_features(fs.open_store(), user_ids=user or None, property_ids=prop or None,
                                features=feature or None)
        typer.echo(json.dumps(json.loads(df.to_json(orient="records", date_format="iso")), indent=2))

    @group.command("training-set")
    def training_set_cmd(
        entities: Path = typer.Option(..., help="entity rows (parquet or CSV): user_id and/or property_id, "
                                      "event_timestamp"),
        out: Path = typer.Option(..., help="output file (.parquet or .csv)"),
        views: str | None = typer.Option(None, help="comma-separated views (default: every view whose entity the "
                                         "rows have)"),
    ) -> None:
        """Point-in-time training set: each entity row with the feature values as of its event_timestamp."""
        from rentalml.features import store as fs

        edf = _read_table(entities)
        try:
            frame = fs.training_frame(fs.open_store(), edf, [v.strip() for v in views.split(",")] if views else None)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--entities/--views") from exc
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".csv":
            frame.to_csv(out, index=False)
        else:
            frame.to_parquet(out, index=False)
        typer.echo(json.dumps({"out": str(out), "rows": len(frame), "columns": list(frame.columns)}))
