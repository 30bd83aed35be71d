"""Shared fixtures: tiny specs that run in seconds on two cores."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

ROOT = Path(__file__).resolve().parents[1]


def tiny_spec_dict(**changes: Any) -> dict[str, Any]:
    """A sweep of a few 1-2 epoch trials on the digits with a 4-channel CNN."""
    raw: dict[str, Any] = {
        "name": "tiny",
        "seed": 0,
        "data": {"dataset": "digits", "batch_size": 128},
        "model": {"name": "small_cnn", "width": 4, "depth": 1},
        "train": {"epochs": 2, "lr": 0.01},
        "space": {"expansion": {"factor": [1, 2], "fill": [0.0, 0.5]}, "norm": {"kind": ["none", "batch"]}},
        "search": {"trials": 3, "sampler": "random", "pruner": "none"},
    }
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return raw


def strategy_settings(**knobs: Any) -> dict[str, dict[str, object]]:
    """Every strategy's defaults with ``asymmetry__fraction=0.2``-style changes."""
    from sbsearch.strategies import STRATEGIES

    out = {name: s.defaults() for name, s in STRATEGIES.items()}
    for key, value in knobs.items():
        strategy, knob = key.split("__")
        out[strategy][knob] = value
    return out


@pytest.fixture
def tiny_spec_file(tmp_path: Path) -> Path:
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_dict()), encoding="utf-8")
    return path


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say how many generated spec inputs the fuzz tests tried (the issue asks for the number)."""
    import sys

    fuzz = sys.modules.get("tests.test_spec_fuzz") or sys.modules.get("test_spec_fuzz")
    if fuzz is not None and fuzz.TRIED["count"]:
        terminalreporter.write_line(f"spec fuzzing: {fuzz.TRIED['count']} generated inputs tried, none gave a traceback")
