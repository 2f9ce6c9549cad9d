"""`rentalml db init|seed|stats`: the database of record (URL from RENTALML_DATABASE_URL unless --url)."""

from __future__ import annotations

import json

import typer

db_app = typer.Typer(help="The database of record (properties, users, interactions).", no_args_is_help=True)

URL_HELP = "SQLAlchemy URL (default: RENTALML_DATABASE_URL, else SQLite under $RENTALML_HOME)"


@db_app.command("init")
def init(url: str = typer.Option(None, "--url", help=URL_HELP)) -> None:
    """Create or upgrade the schema (Alembic migrations to head)."""
    from rentalml.db import store

    revision = store.init_db(url)
    typer.echo(json.dumps({"url": store.safe_url(url), "revision": revision}))


@db_app.command("seed")
def seed(url: str = typer.Option(None, "--url", help=URL_HELP),
         dataset: str = typer.Option("synthetic:2000,1000,50000", "--dataset",
                                     help="dataset spec: synthetic:u,p,e[,seed] | a parquet dir | movielens | airbnb"),
         chunk: int = typer.Option(5000, min=1, help="rows per INSERT batch")) -> None:
    """Migrate, then load a dataset; rows already there (same id / event_id) are skipped."""
    from rentalml.data.loaders import load_dataset
    from rentalml.db import store

    ds = load_dataset(dataset)
    inserted = store.seed(url, ds, chunk=chunk)
    typer.echo(json.dumps({"url": store.safe_url(url), "dataset": ds.name, "inserted": inserted,
                           "rows": store.stats(url)["rows"]}))


@db_app.command("stats")
def stats(url: str = typer.Option(None, "--url", help=URL_HELP)) -> None:
    """Row counts and the schema revision."""
    from rentalml.db import store

    typer.echo(json.dumps(store.stats(url)))


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")
