"""MLflow tracking and the `rental-recommender` registry (aliases champion/challenger, never stages).

Local default: sqlite backend and artifacts under the state dir (settings); any tracking URI by setting.
The champion alias moves only when a new version beats the current champion on the gate metric.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from rentalml.config import Settings, get_settings
from rentalml.features import feast_import
from rentalml.registry.cache import STATUS, BundleCache, RegistryUnreachable, Resolved, is_unreachable

# Feast 0.67 registers an `mlflow.request_header_provider` entry point (feast.infra.data_sources.mlflow.auth), so
# MLflow's first REST call in any process imports Feast: its lean import keeps that at ~1.4 CPU-s instead of ~6
feast_import.lean()

log = logging.getLogger(__name__)
EXPERIMENT = "rentalml"
GATE_METRIC = "ndcg_at_10"


def metric_key(name: str) -> str:
    """MLflow metric names cannot contain '@': ndcg@10 → ndcg_at_10."""
    return name.replace("@", "_at_")


def configure(settings: Settings | None = None):
    import mlflow

    s = settings or get_settings()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(s.tracking_uri)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        # a local store (sqlite/file) keeps artifacts under the state dir, never in the working directory;
        # a tracking server decides its own artifact root
        local = s.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in s.tracking_uri
        mlflow.create_experiment(EXPERIMENT, artifact_location=s.artifact_root if local else None)
    mlflow.set_experiment(EXPERIMENT)
    return mlflow.MlflowClient(tracking_uri=s.tracking_uri)


def _flat_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        key = metric_key(f"{prefix}{k}")
        if isinstance(v, dict):
            out.update(_flat_metrics(v, f"{key}."))
        elif isinstance(v, (int, float)):
            out[key] = float(v)
    return out


def log_training_run(*, model_type: str, params: dict, metrics: dict, bundle_dir: Path,
                     report_dir: Path | None = None, lineage: dict | None = None,
                     settings: Settings | None = None, run_name: str | None = None) -> str:
    """One MLflow run: params, metrics, lineage tags, the bundle (ONNX graphs inside) and the report."""
    import mlflow

    configure(settings)
    with mlflow.start_run(run_name=run_name or f"train-{model_type}") as run:
        mlflow.log_params({k: v for k, v in params.items() if isinstance(v, (int, float, str, bool))})
        mlflow.log_param("model_type", model_type)
        mlflow.log_metrics(_flat_metrics(metrics))
        tags = {f"lineage.{k}": (json.dumps(v) if not isinstance(v, str) else v) for k, v in (lineage or {}).items()}
        mlflow.set_tags({"model_type": model_type, **tags})
        mlflow.log_artifacts(str(bundle_dir), artifact_path="bundle")
        if report_dir is not None and Path(report_dir).exists():
            mlflow.log_artifacts(str(report_dir), artifact_path="report")
        return run.info.run_id


def _run_metric(client, run_id: str, key: str) -> float | None:
    return client.get_run(run_id).data.metrics.get(key)


def register(run_id: str, *, model_name: str | None = None, gate_metric: str = GATE_METRIC, margin: float = 0.0,
             settings: Settings | None = None, promote: bool = True) -> dict:
    """Register the run's bundle as a new version; champion moves only if it beats the champion by `margin`
    (and `promote` allows it: with promote=False the version always becomes the challenger, e.g. an
    incremental fine-tune that must win an A/B test first; with no champion yet it still becomes champion).

    Returns {"version", "promoted", "alias", "candidate", "champion_before"}.
    """
    import mlflow

    s = settings or get_settings()
    client = configure(s)
    name = model_name or s.model_name
    # the bundle is not an MLflow-flavoured model (no MLmodel file), which mlflow.register_model requires since
    # MLflow 3: create the registered model (once) and a version whose source is the run's bundle directory
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = RunsArtifactRepository.get_underlying_uri(f"runs:/{run_id}/bundle")
    mv = client.create_model_version(name, source, run_id=run_id)
    cand = _run_metric(client, run_id, gate_metric)
    try:
        champ = client.get_model_version_by_alias(name, "champion")
        champ_metric = _run_metric(client, champ.run_id, gate_metric)
    except mlflow.exceptions.MlflowException:
        champ, champ_metric = None, None
    promoted = champ is None or (promote and cand is not None and (champ_metric is None or
                                                                  cand > champ_metric + margin))
    alias = "champion" if promoted else "challenger"
    client.set_registered_model_alias(name, alias, mv.version)
    client.set_model_version_tag(name, mv.version, gate_metric, str(cand))
    return {"version": str(mv.version), "promoted": promoted, "alias": alias, "candidate": cand,
            "champion_before": champ_metric, "champion_version_before": str(champ.version) if champ else None}


def alias_version(alias: str, *, model_name: str | None = None, settings: Settings | None = None) -> str | None:
    import mlflow

    s = settings or get_settings()
    try:
        client = configure(s)
        return str(client.get_model_version_by_alias(model_name or s.model_name, alias).version)
    except Exception as exc:  # noqa: BLE001 - sorted below: unreachable, or no such alias
        if is_unreachable(exc):
            raise RegistryUnreachable(f"model registry {s.tracking_uri} unreachable: {exc}") from exc
        if isinstance(exc, mlflow.exceptions.MlflowException):
            return None
        raise


def set_alias(alias: str, version: str, *, model_name: str | None = None, settings: Settings | None = None) -> None:
    s = settings or get_settings()
    configure(s).set_registered_model_alias(model_name or s.model_name, alias, str(version))


def delete_alias(alias: str, *, model_name: str | None = None, settings: Settings | None = None) -> None:
    s = settings or get_settings()
    configure(s).delete_registered_model_alias(model_name or s.model_name, alias)


def fetch_bundle(alias: str = "champion", *, version: str | None = None, model_name: str | None = None,
                 settings: Settings | None = None) -> Path:
    """Download the bundle of `alias` (or an explicit version) into the bundle cache
    (`Settings.bundle_cache_dir`, default $RENTALML_HOME/bundles) / <name>/<version>.

    The registry version is written into the local bundle.json (training cannot know it in advance). The download
    goes to a temporary directory, is checked against its checksums.json, and only then renamed into place: a
    directory there is always whole and verified (one that no longer verifies is downloaded again).
    `RegistryUnreachable` (rentalml.registry.cache) when MLflow cannot be reached; LookupError when it has no
    such alias/version.
    """
    import mlflow

    from rentalml.runtime.bundle import verify_bundle

    s = settings or get_settings()
    name = model_name or s.model_name
    try:
        client = configure(s)
        mv = client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, alias)
    except Exception as exc:  # noqa: BLE001 - sorted below: unreachable, or no such version
        if is_unreachable(exc):
            raise RegistryUnreachable(f"model registry {s.tracking_uri} unreachable: {exc}") from exc
        if not isinstance(exc, mlflow.exceptions.MlflowException):
            raise
        raise LookupError(f"no model version for {name}@{version or alias}: run `make demo` or `rentalml train` "
                          f"first ({exc.message if hasattr(exc, 'message') else exc})") from exc
    dest = Path(s.bundle_cache_dir) / name / str(mv.version)
    if (dest / "bundle.json").exists() and BundleCache(s.bundle_cache_dir).verified(name, str(mv.version)) is None:
        log.warning("cached bundle %s does not verify: downloading it again", dest)
        shutil.rmtree(dest, ignore_errors=True)
    if not (dest / "bundle.json").exists():
        tmp = dest.parent / f".{dest.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            try:
                local = mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{mv.run_id}/bundle",
                                                            dst_path=str(tmp))
            except Exception as exc:  # noqa: BLE001 - the artifact store went away mid-download
                if is_unreachable(exc):
                    raise RegistryUnreachable(f"model registry {s.tracking_uri} unreachable while downloading "
                                              f"{name} version {mv.version}: {exc}") from exc
                raise
            meta_path = Path(local) / "bundle.json"
            meta = json.loads(meta_path.read_text())
            meta["model_version"] = str(mv.version)
            meta["registry"] = {"name": name, "version": str(mv.version), "run_id": mv.run_id}
            meta_path.write_text(json.dumps(meta, indent=2))
            verify_bundle(local, meta)  # BundleIntegrityError: nothing enters the cache
            shutil.rmtree(dest, ignore_errors=True)
            Path(local).rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve(alias: str, *, version: str | None = None, allow_cache: bool = True,
            settings: Settings | None = None) -> Resolved:
    """The bundle of `alias` (or the pinned `version`) from the registry, recorded in the cache; when the
    registry is unreachable and `allow_cache`, the last cached one (`Resolved.cached`), else RegistryUnreachable.
    LookupError when the registry has no such alias/version (no fallback: the registry said so)."""
    s = settings or get_settings()
    name = s.model_name
    cache = BundleCache(s.bundle_cache_dir)
    try:
        path = Path(fetch_bundle(alias=alias, version=version, settings=s))
    except RegistryUnreachable as exc:
        STATUS.mark(False, str(exc))
        hit = cache.lookup(name, alias, version) if allow_cache else None
        what = f"{name}@{alias}" if version is None else f"{name} version {version}"
        if hit is None:
            if allow_cache:
                raise RegistryUnreachable(f"{exc}; and no verified cached bundle of {what} under {cache.root}") \
                    from exc
            raise
        log.warning("model registry unreachable (%s): serving cached version %s of %s from %s", exc, hit.version,
                    what, hit.path)
        return Resolved(hit.path, hit.version, cached=True, reason=str(exc))
    STATUS.mark(True)
    from rentalml.runtime.bundle import read_meta

    got = str(read_meta(path)["model_version"])
    if version is None:
        cache.record(name, alias, got)
    return Resolved(path, got)
