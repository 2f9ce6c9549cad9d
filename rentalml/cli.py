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


@app.callback()
def _settings_first() -> None:
    """Every command starts by reading the settings, so a bad value (a typo in a selector such as
    RENTALML_SERVE__PRECISION) stops the command at once with the setting named, not at first use."""
    from pydantic import ValidationError

    from rentalml.config import get_settings

    try:
        get_settings()
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(x) for x in e['loc'])}: {e['msg']} (got {e.get('input')!r})" for e in exc.errors()]
        typer.echo("error: invalid settings (RENTALML_* environment or .env):\n" + "\n".join(lines), err=True)
        raise typer.Exit(2) from None


#: core command groups, one module each with a `register(app)` (keeps this file from becoming a hub)
CORE_COMMAND_MODULES = (
    "rentalml.db.cli",            # rentalml db init|seed
    "rentalml.features.cli",      # rentalml features apply|materialize|...
    "rentalml.export.cli",        # rentalml optimize, export --triton
    "rentalml.monitoring.cli",    # rentalml monitor drift
    "rentalml.ops.cli",           # rentalml backup|restore
)


def _load_core_groups() -> None:
    import importlib

    for name in CORE_COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # not built (yet): nothing to register
                continue
            raise
        module.register(app)


def _load_plugins() -> None:
    _load_core_groups()
    for ep in entry_points(group="rentalml.commands"):
        try:
            ep.load()(app)
        except ModuleNotFoundError as exc:
            if exc.name != ep.module:  # a missing dependency of a plugin, not a plugin not built yet
                logging.getLogger(__name__).warning("command plugin %s failed to load: %s", ep.name, exc)
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


def _dataset(spec: str, item_features: Path | None = None):
    from rentalml.data.loaders import load_csv, load_dataset

    if item_features is not None:
        return load_csv(spec, item_features)
    return load_dataset(spec)


@app.command()
def benchmark(
    interactions: str = typer.Option(..., help="CSV of user_id,item_id,timestamp[,weight], a dataset dir, "
                                     "'synthetic[:users,props,events]', 'movielens' or 'airbnb'"),
    item_features: Path | None = typer.Option(None, help="optional item-features CSV (item_id, ...)"),
    protocol: str = typer.Option("random-75-25", help="random-75-25 | temporal-leave-last-n | cold-start-items"),
    seed: int = 42,
    seeds: str = typer.Option("", help="comma-separated seeds, e.g. 1,2,3,4,5: one split and fit per seed, "
                              "mean ± std per model (--seed is then ignored; no --report)"),
    k: int = 10,
    models: str = typer.Option("popularity,collaborative,content,hybrid", help="comma-separated; baselines "
                               "ease, itemknn, als are measured by the same harness"),
    tune_trials: int = typer.Option(0, help="Optuna trials per neural model on a validation split of train"),
    min_user_interactions: int = typer.Option(1, help="keep users with at least this many interactions"),
    json_out: Path | None = typer.Option(None, "--json", help="write the result document here"),
    report: Path | None = typer.Option(None, help="also write report.html/report.json (plots) here"),
    progress: bool = False,
) -> None:
    """Split once, fit and evaluate every model; print a table and write JSON."""
    from rentalml.evaluation.benchmark import run_benchmark
    from rentalml.evaluation.protocols import PROTOCOLS
    from rentalml.evaluation.report import format_table, write_report

    if protocol not in PROTOCOLS:
        raise typer.BadParameter(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}",
                                 param_hint="--protocol")
    ds = _dataset(interactions, item_features)
    if min_user_interactions > 1:
        counts = ds.interactions.groupby("user_id")["property_id"].transform("nunique")
        ds = ds.subset(ds.interactions[counts >= min_user_interactions])
    if seeds:
        from rentalml.evaluation.benchmark import format_seeds_table, run_seeds

        try:
            seed_list = [int(x) for x in seeds.split(",") if x.strip()]
        except ValueError:
            raise typer.BadParameter(f"seeds must be integers separated by commas, got {seeds!r}",
                                     param_hint="--seeds") from None
        def write(res: dict) -> None:
            if json_out:
                json_out.parent.mkdir(parents=True, exist_ok=True)
                json_out.write_text(json.dumps(res, indent=2))

        res = run_seeds(ds, seed_list, protocol, k, [m.strip() for m in models.split(",") if m.strip()],
                        tune_trials=tune_trials, progress=progress, log=lambda m: typer.echo(m, err=True),
                        on_seed=write)
        typer.echo(format_seeds_table(res))
        return
    result = run_benchmark(ds, protocol, seed, k, [m.strip() for m in models.split(",") if m.strip()],
                           tune_trials=tune_trials, progress=progress, log=lambda m: typer.echo(m, err=True))
    curves = result.pop("_curves", {})
    typer.echo(format_table(result))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2))
    if report:
        write_report(result, report, curves)


