"""`rentalml backup` / `rentalml restore` (locations from the settings: RENTALML_HOME, tracking and database
URLs, Redis)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def backup_cmd(out: Path = typer.Option(None, "--out", help="archive to write (default: "
                                        "./rentalml-backup-<UTC time>.tar.gz)")) -> None:
    """Back up the MLflow registry and artifacts, the database of record, the feature store registry and
    online store, and the local state into one tar.gz with a checksummed manifest."""
    from rentalml.ops.backup import BackupError, backup

    try:
        manifest = backup(out)
    except BackupError as exc:
        typer.echo(f"backup failed: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(json.dumps({"archive": manifest["archive"], "bytes": manifest["bytes"],
                           "created_at": manifest["created_at"],
                           "components": {c["name"]: {"kind": c["kind"], "files": len(c["members"])}
                                          for c in manifest["components"]}}))


def restore_cmd(archive: Path = typer.Argument(..., help="a backup written by `rentalml backup`"),
                force: bool = typer.Option(False, "--force", help="overwrite non-empty targets")) -> None:
    """Restore a backup into this deployment (checksums verified first; non-empty targets need --force)."""
    from rentalml.ops.backup import BackupError, restore

    try:
        res = restore(archive, force=force)
    except BackupError as exc:
        typer.echo(f"restore failed: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(json.dumps(res))


def register(app: typer.Typer) -> None:
    app.command("backup")(backup_cmd)
    app.command("restore")(restore_cmd)
