"""Controls: baselines that separate a real symmetry-breaking effect from its confounders.

Constant inputs feeding a layer with a bias act as a larger bias step: a unit computing
``w.x + sum_j v_j c_j + b`` has the effective bias ``b' = b + sum_j v_j c_j``, and one gradient step moves
``b'`` by ``(1 + sum_j c_j^2)`` times the step of ``b`` alone. Expanded inputs also give a dense first
layer more parameters. The knobs rebuild those effects *without* constants in the input:

- ``bias_lr_multiplier``: the first layer's bias learns this many times faster (an optimiser parameter
  group; every other parameter keeps the spec's learning rate). ``auto`` is the control for the
  configured expansion: the input stays unexpanded and the multiplier is ``1 + sum c^2``, where the sum
  runs over the constants one first-layer unit of the *expanded* model sees in one input sample, with
  each ``c`` in the units the model sees (after normalisation when ``fill_space: raw``). For a dense first
  layer that is every constant position; for a conv it is the constants inside the unit's window,
  averaged over the window positions (zero padding counts as nothing). A number applies as given, with
  the input expanded as configured. L-BFGS has no per-parameter learning rate, so it is refused there.
- ``bias_scale``: the first layer computes its bias as ``s * b``, where ``b`` is the trained parameter
  and ``s`` a fixed number, so every optimiser (L-BFGS included) moves the effective bias ``s * b`` by a
  different step than it moves a plain bias. ``auto`` is the control for the configured expansion under
  the configured ``train.optimizer``: the input stays unexpanded and ``s`` is the factor by which the
  expanded model's effective bias ``b'`` moves faster than a plain bias, given the same gradient
  ``g = dL/db'`` (the sums over constants as for ``bias_lr_multiplier``):

  * gradient-following steps (``sgd``, ``lbfgs``): ``b`` gets ``dL/db = g`` and each ``v_j`` gets ``g c_j``,
    so a step of size ``lr`` moves ``b'`` by ``-lr g (1 + sum c^2)``. With ``s * b`` the gradient on ``b``
    is ``s g``, and ``s * b`` moves by ``-lr s^2 g``: ``s = sqrt(1 + sum c^2)``. The same holds for
    momentum (a linear sum of gradients) and for L-BFGS: in the span of ``(1, c)`` in which its steps
    on ``(b, v)`` lie, that ``s`` makes the plain bias an isometric copy of ``b'``, so its directions,
    curvature pairs and line search see the same function (only the first iteration's trial step,
    ``min(1, 1/|grad|_1) lr``, uses an L1 norm that differs when the gradient's L1 norm exceeds 1).
  * per-parameter normalised steps (``adam``, ``adamw``): Adam's step ``m / sqrt(v)`` is unchanged when a
    parameter's gradients are all multiplied by one constant, and only its sign follows the constant's.
    ``b`` moves by ``-lr u`` and each ``v_j`` by ``-lr sign(c_j) u``, where ``u`` is Adam's step for the
    gradient history of ``g`` (``sign(g)`` on the first step), so ``b'`` moves by ``-lr u (1 + sum |c|)``.
    With ``s * b``, ``b`` gets ``s g`` and still moves by ``-lr u``: ``s = 1 + sum |c|``.

  For a dense first layer both rules are exact, step after step, while the two models compute the same
  function (Adam's ``eps`` and weight decay aside); for a conv, whose units at different positions see
  different constants through one shared bias, the window average is an approximation. The trained
  parameter starts at ``b0 / s``, where ``b0`` is the plain model's initial bias (``model.first_bias``,
  0 with ``zero``), so the effective bias starts where the plain model's does: the control changes the
  step, not the starting point. (The expanded model starts elsewhere: its ``b'`` begins at
  ``b0 + sum v_j c_j`` with random ``v_j``, and its other first-layer weights are drawn for a larger
  fan-in. Neither is part of this control.) A number applies as given, with the input expanded as
  configured.
- ``width_matched``: the input stays unexpanded, and the first layer's width is chosen so that the
  network's parameter count is as close as possible to that of the expanded model (the rest of the
  network is unchanged; ties go to the narrower layer).

The resolved ``bias_lr_multiplier`` and ``bias_scale`` of a trial, where they are not 1, are logged with
its final values as ``controls.bias_lr_multiplier_value`` and ``controls.bias_scale_value``
(``final.controls.*`` in MLflow).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

from sbsearch.strategies.base import ControlSet, Knob, ModelDesc, Params, ReportControl, Settings, Strategy

__all__ = ["BIAS_SCALE_RULES", "CONTROLS", "EXPANSION_CONTROLS", "WIDTH_MODELS", "auto_bias_scale", "control_values",
           "input_expansion", "replaces_expansion"]

WIDTH_MODELS = ("mlp", "small_cnn", "resnet9")
"""Architectures with a first-layer width the width-matched control can change."""

BIAS_MODELS = ("mlp", "small_cnn", "resnet9")
"""Architectures whose first layer can have a bias (without a norm layer after it; torchvision's first convs
have none)."""

BIAS_SCALE_RULES = {"sgd": "gradient", "lbfgs": "gradient", "adam": "normalised", "adamw": "normalised"}
"""How each ``train.optimizer`` steps a parameter, which decides ``bias_scale: auto`` (module docstring)."""


def auto_bias_scale(optimizer: str, energy: float, mass: float) -> float:
    """``s`` that makes ``s * b`` move as the expanded model's effective bias does under ``optimizer``.

    Args:
        optimizer: ``train.optimizer``, a key of ``BIAS_SCALE_RULES``.
        energy: ``sum c^2`` over the constants one first-layer unit of the expanded model sees.
        mass: ``sum |c|`` over the same constants.

    Returns:
        ``sqrt(1 + energy)`` for gradient-following steps, ``1 + mass`` for per-parameter normalised ones.
    """
    rule = BIAS_SCALE_RULES[optimizer]
    return math.sqrt(1.0 + energy) if rule == "gradient" else 1.0 + mass


def control_values(desc: ModelDesc) -> dict[str, float]:
    """The resolved bias controls of a trial's model that are switched on, under their logged names."""
    values = {"controls.bias_lr_multiplier_value": desc.bias_lr_multiplier, "controls.bias_scale_value": desc.bias_scale}
    assert all(isinstance(v, float) for v in values.values()), f"controls must be resolved before logging: {values}"
    return {name: float(v) for name, v in values.items() if v != 1.0}


