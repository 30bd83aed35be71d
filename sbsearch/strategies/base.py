"""What a strategy is: named knobs, plus one hook per stage of the data flow it touches.

A strategy may contribute a step to the trial's input pipeline (``transform_input``), edit the plain
model description (``edit_model``), add a term to the training loss (``loss_term``), refuse what it
cannot apply to (``incompatible``) and offer the report the controls that test its gain
(``report_controls``). The data, the model builder and the trainer call these hooks for every
registered strategy in turn, and know no strategy by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = [
    "INPUT_STAGES",
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
]

Settings = Mapping[str, object]
"""One strategy's knob values, by knob name (``{"factor": 2, "fill": 0.5}``)."""

KnobKind = Literal["int", "float", "choice", "bool"]


@dataclass(frozen=True)
class Knob:
    """One searchable setting of a strategy, with its rule.

    ``low``/``high`` bound numbers (``high`` exclusive when ``high_open``); ``choices`` lists the
    allowed values of a ``choice`` knob.
    """

    name: str
    kind: KnobKind
    default: object
    doc: str
    choices: tuple[object, ...] = ()
    low: float | None = None
    high: float | None = None
    high_open: bool = False
    low_open: bool = False
    presets: tuple[str, ...] = ()
    vector_default: object = None
    """The default for vector inputs where it differs from ``default`` (which images get); None: the same."""

    def default_for(self, input_kind: str) -> object:
        """The default for ``image`` or ``vector`` inputs."""
        return self.vector_default if input_kind == "vector" and self.vector_default is not None else self.default

    def default_words(self) -> str:
        """The default as a spec writes it, for help text (``'start' (vectors: 'center')``, ``false``)."""
        if self.vector_default is None:
            return _yaml_word(self.default)
        return f"{_yaml_word(self.default)} (vectors: {_yaml_word(self.vector_default)})"

    def rule(self) -> str:
        """The rule a value must follow, in the words of an error message."""
        if self.kind == "choice":
            return "must be one of " + ", ".join(_yaml_word(c) for c in self.choices)
        if self.kind == "bool":
            return "must be true or false"
        noun = "an integer" if self.kind == "int" else "a finite number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            words = f"must be {noun} in {left}{_num(self.low)}, {_num(self.high)}{right}"
        elif self.low is not None:
            words = f"must be {noun} {'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            words = f"must be {noun} {'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            words = f"must be {noun}"
        return words + "".join(f" or {_yaml_word(p)}" for p in self.presets)

    def accepts(self, value: object) -> bool:
        """True when ``value`` follows this knob's rule (a number in range, or one of the presets)."""
        if self.kind == "choice":
            return any(value == c and type(value) is type(c) for c in self.choices)
        if self.kind == "bool":
            return isinstance(value, bool)
        if isinstance(value, str) and value in self.presets:
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def coerce(self, value: object) -> object:
        """Normalise a value that ``accepts`` would reject only for its type (``1`` for a float)."""
        if self.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value


def _yaml_word(value: object) -> str:
    """A knob value as a spec writes it: ``true``, ``false``, ``null``, ``'grid'``, ``0.5``.

    Strings keep their quotes (valid YAML), so that the choice ``'none'`` never reads as ``null``.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class ModelDesc:
    """A plain, buildable description of a network; strategies edit it, ``models`` builds it.

    ``input_shape`` is ``(C, H, W)`` for images and ``(F,)`` for vectors. ``name`` (the registered
    architecture), ``width``, ``depth``, ``first_bias`` and ``cifar_stem`` are the spec's ``model`` section,
    which ``spec.stage_config`` copies in under the same names.
    """

    name: str  # the registered architecture (``models.MODELS``)
    input_shape: tuple[int, ...]
    num_outputs: int
    width: int = 16
    depth: int = 2
    kernel_size: int = 3
    norm: str = "none"
    dropout_rate: float = 0.0
    dropout_kind: str = "element"
    dropout_where: str = "all"
    stem_stride: int = 1
    stem_kernel: int = 3
    # The width-matched control widens only the first layer (0 = ``width``).
    first_width: int = 0
    # torchvision models: a 3x3 stride-1 first conv and no stem max-pool, for small (32x32) images.
    cifar_stem: bool = False
    # Group-equivariant blocks of small_cnn: "none", "stem", "early" or "all", for group "c4" or "d4".
    equivariant_layers: str = "none"
    equivariant_group: str = "c4"
    frozen_fraction: float = 0.0  # share of every conv/linear weight frozen at fixed random values
    bias_lr_multiplier: float | str = 1.0  # on the first layer's bias; "auto" until resolved by the data
    bias_scale: float | str = 1.0  # the first layer's bias enters as bias_scale * bias; "auto" as above
    # "zero" zeroes the first layer's bias after the seeded initialisation: with zero biases, constant
    # inputs are the only offset the first layer starts with (the 1-D function study's condition).
    first_bias: str = "default"

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3


ModelEdit = Callable[[ModelDesc, Settings], ModelDesc]
Compatibility = Callable[[Settings, str, str], "str | None"]


# --- the input stage -----------------------------------------------------------------------------

InputStage = Literal["symmetry", "raw", "normalized"]

INPUT_STAGES: tuple[InputStage, ...] = ("symmetry", "raw", "normalized")
"""The stages of a trial's input pipeline, in the order they run on a batch of raw inputs:

- ``symmetry``: symmetry transforms of the data (random rotations of a training image), on training
  batches only and on the image as the data set has it, before anything changes its size or units;
- ``raw``: deterministic steps in raw input units, on every split (the expansion with ``fill_space: raw``);
- the data's own normalisation (not a strategy's step);
- ``normalized``: deterministic steps on normalised inputs, on every split.

