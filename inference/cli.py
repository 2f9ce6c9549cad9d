"""`rentalml serve` (added to the core CLI through the `rentalml.commands` entry-point group)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        bundle: Path | None = typer.Option(None, "--bundle", help="model bundle directory; default: fetch the "
                                           "bundle behind --alias from the MLflow registry"),
        alias: str = typer.Option("champion", "--alias", help="MLflow model alias to serve (champion/challenger)"),
        variant: str | None = typer.Option(None, "--variant", help="A/B variant reported in responses and "
                                           "metrics (default: the alias)"),
        http_port: int | None = typer.Option(None, "--http-port", help="REST port (default: "
                                             "RENTALML_SERVE__HTTP_PORT, else 8080)"),
        grpc_port: int | None = typer.Option(None, "--grpc-port", help="gRPC port (default: "
                                             "RENTALML_SERVE__GRPC_PORT, else 8081)"),
        workers: int = typer.Option(1, "--workers", min=1, help="REST worker processes (gRPC stays in the main one)"),
        grpc_threads: int = typer.Option(4, "--grpc-threads", min=1, help="gRPC server thread pool size"),
    ) -> None:
        """Serve a model bundle: KServe v2 REST + gRPC, POST /predict, GET /health, /metrics.

        Logging follows KSERVE_LOGLEVEL (DEBUG/INFO/WARNING/ERROR); SIGTERM/SIGINT shut down gracefully.
        """
        from .server import serve as run_server

        try:
            run_server(bundle, alias=alias, variant=variant, http_port=http_port, grpc_port=grpc_port,
                       workers=workers, grpc_threads=grpc_threads)
        except (FileNotFoundError, LookupError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
