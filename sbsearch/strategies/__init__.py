"""The registered symmetry-breaking strategies, by name, and the functions that run their hooks.

A spec names strategies and their knobs (``expansion.factor``) from this dict, never by import path.
The registry order is the order in which the hooks run: the model edits, the input steps within one
stage of the pipeline, and the loss terms. A new strategy is one module and one entry here.
"""

from __future__ import annotations

from collections.abc import Mapping

from sbsearch.strategies.asymmetry import ASYMMETRY
from sbsearch.strategies.base import (
    INPUT_STAGES,
    BatchInputs,
    ControlSet,
    InputTransform,
    Knob,
    LossBatch,
    LossTerm,
    ModelDesc,
    ReplicaStart,
    ReportControl,
    Settings,
    Strategy,
)
from sbsearch.strategies.controls import CONTROLS, auto_bias_scale, control_values, input_expansion, replaces_expansion
from sbsearch.strategies.dropout import DROPOUT
from sbsearch.strategies.equivariance import EQUIVARIANCE
from sbsearch.strategies.expansion import EXPANSION, expand
from sbsearch.strategies.norm import NORM
from sbsearch.strategies.syre import SYRE

__all__ = [
    "INPUT_STAGES",
    "STRATEGIES",
    "BatchInputs",
    "ControlSet",
    "InputTransform",
    "Knob",
    "LossBatch",
    "LossTerm",
    "ModelDesc",
    "ReplicaStart",
    "ReportControl",
    "Settings",
    "Strategy",
    "apply_model_edits",
    "auto_bias_scale",
    "control_values",
    "defers_training_inputs",
    "expand",
    "input_expansion",
    "input_transforms",
    "loss_terms",
    "replaces_expansion",
    "report_controls",
]

STRATEGIES: dict[str, Strategy] = {
    s.name: s for s in (EXPANSION, EQUIVARIANCE, DROPOUT, NORM, ASYMMETRY, CONTROLS, SYRE)
}

AllSettings = Mapping[str, Settings]
"""Every strategy's knob values, by strategy name (``{"expansion": {"factor": 2, ...}, ...}``)."""


def apply_model_edits(desc: ModelDesc, settings: dict[str, dict[str, object]]) -> ModelDesc:
    """Let every strategy edit the model description, in registry order."""
    for name, strategy in STRATEGIES.items():
        if strategy.edit_model is not None:
            desc = strategy.edit_model(desc, settings[name])
    return desc


def input_transforms(settings: AllSettings, input_kind: str) -> list[InputTransform]:
    """Every strategy's step of a trial's input pipeline, ordered by stage (``INPUT_STAGES``), registry
    order within a stage. A strategy absent from ``settings`` contributes none.

    The data's own inputs are what the expansion gets: none when a control stands in for it
    (``input_expansion``).
    """
    if "expansion" in settings and "controls" in settings:
        settings = {**settings, "expansion": input_expansion({k: dict(v) for k, v in settings.items()})}
    steps = [step for name, strategy in STRATEGIES.items()
             if strategy.transform_input is not None and name in settings
             and (step := strategy.transform_input(settings[name], input_kind)) is not None]
    return sorted(steps, key=lambda step: INPUT_STAGES.index(step.stage))  # stable: registry order within a stage


def loss_terms(settings: AllSettings) -> list[LossTerm]:
    """Every strategy's term of the training loss, in registry order (a strategy absent from ``settings``
    adds none)."""
    return [term for name, strategy in STRATEGIES.items()
            if strategy.loss_term is not None and name in settings
            and (term := strategy.loss_term(settings[name])) is not None]


def defers_training_inputs(settings: AllSettings, input_kind: str) -> bool:
    """Whether the trainer needs the training inputs before the pipeline: a ``symmetry`` step must turn
    the image before the expansion places it, and a loss term that reads the batch must see it too."""
    return (any(step.stage == "symmetry" for step in input_transforms(settings, input_kind))
            or any(term.sees_inputs for term in loss_terms(settings)))


def report_controls() -> dict[str, ControlSet]:
    """Each strategy's controls for the report, by strategy name (those that offer any)."""
    return {name: s.report_controls for name, s in STRATEGIES.items() if s.report_controls is not None}
