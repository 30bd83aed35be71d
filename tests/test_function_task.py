"""The 1-D function task: its options reach the trial, pi as a fill preset, and a regression sweep."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

from sbsearch.errors import SpecError
from sbsearch.space import config_from_params
from sbsearch.spec import parse_spec, spec_to_dict
from sbsearch.trainer import TrainPlan, train
from sbsearch.trial import build_trial

TWO_PI = 2 * math.pi


def test_the_spec_carries_the_function_options_to_the_trial() -> None:
    spec = parse_spec({
        "data": {"dataset": "fn_step", "domain": [0, "2pi"], "sampling": "random", "points": 30},
        "model": {"name": "mlp", "first_bias": "zero"},
        "train": {"optimizer": "lbfgs", "lr": 1.0},
        "space": {"expansion": {"factor": 5, "fill": "pi", "layout": "border"}},
    })
    assert spec.data.domain == (0.0, TWO_PI) and spec.param("expansion.fill").values == (math.pi,)
    split, desc = build_trial(spec, config_from_params(spec, {}))
    assert split.x_train.shape == (30, 5) and desc.first_bias == "zero" and desc.input_shape == (5,)
    assert torch.allclose(split.x_train[:, [0, 1, 3, 4]], torch.tensor(math.pi))
    assert 0 <= float(split.x_train[:, 2].min()) and float(split.x_train[:, 2].max()) <= TWO_PI
    assert parse_spec(spec_to_dict(spec)) == spec  # the resolved spec (pi written out) parses back the same


@pytest.mark.parametrize("value,expected", [("pi", math.pi), ("-pi", -math.pi), ("2pi", TWO_PI), ("pi/2", math.pi / 2),
                                            ("2*pi", TWO_PI), ("π", math.pi)])
def test_pi_presets_of_float_knobs(value: str, expected: float) -> None:
    spec = parse_spec({"space": {"expansion": {"fill": [0, value]}, "dropout": {"rate": {"low": 0, "high": "pi/10"}}}})
    assert spec.param("expansion.fill").values == (0.0, expected)
    assert spec.param("dropout.rate").high == pytest.approx(math.pi / 10)


@pytest.mark.parametrize("raw,path,words", [
    ({"space": {"expansion": {"fill": "pie"}}}, "space.expansion.fill", "must be a finite number or a multiple of pi"),
    ({"space": {"expansion": {"factor": "pi"}}}, "space.expansion.factor", "must be an integer"),
    ({"data": {"dataset": "fn_abs", "domain": [1, 0]}}, "data.domain", "low < high"),
    ({"data": {"dataset": "fn_abs", "domain": [0, "tau"]}}, "data.domain", "a list of 2 finite numbers"),
    ({"train": {"optimizer": "bfgs"}}, "train.optimizer", "did you mean 'lbfgs'"),
    ({"model": {"first_bias": "zeros"}}, "model.first_bias", "did you mean 'zero'"),
])
def test_bad_function_options_get_one_line_each(raw: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    assert [p.path for p in info.value.problems] == [path] and words in str(info.value)


def test_vector_expansion_runs_end_to_end_on_a_tabular_set() -> None:
    spec = parse_spec({"data": {"dataset": "wine"}, "model": {"name": "mlp", "width": 8},
                       "train": {"epochs": 2}, "space": {"expansion": {"factor": 5, "fill": "pi", "layout": "border"}}})
    split, desc = build_trial(spec, config_from_params(spec, {}))
    assert split.x_train.shape[1] == 13 * 5 and desc.input_shape == (65,)
    assert torch.allclose(split.x_train[:, :26], torch.tensor(math.pi))  # 52 constants: 26 before, 26 after
    result = train(split, desc, TrainPlan(epochs=2))
    assert 0 <= result.final["val_accuracy"] <= 1


@pytest.mark.slow
def test_a_regression_sweep_minimises_the_mse(tmp_path: Path) -> None:
    """Search, storage, trials.csv and MLflow all follow the task's direction (MSE down)."""
    from mlflow.tracking import MlflowClient

    from sbsearch.study import Store
    from sbsearch.sweep import run_sweep

    spec = parse_spec({
        "name": "fn-sweep", "data": {"dataset": "fn_abs", "points": 30},
        "model": {"name": "mlp", "width": 8, "depth": 1},
        "train": {"epochs": 2, "optimizer": "lbfgs", "lr": 1.0},
        "space": {"expansion": {"factor": [1, 5], "fill": [0.0, "pi"], "layout": "border"}},
        "search": {"trials": 3, "sampler": "random", "pruner": "median", "warmup_epochs": 0},
    })
    result = run_sweep(spec, tmp_path / "out", console=Console(quiet=True))
    assert result.metric == "val_mse" and result.direction == "minimize"
    with open(tmp_path / "out" / "trials.csv", newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["state"] == "COMPLETE"]
    assert rows and "val_mse" in rows[0] and "val_accuracy" not in rows[0]
    best = min(rows, key=lambda r: float(r["val_mse"]))
    assert result.best is not None and result.best.number == int(best["number"])
    study = Store.open(spec, tmp_path / "out", "minimize").study
    assert study.direction.name == "MINIMIZE" and study.best_value == pytest.approx(float(best["val_mse"]))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fn-sweep")
    assert experiment is not None
    parent = next(r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("sbsearch.role") == "sweep")
    assert parent.data.metrics["best_val_mse"] == pytest.approx(float(best["val_mse"]))