Within a stage, steps run in registry order."""


@dataclass(frozen=True)
class InputTransform:
    """One strategy's step in a trial's input pipeline.

    Args:
        stage: where in the pipeline it runs (``INPUT_STAGES``).
        apply: maps a batch (N, ...) to the next batch. ``symmetry`` steps get the trainer's generator
            for their random draws; the deterministic stages get ``None`` and must not draw.
    """

    stage: InputStage
    apply: Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]


# --- the loss stage ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaStart:
    """What a loss term may fix once per training, before the first step (a random anchor, say).

    ``initial`` holds every weight that connects units (conv, linear and group-conv weights, in module
    order: the first layer first, the output layer last), stacked over replicas (R, ...) at
    initialisation; ``seeds`` are the replicas' initialisation seeds, in the same order.
    """

    seeds: tuple[int, ...]
    initial: Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class BatchInputs:
    """One training batch as a loss term sees it (absent in L-BFGS's full-batch step).

    ``x`` is the batch after the ``symmetry`` stage and before the rest of the pipeline, ``pipeline``
    that rest (the identity when the trainer got prepared inputs), ``out`` = ``net(pipeline(x))``
    (R, B, out), computed once for the task loss; ``generator`` is the trainer's stream for random draws.
    """

    net: Callable[[torch.Tensor], torch.Tensor]
    x: torch.Tensor
    out: torch.Tensor
    pipeline: Callable[[torch.Tensor], torch.Tensor]
    generator: torch.Generator


@dataclass(frozen=True)
class LossBatch:
    """What a loss term reads at one training step.

    ``weights`` holds every parameter by name, stacked (R', ...) over the replicas listed in
    ``replicas`` (indices into ``ReplicaStart.seeds``: all of them, or one under L-BFGS, which steps each
    replica on its own). They are the live, trained tensors: a term built from them trains them.
    """

    weights: Mapping[str, torch.Tensor]
    replicas: tuple[int, ...]
    inputs: BatchInputs | None


@dataclass(frozen=True)
class LossTerm:
    """A term a strategy adds to the training loss, summed over replicas like the task loss.

    Args:
        start: called once per training with the replicas' start; returns the term, a function of
            one step's ``LossBatch``. What it fixes (an anchor) lives in that function, never in the model:
            the optimiser and the replica score see only the model's own parameters.
        sees_inputs: the term reads ``LossBatch.inputs``; the trial then hands the trainer its training
            inputs before the pipeline, so that ``x`` is the image and not the expanded canvas.
    """

    start: Callable[[ReplicaStart], Callable[[LossBatch], torch.Tensor]]
    sees_inputs: bool = False


InputHook = Callable[[Settings, str], "InputTransform | None"]
LossHook = Callable[[Settings], "LossTerm | None"]


# --- the report's controls -----------------------------------------------------------------------

Params = Mapping[str, Any]
"""One trial's parameters by dotted knob name (``expansion.factor``), as a sweep records them."""


@dataclass(frozen=True)
class ReportControl:
    """A baseline that rebuilds one confounder of a strategy's gain without the strategy itself.

    Args:
        name: short name (``bias_lr``).
        label: what the report calls it.
        knob: the knob that switches it on; the report offers the control only where a spec has that knob.
        rebuilds: the confounder, in words (``the extra parameters of the expanded model``).
        member: whether a trial's parameters make it a trial of this control.
        how: the spec line that adds the control to a sweep.
    """

    name: str
    label: str
    knob: str
    rebuilds: str
    member: Callable[[Params], bool]
    how: str


@dataclass(frozen=True)
class ControlSet:
    """What a report needs to test one strategy's gain against its controls.

    The gain is the mean metric of ``treated`` trials minus that of ``baseline`` trials; each control's
    gain is its ``member`` trials' mean minus the same baseline. ``tried`` says whether a trial tried the
    treatment in any form (treated or a control of it): with none, there is no gain to explain.
    """

    treatment: str
    tried: Callable[[Params], bool]
    treated: Callable[[Params], bool]
    baseline: Callable[[Params], bool]
    controls: tuple[ReportControl, ...]


@dataclass(frozen=True)
class Strategy:
    """A registered symmetry-breaking strategy: its knobs and a hook per stage it touches.

    Args:
        name: the registered name; its knobs appear as ``<name>.<knob>`` everywhere.
        doc: one line on what it does.
        knobs: its settings with their rules and defaults.
        transform_input: given settings and input kind (``image``/``vector``), its step of the input
            pipeline, or ``None`` when it leaves the inputs alone.
        edit_model: returns an edited model description for the given settings.
        loss_term: given settings, the term it adds to the training loss, or ``None`` when it adds none.
        incompatible: given settings, model name and input kind, says why the strategy cannot apply,
            or returns ``None``.
        report_controls: the baselines the report sets beside this strategy's gain.
    """

    name: str
    doc: str
    knobs: tuple[Knob, ...]
    transform_input: InputHook | None = None
    edit_model: ModelEdit | None = None
    loss_term: LossHook | None = None
    incompatible: Compatibility | None = None
    report_controls: ControlSet | None = None
    knob_by_name: dict[str, Knob] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "knob_by_name", {k.name: k for k in self.knobs})

    def defaults(self) -> dict[str, object]:
        return {k.name: k.default for k in self.knobs}
