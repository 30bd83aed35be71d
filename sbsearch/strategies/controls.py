"""Controls: baselines that separate a real symmetry-breaking effect from its confounders.

Constant inputs feeding a layer with a bias act as a larger bias step: a unit computing
``w.x + sum_j v_j c_j + b`` has the effective bias ``b' = b + sum_j v_j c_j``, and one gradient step moves
``b'`` by ``(1 + sum_j c_j^2)`` times the step of ``b`` alone. Expanded inputs also give a dense first
layer more parameters. The two knobs rebuild those effects *without* constants in the input:

- ``bias_lr_multiplier``: the first layer's bias learns this many times faster (an optimiser parameter
  group; every other parameter keeps the spec's learning rate). ``auto`` is the control for the
  configured expansion: the input stays unexpanded and the multiplier is ``1 + sum c^2``, where the sum
  runs over the constants one first-layer unit of the *expanded* model sees in one input sample, with
  each ``c`` in the units the model sees (after normalisation when ``fill_space: raw``). For a dense first
  layer that is every constant position; for a conv it is the constants inside the unit's window,
  averaged over the window positions (zero padding counts as nothing). The value is logged as
  ``controls.bias_lr_multiplier_value``. A number applies as given, with the input expanded as configured.
- ``width_matched``: the input stays unexpanded, and the first layer's width is chosen so that the
  network's parameter count is as close as possible to that of the expanded model (the rest of the
  network is unchanged; ties go to the narrower layer).
"""

from __future__ import annotations

from dataclasses import replace

from sbsearch.strategies.base import Knob, ModelDesc, Settings, Strategy

__all__ = ["CONTROLS", "WIDTH_MODELS", "input_expansion", "replaces_expansion"]

WIDTH_MODELS = ("mlp", "small_cnn")
"""Architectures with a first-layer width the width-matched control can change."""

BIAS_MODELS = ("mlp", "small_cnn")
"""Architectures whose first layer can have a bias (torchvision's first convs have none)."""


def replaces_expansion(controls: Settings) -> bool:
    """Whether the controls stand in for the expansion (the input then stays unexpanded)."""
    return controls["bias_lr_multiplier"] == "auto" or bool(controls["width_matched"])


def input_expansion(settings: dict[str, dict[str, object]]) -> dict[str, object]:
    """The expansion the data really gets: none (factor 1) when a control replaces it."""
    expansion = dict(settings["expansion"])
    if replaces_expansion(settings["controls"]):
        expansion["factor"] = 1
    return expansion


def _edit_model(desc: ModelDesc, settings: Settings) -> ModelDesc:
    multiplier = settings["bias_lr_multiplier"]
    return replace(desc, bias_lr_multiplier=multiplier if multiplier == "auto" else float(multiplier))  # type: ignore[arg-type]


def _incompatible(settings: Settings, model: str, input_kind: str) -> str | None:
    if settings["width_matched"] and model not in WIDTH_MODELS:
        return f"a width-matched baseline needs a model with a first-layer width ({', '.join(WIDTH_MODELS)}), not {model}"
    if settings["bias_lr_multiplier"] != 1.0 and model not in BIAS_MODELS:
        return f"the first conv of {model} has no bias (a norm layer follows it); use {' or '.join(BIAS_MODELS)}"
    return None


CONTROLS = Strategy(
    name="controls",
    doc="confounder controls: a first-layer bias learning-rate multiplier and a width-matched baseline",
    knobs=(
        Knob("bias_lr_multiplier", "float", 1.0, "learning-rate multiplier of the first layer's bias; auto = "
             "1 + sum of squared constants one first-layer unit of the expanded model sees, with the input "
             "left unexpanded", low=0.0, low_open=True, presets=("auto",)),
        Knob("width_matched", "bool", False, "leave the input unexpanded and widen the first layer until "
             "the parameter count matches the expanded model's"),
    ),
    edit_model=_edit_model,
    incompatible=_incompatible,
)
