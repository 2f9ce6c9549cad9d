"""Katib `Experiment`s generated from the one search space (rentalml.training.search_space.SEARCH_SPACE).

Algorithm `multivariate-tpe` (Katib's Optuna suggestion service, the same sampler as `rentalml tune --local`),
objective `ndcg_at_10` (validation nDCG@10, maximize), StdOut metrics collector: the training entrypoint
prints `ndcg_at_10=<value>` lines on rank 0. Each trial runs the entrypoint as a Kubeflow Trainer TrainJob
(default) or as an MPIJob (variant).

    python -m rentalml.training.katib --out manifests/jobs            # regenerate the committed manifests
    rentalml tune --katib [--launcher mpijob] [--out FILE]              # print or write one Experiment
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rentalml.training import jobs
from rentalml.training.search_space import SEARCH_SPACE, Param

API_VERSION = "kubeflow.org/v1beta1"
OBJECTIVE = "ndcg_at_10"
ALGORITHM = "multivariate-tpe"
PARAMETER_TYPES = ("double", "int", "discrete", "categorical")
DISTRIBUTIONS = ("uniform", "logUniform", "normal", "logNormal")
#: Katib's StdOut collector default filter: `name=value` pairs anywhere on a line
METRICS_FORMAT = r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"
LAUNCHERS = ("trainjob", "mpijob")


def _num(v) -> str:
    """Positional notation: '1e-09' would read as a float in Kubernetes' YAML, where Katib wants a string."""
    return f"{v:.12f}".rstrip("0").rstrip(".") if isinstance(v, float) else str(v)


def katib_parameter(p: Param) -> dict:
    """One search-space parameter as a Katib ParameterSpec (numeric choices are `discrete`)."""
    if p.kind == "double":
        space = {"min": _num(float(p.low)), "max": _num(float(p.high)),
                 "distribution": "logUniform" if p.log else "uniform"}
        return {"name": p.name, "parameterType": "double", "feasibleSpace": space}
    if p.kind == "int":
        space = {"min": str(int(p.low)), "max": str(int(p.high)),
                 "distribution": "logUniform" if p.log else "uniform"}
        return {"name": p.name, "parameterType": "int", "feasibleSpace": space}
    numeric = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in p.choices)
    return {"name": p.name, "parameterType": "discrete" if numeric else "categorical",
            "feasibleSpace": {"list": [_num(c) for c in p.choices]}}


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def trial_args(data: str = jobs.DEFAULT_DATA, checkpoint: bool = True) -> list[str]:
    """Entrypoint arguments of a trial: fixed ones plus one `--flag=${trialParameters.name}` per parameter.
    No test evaluation and one checkpoint directory per trial."""
    fixed = [f"--data={data}", "--model=hybrid", "--epochs=30", "--eval-every=2", "--patience=6", "--no-test"]
    if checkpoint:
        fixed.append(f"--checkpoint-dir={jobs.CHECKPOINT_MOUNT}/katib/${{trialSpec.Name}}")
    return fixed + [f"{flag(p.name)}=${{trialParameters.{p.name}}}" for p in SEARCH_SPACE]


def trial_template(launcher: str = "trainjob", data: str = jobs.DEFAULT_DATA, gpus: int = 1,
                   image: str = jobs.IMAGE) -> dict:
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}")
    params = [{"name": p.name, "reference": p.name,
               "description": f"{flag(p.name)} of the entrypoint (NeuralParams.{p.name})"} for p in SEARCH_SPACE]
    labels = {"katib.kubeflow.org/component": "trial"}
    if launcher == "trainjob":
        # one node, `gpus` processes: a trial is small; the pods of node 0 carry rank 0's output
        spec = jobs.trainjob("${trialSpec.Name}", args=trial_args(data), num_nodes=1, gpus_per_node=gpus,
                             labels=labels, image=image)
        spec["metadata"] = {"labels": {**jobs.LABELS, **labels}}  # Katib sets the trial's name and namespace
        return {
            "primaryContainerName": "node",
            "primaryPodLabels": {"jobset.sigs.k8s.io/replicatedjob-name": "node",
                                 "batch.kubernetes.io/job-completion-index": "0"},
            "successCondition": 'status.conditions.#(type=="Complete")#|#(status=="True")#',
            "failureCondition": 'status.conditions.#(type=="Failed")#|#(status=="True")#',
            "retain": False,
            "trialParameters": params,
            "trialSpec": spec,
        }
    spec = jobs.mpijob("${trialSpec.Name}", args=trial_args(data), workers=2, gpus_per_worker=gpus, labels=labels,
                       image=image)
    spec["metadata"] = {"labels": {**jobs.LABELS, **labels}}
    return {
        "primaryContainerName": "launcher",  # mpirun forwards every rank's stdout to the launcher
        "primaryPodLabels": {"training.kubeflow.org/job-role": "launcher"},
        "successCondition": 'status.conditions.#(type=="Succeeded")#|#(status=="True")#',
        "failureCondition": 'status.conditions.#(type=="Failed")#|#(status=="True")#',
        "retain": False,
        "trialParameters": params,
        "trialSpec": spec,
    }


