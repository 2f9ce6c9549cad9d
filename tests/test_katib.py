"""Katib Experiments and the TrainJob/MPIJob manifests: they validate against the Kubeflow SDK's API models
(kubeflow_katib_api / kubeflow_trainer_api, shipped with the `kubeflow` package), share the one search space
with local Optuna tuning, and the committed files under manifests/jobs/ match the code."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from rentalml.cli import app
from rentalml.training import jobs, katib
from rentalml.training.distributed import build_parser
from rentalml.training.search_space import SEARCH_SPACE, suggest

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests" / "jobs"


@pytest.fixture(params=katib.LAUNCHERS)
def exp(request):
    return katib.experiment(launcher=request.param)


def test_experiment_validates_against_katib_models(exp):
    from kubeflow_katib_api.models import V1beta1Experiment

    assert katib.validate_experiment(exp) == []
    model = V1beta1Experiment.from_dict(exp)
    assert model.spec.algorithm.algorithm_name == "multivariate-tpe"
    assert model.spec.objective.objective_metric_name == "ndcg_at_10" and model.spec.objective.type == "maximize"
    assert model.spec.metrics_collector_spec.collector.kind == "StdOut"
    assert model.spec.parallel_trial_count == 3 and model.spec.max_trial_count == 24


def test_experiment_shares_the_search_space(exp):
    """Every parameter of SEARCH_SPACE, with the same type, range/choices and scale, and nothing else."""
    params = {p["name"]: p for p in exp["spec"]["parameters"]}
    assert list(params) == [p.name for p in SEARCH_SPACE]
    for p in SEARCH_SPACE:
        k = params[p.name]
        fs = k["feasibleSpace"]
        if p.kind in ("double", "int"):
            assert k["parameterType"] == p.kind
            assert float(fs["min"]) == pytest.approx(p.low) and float(fs["max"]) == pytest.approx(p.high)
            assert fs["distribution"] == ("logUniform" if p.log else "uniform")
        else:
            assert k["parameterType"] == "discrete"
            assert [float(v) for v in fs["list"]] == [float(c) for c in p.choices]
    # every trial parameter reaches the entrypoint as its own option, and the entrypoint parses it
    args = exp["spec"]["trialTemplate"]["trialSpec"]
    text = yaml.safe_dump(args)
    for p in SEARCH_SPACE:
        assert f"--{p.name.replace('_', '-')}=${{trialParameters.{p.name}}}" in text


def test_optuna_suggestions_are_feasible_katib_values(exp):
    """What the local Optuna run samples lies inside the Katib feasible space (and parses as a trial)."""
    params = {p["name"]: p for p in exp["spec"]["parameters"]}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        values = suggest(study.ask())
        for name, v in values.items():
            fs = params[name]["feasibleSpace"]
            if "list" in fs:
                assert str(v) in fs["list"]
            else:
                assert float(fs["min"]) <= v <= float(fs["max"])
        cmd = [a.replace(f"${{trialParameters.{n}}}", str(v)) for a in katib.trial_args() for n, v in values.items()
               if f"${{trialParameters.{n}}}" in a]
        parsed = build_parser().parse_args(cmd)
        for name, v in values.items():
            assert math.isclose(getattr(parsed, name), v, rel_tol=1e-12)


def test_trial_specs_run_the_entrypoint():
    tj = katib.experiment(launcher="trainjob")["spec"]["trialTemplate"]
    assert tj["trialSpec"]["kind"] == "TrainJob" and tj["primaryContainerName"] == "node"
    assert tj["trialSpec"]["spec"]["trainer"]["command"] == ["torchrun", "-m", "rentalml.training.distributed"]
    mj = katib.experiment(launcher="mpijob")["spec"]["trialTemplate"]
    assert mj["trialSpec"]["kind"] == "MPIJob" and mj["primaryPodLabels"] == {"training.kubeflow.org/job-role":
                                                                              "launcher"}
    assert "rentalml.training.distributed" in mj["trialSpec"]["spec"]["mpiReplicaSpecs"]["Launcher"]["template"][
        "spec"]["containers"][0]["command"]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["spec"]["parameters"][0]["feasibleSpace"].update(min="0.5"), "min must be below max"),
    (lambda d: d["spec"]["parameters"][1].update(parameterType="choice"), "parameterType"),
    (lambda d: d["spec"].update(parallelTrialCount=100), "parallelTrialCount exceeds"),
    (lambda d: d["spec"]["trialTemplate"]["trialParameters"].pop(), "trialParameters reference"),
    (lambda d: d["spec"]["objective"].update(type="maximise"), "objective.type"),
    (lambda d: d["spec"].update(maxTrialCount="24"), "does not validate"),  # strict int in the Katib models
    (lambda d: d["spec"]["objective"].update(objectiveMetricNmae="x"), "dropped field"),  # typo
    (lambda d: d["spec"]["trialTemplate"]["trialSpec"]["spec"]["trainer"].update(numNodes="two"), "TrainJob"),
])
def test_validation_catches_mistakes(mutate, message):
    doc = copy.deepcopy(katib.experiment())
    mutate(doc)
    errors = katib.validate_experiment(doc)
    assert any(message in e for e in errors), errors


def test_standalone_jobs_validate():
    assert jobs.validate_trainjob(jobs.trainjob()) == []
    assert jobs.validate_mpijob(jobs.mpijob()) == []
    tj = jobs.trainjob()["spec"]["trainer"]
    assert tj["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "1" and tj["numNodes"] == 2
    bad = jobs.mpijob()
    bad["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] = 3
    assert any("-np" in e for e in jobs.validate_mpijob(bad))


def test_committed_manifests_match_the_code():
    expected = katib.manifests()
    on_disk = {str(p.relative_to(MANIFESTS)) for p in MANIFESTS.rglob("*.yaml")}
    assert on_disk == set(expected), "regenerate: python -m rentalml.training.katib --out manifests/jobs"
    for name, doc in expected.items():
        text = (MANIFESTS / name).read_text()
        assert text == katib.render(doc), f"{name} differs from the code: python -m rentalml.training.katib " \
                                          f"--out manifests/jobs"
    for kust in MANIFESTS.rglob("kustomization.yaml"):
        assert all((kust.parent / r).exists() for r in yaml.safe_load(kust.read_text())["resources"])


def test_cli_tune_katib_writes_a_valid_experiment(tmp_path):
    out = tmp_path / "exp.yaml"
    res = CliRunner().invoke(app, ["tune", "--katib", "--trials", "12", "--launcher", "mpijob",
                                   "--data", "synthetic:1000,500,20000", "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = yaml.safe_load(out.read_text())
    assert katib.validate_experiment(doc) == []
    assert doc["spec"]["maxTrialCount"] == 12 and doc["spec"]["trialTemplate"]["trialSpec"]["kind"] == "MPIJob"
    assert "--data=synthetic:1000,500,20000" in yaml.safe_dump(doc)


def test_local_tuning_starts_from_the_defaults():
    """The defaults' score is recorded in the Optuna study (TPE learns from it) and is the floor of the result."""
    from rentalml.data.generator import generate_marketplace
    from rentalml.training.tuning import tune

    ds = generate_marketplace(n_users=150, n_properties=80, n_events=3000, seed=2)
    from rentalml.training.tuning import _default_point

    point = _default_point({"epochs": 4})
    assert point["dim"] == 200 and point["lr"] == 2e-3
    assert point["weight_decay"] == 1e-9  # zero weight decay, on the log scale's lower bound
    assert _default_point({"dim": 96}) is None  # a default outside the space is not recorded
    res = tune("collaborative", ds, trials=2, seed=1, base_params={"epochs": 4, "eval_every": 2})
    assert len(res["trials"]) == 2 and res["best_value"] >= res["default_value"]
    assert res["best_params"] == {} or res["best_value"] > res["default_value"]
