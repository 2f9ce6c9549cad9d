"""`rentalml optimize` and `rentalml triton-repo` (registered by rentalml.cli; `rentalml export --triton DIR`
calls the same triton_repo after writing the bundle: the versioned cluster repository and its python twin)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def triton_repo(bundle: Path, out: Path, gpu: bool | None = None, max_batch_size: int = 64, instances: int = 1,
                k: int | None = None, hint: str = "--triton", version: int | None = None, replace: bool = False,
                twin: Path | None = None) -> dict:
    """Write version `version` (default: the bundle's MLflow version, else 1) of the bundle into the Triton
    repository `out` (other versions kept unless `replace`), validate it, and write its python-backend twin
    (default `out`-python); raises typer.BadParameter listing what does not match."""
    from rentalml.export.triton import (
        compare_twin,
        triton_version,
        validate_triton_repo,
        write_python_twin,
        write_triton_repo,
    )
    from rentalml.runtime.bundle import read_meta

    for d in (out, twin):
        if d is not None and (d.resolve() == bundle.resolve() or bundle.resolve() in d.resolve().parents):
            raise typer.BadParameter(f"the Triton repository {d} must not be inside the bundle {bundle}",
                                     param_hint=hint)
    try:
        v = triton_version(read_meta(bundle), version)
        repo = write_triton_repo(bundle, out, version=v, gpu=gpu, max_batch_size=max_batch_size,
                                 instances=instances, k=k, replace=replace)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=hint) from None
    errors = validate_triton_repo(repo)
    if errors:
        raise typer.BadParameter("; ".join(errors), param_hint=hint)
    twin_repo = write_python_twin(repo, twin)
    errors = compare_twin(repo, twin_repo)
    if errors:  # pragma: no cover - the twin is derived from the configs
        raise typer.BadParameter("; ".join(errors), param_hint=hint)
    from rentalml.export.triton import load_config, model_config_pb2

    kinds = {load_config(p / "config.pbtxt").instance_group[0].kind for p in repo.iterdir()
             if (p / "config.pbtxt").exists() and load_config(p / "config.pbtxt").instance_group}
    return {"triton_repo": str(repo), "python_twin": str(twin_repo), "version": v,
            "models": sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").exists()),
            "gpu": model_config_pb2().ModelInstanceGroup.KIND_GPU in kinds, "validated": True}


def register(app: typer.Typer) -> None:
    @app.command("triton-repo")
    def triton_repo_cmd(
        bundle: Path = typer.Option(..., "--bundle", help="model bundle directory"),
        out: Path = typer.Option(..., "--out", help="Triton model repository to add this version to (its "
                                 "python-backend twin goes to OUT-python)"),
        gpu: bool | None = typer.Option(None, "--gpu/--cpu", help="KIND_GPU instances + ONNX Runtime TensorRT "
                                        "accelerator (fp16) (default settings.export.triton_gpu)"),
        version: int | None = typer.Option(None, "--version", min=1, help="Triton model version (default: the "
                                           "bundle's MLflow version, else 1)"),
        replace: bool = typer.Option(False, "--replace", help="drop the versions already in OUT"),
        max_batch_size: int = typer.Option(64, help="Triton max_batch_size (dynamic batching)"),
        instances: int = typer.Option(1, help="instance_group count per model"),
        k: int | None = typer.Option(None, help="k baked into rental-scorer (default settings.export.triton_k)"),
    ) -> None:
        """Write a Triton model repository from an existing bundle and validate it (configs vs ONNX graphs)."""
        if not (bundle / "bundle.json").exists():
            raise typer.BadParameter(f"{bundle} is not a model bundle (no bundle.json)", param_hint="--bundle")
        typer.echo(json.dumps(triton_repo(bundle, out, gpu, max_batch_size, instances, k, hint="--out",
                                          version=version, replace=replace)))

    @app.command()
    def optimize(
        bundle: Path = typer.Option(..., "--bundle", help="model bundle directory"),
        out: Path = typer.Option(..., "--out", help="where the variants, optimize.json and optimize.md go"),
        max_ndcg_drop: float = typer.Option(0.01, help="largest relative nDCG@10 drop vs fp32 for a deployable "
                                            "variant (0.01 = 1 %)"),
        dataset: str | None = typer.Option(None, help="dataset spec whose interactions outside the bundle "
                                           "histories are the holdout (default: leave-last-out of the histories)"),
        prune: str = typer.Option("0.5", help="comma-separated pruning sparsities"),
        repeats: int = typer.Option(30, help="timed runs per latency figure (median)"),
        max_users: int = typer.Option(2000, help="holdout users"),
    ) -> None:
        """fp32 / int8 dynamic / int8 static / pruned / ORT-format / TensorRT variants with a quality table."""
        from rentalml.export.optimize import holdout_from_dataset, holdout_leave_last, optimize_bundle
        from rentalml.runtime.bundle import Bundle

        if not (bundle / "bundle.json").exists():
            raise typer.BadParameter(f"{bundle} is not a model bundle (no bundle.json)", param_hint="--bundle")
        try:
            sparsities = tuple(float(x) for x in prune.split(",") if x.strip())
        except ValueError as exc:
            raise typer.BadParameter(f"not a list of numbers: {prune!r}", param_hint="--prune") from exc
        if any(not 0 <= s < 1 for s in sparsities):
            raise typer.BadParameter(f"sparsities must be in [0, 1): {prune!r}", param_hint="--prune")
        if max_ndcg_drop < 0:
            raise typer.BadParameter("must be ≥ 0", param_hint="--max-ndcg-drop")
        b = Bundle(bundle)
        if dataset:
            from rentalml.data.loaders import load_dataset

            hold = holdout_from_dataset(b, load_dataset(dataset).interactions, max_users=max_users)
        else:
            hold = holdout_leave_last(b, max_users=max_users)
        report = optimize_bundle(bundle, out, max_ndcg_drop=max_ndcg_drop, holdout=hold,
                                 prune_sparsities=sparsities, repeats=repeats)
        typer.echo((out / "optimize.md").read_text(), nl=False)
        typer.echo(json.dumps({"out": str(out), "deployable": [r["variant"] for r in report["variants"]
                                                                if r["deployable"]]}))
