"""The knob sweeps of ``benchmarks/score_validity.py --part monotonicity``: every level is a valid spec whose
knob reaches the model or the loss, and the statistics helpers do what the results file says they do."""

from __future__ import annotations

import importlib.util
import math
import sys
from types import ModuleType

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from tests.conftest import ROOT


def _load_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("score_validity", ROOT / "benchmarks" / "score_validity.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()


@pytest.mark.parametrize("name", list(bench.SWEEPS))
def test_every_level_is_a_distinct_valid_trial(name: str) -> None:
    from sbsearch.space import config_from_params
    from sbsearch.spec import parse_spec
    from sbsearch.trial import build_trial

    sweep = bench.SWEEPS[name]
    seen = set()
    for level in range(len(sweep.labels)):
        spec = parse_spec(sweep.level_spec(level))
        config = config_from_params(spec, {})
        _, desc = build_trial(spec, config)
        # A level differs from the others in the model, the strategies' settings or the training recipe.
        seen.add((desc, repr(sorted(config.params.items())), spec.train))
    assert len(seen) == len(sweep.labels)


def test_partial_spearman_without_a_third_variable_is_spearman() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=20), rng.normal(size=20)
    assert bench._partial_spearman(x, y, None) == pytest.approx(spearmanr(x, y)[0])
    assert bench._partial_spearman(x, y, np.ones(20)) == pytest.approx(spearmanr(x, y)[0])


def test_partial_spearman_removes_a_shared_cause() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(size=400)
    x, y = z + 0.3 * rng.normal(size=400), z + 0.3 * rng.normal(size=400)
    assert spearmanr(x, y)[0] > 0.8
    assert abs(bench._partial_spearman(x, y, z)) < 0.15


def test_level_resamples_keep_each_level_count() -> None:
    levels = np.array([0, 0, 0, 1, 1, 2])
    for idx in bench._level_resamples(levels, 50, np.random.default_rng(0)):
        assert np.bincount(levels[idx]).tolist() == [3, 2, 1]


def test_entries_kept_drops_each_replicas_frozen_entries() -> None:
    weights = [{"w": torch.arange(6.0).reshape(2, 3)}, {"w": torch.arange(6.0, 12.0).reshape(2, 3)}]
    masks = [{"w": torch.tensor([[True, False, False], [False, False, True]])},
             {"w": torch.tensor([[False, True, False], [True, False, False]])}]
    kept = bench._entries_kept(weights, masks)
    assert kept[0]["w"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert kept[1]["w"].tolist() == [6.0, 8.0, 10.0, 11.0]
    assert bench._entries_kept(weights, [{}, {}])[0]["w"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_rho_without_spread_is_not_a_number() -> None:
    draws = bench._level_resamples(np.array([0, 0, 1, 1]), 20, np.random.default_rng(0))
    rho = bench._rho(np.array([0.0, 0.0, 1.0, 1.0]), np.ones(4), draws)
    assert math.isnan(rho.value) and str(rho) == "n/a"


def test_rows_agree_with_one_at_a_time() -> None:
    rng = np.random.default_rng(2)
    x, y, z = (rng.integers(0, 4, (30, 12)).astype(float) for _ in range(3))  # ties, as knob levels have
    rows = bench._partial_spearman_rows(x, y, z)
    for i in range(30):
        assert rows[i] == pytest.approx(bench._partial_spearman(x[i], y[i], z[i]), nan_ok=True)
        assert bench._partial_spearman(x[i], y[i], None) == pytest.approx(spearmanr(x[i], y[i])[0], nan_ok=True)
