"""Normalisation layers, which also break (and change) weight-space symmetries."""

from __future__ import annotations

from dataclasses import replace

from sbsearch.strategies.base import Knob, ModelDesc, Settings, Strategy

__all__ = ["NORM", "NORM_KINDS"]

NORM_KINDS = ("none", "batch", "group", "layer")


def _edit_model(desc: ModelDesc, settings: Settings) -> ModelDesc:
    return replace(desc, norm=str(settings["kind"]))


NORM = Strategy(
    name="norm",
    doc="normalisation after each hidden layer",
    knobs=(Knob("kind", "choice", "none", "which normalisation layer", choices=NORM_KINDS),),
    edit_model=_edit_model,
)