@app.command()
def train(
    data: str = typer.Option("synthetic", help="dataset spec (see benchmark --interactions)"),
    model: str = typer.Option("hybrid", help="popularity | collaborative | content | hybrid"),
    protocol: str = "random-75-25",
    seed: int = 42,
    k: int = 10,
    register: bool = typer.Option(True, help="log to MLflow and register a new version"),
    margin: float = typer.Option(0.0, help="champion moves only if the candidate beats it by this"),
    out: Path | None = typer.Option(None, help="keep the bundle/report here"),
    params: str = typer.Option("{}", help="JSON of model parameters"),
    device: str | None = typer.Option(None, help="auto | cpu | cuda: where the network trains (cuda: bf16 "
                                      "autocast; auto: cuda when available) (default settings.train.device)"),
    progress: bool = True,
) -> None:
    """Train, evaluate, export (ONNX + int8), log to MLflow and register (champion only if better)."""
    from rentalml.config import get_settings
    from rentalml.models.neural import resolve_device
    from rentalml.training.workflow import train_and_register

    device = device or get_settings().train.device
    try:
        resolve_device(device)  # before the data is read: no CUDA here is an error now, not deep in training
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--device") from None
    res = train_and_register(_dataset(data), model, protocol, k, seed, {**json.loads(params), "device": device},
                             register=register, margin=margin, out_dir=out, progress=progress)
    typer.echo(json.dumps(res, indent=2, default=str))


@app.command()
def export(
    data: str = typer.Option("synthetic", help="dataset spec"),
    model: str = "hybrid",
    out: Path = typer.Option(Path(".rentalml/export"), help="bundle directory"),
    seed: int = 42,
    params: str = "{}",
    triton: Path | None = typer.Option(None, "--triton", help="also add the bundle to this "
                                         "Triton model repository (validated; python twin in TRITON-python)"),
    gpu: bool | None = typer.Option(None, "--gpu/--cpu", help="--triton: KIND_GPU instances + TensorRT "
                                    "accelerator (fp16) (default settings.export.triton_gpu)"),
    version: int | None = typer.Option(None, "--version", min=1, help="--triton: the Triton model version "
                                       "(default: the bundle's MLflow version, else 1)"),
) -> None:
    """Fit on all data and write a model bundle (scorer.onnx with top-k in the graph, int8 variant)."""
    from rentalml.export.bundle import write_bundle
    from rentalml.training.trainer import fit_model

    ds = _dataset(data)
    fitted = fit_model(model, ds, params=json.loads(params), seed=seed)
    typer.echo(str(write_bundle(fitted, ds, out, model_version=str(version or 0))))
    if triton is not None:
        from rentalml.export.cli import triton_repo

        typer.echo(json.dumps(triton_repo(out, triton, gpu=gpu, version=version)))


@app.command()
def finetune(
    recent: str = typer.Option(..., help="recent interactions: a dataset spec (dir, 'db', SQL URL, CSV...)"),
    window_days: float = typer.Option(7.0, help="only the last N days of --recent (0 = all)"),
    epochs: int = typer.Option(2, min=1, help="fine-tuning epochs"),
    seed: int = 42,
) -> None:
    """Incremental learning: fine-tune the champion on the recent window and register it as the challenger
    (it becomes champion only through the A/B test)."""
    from rentalml.data.loaders import load_dataset
    from rentalml.training.incremental import finetune_champion

    res = finetune_champion(load_dataset(recent), window_days=window_days or None, epochs=epochs, seed=seed)
    typer.echo(json.dumps(res, indent=2, default=str))


@app.command()
def tune(
    data: str = typer.Option("synthetic", help="dataset spec"),
    model: str = "hybrid",
    trials: int = 8,
    local: bool = typer.Option(True, "--local/--katib", help="run Optuna here, or write the Katib Experiment "
                               "(same search space, multivariate-tpe, objective ndcg_at_10) for --trials trials"),
    seed: int = 42,
    json_out: Path | None = typer.Option(None, "--json"),
    launcher: str = typer.Option("trainjob", help="--katib: trials as a Trainer TrainJob or an MPIJob (mpijob)"),
    out: Path | None = typer.Option(None, "--out", help="--katib: write the Experiment YAML here (default: print)"),
) -> None:
    """Optuna (multivariate TPE, median pruning) over the shared search space on a validation split."""
    if not local:
        from rentalml.training.katib import experiment, to_yaml, validate_experiment

        doc = experiment(launcher=launcher, max_trials=trials, parallel=min(3, trials), data=data)
        errors = validate_experiment(doc)
        if errors:
            raise typer.BadParameter("; ".join(errors))
        if out:
            out.write_text(to_yaml(doc))
            typer.echo(str(out))
        else:
            typer.echo(to_yaml(doc), nl=False)
        return
    from rentalml.evaluation.protocols import random_split
    from rentalml.training.tuning import tune as run_tune

    ds = _dataset(data)
    train_pairs, _ = random_split(ds.interactions, 0.75, seed)
    res = run_tune(model, ds, train_pairs, trials=trials, seed=seed)
    typer.echo(json.dumps({k: v for k, v in res.items() if k != "trials"}, indent=2))
    if json_out:
        json_out.write_text(json.dumps(res, indent=2, default=str))


_load_plugins()


if __name__ == "__main__":
    app()
