"""The registered symmetry-breaking strategies, by name.

A spec names strategies and their knobs (``expansion.factor``) from this dict, never by import path.
The order is the order in which they edit a model description.
"""

from __future__ import annotations

from sbsearch.strategies.asymmetry import ASYMMETRY
from sbsearch.strategies.base import Knob, ModelDesc, Settings, Strategy
from sbsearch.strategies.controls import CONTROLS, auto_bias_scale, control_values, input_expansion, replaces_expansion
from sbsearch.strategies.dropout import DROPOUT
from sbsearch.strategies.equivariance import EQUIVARIANCE
from sbsearch.strategies.expansion import EXPANSION, expand
from sbsearch.strategies.norm import NORM

__all__ = [
    "STRATEGIES",
    "Knob",
    "ModelDesc",
    "Settings",
    "Strategy",
    "apply_model_edits",
    "auto_bias_scale",
    "control_values",
    "expand",
    "input_expansion",
    "replaces_expansion",
]

STRATEGIES: dict[str, Strategy] = {
    s.name: s for s in (EXPANSION, EQUIVARIANCE, DROPOUT, NORM, ASYMMETRY, CONTROLS)
}


def apply_model_edits(desc: ModelDesc, settings: dict[str, dict[str, object]]) -> ModelDesc:
    """Let every strategy edit the model description, in registry order."""
    for name, strategy in STRATEGIES.items():
        if strategy.edit_model is not None:
            desc = strategy.edit_model(desc, settings[name])
    return desc
