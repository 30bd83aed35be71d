"""What a strategy is: named knobs, plus edits to the inputs or to a plain model description."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

__all__ = ["Knob", "ModelDesc", "Settings", "Strategy"]

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

    ``input_shape`` is ``(C, H, W)`` for images and ``(F,)`` for vectors.
    """

    arch: str
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
    # Asked of training rather than of the architecture: the trainer applies these.
    augment_group: str = "none"  # random group elements applied to every training image
    penalty_group: str = "none"  # a loss term penalty_weight * mean |f(g.x) - f(x)|^2
    penalty_weight: float = 0.0
    frozen_fraction: float = 0.0  # share of every conv/linear weight frozen at fixed random values
    bias_lr_multiplier: float | str = 1.0  # on the first layer's bias; "auto" until resolved by the data
    bias_scale: float | str = 1.0  # the first layer's bias enters as bias_scale * bias; "auto" as above
    # "zero" zeroes the first layer's bias after the seeded initialisation: with zero biases, constant
    # inputs are the only offset the first layer starts with (the 1-D function study's condition).
    first_bias: str = "default"

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3


InputTransform = Callable[[torch.Tensor, Settings], torch.Tensor]
ModelEdit = Callable[[ModelDesc, Settings], ModelDesc]
Compatibility = Callable[[Settings, str, str], "str | None"]


@dataclass(frozen=True)
class Strategy:
    """A registered symmetry-breaking strategy.

    Args:
        name: the registered name; its knobs appear as ``<name>.<knob>`` everywhere.
        doc: one line on what it does.
        knobs: its settings with their rules and defaults.
        edit_model: returns an edited model description for the given settings.
        incompatible: given settings, model name and input kind (``image``/``vector``), says why the
            strategy cannot apply, or returns ``None``.
    """

    name: str
    doc: str
    knobs: tuple[Knob, ...]
    edit_model: ModelEdit | None = None
    incompatible: Compatibility | None = None
    knob_by_name: dict[str, Knob] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "knob_by_name", {k.name: k for k in self.knobs})

    def defaults(self) -> dict[str, object]:
        return {k.name: k.default for k in self.knobs}