def replaces_expansion(controls: Settings) -> bool:
    """Whether the controls stand in for the expansion (the input then stays unexpanded)."""
    return "auto" in (controls["bias_lr_multiplier"], controls["bias_scale"]) or bool(controls["width_matched"])


def input_expansion(settings: dict[str, dict[str, object]]) -> dict[str, object]:
    """The expansion the data really gets: none (factor 1) when a control replaces it."""
    expansion = dict(settings["expansion"])
    if replaces_expansion(settings["controls"]):
        expansion["factor"] = 1
    return expansion


def _edit_model(desc: ModelDesc, settings: Settings) -> ModelDesc:
    multiplier, scale = settings["bias_lr_multiplier"], settings["bias_scale"]
    return replace(desc, bias_lr_multiplier=multiplier if multiplier == "auto" else float(multiplier),  # type: ignore[arg-type]
                   bias_scale=scale if scale == "auto" else float(scale))  # type: ignore[arg-type]


def _incompatible(settings: Settings, model: str, input_kind: str) -> str | None:
    if settings["width_matched"] and model not in WIDTH_MODELS:
        return f"a width-matched baseline needs a model with a first-layer width ({', '.join(WIDTH_MODELS)}), not {model}"
    if (settings["bias_lr_multiplier"] != 1.0 or settings["bias_scale"] != 1.0) and model not in BIAS_MODELS:
        return f"the first conv of {model} has no bias (a norm layer follows it); use {' or '.join(BIAS_MODELS)}"
    if settings["bias_lr_multiplier"] != 1.0 and settings["bias_scale"] != 1.0:
        return "bias_lr_multiplier and bias_scale are two controls of the same bias step; use one at a time"
    return None


# --- what the report sets beside the expansion's gain ---------------------------------------------
# Trial parameters come from a sweep's records (a journal, or trials.csv, where numbers may be strings
# and a knob the sweep did not search is absent): absent knobs stand at their defaults.


def _factor(p: Params) -> int:
    try:
        return int(p.get("expansion.factor", 1))
    except (TypeError, ValueError):
        return 1


def _bias_value(p: Params, knob: str) -> str | float:
    value = p.get(f"controls.{knob}", 1.0)
    return value if isinstance(value, str) else float(value)


