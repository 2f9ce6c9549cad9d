"""`rentalml pipeline ...` (added to the core CLI through the `rentalml.commands` entry point).

    rentalml pipeline compile                # IR YAML → pipelines/training_pipeline.yaml (the golden file)
    rentalml pipeline run --local            # the whole DAG with kfp.local (subprocesses, this interpreter)
    rentalml pipeline submit --host $KFP_HOST [--namespace rentalml] [--schedule weekly]

Multi-user Kubeflow Pipelines (Kubeflow's default) keeps pipelines, experiments and runs per profile namespace:
the API server rejects an experiment without one and lists only shared pipelines when none is given, so
`submit` names the namespace (--namespace, $KFP_NAMESPACE, else the pod's own namespace) in every call that
takes it. Single-user KFP: leave it unset.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import typer

GOLDEN = Path(__file__).resolve().parent / "training_pipeline.yaml"
SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
#: the recurring run: Mondays 03:00 UTC (KFP cron has a seconds field), one run at a time, no backfill
WEEKLY = {"name": "rentalml-training-weekly", "cron": "0 0 3 * * 1", "max_concurrency": 1, "no_catchup": True}


def compile_pipeline(out: Path = GOLDEN) -> Path:
    from kfp import compiler
    from rentalml.pipelines.training import training_pipeline

    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(training_pipeline, str(out))
    return out


def _arguments(source: str | None, model: str | None, params: str | None, tune_trials: int | None,
               margin: float | None, extra: list[str]) -> dict:
    args: dict = {}
    if source is not None:
        args["source"] = source
    if model is not None:
        args["model"] = model
    if params is not None:
        args["params"] = json.loads(params)
    if tune_trials is not None:
        args["tune_trials"] = tune_trials
    if margin is not None:
        args["margin"] = margin
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--arg takes NAME=VALUE (JSON values are parsed), got {item!r}")
        try:
            args[key] = json.loads(value)
        except json.JSONDecodeError:
            args[key] = value
    return args


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def artifact_table(run_dir: Path) -> list[dict]:
    """Every output artifact of a kfp.local run (from each task's executor_output.json): task, name, uri,
    bytes on disk (0 for Metrics, which live in the metadata) and metadata."""
    rows = []
    for out_file in sorted(run_dir.glob("*/executor_output.json")):
        doc = json.loads(out_file.read_text())
        for name, arts in sorted(doc.get("artifacts", {}).items()):
            for art in arts.get("artifacts", []):
                uri = art.get("uri", "")
                rows.append({"task": out_file.parent.name, "output": name, "uri": uri,
                             "bytes": _size(Path(uri)), "metadata": art.get("metadata", {})})
    return rows


def run_local(arguments: dict, pipeline_root: Path) -> dict:
    """Run the pipeline with kfp.local's SubprocessRunner in this interpreter; returns run dir and timing."""
    from kfp import local
    from rentalml.pipelines.training import PIPELINE_NAME, build

    pipeline_root.mkdir(parents=True, exist_ok=True)
    before = set(pipeline_root.iterdir())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=True)
    t0 = time.perf_counter()
    build(local=True)(**arguments)
    seconds = time.perf_counter() - t0
    new = sorted((p for p in set(pipeline_root.iterdir()) - before if p.name.startswith(PIPELINE_NAME)),
                 key=lambda p: p.stat().st_mtime)
    if not new:
        raise RuntimeError(f"no run directory appeared under {pipeline_root}")
    return {"run_dir": str(new[-1]), "seconds": round(seconds, 1), "artifacts": artifact_table(new[-1])}


def _executor_outputs(run_dir: Path, task: str) -> dict:
    p = run_dir / task / "executor_output.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _client(host: str | None):
    """kfp.Client for `host`, authenticated with the projected service-account token (audience
    pipelines.kubeflow.org) when the pod has one: with an explicit host and no credentials kfp 2.17.3's Client
    sends no token at all (Client._load_config returns before its default credentials), and multi-user KFP
    then answers every call as unauthenticated."""
    import kfp
    from kfp.client import KF_PIPELINES_SA_TOKEN_ENV, KF_PIPELINES_SA_TOKEN_PATH
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    token = os.environ.get(KF_PIPELINES_SA_TOKEN_ENV) or KF_PIPELINES_SA_TOKEN_PATH
    credentials = ServiceAccountTokenVolumeCredentials(token) if Path(token).is_file() else None
    return kfp.Client(host=host, credentials=credentials)


def kfp_namespace(explicit: str | None = None) -> str | None:
    """The profile namespace for multi-user KFP: --namespace, else $KFP_NAMESPACE (the CronJobs set it from
    the downward API), else the pod's service-account namespace file; None (single-user KFP) outside a pod."""
    if explicit:
        return explicit
    if os.environ.get("KFP_NAMESPACE"):
        return os.environ["KFP_NAMESPACE"]
    try:
        return SA_NAMESPACE.read_text().strip() or None
    except OSError:
        return None


