"""Equivariance to 90-degree rotations (C4) and, with flips, the square's symmetries (D4).

Three ways of asking for it, which the paper compares (embedding it in the architecture worked best):

- ``augment``: every training image is transformed by a random group element (labels unchanged);
- ``penalty``: a loss term ``penalty_weight * mean |f(g.x) - f(x)|^2`` over the logits, for one random
  non-identity element ``g`` per batch;
- ``layers``: group convolutions (``sbsearch.group_conv``) at the ``stem`` (the first conv only), the
  ``early`` blocks (the first ceil(depth/2); the same as ``stem`` for depth <= 2) or ``all`` conv blocks
  of ``small_cnn``, pooled over the group before the ordinary layers. With ``all``, the head pools
  globally, so the logits are invariant.
"""

from __future__ import annotations

from dataclasses import replace

from sbsearch.strategies.base import Knob, ModelDesc, Settings, Strategy

__all__ = ["EQUIVARIANCE", "EQUIVARIANT_MODELS"]

EQUIVARIANT_MODELS = ("small_cnn",)
"""Architectures whose builder can place group convolutions."""


def _edit_model(desc: ModelDesc, settings: Settings) -> ModelDesc:
    how, group = str(settings["how"]), str(settings["group"])
    if how == "augment":
        return replace(desc, augment_group=group)
    if how == "penalty":
        return replace(desc, penalty_group=group, penalty_weight=float(settings["penalty_weight"]))  # type: ignore[arg-type]
    if how == "layers":
        return replace(desc, equivariant_layers=str(settings["where"]), equivariant_group=group)
    return desc


def _incompatible(settings: Settings, model: str, input_kind: str) -> str | None:
    how = settings["how"]
    if how == "none":
        return None
    if input_kind != "image":
        return f"{how} acts on images by rotations and flips; this data set has {input_kind} inputs (use how: none)"
    if how == "layers" and model not in EQUIVARIANT_MODELS:
        return (f"group-convolution layers can be placed in {', '.join(EQUIVARIANT_MODELS)} only, not in {model} "
                "(use how: augment or penalty)")
    return None


EQUIVARIANCE = Strategy(
    name="equivariance",
    doc="rotation (C4) or rotation-and-flip (D4) equivariance: by augmentation, a loss penalty or group layers",
    knobs=(
        Knob("how", "choice", "none", "none, random group transforms of the training images (augment), "
             "a loss term asking f(g.x) = f(x) (penalty), or group convolutions (layers)",
             choices=("none", "augment", "penalty", "layers")),
        Knob("group", "choice", "c4", "c4: 90-degree rotations; d4: rotations and flips", choices=("c4", "d4")),
        Knob("where", "choice", "all", "with how: layers, which conv blocks are group convolutions: the first (stem), "
             "the first half (early) or all", choices=("stem", "early", "all")),
        Knob("penalty_weight", "float", 1.0, "with how: penalty, the weight of the invariance loss term", low=0.0),
    ),
    edit_model=_edit_model,
    incompatible=_incompatible,
)
