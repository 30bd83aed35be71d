"""Symmetry removal, "syre" (Ziyin et al., "Remove Symmetries to Control Model Expressivity and Improve
Optimization", ICLR 2025, arXiv 2408.15495, Eq. 6).

Each chosen weight is read as ``W = theta + anchor``, where the anchor is a fixed random tensor drawn
once per replica and never trained, and the weight decay acts on the trained part ``theta``: the loss
gains ``gamma * sum (W - anchor)^2`` per replica, a decay toward a random point instead of toward 0.
Decay toward 0 keeps every reflection symmetry of the loss (swapping two hidden units, flipping the
sign of a tanh unit): the symmetric solutions, where units coincide or vanish, stay stationary and the
decay pulls toward them, so units that meet there stay trapped together. No reflection fixes a random
anchor, so with it those solutions stop being stationary and the units come apart.

Choices made here:

- The anchor of a layer is normal, with standard deviation ``scale`` times the standard deviation of
  that replica's initial weights of the layer: a relative scale means the same across layers of any
  fan-in and any initialisation scheme.
- The network starts where it would without syre: ``theta`` starts at ``W_init - anchor``. Syre changes
  where the decay pulls, not the starting point (the paper starts ``theta`` at the usual initialisation,
  which moves the starting weights by the anchor too).
- Each replica's anchors come from their own seeded stream, mixed from the replica's initialisation
  seed and a fixed tag, so they are fixed by the trial seed and the replica index and independent of
  the initialisation's draws; a layer's anchor does not depend on which ``layers`` are chosen.
- The anchors live in the loss term, not in the model: the optimiser never sees them and the replica
  score, over the model's weights, neither.
- The decay adds to ``train.weight_decay``, which still pulls toward 0; with both, SGD's weights settle
  toward ``2 gamma / (2 gamma + weight_decay) * anchor``, still a point no reflection fixes. Set
  ``train.weight_decay: 0`` for syre's decay alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sbsearch.strategies.base import Knob, LossBatch, LossTerm, ReplicaStart, Settings, Strategy

__all__ = ["SYRE", "anchors", "chosen_layers"]

LAYER_CHOICES = ("all", "hidden", "first")

_ANCHOR_STREAM = 0x5E7E
"""Mixed into each replica's seed, so that the anchors are not the initialisation's own draws."""


def chosen_layers(layers: str, names: list[str]) -> list[str]:
    """The weights that get an anchor, of ``names`` (every weight that connects units, first layer first):
    all of them, all but the output layer (``hidden``: the layers whose units have a symmetry), or the first.
    """
    if layers == "all":
        return list(names)
    if layers == "hidden":
        return list(names[:-1])
    assert layers == "first", layers
    return list(names[:1])


def anchors(start: ReplicaStart, scale: float) -> dict[str, torch.Tensor]:
    """Every connecting weight's anchor, stacked over replicas (R, ...) like ``start.initial``.

    Replica ``i``'s anchors are drawn, layer by layer in ``start.initial``'s order, from a generator seeded
    by ``start.seeds[i]``: the same trial seed and replica index always give the same anchors.
    """
    per_replica: list[dict[str, torch.Tensor]] = []
    for index, seed in enumerate(start.seeds):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + _ANCHOR_STREAM)
        drawn = {}
        for name, stacked in start.initial.items():
            initial = stacked[index]
            std = float(initial.detach().float().std(correction=0))
            noise = torch.randn(tuple(initial.shape), generator=generator, dtype=torch.float32)
            drawn[name] = (scale * std * noise).to(device=initial.device, dtype=initial.dtype)
        per_replica.append(drawn)
    return {name: torch.stack([d[name] for d in per_replica]) for name in start.initial}


def _loss_term(settings: Settings) -> LossTerm | None:
    gamma = float(settings["gamma"])  # type: ignore[arg-type]
    if gamma == 0:
        return None
    scale, layers = float(settings["scale"]), str(settings["layers"])  # type: ignore[arg-type]

    def start(replicas: ReplicaStart) -> Callable[[LossBatch], torch.Tensor]:
        names = chosen_layers(layers, list(replicas.initial))
        fixed = {name: a for name, a in anchors(replicas, scale).items() if name in names}

        def decay_toward_anchor(batch: LossBatch) -> torch.Tensor:
            rows = list(batch.replicas)
            total = sum((batch.weights[name] - a[rows]).pow(2).sum() for name, a in fixed.items())
            return gamma * torch.as_tensor(total)

        return decay_toward_anchor

    return LossTerm(start)


SYRE = Strategy(
    name="syre",
    doc="symmetry removal (Ziyin et al., ICLR 2025): weight decay toward a fixed random anchor instead of 0",
    knobs=(
        Knob("gamma", "float", 0.0, "strength of the decay toward the anchor: the loss gains "
             "gamma * sum (W - anchor)^2 per replica (0 = off)", low=0.0),
        Knob("scale", "float", 1.0, "standard deviation of the anchor, relative to that of the layer's "
             "initial weights", low=0.0, low_open=True),
        Knob("layers", "choice", "all", "which conv/linear weights get an anchor: all, all but the output "
             "layer (hidden), or the first layer only (first)", choices=LAYER_CHOICES),
    ),
    loss_term=_loss_term,
)