def experiment(name: str | None = None, *, launcher: str = "trainjob", max_trials: int = 24, parallel: int = 3,
               max_failed: int = 3, data: str = jobs.DEFAULT_DATA, namespace: str | None = None,
               image: str = jobs.IMAGE, seed: int = 42) -> dict:
    """The Katib Experiment (kubeflow.org/v1beta1) for the shared search space."""
    name = name or ("rentalml-two-tower-tpe" if launcher == "trainjob" else "rentalml-two-tower-tpe-mpi")
    meta: dict = {"name": name, "labels": dict(jobs.LABELS)}
    if namespace:
        meta["namespace"] = namespace
    return {
        "apiVersion": API_VERSION,
        "kind": "Experiment",
        "metadata": meta,
        "spec": {
            "objective": {"type": "maximize", "objectiveMetricName": OBJECTIVE,
                          "metricStrategies": [{"name": OBJECTIVE, "value": "max"}]},
            "algorithm": {"algorithmName": ALGORITHM,
                          "algorithmSettings": [{"name": "random_state", "value": "42"},
                                                {"name": "n_startup_trials", "value": str(max(2, max_trials // 3))}]},
            "metricsCollectorSpec": {"collector": {"kind": "StdOut"},
                                     "source": {"filter": {"metricsFormat": [METRICS_FORMAT]}}},
            "parallelTrialCount": parallel,
            "maxTrialCount": max_trials,
            "maxFailedTrialCount": max_failed,
            "resumePolicy": "Never",
            "parameters": [katib_parameter(p) for p in SEARCH_SPACE],
            "trialTemplate": trial_template(launcher, data, image=image),
        },
    }


def validate_experiment(doc: dict) -> list[str]:
    """Problems of an Experiment: it must load into the Kubeflow SDK's Katib API models (kubeflow_katib_api,
    installed with the `kubeflow` package) without losing a field, and pass the checks Katib's admission
    webhook makes (types, ranges, trial parameters referenced by the template, objective, collector)."""
    from kubeflow_katib_api.models import V1beta1Experiment

    errors = []
    try:
        model = V1beta1Experiment.from_dict(doc)
    except Exception as exc:  # pydantic ValidationError
        return [f"Experiment does not validate against the Katib API models: {exc}"]
    errors += [f"Experiment: unknown or dropped field {p}" for p in jobs.dropped_fields(doc, model.to_dict())]
    if doc.get("apiVersion") != API_VERSION or doc.get("kind") != "Experiment":
        errors.append(f"not a {API_VERSION} Experiment")
    spec = model.spec
    if spec is None:
        return [*errors, "no spec"]
    if spec.objective is None or spec.objective.type not in ("maximize", "minimize"):
        errors.append("objective.type must be maximize or minimize")
    if spec.objective is not None and not spec.objective.objective_metric_name:
        errors.append("objective.objectiveMetricName is required")
    if spec.algorithm is None or not spec.algorithm.algorithm_name:
        errors.append("algorithm.algorithmName is required")
    kind = spec.metrics_collector_spec.collector.kind if spec.metrics_collector_spec else "StdOut"
    if kind not in ("StdOut", "File", "TensorFlowEvent", "PrometheusMetric", "Custom", "None", "Push"):
        errors.append(f"unknown metrics collector {kind}")
    if not (spec.parallel_trial_count or 0) > 0 or not (spec.max_trial_count or 0) > 0:
        errors.append("parallelTrialCount and maxTrialCount must be positive")
    elif spec.parallel_trial_count > spec.max_trial_count:
        errors.append("parallelTrialCount exceeds maxTrialCount")
    names = []
    for p in spec.parameters or []:
        names.append(p.name)
        fs = p.feasible_space
        if p.parameter_type not in PARAMETER_TYPES:
            errors.append(f"{p.name}: parameterType must be one of {PARAMETER_TYPES}")
            continue
        if fs is None:
            errors.append(f"{p.name}: feasibleSpace is required")
            continue
        if fs.distribution is not None and fs.distribution not in DISTRIBUTIONS:
            errors.append(f"{p.name}: distribution must be one of {DISTRIBUTIONS}")
        if p.parameter_type in ("double", "int"):
            if fs.list:
                errors.append(f"{p.name}: {p.parameter_type} takes min/max, not a list")
            try:
                cast = float if p.parameter_type == "double" else int
                lo, hi = cast(fs.min), cast(fs.max)
                if not lo < hi:
                    errors.append(f"{p.name}: min must be below max")
                if fs.distribution in ("logUniform", "logNormal") and lo <= 0:
                    errors.append(f"{p.name}: a log distribution needs min > 0")
            except (TypeError, ValueError):
                errors.append(f"{p.name}: min/max must be {p.parameter_type} numbers")
        else:
            if not fs.list or fs.min or fs.max:
                errors.append(f"{p.name}: {p.parameter_type} takes a list, not min/max")
            elif p.parameter_type == "discrete":
                try:
                    [float(v) for v in fs.list]
                except ValueError:
                    errors.append(f"{p.name}: discrete values must be numbers")
    if len(set(names)) != len(names):
        errors.append("duplicate parameter names")
    tt = spec.trial_template
    if tt is None or not tt.trial_spec:
        return [*errors, "trialTemplate.trialSpec is required"]
    refs = {tp.reference for tp in tt.trial_parameters or []}
    if refs != set(names):
        errors.append(f"trialParameters reference {sorted(refs)} but the parameters are {sorted(names)}")
    text = str(tt.trial_spec)
    for tp in tt.trial_parameters or []:
        if f"${{trialParameters.{tp.name}}}" not in text:
            errors.append(f"trial parameter {tp.name} is not used in the trial spec")
    if not tt.primary_container_name or not tt.success_condition or not tt.failure_condition:
        errors.append("trialTemplate needs primaryContainerName, successCondition and failureCondition")
    trial = tt.trial_spec
    if trial.get("kind") == "TrainJob":
        errors += [f"trialSpec: {e}" for e in jobs.validate_trainjob(trial)]
    elif trial.get("kind") == "MPIJob":
        errors += [f"trialSpec: {e}" for e in jobs.validate_mpijob(trial)]
    else:
        errors.append(f"unsupported trial kind {trial.get('kind')!r}")
    return errors


def best_trial(exp: dict) -> tuple[dict, float | None]:
    """(parameters, objective value) of `status.currentOptimalTrial`, values cast to the search space's types
    (Katib reports every assignment and metric as a string)."""
    opt = (exp.get("status") or {}).get("currentOptimalTrial") or {}
    kinds = {p.name: p for p in SEARCH_SPACE}
    params = {}
    for a in opt.get("parameterAssignments") or []:
        p, v = kinds.get(a["name"]), a["value"]
        if p is None:
            continue
        if p.kind == "int" or (p.kind == "categorical" and all(isinstance(c, int) for c in p.choices)):
            params[a["name"]] = int(float(v))
        elif p.kind == "double" or (p.kind == "categorical" and all(isinstance(c, float) for c in p.choices)):
            params[a["name"]] = float(v)
        else:
            params[a["name"]] = v
    value = None
    for m in (opt.get("observation") or {}).get("metrics") or []:
        if m.get("name") == OBJECTIVE:
            value = float(m.get("max") if m.get("max") not in (None, "") else m["latest"])
    return params, value


def run_experiment(name: str, data: str, *, trials: int, seed: int = 42, parallel: int = 3,
                   image: str = jobs.IMAGE, namespace: str | None = None, api=None, poll_s: float = 30.0,
                   timeout_s: float = 48 * 3600) -> dict:
    """The tune step in the cluster: create a Katib Experiment whose trials (TrainJobs) train on `data` (the
    pipeline's dataset artifact), wait until it Succeeded and return the best trial. Calls: create + get
    kubeflow.org/v1beta1 experiments."""
    body = experiment(name, max_trials=trials, parallel=min(parallel, trials), data=data, image=image, seed=seed)
    # trials of a pipeline run keep nothing: no checkpoint volume per trial
    body["spec"]["trialTemplate"]["trialSpec"]["spec"]["trainer"]["args"] = [
        *trial_args(data, checkpoint=False)]
    errors = validate_experiment(body)
    if errors:
        raise ValueError("; ".join(errors))
    done = jobs.create_and_wait(api or jobs.custom_objects_api(), jobs.EXPERIMENT_API,
                                namespace or jobs.current_namespace(), body, success="Succeeded", poll_s=poll_s,
                                timeout_s=timeout_s)
    params, value = best_trial(done)
    status = done.get("status") or {}
    return {"experiment": done["metadata"]["name"], "best_params": params, "best_value": value,
            "trials": int(status.get("trials") or trials), "succeeded": int(status.get("trialsSucceeded") or 0)}


def to_yaml(doc: dict, header: str = "") -> str:
    import yaml

    body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=120)
    return (header + body) if header else body


GENERATED = ("# Generated by `python -m rentalml.training.katib --out manifests/jobs`: "
             "edit the code, not this.\n")
#: kustomize's images transformer only knows `containers[].image`: the TrainJob's trainer image and the trial
#: templates' images need their paths named (kustomize "configurations")
IMAGE_FIELDS = {"images": [
    {"path": "spec/trainer/image", "kind": "TrainJob"},
    {"path": "spec/trialTemplate/trialSpec/spec/trainer/image", "kind": "Experiment"},
    {"path": "spec/trialTemplate/trialSpec/spec/mpiReplicaSpecs/Launcher/template/spec/containers[]/image",
     "kind": "Experiment"},
    {"path": "spec/trialTemplate/trialSpec/spec/mpiReplicaSpecs/Worker/template/spec/containers[]/image",
     "kind": "Experiment"},
    {"path": "spec/mpiReplicaSpecs/Launcher/template/spec/containers[]/image", "kind": "MPIJob"},
    {"path": "spec/mpiReplicaSpecs/Worker/template/spec/containers[]/image", "kind": "MPIJob"},
]}


def _kustomization(resources: list[str], comment: str, **extra) -> dict:
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "__comment": comment,
            **extra, "resources": resources}


def manifests() -> dict[str, dict]:
    """Relative path → document of everything under manifests/jobs/ (kustomizations included).

    One-shot jobs live outside the default apply set (manifests/base): a TrainJob's spec.trainer/runtimeRef
    and a Katib Experiment's spec are immutable, so re-applying the stack after any change would be refused.
    Start them with `kubectl create -k manifests/jobs/trainer` (or `.../jobs/mpi`, `.../jobs/prod`); delete
    the finished ones first (`kubectl delete -k manifests/jobs/trainer`)."""
    base = {"namespace": "rentalml", "configurations": ["kustomizeconfig.yaml"]}
    return {
        "trainer/trainjob.yaml": jobs.trainjob(),
        "trainer/katib-experiment.yaml": experiment(launcher="trainjob"),
        "trainer/kustomizeconfig.yaml": IMAGE_FIELDS,
        "trainer/kustomization.yaml": _kustomization(
            ["trainjob.yaml", "katib-experiment.yaml"],
            "the TrainJob and its Katib Experiment: kubectl create -k manifests/jobs/trainer", **base,
            images=[{"name": "ghcr.io/rentalml/rentalml", "newTag": "0.1.0"}]),
        "mpi/mpijob.yaml": jobs.mpijob(),
        "mpi/katib-experiment-mpijob.yaml": experiment(launcher="mpijob"),
        "mpi/kustomizeconfig.yaml": IMAGE_FIELDS,
        "mpi/kustomization.yaml": _kustomization(
            ["mpijob.yaml", "katib-experiment-mpijob.yaml"],
            "the MPIJob alternative where the MPI operator runs: kubectl create -k manifests/jobs/mpi", **base,
            images=[{"name": "ghcr.io/rentalml/rentalml", "newTag": "0.1.0"}]),
        "prod/kustomization.yaml": _kustomization(
            ["../trainer"], "prod: the same jobs on the CUDA training image: kubectl create -k manifests/jobs/prod",
            images=[{"name": "ghcr.io/rentalml/rentalml", "newName": jobs.GPU_IMAGE.rsplit(":", 1)[0],
                     "newTag": jobs.GPU_IMAGE.rsplit(":", 1)[1]}]),
    }


def render(doc: dict) -> str:
    comment = doc.get("__comment")
    body = to_yaml({k: v for k, v in doc.items() if k != "__comment"})
    return GENERATED + (f"# {comment}\n" if comment else "") + body


def write_manifests(out: str | Path) -> list[Path]:
    out = Path(out)
    written = []
    for name, doc in manifests().items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(doc))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m rentalml.training.katib")
    ap.add_argument("--out", type=Path, help="write every training manifest into this directory")
    ap.add_argument("--launcher", choices=LAUNCHERS, default="trainjob")
    a = ap.parse_args(argv)
    if a.out:
        for p in write_manifests(a.out):
            print(p)
        return
    doc = experiment(launcher=a.launcher)
    errors = validate_experiment(doc)
    if errors:
        raise SystemExit("\n".join(errors))
    print(to_yaml(doc), end="")


if __name__ == "__main__":
    main()