def _no_control(p: Params) -> bool:
    return (_bias_value(p, "bias_lr_multiplier") == 1.0 and _bias_value(p, "bias_scale") == 1.0
            and not p.get("controls.width_matched", False))


def _bias_control(value: str | float, p: Params) -> bool:
    """A bias control standing in for the expansion: ``auto`` (which leaves the input unexpanded) for an
    expanded configuration with constants, or a number on the unexpanded input. ``auto`` under the
    ``upsample`` layout has no constants to take its value from: it resolves to 1, a plain model, and
    counting it would pull the control's mean toward the baseline."""
    constants = _factor(p) > 1 and p.get("expansion.layout", "grid") != "upsample"
    return (value == "auto" and constants) or (isinstance(value, float) and value != 1.0 and _factor(p) == 1)


def _only_bias_control(knob: str, other: str) -> Callable[[Params], bool]:
    def member(p: Params) -> bool:
        return (not p.get("controls.width_matched", False) and _bias_value(p, other) == 1.0
                and _bias_control(_bias_value(p, knob), p))

    return member


EXPANSION_CONTROLS = ControlSet(
    treatment="expansion (constants)",
    tried=lambda p: _factor(p) > 1,
    # Constants in the input: the treatment whose gain the controls try to explain.
    treated=lambda p: _factor(p) > 1 and p.get("expansion.layout", "grid") != "upsample" and _no_control(p),
    # The unexpanded model with no control switched on.
    baseline=lambda p: _factor(p) == 1 and _no_control(p),
    controls=(
        ReportControl(
            "upsample", "same-size input without constants (expansion.layout: upsample)", "expansion.layout",
            "the larger input and the extra compute",
            lambda p: _factor(p) > 1 and p.get("expansion.layout") == "upsample" and _no_control(p),
            "add upsample to space.expansion.layout"),
        ReportControl(
            "width_matched", "width-matched model without expansion (controls.width_matched)",
            "controls.width_matched", "the extra parameters of the expanded model",
            lambda p: _factor(p) > 1 and bool(p.get("controls.width_matched", False)),
            "search space.controls.width_matched: [false, true]"),
        ReportControl(
            "bias_lr", "bias learning-rate control without expansion (controls.bias_lr_multiplier)",
            "controls.bias_lr_multiplier", "the larger effective bias step that constant inputs give the first layer",
            _only_bias_control("bias_lr_multiplier", "bias_scale"),
            "search space.controls.bias_lr_multiplier: [1.0, auto]"),
        ReportControl(
            "bias_scale", "bias-scale control without expansion (controls.bias_scale)",
            "controls.bias_scale", "the larger effective bias step that constant inputs give the first layer",
            _only_bias_control("bias_scale", "bias_lr_multiplier"),
            "search space.controls.bias_scale: [1.0, auto]"),
    ),
)
"""The expansion's gain and the baselines that rebuild its confounders without constants in the input:
the report's "controls beside the expansion" (``CONTROLS.report_controls``)."""


CONTROLS = Strategy(
    name="controls",
    doc="confounder controls: a first-layer bias learning-rate multiplier, a first-layer bias scale and a "
        "width-matched baseline",
    knobs=(
        Knob("bias_lr_multiplier", "float", 1.0, "learning-rate multiplier of the first layer's bias; auto = "
             "1 + sum of squared constants one first-layer unit of the expanded model sees, with the input "
             "left unexpanded", low=0.0, low_open=True, presets=("auto",)),
        Knob("bias_scale", "float", 1.0, "the first layer's bias is computed as bias_scale * b from the trained b "
             "(which starts at its usual value / bias_scale), so any optimiser, lbfgs included, steps it "
             "differently; auto = the scale that makes it move as the expanded model's effective bias does, "
             "with the input left unexpanded: sqrt(1 + sum c^2) for sgd and lbfgs, 1 + sum |c| for adam and "
             "adamw (sums over the constants one first-layer unit of the expanded model sees)",
             low=0.0, low_open=True, presets=("auto",)),
        Knob("width_matched", "bool", False, "leave the input unexpanded and widen the first layer until "
             "the parameter count matches the expanded model's"),
    ),
    edit_model=_edit_model,
    incompatible=_incompatible,
    report_controls=EXPANSION_CONTROLS,
)