def _pipeline_id(client, name: str, namespace: str | None) -> str | None:
    """The pipeline named `name` in `namespace` (Client.get_pipeline_id takes no namespace: in multi-user KFP it
    would see only shared pipelines, miss ours and upload a duplicate every week)."""
    flt = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    found = client.list_pipelines(filter=flt, namespace=namespace).pipelines or []
    if len(found) > 1:
        raise RuntimeError(f"{len(found)} pipelines named {name!r} in namespace {namespace!r}")
    return found[0].pipeline_id if found else None


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Kubeflow Pipelines: compile, run locally, submit", no_args_is_help=True)
    app.add_typer(group, name="pipeline")

    @group.command("compile")
    def compile_cmd(out: Path = typer.Option(GOLDEN, help="where to write the IR YAML (default: the golden "
                                             "file in the repository)")) -> None:
        """Compile the training pipeline to KFP IR YAML."""
        typer.echo(str(compile_pipeline(out)))

    @group.command("run")
    def run_cmd(
        local: bool = typer.Option(True, "--local/--remote", help="kfp.local here, or submit to KFP_HOST"),
        source: str | None = typer.Option(None, help="data source (default: the demo marketplace "
                                          "synthetic:2000,1000,50000,42); CSV, parquet, dir or sql:<table>"),
        model: str | None = typer.Option(None, help="hybrid | collaborative | content | popularity"),
        params: str | None = typer.Option(None, help='model parameters as JSON (default {"epochs": 40})'),
        tune_trials: int | None = typer.Option(None, help="Optuna trials in the tune step (default 0)"),
        margin: float | None = typer.Option(None, help="the champion gate margin (default 0)"),
        deploy_mode: str = typer.Option("local", help="local (restart the local server) | kserve | none"),
        serve: bool = typer.Option(False, "--serve", help="local deploy: start a server if none is running"),
        arg: list[str] = typer.Option([], "--arg", help="any other pipeline parameter, NAME=VALUE"),
        pipeline_root: Path | None = typer.Option(None, help="kfp.local pipeline root (default "
                                                  "$RENTALML_HOME/kfp-local)"),
        json_out: Path | None = typer.Option(None, "--json", help="write the run summary here"),
        threads: int = typer.Option(1, min=1, help="torch/OpenMP threads per step (OMP_NUM_THREADS): on a "
                                    "shared machine intra-op threads oversubscribe the cores (~10x slower fits)"),
        host: str | None = typer.Option(None, envvar="KFP_HOST", help="--remote: KFP endpoint"),
    ) -> None:
        """Run the training pipeline; --local runs every step as a subprocess and lists where artifacts landed."""
        args = _arguments(source, model, params, tune_trials, margin, arg)
        args.setdefault("deploy_mode", deploy_mode)
        if serve:
            args["start_local_server"] = True
        if not local:
            typer.echo(json.dumps(_submit(host, args, None, None, "rentalml", kfp_namespace()), indent=2))
            return
        from rentalml.config import get_settings

        s = get_settings()
        root = pipeline_root or s.home_dir / "kfp-local"
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the step subprocesses inherit it
        res = run_local(args, root)
        run_dir = Path(res["run_dir"])
        reg = _executor_outputs(run_dir, "register").get("parameterValues", {})
        scores = _executor_outputs(run_dir, "evaluate").get("parameterValues", {}).get("Output", {})
        decision = _executor_outputs(run_dir, "champion-gate").get("parameterValues", {}).get("Output")
        dep = _executor_outputs(run_dir, "deploy").get("parameterValues", {}).get("Output")
        summary = {"run_dir": str(run_dir), "seconds": res["seconds"], "arguments": args,
                   "mlflow": s.tracking_uri, "scores": scores, "gate": decision, "registered": reg,
                   "deploy": dep or "skipped (gate)", "artifacts": res["artifacts"]}
        typer.echo(f"\npipeline finished in {res['seconds']} s; artifacts of run {run_dir.name}:")
        for row in res["artifacts"]:
            where = row["uri"] if row["bytes"] else f"(metadata) {json.dumps(row['metadata'], default=str)[:90]}"
            typer.echo(f"  {row['task']:<15} {row['output']:<15} {row['bytes']:>10,d} B  {where}")
        typer.echo(f"test ndcg@10 {scores.get('ndcg@10')}; champion gate: {decision}")
        typer.echo(f"registered: {s.model_name} v{reg.get('version')} alias {reg.get('alias')} "
                   f"(MLflow run {reg.get('run_id')}, {s.tracking_uri})")
        typer.echo(f"deploy: {json.dumps(dep) if dep else 'skipped: the candidate did not beat the champion'}")
        if json_out:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(summary, indent=2, default=str))

    @group.command("local-cluster")
    def local_cluster_cmd(
        workdir: Path = typer.Option(Path(".rentalml/local-cluster"), help="where the servers keep their files "
                                     "and logs (emptied first)"),
        users: int = typer.Option(12, min=1, help="users to send requests for"),
        canary_percent: int = typer.Option(50, min=0, max=100, help="the second run's canary share"),
        json_out: Path | None = typer.Option(None, "--json", help="write the full report here"),
    ) -> None:
        """The serving half of the cluster on this machine, from the rendered dev overlay: moto S3 + MLflow
        (--serve-artifacts), two kfp.local pipeline runs (publish + deploy through a stand-in API server with
        the API server's patch semantics), KServe's storage initializer, Triton, the transformer (JWT), v2
        requests over HTTP and gRPC, a sticky canary, outcomes in Kafka (Tansu)."""
        import shutil

        from rentalml.pipelines.local_cluster import run, summary

        shutil.rmtree(workdir, ignore_errors=True)
        rep = run(workdir, users=users, canary_percent=canary_percent, log=typer.echo)
        if json_out:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(rep, indent=2, default=str))
        typer.echo(json.dumps(summary(rep), indent=2, default=str))

    @group.command("submit")
    def submit_cmd(
        host: str | None = typer.Option(None, envvar="KFP_HOST", help="KFP endpoint (default: $KFP_HOST)"),
        experiment: str = typer.Option("rentalml", help="KFP experiment"),
        namespace: str | None = typer.Option(None, envvar="KFP_NAMESPACE", help="profile namespace of multi-user "
                                             "KFP (default: $KFP_NAMESPACE, else the pod's namespace; unset: "
                                             "single-user KFP)"),
        run_name: str | None = typer.Option(None, help="run name (default: rentalml-training-<time>)"),
        schedule: str | None = typer.Option(None, help="'weekly' (Mondays 03:00 UTC) or a 6-field KFP cron: "
                                            "create a recurring run instead of one run"),
        source: str | None = typer.Option(None),
        model: str | None = typer.Option(None),
        params: str | None = typer.Option(None),
        tune_trials: int | None = typer.Option(None),
        margin: float | None = typer.Option(None),
        arg: list[str] = typer.Option([], "--arg", help="any other pipeline parameter, NAME=VALUE"),
    ) -> None:
        """Upload the compiled pipeline and start a run (or a recurring weekly run) on Kubeflow Pipelines."""
        args = _arguments(source, model, params, tune_trials, margin, arg)
        typer.echo(json.dumps(_submit(host, args, run_name, schedule, experiment, kfp_namespace(namespace)),
                              indent=2))


