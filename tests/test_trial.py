"""A trial's clock: ``seconds`` is its own work; its worker's one-time set-up is recorded apart."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from sbsearch import trial
from sbsearch.space import config_from_params
from sbsearch.spec import parse_spec
from sbsearch.trial import SweepContext, run_trial
from tests.conftest import tiny_spec_dict

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
