"""Shared fixtures: tiny specs that run in seconds on two cores."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from torch import nn

    from sbsearch.space import TrialConfig
    from sbsearch.strategies import ModelDesc

os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# What sbsearch remembers per machine (replica-mode timings, decoded images by default) stays out of the
# user's own cache; worker processes inherit the variable.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="sbsearch-tests-cache-")

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


def trial_config(**knobs: Any) -> TrialConfig:
    """A trial's configuration: ``strategy_settings(**knobs)`` under dotted keys (``expansion.factor``)."""
    from sbsearch.space import TrialConfig

    return TrialConfig({f"{s}.{k}": v for s, ks in strategy_settings(**knobs).items() for k, v in ks.items()}, ())


def registered_model_cases() -> list[object]:
    """Every registered model on each input kind it takes, and small_cnn with group convolutions at
    every ``where`` for both groups, under three norms (the group norms' affines must stay out)."""
    import itertools

    from sbsearch.models import INPUT_KINDS, MODELS, TORCHVISION_MODELS
    from sbsearch.strategies import ModelDesc

    cases = []
    for arch in MODELS:
        for kind in INPUT_KINDS[arch]:
            shape = (8,) if kind == "vector" else (1, 32, 32) if arch in TORCHVISION_MODELS else (1, 8, 8)
            cases.append(pytest.param(ModelDesc(arch, shape, 10, width=4, depth=3), id=f"{arch}-{kind}"))
    for where, group, norm in itertools.product(("stem", "early", "all"), ("c4", "d4"), ("none", "batch", "layer")):
        desc = ModelDesc("small_cnn", (1, 8, 8), 10, width=4, depth=3, norm=norm, equivariant_layers=where,
                         equivariant_group=group)
        cases.append(pytest.param(desc, id=f"small_cnn-{where}-{group}-{norm}"))
    return cases


def shape_only(desc: ModelDesc) -> nn.Module:
    """The model of ``desc`` on the meta device: its shapes, without memory or initialisation."""
    import torch

    from sbsearch.models import MODELS

    with torch.device("meta"):
        return MODELS[desc.name](desc)


def connecting_weights(model: nn.Module) -> list[str]:
    """The weights that connect units (linear, conv and group-conv), which the score must cover (DESIGN.md);
    the selection goes by what a module is, so this list is the tests', not the code's."""
    from torch import nn

    from sbsearch.group_conv import GroupConv2d, LiftingConv2d

    connecting = (nn.Linear, nn.modules.conv._ConvNd, LiftingConv2d, GroupConv2d)
    wanted = {id(m.weight) for m in model.modules() if isinstance(m, connecting)}
    return [name for name, p in model.named_parameters() if id(p) in wanted]


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
