"""`rentalml benchmark --seeds`: one split and fit per seed, every model in the same run, mean ± std."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from rentalml.cli import app
from rentalml.data.generator import generate_marketplace
from rentalml.evaluation.benchmark import format_seeds_table, run_benchmark, run_seeds

MODELS = ["popularity", "ease"]


@pytest.fixture(scope="module")
def small():
    return generate_marketplace(n_users=150, n_properties=60, n_events=2500, seed=3)


def test_mean_and_std_are_over_the_per_seed_runs(small):
    partial = []
    res = run_seeds(small, [1, 2, 3], models=MODELS, log=lambda m: None, on_seed=partial.append)
    assert res["seeds"] == [1, 2, 3] and set(res["summary"]) == set(MODELS)
    assert [d["seeds"] for d in partial] == [[1], [1, 2], [1, 2, 3]]  # written after every seed
    for name in MODELS:
        vals = [res["runs"][str(s)]["models"][name]["ndcg@10"] for s in (1, 2, 3)]
        row = res["summary"][name]["ndcg@10"]
        assert row["values"] == vals
        assert row["mean"] == pytest.approx(np.mean(vals))
        assert row["std"] == pytest.approx(np.std(vals, ddof=1))
    # each seed is its own split: the single-seed harness gives the same figures, and seeds differ
    one = run_benchmark(small, seed=2, models=MODELS, log=lambda m: None)
    assert one["models"]["ease"]["ndcg@10"] == res["runs"]["2"]["models"]["ease"]["ndcg@10"]
    assert len(set(res["summary"]["popularity"]["ndcg@10"]["values"])) > 1
    table = format_seeds_table(res)
    assert "| ease | " in table and "±" in table and "seeds 1,2,3" in table
    with pytest.raises(ValueError, match="seeds"):
        run_seeds(small, [], models=MODELS)


def test_cli_seeds_writes_the_summary(small, tmp_path):
    csv = tmp_path / "i.csv"
    df = small.interactions[["user_id", "property_id", "timestamp"]].rename(columns={"property_id": "item_id"})
    df["timestamp"] = df["timestamp"].astype("int64") // 10**9
    df.to_csv(csv, index=False)
    out = tmp_path / "seeds.json"
    res = CliRunner().invoke(app, ["benchmark", "--interactions", str(csv), "--seeds", "1,2", "--models",
                                   "popularity", "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["seeds"] == [1, 2] and doc["summary"]["popularity"]["ndcg@10"]["std"] >= 0
    assert "± " in res.stdout
    bad = CliRunner().invoke(app, ["benchmark", "--interactions", str(csv), "--seeds", "1,x"])
    assert bad.exit_code != 0 and "seeds must be integers" in bad.output
