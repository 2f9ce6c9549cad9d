"""`rentalml` command line through typer's CliRunner (in process, real models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from rentalml.cli import app
from rentalml.data.generator import generate_marketplace
from rentalml.evaluation.report import format_table, write_report

runner = CliRunner()
METRICS = ("ndcg@10", "recall@10", "precision@10", "map@10", "coverage", "fit_seconds")


def _write_csv(path, n_users: int, n_properties: int, n_events: int, seed: int = 3):
    ds = generate_marketplace(n_users=n_users, n_properties=n_properties, n_events=n_events, seed=seed)
    df = ds.interactions[["user_id", "property_id", "timestamp"]].rename(columns={"property_id": "item_id"})
    df["timestamp"] = df["timestamp"].astype("int64") // 10**9  # unix seconds
    df.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory):
    return _write_csv(tmp_path_factory.mktemp("cli") / "interactions.csv", 150, 60, 2500)


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    # few users, but enough pairs per user that the tuning validation split is not empty
    return _write_csv(tmp_path_factory.mktemp("cli") / "tiny.csv", 100, 60, 6000)


@pytest.fixture(scope="module")
def bench(small_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    res = runner.invoke(app, ["benchmark", "--interactions", str(small_csv), "--protocol", "random-75-25",
                              "--seed", "42", "--k", "10", "--models", "popularity,collaborative",
                              "--json", str(out / "result.json"), "--report", str(out / "report")])
    return res, out


def test_benchmark_writes_json(bench, small_csv):
    res, out = bench
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "result.json").read_text())
    assert {"dataset", "protocol", "k", "models"} <= set(doc)
    assert doc["dataset"] == "interactions" and doc["protocol"] == "random-75-25"
    assert doc["k"] == 10 and doc["seed"] == 42
    assert list(doc["models"]) == ["popularity", "collaborative"]
    assert "_curves" not in doc
    n_pairs = pd.read_csv(small_csv).drop_duplicates(["user_id", "item_id"]).shape[0]
    assert doc["train_pairs"] + doc["test_pairs"] == n_pairs
    for name, m in doc["models"].items():
        for key in METRICS:
            assert isinstance(m[key], float | int), (name, key)
            assert m[key] >= 0.0
        for key in METRICS[:-1]:
            assert m[key] <= 1.0
        assert "tuning" not in m
    assert doc["models"]["collaborative"]["ndcg@10"] > doc["models"]["popularity"]["ndcg@10"]


def test_benchmark_prints_table(bench):
    res, out = bench
    doc = json.loads((out / "result.json").read_text())
    assert "| model | ndcg@10 | recall@10 | precision@10 | map@10 | coverage | fit_seconds |" in res.stdout
    rows = [line for line in res.stdout.splitlines() if line.startswith("| popularity") or
            line.startswith("| collaborative")]
    assert len(rows) == 2
    assert format_table(doc) in res.stdout
    assert f"{doc['models']['collaborative']['ndcg@10']:.4f}" in rows[1]


def test_benchmark_report_has_plots(bench):
    _, out = bench
    html = (out / "report" / "report.html").read_text()
    assert html.count("<img src='data:image/png;base64,") >= 2  # metric bars + the collaborative training curve
    assert "Training curve: collaborative" in html and "Metrics by model" in html
    assert json.loads((out / "report" / "report.json").read_text())["models"].keys() == {"popularity",
                                                                                         "collaborative"}


def test_benchmark_with_tuning(tiny_csv, tmp_path):
    out = tmp_path / "tuned.json"
    res = runner.invoke(app, ["benchmark", "--interactions", str(tiny_csv), "--models", "popularity,collaborative",
                              "--tune-trials", "2", "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    tuning = doc["models"]["collaborative"]["tuning"]
    assert tuning["trials"] == 2
    assert 0.0 <= tuning["default_value"] <= tuning["best_value"] <= 1.0  # never worse than the defaults
    assert "tuning" not in doc["models"]["popularity"]  # nothing to tune
    assert doc["models"]["collaborative"]["params"]["epochs"] >= 1


def test_benchmark_bad_protocol_fails_with_message(small_csv, tmp_path):
    out = tmp_path / "never.json"
    res = runner.invoke(app, ["benchmark", "--interactions", str(small_csv), "--protocol", "leave-one-out",
                              "--models", "popularity", "--json", str(out)])
    assert res.exit_code != 0
    message = res.output + str(res.exception or "")
    assert "unknown protocol 'leave-one-out'" in message
    assert "random-75-25" in message and "cold-start-items" in message
    assert not out.exists()


def test_benchmark_missing_column_fails(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,item_id\nu1,p1\n")
    res = runner.invoke(app, ["benchmark", "--interactions", str(bad), "--models", "popularity"])
    assert res.exit_code != 0
    assert "timestamp" in res.output + str(res.exception or "")


def test_tune_command(tmp_path):
    out = tmp_path / "tune.json"
    res = runner.invoke(app, ["tune", "--data", "synthetic:300,150,5000", "--trials", "2", "--json", str(out)])
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)
    assert set(printed) == {"best_params", "best_value", "default_value"}
    assert printed["best_value"] >= printed["default_value"] > 0.0
    full = json.loads(out.read_text())
    assert len(full["trials"]) == 2 and {t["state"] for t in full["trials"]} <= {"COMPLETE", "PRUNED"}
    from rentalml.training.search_space import SEARCH_SPACE

    for t in full["trials"]:
        assert set(t["params"]) == {p.name for p in SEARCH_SPACE}


def test_write_report_embeds_png_plots(tmp_path):
    result = {"dataset": "toy", "protocol": "random-75-25", "k": 10, "seed": 1, "models": {
        "popularity": {"ndcg@10": 0.1, "recall@10": 0.2, "precision@10": 0.02, "map@10": 0.05, "coverage": 0.1},
        "hybrid": {"ndcg@10": 0.3, "recall@10": 0.5, "precision@10": 0.05, "map@10": 0.2, "coverage": 0.8,
                   "cold_start": {"ndcg@10": 0.1}}}}
    curves = {"hybrid": [{"epoch": 1, "loss": 3.0}, {"epoch": 2, "loss": 2.5, "val_ndcg@10": 0.2}],
              "popularity": []}
    path = write_report(result, tmp_path / "r", curves)
    html = path.read_text()
    assert path.name == "report.html"
    assert html.count("<img src='data:image/png;base64,iVBORw0KGgo") == 3  # metrics, cold-start slice, curve
    assert "Cold-start slice" in html and "Training curve: hybrid" in html
    assert "<td>hybrid</td><td>0.3000</td>" in html
    assert json.loads((tmp_path / "r" / "report.json").read_text()) == result


@pytest.mark.parametrize(("env", "value", "field"), [
    ("RENTALML_SERVE__PRECISION", "int9", "serve.precision"),
    ("RENTALML_SERVE__FEATURE_SOURCE", "feest", "serve.feature_source"),
    ("RENTALML_SERVE__OUTCOMES_SINK", "kafak", "serve.outcomes_sink"),
    ("RENTALML_KAFKA__SECURITY_PROTOCOL", "SASL_PLAIN", "kafka.security_protocol"),
    ("RENTALML_MONITOR__RETRAIN", "yes", "monitor.retrain"),
])
def test_a_typo_in_a_selector_stops_any_command_at_start(env, value, field):
    """Settings selectors are Literal types: a typo fails when the command starts, naming the setting, instead of
    at first use deep inside a server."""
    proc = subprocess.run([sys.executable, "-m", "rentalml.cli", "serve", "--http-port", "0"],
                          env={**os.environ, env: value}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert field in proc.stderr and repr(value) in proc.stderr and "Traceback" not in proc.stderr
