"""Training on a device (issue 14 point 5): benchmarks/gpu_training.py's smoke run on the CPU, the startup error
of `--device cuda` on a machine without CUDA, and the bf16 autocast path of the trainer (CPU autocast standing in
for CUDA's, the same casts: on a CUDA card the benchmark itself is the check)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import rentalml.models.neural as neural
from rentalml.models.base import TrainData
from rentalml.models.neural import TwoTower, resolve_device

ROOT = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_training", ROOT / "benchmarks" / "gpu_training.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_cpu_small_records_both_trainers_the_ratio_and_quality(bench, tmp_path):
    try:
        bench.find_reference()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "gpu_training.json"
    bench.run("cpu", small=True, out=out)
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu" and doc["small"] is True
    ours, ref = doc["project"]["b256"], doc["reference"]
    assert ours["train_samples_per_s"] > 0 and ref["train_samples_per_s_b256"] > 0
    assert ref["items"] == doc["sizes"]["items"] == 2_000 and ref["dim"] == doc["sizes"]["dim"]  # the same sizes
    assert 240 <= ours["samples_per_step"] <= 256  # batch 256 counted in interactions, as the reference's pairs
    assert doc["ratio"]["b256"] == pytest.approx(ours["train_samples_per_s"] / ref["train_samples_per_s_b256"],
                                                 rel=1e-3)
    q = doc["quality"]
    for side in ("cpu", "device"):
        assert 0 < q[side]["tower_val_ndcg@10"] <= 1 and 0 < q[side]["model_val_ndcg@10"] <= 1
    assert q["same_run"] and q["relative_difference"]["model_val_ndcg@10"] == 0.0 and q["within_1pct"]
    assert doc["goal"]["measured"] is False and doc["goal"]["met"] is None  # a smoke run is not the bar


@no_cuda
def test_device_cuda_without_cuda_fails_at_startup_naming_the_flag(tmp_path, capsys, monkeypatch):
    from rentalml.cli import app
    from rentalml.config import get_settings
    from rentalml.training import distributed

    # the device is checked before the data is read: a missing dataset would be the error otherwise
    res = CliRunner().invoke(app, ["train", "--device", "cuda", "--data", str(tmp_path / "absent"), "--no-register"])
    assert res.exit_code == 2, res.output
    assert "--device" in res.output and "CUDA is not available" in res.output
    with pytest.raises(SystemExit) as exc:
        distributed.run(["--device", "cuda", "--data", str(tmp_path / "absent")])
    assert exc.value.code == 2 and "--device cuda: CUDA is not available" in capsys.readouterr().err
    # the library raises before any training, with the same message
    model = TwoTower(device="cuda", epochs=1)
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
        model.fit(TrainData(np.eye(4, dtype=np.float32)))
    assert model.history_ == []
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="one of auto, cpu, cuda"):
        resolve_device("gpu")
    # the setting behind the flag's default is a Literal, checked when any command starts
    monkeypatch.setenv("RENTALML_TRAIN__DEVICE", "gpu")
    get_settings.cache_clear()
    try:
        res = CliRunner().invoke(app, ["version"])
    finally:
        monkeypatch.delenv("RENTALML_TRAIN__DEVICE")
        get_settings.cache_clear()
    assert res.exit_code == 2 and "train.device" in res.output


@pytest.fixture(scope="module")
def data(market):
    from rentalml.data.dataset import InteractionMatrix
    from rentalml.evaluation.protocols import aggregate_pairs, holdout_split
    from rentalml.training.trainer import _features, catalogue

    pairs = aggregate_pairs(market.interactions)
    items, users = catalogue(market, pairs), np.array(sorted(pairs["user_id"].unique()), dtype=object)
    _, item_x, _, user_x = _features(market, items, users)
    tr, va = holdout_split(pairs, 0.1, 43)
    build = lambda df: InteractionMatrix.build(df, item_ids=items, user_ids=users).matrix  # noqa: E731
    return TrainData(build(tr), item_x, user_x, valid=build(va), seed=3)


@pytest.mark.parametrize("softmax", ["sampled", "full"])
def test_bf16_autocast_path_trains_and_hands_back_a_float32_cpu_model(data, monkeypatch, softmax):
    """Under bf16 autocast (the CPU's, as the trainer uses CUDA's on a card) both losses train the hybrid tower
    (ID + content MLPs), the log-sum-exp runs in float32, and the fitted model is a float32 CPU model within 2 %
    of the float32 run's validation nDCG (the 1 % bar is measured on a card by benchmarks/gpu_training.py)."""
    params = {"softmax": softmax, "epochs": 6, "eval_every": 2, "dim": 16, "hidden": 32, "negatives": 32,
              "sampled_batch_size": 32, "batch_size": 32}
    fp32 = TwoTower(**params).fit(data)
    casts = []

    def bf16(dev):
        casts.append(dev.type)
        return torch.autocast("cpu", dtype=torch.bfloat16)

    monkeypatch.setattr(neural, "autocast", bf16)
    model = TwoTower(**params).fit(data)
    assert casts and set(casts) == {"cpu"}
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.net.parameters())
    assert model.table_out.dtype == torch.float32
    x = data.binary()
    scores = model.score(np.arange(5), x[:5])
    assert scores.dtype == np.float32 and np.isfinite(scores).all()
    assert not np.array_equal(scores, fp32.score(np.arange(5), x[:5]))  # bf16 really ran
    assert model.best_val >= 0.98 * fp32.best_val, (model.best_val, fp32.best_val)