def _submit(host: str | None, args: dict, run_name: str | None, schedule: str | None, experiment: str,
            namespace: str | None = None) -> dict:
    """Upload the compiled pipeline as a new version of `rentalml-training` and start a run, or a recurring
    run (`schedule`: "weekly" or a KFP cron with seconds), from that version. `namespace`: the profile of
    multi-user KFP (pipeline, experiment and so the runs live there); None for single-user KFP."""
    import tempfile

    from rentalml.pipelines.training import PIPELINE_NAME

    if not host:
        raise typer.BadParameter("no Kubeflow Pipelines endpoint: pass --host or set KFP_HOST", param_hint="--host")
    package = str(compile_pipeline(Path(tempfile.mkdtemp(prefix="rentalml-kfp-")) / "training_pipeline.yaml"))
    client = _client(host)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    pipeline_id = _pipeline_id(client, PIPELINE_NAME, namespace)
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(package, pipeline_name=PIPELINE_NAME,
                                             description="rentalml training pipeline",
                                             namespace=namespace).pipeline_id
        versions = client.list_pipeline_versions(pipeline_id).pipeline_versions
        version_id = versions[0].pipeline_version_id
    else:
        version_id = client.upload_pipeline_version(package, pipeline_version_name=f"{PIPELINE_NAME}-{stamp}",
                                                    pipeline_id=pipeline_id).pipeline_version_id
    exp_id = client.create_experiment(name=experiment, namespace=namespace).experiment_id
    out = {"host": host, "namespace": namespace, "pipeline_id": pipeline_id, "version_id": version_id,
           "experiment": experiment, "arguments": args}
    if schedule:
        cron = WEEKLY["cron"] if schedule == "weekly" else schedule
        name = WEEKLY["name"] if schedule == "weekly" else f"rentalml-training-{stamp}"
        rr = client.create_recurring_run(experiment_id=exp_id, job_name=name, cron_expression=cron,
                                         pipeline_id=pipeline_id, version_id=version_id, params=args,
                                         max_concurrency=WEEKLY["max_concurrency"], no_catchup=WEEKLY["no_catchup"],
                                         enable_caching=False)
        return {**out, "recurring_run_id": rr.recurring_run_id, "name": name, "cron": cron}
    run = client.run_pipeline(experiment_id=exp_id, job_name=run_name or f"rentalml-training-{stamp}",
                              pipeline_id=pipeline_id, version_id=version_id, params=args, enable_caching=False)
    return {**out, "run_id": run.run_id}
