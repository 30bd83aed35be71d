"""A trial: its clock (``seconds`` is its own work; its worker's one-time set-up is recorded apart), and what
``build_trial`` hands the model builder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from sbsearch import trial
from sbsearch.data import load_dataset
from sbsearch.space import config_from_params
from sbsearch.spec import parse_spec
from sbsearch.trial import SweepContext, build_trial, run_trial
from tests.conftest import tiny_spec_dict, trial_config

SLOW_LOAD = 2.0  # seconds the data set takes to load, far more than the tiny trial itself


def test_a_workers_first_trial_records_its_set_up_apart_and_later_ones_have_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A fresh worker process: nothing set up, nothing cached, and a data set that loads slowly.
    monkeypatch.setattr(trial, "_SET_UP", set())
    trial._base_split.cache_clear()
    loads = []
    load_dataset = trial.load_dataset

    def slow_load(*args: Any) -> Any:
        loads.append(args)
        time.sleep(SLOW_LOAD)
        return load_dataset(*args)

    monkeypatch.setattr(trial, "load_dataset", slow_load)
    spec = parse_spec(tiny_spec_dict(train__epochs=1, train__replicas=1, seed=11))
    ctx = SweepContext(spec, tmp_path, None, None, threads=1)
    config = config_from_params(spec, {"expansion.factor": 1, "expansion.fill": 0.0, "norm.kind": "none"})
    try:
        first, second = (run_trial(ctx, n, config, lambda epoch, metrics: None) for n in (0, 1))
    finally:
        trial._base_split.cache_clear()  # other tests load the real data
    assert first.state == second.state == "COMPLETE"
    assert len(loads) == 1
    assert first.startup_seconds >= SLOW_LOAD
    assert first.seconds < SLOW_LOAD  # the trial's own time leaves the loading out
    assert second.startup_seconds == 0.0 and 0.0 < second.seconds < SLOW_LOAD


def test_auto_multiplier_through_a_trial_uses_the_normalised_constant() -> None:
    spec = parse_spec(tiny_spec_dict(model__name="mlp", space={}))
    split, desc = build_trial(spec, trial_config(expansion__factor=2, expansion__fill=0.5,
                                                 controls__bias_lr_multiplier="auto"))
    base = load_dataset("digits", spec.data.val_fraction, spec.seed)
    c = (0.5 - base.mean) / base.std  # fill_space raw: the constant is normalised like the pixels
    assert split.x_train.shape[1:] == (1, 8, 8) and desc.input_shape == (1, 8, 8)
    assert desc.bias_lr_multiplier == pytest.approx(1 + (256 - 64) * float(c[0]) ** 2, rel=1e-5)
