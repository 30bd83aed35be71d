"""Equivariance to 90-degree rotations (C4) and, with flips, the square's symmetries (D4).

Three ways of asking for it, which the paper compares (embedding it in the architecture worked best):

- ``augment``: every training image is transformed by a random group element (labels unchanged): a
  ``symmetry``-stage step of the input pipeline, so it turns the image before the expansion places it;
- ``penalty``: a loss term ``penalty_weight * mean |f(g.x) - f(x)|^2`` over the logits, for one random
  non-identity element ``g`` per batch, acting on the image before the expansion too;
- ``layers``: group convolutions (``sbsearch.group_conv``) at the ``stem`` (the first conv only), the
  ``early`` blocks (the first ceil(depth/2); the same as ``stem`` for depth <= 2) or ``all`` conv blocks
  of ``small_cnn``.

  With ``stem`` and ``early`` the ordinary layers get the last group block's maps with the group axis
  folded into the channels, (N, C, |G|, H, W) -> (N, C*|G|, H, W) (``group_conv.GroupFold``): one
  channel per filter and orientation. These features are equivariant, not invariant: a turn of the
  input turns every map and cyclically permutes each filter's orientations, so the next conv still
  sees which way an edge runs. A maximum over the group axis there would keep where a feature is and
  drop its orientation, which no ordinary layer after it can recover: on turned digits (depth 2, width
  16, same parameter count) such a stem trailed the plain model by 19 points after two epochs (0.43
  against 0.63 validation accuracy), where the folded one keeps pace (0.56 after two epochs, 0.72 after
  three, as the plain model; ``benchmarks/results/equivariance_init.md``). So the maximum is not offered
  as an option: it would handicap the very placements this strategy compares.

  With ``all``, the last map is max-pooled over the group, the plain head (a 4x4 pool and a linear
  layer) reads every transformed copy of it and the logits are the maximum over the copies, so they are
  invariant (``group_conv.InvariantReadout``).

  The model is parameter-matched to the plain network of the same ``width``
  (``models.equivariant_block_widths``): the group blocks' channel counts are the plain ones times one
  factor, and after a fold the first ordinary block's width takes up the rest, so that the counts agree
  (within 2.5% at width 16 on 8x8 digits). A group block of c channels has c maps per group element, a
  group conv |G| times a plain conv's parameters, and the conv after a fold |G| times the inputs; without
  the matching every placement would also compare capacity. The group layers are initialised as
  ``nn.Conv2d`` is, with the fan-in of the filter they actually apply (C_in x |G| x k x k for a group
  conv), and so is the conv after a fold (C x |G| x k x k), so each starts at the plain layer's scale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from sbsearch.group_conv import act_on_image, act_on_image_batch, get_group
from sbsearch.strategies.base import (
    InputTransform,
    Knob,
    LossBatch,
    LossTerm,
    ModelDesc,
    ReplicaStart,
    Settings,
    Strategy,
)

__all__ = ["EQUIVARIANCE", "EQUIVARIANT_MODELS", "invariance_penalty"]

EQUIVARIANT_MODELS = ("small_cnn",)
"""Architectures whose builder can place group convolutions."""


def _edit_model(desc: ModelDesc, settings: Settings) -> ModelDesc:
    if settings["how"] == "layers":
        return replace(desc, equivariant_layers=str(settings["where"]), equivariant_group=str(settings["group"]))
    return desc


def _transform_input(settings: Settings, input_kind: str) -> InputTransform | None:
    if settings["how"] != "augment":
        return None
    group = str(settings["group"])

    def augment(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        assert generator is not None, "augmentation is a symmetry-stage step: the trainer gives it its generator"
        elements = torch.randint(get_group(group).order, (x.shape[0],), generator=generator)
        return act_on_image_batch(group, elements, x)  # labels unchanged: the task is invariant

    return InputTransform("symmetry", augment)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def invariance_penalty(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, out: torch.Tensor,
                       group: str, element: int,
                       pipeline: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Sum over replicas of ``mean |f(P(g.x)) - f(P(x))|^2`` for one group element ``g``.

    ``x`` is the batch before the input pipeline ``P`` (expansion, normalisation; the identity when
    ``None``), so ``g`` turns the image and never the expanded canvas; ``out`` is ``net(P(x))``
    (R, B, out), already computed for the task loss.
    """
    prepare = pipeline or _identity
    diff = net(prepare(act_on_image(group, element, x))) - out  # (R, B, out)
    return diff.pow(2).flatten(1).mean(dim=1).sum()


def _loss_term(settings: Settings) -> LossTerm | None:
    weight = float(settings["penalty_weight"])  # type: ignore[arg-type]
    if settings["how"] != "penalty" or weight <= 0:
        return None
    group = str(settings["group"])

    def penalty(batch: LossBatch) -> torch.Tensor:
        assert batch.inputs is not None, "the spec refuses the penalty under full-batch L-BFGS"
        inputs = batch.inputs
        # A random non-identity element per batch: over many batches the penalty covers the group.
        element = 1 + int(torch.randint(get_group(group).order - 1, (1,), generator=inputs.generator))
        return weight * invariance_penalty(inputs.net, inputs.x, inputs.out, group, element, inputs.pipeline)

    def start(_: ReplicaStart) -> Callable[[LossBatch], torch.Tensor]:
        return penalty

    return LossTerm(start, sees_inputs=True)


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
    transform_input=_transform_input,
    edit_model=_edit_model,
    loss_term=_loss_term,
    incompatible=_incompatible,
)
