"""`rentalml ...` command line (Typer).

The core never imports a deployable: the deployable parts (inference, streaming, pipelines, components)
add their commands through the `rentalml.commands` entry-point group (a `register(app)` function each).
"""

from __future__ import annotations

import json
import logging
from importlib.metadata import entry_points
from pathlib import Path

import typer

app = typer.Typer(help="rentalml: recommendations for rental marketplaces", no_args_is_help=True,
                  pretty_exceptions_enable=False)


def _load_plugins() -> None:
    for ep in entry_points(group="rentalml.commands"):
        try:
            ep.load()(app)
        except Exception as exc:  # a broken plugin must not take the whole CLI down
            logging.getLogger(__name__).warning("command plugin %s failed to load: %s", ep.name, exc)


@app.command()
def version() -> None:
    """Print the package version."""
    from rentalml import __version__

    typer.echo(__version__)


@app.command()
def generate(out: Path = typer.Option(Path(".rentalml/data/demo"), help="output directory"),
             users: int = 2000, properties: int = 1000, events: int = 50_000, seed: int = 42) -> None:
    """Generate a synthetic marketplace (parquet)."""
    from rentalml.data.generator import generate_marketplace

    ds = generate_marketplace(n_users=users, n_properties=properties, n_events=events, seed=seed)
    ds.save(out)
    typer.echo(json.dumps({"out": str(out), **ds.summary()}))


_load_plugins()
