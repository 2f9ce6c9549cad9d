"""`rentalml monitor drift`: recent data vs the training snapshot; over threshold → a retraining run."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Monitoring: feature and score drift against the training snapshot", no_args_is_help=True)
    app.add_typer(group, name="monitor")

    @group.command("drift")
    def drift_cmd(
        current: str = typer.Option(..., help="recent data: a dataset spec (dir, 'db', a SQL URL, "
                                    "'synthetic:u,p,e', CSV...)"),
        bundle: Path | None = typer.Option(None, help="model bundle whose drift_reference.json is the baseline "
                                           "(default: the registry's champion)"),
        reference: str | None = typer.Option(None, help="instead of the bundle's reference: a reference JSON or "
                                             "a dataset spec to profile"),
        window_days: float | None = typer.Option(None, help="only the last N days of --current (default: "
                                                 "settings.monitor.window_days; 0 = all)"),
        out: Path | None = typer.Option(None, help="report directory (default $RENTALML_HOME/monitoring/drift-<ts>)"),
        retrain: str | None = typer.Option(None, help="local | kfp | off (default settings.monitor.retrain)"),
        retrain_source: str | None = typer.Option(None, help="data source of the retraining run (default "
                                                  "settings.monitor.retrain_source, else --current)"),
        retrain_arg: list[str] = typer.Option([], "--retrain-arg", help="extra args for the pipeline run"),
        fail_on_drift: bool = typer.Option(False, help="exit 3 when drift is detected (for CronJobs/alerts)"),
    ) -> None:
        """Compare recent features and model scores with the training snapshot (PSI and KS per feature),
        write a report with plots, export the drift gauges and, over threshold, trigger retraining."""
        from rentalml.config import get_settings
        from rentalml.data.loaders import load_dataset
        from rentalml.monitoring import drift as d
        from rentalml.runtime.bundle import Bundle

        s = get_settings()
        m = s.monitor
        bundle_dir = bundle
        if bundle_dir is None and reference is None:
            from rentalml.registry.mlflow_registry import fetch_bundle

            bundle_dir = fetch_bundle("champion", settings=s)
        b = Bundle(bundle_dir) if bundle_dir is not None else None
        if reference is None:
            ref = d.load_reference(bundle_dir)
        elif Path(reference).is_file() and reference.endswith(".json"):
            ref = d.load_reference(reference)
        else:
            ref = d.build_reference(load_dataset(reference), b)
        days = m.window_days if window_days is None else window_days
        cur = d.recent(load_dataset(current), days)
        report = d.check_drift(ref, cur, b, psi_threshold=m.psi_threshold, ks_threshold=m.ks_threshold,
                               ks_alpha=m.ks_alpha, min_samples=m.min_samples)
        out_dir = out or s.home_dir / "monitoring" / f"drift-{datetime.now(UTC):%Y%m%dT%H%M%S}"
        paths = d.write_report(report, out_dir)
        d.export_metrics(report, s.home_dir / "monitoring" / "drift.prom", m.pushgateway_url)
        summary = {**report.to_dict(), "report": str(paths["html"]), "retraining": None}
        summary.pop("features")
        mode = retrain or m.retrain
        if report.over_threshold and mode != "off":
            typer.echo(f"drift over threshold in {', '.join(f.feature for f in report.drifted)}: "
                       f"triggering retraining ({mode})", err=True)
            summary["retraining"] = d.trigger_retraining(mode, retrain_source or m.retrain_source or current,
                                                         retrain_arg, log=out_dir / "retraining.log")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        typer.echo(json.dumps(summary, indent=2, default=str))
        if fail_on_drift and report.over_threshold:
            raise typer.Exit(3)
