"""`rentalml serve`, `rentalml ab report|promote|rollback`, `rentalml loadtest` (added to the core CLI through the
`rentalml.commands` entry-point group)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def _echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        bundle: Path | None = typer.Option(None, "--bundle", help="model bundle directory; default: the registry's "
                                           "`champion` (and `challenger` with a canary), reloadable"),
        alias: str = typer.Option("champion", "--alias", help="without --bundle: serve only this MLflow alias "
                                  "(champion = the A/B router over champion/challenger)"),
        variant: str | None = typer.Option(None, "--variant", help="A/B variant reported for the champion in "
                                           "responses and metrics (default: the alias)"),
        challenger_bundle: Path | None = typer.Option(None, "--challenger-bundle", help="bundle directory of the "
                                                      "challenger (with --bundle)"),
        challenger_percent: float | None = typer.Option(None, "--challenger-percent", min=0, max=100,
                                                        help="share of users (sticky) sent to the challenger "
                                                        "(default RENTALML_SERVE__CHALLENGER_PERCENT, else 0)"),
        http_port: int | None = typer.Option(None, "--http-port", "--http_port", help="REST port (default: "
                                             "RENTALML_SERVE__HTTP_PORT, else 8080)"),
        grpc_port: int | None = typer.Option(None, "--grpc-port", "--grpc_port", help="gRPC port (default: "
                                             "RENTALML_SERVE__GRPC_PORT, else 8081)"),
        workers: int = typer.Option(1, "--workers", min=1, help="REST worker processes (gRPC stays in the main one)"),
        grpc_threads: int = typer.Option(4, "--grpc-threads", min=1, help="gRPC server thread pool size"),
        role: str = typer.Option("server", "--role", help="server: everything in this process | transformer: "
                                 "ids, features, filters and fold-in here, the graphs on --predictor-host (Triton: "
                                 "each A/B arm calls its own model version there)"),
        predictor_host: str | None = typer.Option(None, "--predictor-host", "--predictor_host",
                                                  help="transformer: the v2 predictor (host:port or URL; KServe "
                                                  "passes it; default RENTALML_SERVE__PREDICTOR_URL)"),
        model_name: str | None = typer.Option(None, "--model-name", "--model_name",
                                              help="model name to serve under (KServe passes the "
                                              "InferenceService name; default rental-recommender)"),
    ) -> None:
        """Serve recommendations: KServe v2 REST + gRPC, POST /predict, POST /feedback, GET /health, /metrics,
        POST /admin/reload, POST /admin/invalidate.

        Logging follows KSERVE_LOGLEVEL (DEBUG/INFO/WARNING/ERROR); SIGTERM/SIGINT shut down gracefully.
        """
        from rentalml.config import get_settings

        from .server import serve as run_server

        s = get_settings().serve
        try:
            if role not in ("server", "transformer"):  # the predictor is Triton (start_triton in tests)
                raise ValueError(f"--role must be server or transformer, got {role!r}")
            predictor = predictor_host or s.predictor_url
            if role == "transformer" and not predictor:
                raise ValueError("--role transformer needs --predictor-host (or RENTALML_SERVE__PREDICTOR_URL)")
            run_server(bundle, alias=alias, variant=variant, http_port=http_port, grpc_port=grpc_port,
                       workers=workers, grpc_threads=grpc_threads, challenger=challenger_bundle,
                       challenger_percent=challenger_percent, predictor_url=predictor if role == "transformer"
                       else None, model_name=model_name)
        except (FileNotFoundError, LookupError, ValueError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    ab = typer.Typer(help="A/B test of the champion and challenger: report, promote, roll back", no_args_is_help=True)
    app.add_typer(ab, name="ab")

    @ab.command("report")
    def ab_report(
        outcomes: Path | None = typer.Option(None, "--outcomes", help="outcomes JSONL (default: "
                                             "$RENTALML_HOME/ab/outcomes.jsonl or serve.outcomes_path)"),
        source: str = typer.Option("file", "--source", help="file | kafka (the ab_outcomes topic)"),
        metric: str = typer.Option("ctr", "--metric", help="decision metric: ctr | conversion"),
        alpha: float | None = typer.Option(None, "--alpha", help="significance level (default serve.ab_alpha)"),
        min_impressions: int | None = typer.Option(None, "--min-impressions",
                                                   help="per variant (default serve.ab_min_impressions)"),
    ) -> None:
        """Per-variant CTR and conversion with 95 % Wilson intervals, a two-proportion z-test, and the
        recommendation: promote / keep / rollback."""
        from rentalml.evaluation import ab as abm

        if source not in ("file", "kafka"):
            raise typer.BadParameter("must be 'file' or 'kafka'", param_hint="--source")
        if metric not in ("ctr", "conversion"):
            raise typer.BadParameter("must be 'ctr' or 'conversion'", param_hint="--metric")
        if source == "kafka":
            from rentalml.kafka import client_config

            events = abm.read_outcomes_kafka(client_config())
        else:
            path = outcomes or abm.outcomes_path()
            if not path.exists():
                typer.echo(f"error: no outcomes at {path}", err=True)
                raise typer.Exit(2)
            events = abm.read_outcomes_file(path)
        _echo_json(abm.report(events, metric=metric, alpha=alpha, min_impressions=min_impressions))

    def _cluster(percent: int, cluster: bool | None, isvc: str | None, namespace: str | None,
                 champion: str | None = None) -> dict | None:
        from rentalml.config import get_settings

        s = get_settings().serve
        if not (s.cluster if cluster is None else cluster):
            return None
        from rentalml.kserve import set_canary_traffic

        return set_canary_traffic(isvc or s.isvc_name, percent, namespace=namespace or s.namespace,
                                  champion=champion)

    cluster_opt = typer.Option(None, "--cluster/--no-cluster", help="also JSON-patch the InferenceService's "
                               "transformer arms (pinned versions, challenger share; default "
                               "RENTALML_SERVE__CLUSTER)")
    isvc_opt = typer.Option(None, "--isvc", help="InferenceService name (default serve.isvc_name)")
    ns_opt = typer.Option(None, "--namespace", help="namespace (default serve.namespace, in-cluster: own)")

    def _move(action: str, percent: int, cluster, isvc, namespace) -> None:
        from rentalml.evaluation import ab as abm

        try:
            res = getattr(abm, action)()
        except LookupError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        # a new champion (promote, or a rollback that restores the previous one) is pinned as the transformer's
        # champion arm with no challenger; stopping a canary only sets its share to 0
        champion = res.get("champion") if action == "promote" or res.get("action") == "champion_restored" else None
        res["cluster"] = _cluster(percent, cluster, isvc, namespace, champion=champion)
        _echo_json(res)

    @ab.command("promote")
    def ab_promote(cluster: bool | None = cluster_opt, isvc: str | None = isvc_opt,
                   namespace: str | None = ns_opt) -> None:
        """challenger → champion (the old champion is recorded for rollback); cluster: canary to 100 %."""
        _move("promote", 100, cluster, isvc, namespace)

    @ab.command("rollback")
    def ab_rollback(cluster: bool | None = cluster_opt, isvc: str | None = isvc_opt,
                    namespace: str | None = ns_opt) -> None:
        """Stop the canary (drop the challenger alias) or, without one, restore the previous champion;
        cluster: canary to 0 %."""
        _move("rollback", 0, cluster, isvc, namespace)

    @app.command()
    def loadtest(
        url: str = typer.Option("http://127.0.0.1:8080", "--url", help="server address (loopback only); the "
                                "gRPC port for --protocol grpc"),
        protocol: str = typer.Option("rest", "--protocol", help="friendly | rest | grpc"),
        requests: int = typer.Option(1000, "--requests", min=1, max=1_000_000, help="request budget"),
        duration: float = typer.Option(10.0, "--duration", min=0.1, max=600, help="time budget, seconds"),
        concurrency: int = typer.Option(4, "--concurrency", min=1, max=64, help="client threads"),
        k: int = typer.Option(10, "--k", min=1, help="recommendations per request"),
        users: str | None = typer.Option(None, "--users", help="comma-separated user ids (default u_000000..)"),
        users_from: Path | None = typer.Option(None, "--users-from", help="bundle directory: its users"),
        token: str | None = typer.Option(None, "--token", help="JWT bearer token (servers with auth)"),
    ) -> None:
        """Load-test a local `rentalml serve`: p50/p95/p99 latency and requests/s, as JSON."""
        from .loadtest import PROTOCOLS, run

        if protocol not in PROTOCOLS:
            raise typer.BadParameter(f"must be one of {', '.join(PROTOCOLS)}", param_hint="--protocol")
        if users:
            ids = [u for u in users.split(",") if u]
        elif users_from is not None:
            import pandas as pd

            ids = pd.read_parquet(users_from / "users.parquet")["user_id"].astype(str).tolist()
        else:
            ids = [f"u_{i:06d}" for i in range(1000)]
        try:
            res = run(url, protocol, ids, requests=requests, duration_s=duration, concurrency=concurrency, k=k,
                      token=token)
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        _echo_json(res)
        if res["errors"]:
            raise typer.Exit(1)
