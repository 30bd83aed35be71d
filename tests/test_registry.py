"""Tests generated from the registries: every strategy knob value on every model.

For each model and each value of each knob (choices and booleans in full, numbers at their default
and one other value, presets), with the knob's strategy in a state where the value matters, the spec
either validates, and the model then builds and trains one step (forward and backward, through the
real trainer and its strategy hooks) on tiny random data; or validation rejects it with one line per
problem, before anything runs. torchvision models get 3x32x32 images, the others 1x8x8 (and the mlp
4-feature vectors too).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from sbsearch.data import Split
from sbsearch.errors import SpecError
from sbsearch.models import INPUT_KINDS, MODELS, TORCHVISION_MODELS, build_model, describe_model
from sbsearch.spec import parse_spec
from sbsearch.strategies import STRATEGIES, Knob, ModelDesc, expand, input_expansion
from sbsearch.trainer import TrainPlan, replica_seeds, train
from tests.conftest import tiny_spec_dict

# Settings under which a knob's value shows: an expansion knob needs K > 1, a dropout knob a rate > 0.
CONTEXT: dict[str, dict[str, dict[str, object]]] = {
    "expansion": {"expansion": {"factor": 2}},
    "equivariance.group": {"equivariance": {"how": "layers"}},
    "equivariance.where": {"equivariance": {"how": "layers"}},
    "equivariance.penalty_weight": {"equivariance": {"how": "penalty"}},
    "dropout": {"dropout": {"rate": 0.2}},
    "controls": {"expansion": {"factor": 2}},
    "syre": {"syre": {"gamma": 0.01}},
}

# (data set the spec validates against, input shape of the tiny data)
INPUTS = {"image": ("digits", (1, 8, 8)), "vector": ("iris", (4,)), "large_image": ("fakedata", (3, 32, 32))}


def knob_values(knob: Knob) -> list[object]:
    if knob.kind == "choice":
        return list(knob.choices)
    if knob.kind == "bool":
        return [False, True]
    if knob.kind == "int":
        other: object = int(knob.default) + 1  # type: ignore[call-overload]
    elif knob.low is not None and knob.high is not None:
        other = (knob.low + knob.high) / 2
    else:
        other = float(knob.default) / 2 if float(knob.default) > 0 else float(knob.default) + 0.5  # type: ignore[arg-type]
    return [knob.default, other, *knob.presets]


def _spec_changes(arch: str, kind: str, space: dict[str, dict[str, object]]) -> dict[str, Any]:
    dataset = INPUTS[kind][0]
    return {"model__name": arch, "data__dataset": dataset, "space": space, "train__replicas": 1}


def _cases() -> tuple[list[Any], list[Any]]:
    accepted: dict[tuple[ModelDesc, tuple[object, ...]], Any] = {}
    rejected = []
    for arch in MODELS:
        kinds = ["large_image"] if arch in TORCHVISION_MODELS else list(INPUT_KINDS[arch])
        for kind in kinds:
            for sname, strategy in STRATEGIES.items():
                for knob in strategy.knobs:
                    for value in knob_values(knob):
                        context = CONTEXT.get(f"{sname}.{knob.name}", CONTEXT.get(sname, {}))
                        space = {s: dict(k) for s, k in context.items()}
                        space.setdefault(sname, {})[knob.name] = value
                        if sname == "expansion" and kind == "large_image" and knob.name == "factor" and value != 1:
                            space["expansion"]["factor"] = value = 2  # 3x32x32 at K = 3 costs 9x; K = 2 shows the same
                        label = f"{arch}-{kind}-{sname}.{knob.name}={value}"
                        try:
                            spec = parse_spec(tiny_spec_dict(**_spec_changes(arch, kind, space)))
                        except SpecError as exc:
                            rejected.append(pytest.param(arch, kind, space, str(exc), id=label))
                            continue
                        desc, x_shape = _describe(arch, kind, space, spec.train.optimizer)
                        settings = _settings(space)
                        accepted.setdefault((desc, _training_hooks(settings, kind)),
                                            pytest.param(desc, x_shape, settings, id=label))
    return list(accepted.values()), rejected


def _settings(space: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
    out = {name: s.defaults() for name, s in STRATEGIES.items()}
    for sname, knobs in space.items():
        out[sname].update(knobs)
    return out


def _training_hooks(settings: dict[str, dict[str, object]], kind: str) -> tuple[object, ...]:
    """The settings of the strategies that act during training (a symmetry input step, a loss term): the
    same model with other training hooks is another case."""
    input_kind = "vector" if kind == "vector" else "image"
    steps = {name: s.transform_input(settings[name], input_kind) if s.transform_input else None
             for name, s in STRATEGIES.items()}
    return tuple((name, tuple(sorted(settings[name].items()))) for name, s in STRATEGIES.items()
                 if (s.loss_term is not None and s.loss_term(settings[name]) is not None)
                 or (steps[name] is not None and steps[name].stage == "symmetry"))  # type: ignore[union-attr]


def _describe(arch: str, kind: str, space: dict[str, dict[str, object]],
              optimizer: str) -> tuple[ModelDesc, tuple[int, ...]]:
    shape = INPUTS[kind][1]
    settings = _settings(space)
    nan = torch.full((1, *shape), math.nan)
    constants = torch.nan_to_num(expand(nan, settings["expansion"])[0], nan=0.0)
    plain = ModelDesc(arch, shape, 3, width=4, depth=2)
    x_shape = tuple(expand(torch.zeros(1, *shape), input_expansion(settings)).shape[1:])
    return describe_model(plain, settings, constants, optimizer), x_shape


ACCEPTED, REJECTED = _cases()


@pytest.mark.parametrize("desc, x_shape, settings", ACCEPTED)
def test_accepted_combination_builds_and_trains_one_step(desc: ModelDesc, x_shape: tuple[int, ...],
                                                         settings: dict[str, dict[str, object]]) -> None:
    assert desc.input_shape == x_shape
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(4, *x_shape, generator=generator)
    y = torch.tensor([0, 1, 2, 0])
    split = Split("tiny", x[:2], y[:2], x[2:], y[2:], "classification", 3,
                  mean=torch.zeros(x_shape[0]), std=torch.ones(x_shape[0]))
    result = train(split, desc, TrainPlan(epochs=1, batch_size=2, lr=1e-3, score=False), strategies=settings)
    assert math.isfinite(result.final["train_loss"])
    if desc.name not in TORCHVISION_MODELS:  # building a torchvision model twice would double the cost
        start = build_model(desc, replica_seeds(0, 1)[0]).state_dict()
        assert any(not torch.equal(w, start[name]) for name, w in result.weights[0].items()), "no step was taken"


@pytest.mark.parametrize("arch, kind, space, message", REJECTED)
def test_rejected_combination_gets_one_line_per_problem(arch: str, kind: str, space: dict[str, Any], message: str) -> None:
    lines = message.strip().splitlines()
    assert lines
    for line in lines:
        line = line.strip()
        assert line.startswith(("space.", "model.")) and ": " in line and "but got" in line, line


def test_every_model_and_strategy_is_covered() -> None:
    covered = {p.values[0].name for p in ACCEPTED}
    assert covered == set(MODELS)
    trained_with = {name for p in ACCEPTED for name, _ in _training_hooks(p.values[2], "image")}
    assert trained_with == {"equivariance", "syre"}  # the augmentation, the penalty and syre's decay
    assert len(ACCEPTED) > 5 * len(MODELS)
