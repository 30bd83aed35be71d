"""W-Asymmetric networks (Lim et al., "The Empirical Impact of Neural Parameter Symmetries, or Lack
Thereof", NeurIPS 2024): a fixed, seeded share of every weight is frozen at random values.

Each output unit (row of a linear weight, output channel of a conv) gets its own random set of
``round(fraction * fan_in)`` frozen entries, so no two units are interchangeable any more: permuting
hidden units no longer maps the network onto an equivalent one. The frozen values are drawn from a
normal distribution with the standard deviation of the layer's own initialisation. The model builder
makes the mask and values (seeded by the model seed); the trainer keeps the frozen entries exact.
"""

from __future__ import annotations

from dataclasses import replace

from sbsearch.strategies.base import Knob, ModelDesc, Settings, Strategy

__all__ = ["ASYMMETRY"]


def _edit_model(desc: ModelDesc, settings: Settings) -> ModelDesc:
    return replace(desc, frozen_fraction=float(settings["fraction"]))  # type: ignore[arg-type]


ASYMMETRY = Strategy(
    name="asymmetry",
    doc="W-Asymmetric networks: a seeded share of each conv/linear weight frozen at fixed random values",
    knobs=(
        Knob("fraction", "float", 0.0, "share of each unit's incoming weights frozen (0 = off)",
             low=0.0, high=1.0, high_open=True),
    ),
    edit_model=_edit_model,
)
