"""The replica Wasserstein score: how differently R seed-replicas of one configuration have trained.

Definition (DESIGN.md, "The replica Wasserstein score"). For a weight tensor ℓ and replicas i = 1..R,
let P_i be the empirical distribution of the n entries of replica i's tensor. Then

    layer(ℓ) = mean over pairs i<j of W1(P_i, P_j) / pooled_std(ℓ)
    pooled_std(ℓ) = sqrt(mean_i var_i),  var_i = mean over entries of (w - mean(w))**2

(population variances, i.e. divided by n, not n - 1); a layer whose pooled_std is 0 scores 0, and a
layer holding a NaN or infinite entry scores NaN (a diverged replica has no meaningful score).
The score is the mean of layer(ℓ) over the chosen tensors, weighted by their numbers of entries.

W1 is the 1-D Wasserstein-1 distance. For two samples of equal size n with uniform weights it is
mean(|sort(a) - sort(b)|), which is exactly what POT's `ot.wasserstein_1d(a, b, p=1)` computes; that
closed form lets each replica's tensor be sorted once instead of once per pair (the tests check it
against POT). Sorting is what makes the score blind to permutations of hidden units.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["ScoreResult", "default_score_layers", "drift_score", "replica_score"]

_NUMPY_SORTABLE = (torch.float16, torch.float32, torch.float64)

# A normalisation layer's affine weight scales features one by one; it connects no units, even where it
# is a tensor rather than a vector (LayerNorm over (C, H, W)). GroupBatchNorm subclasses _NormBase.
_NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.RMSNorm,
)


@dataclass(frozen=True)
class ScoreResult:
    """A score and its per-layer values (layer name -> value before the weighted mean)."""

    value: float
    per_layer: dict[str, float]


def default_score_layers(model: nn.Module) -> list[str]:
    """Names of every weight that connects units and that training moves, as `named_parameters()` spells them.

    A module's parameter is scored when it is named `weight`, has two or more axes (output units by
    inputs, and any kernel or group axes), requires a gradient, and the module is not a normalisation
    layer. That covers linear and conv weights of any dimension, transposed convs, and the base filters
    of `LiftingConv2d` and `GroupConv2d` (which are not torch conv classes); biases, norm affines and
    weights that do not train (`requires_grad=False`) are left out. A weight shared by several modules
    appears once, under the name `named_parameters()` gives it.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 10))
        >>> default_score_layers(net)
        ['0.weight', '3.weight']
    """
    scored_ids = {
        id(param)
        for module in model.modules()
        if not isinstance(module, _NORM_LAYERS)
        for name, param in module.named_parameters(recurse=False)
        if name == "weight" and param.dim() >= 2 and param.requires_grad
    }
    return [name for name, param in model.named_parameters() if id(param) in scored_ids]


def replica_score(weights: Sequence[Mapping[str, Tensor]], layers: Sequence[str] | None = None) -> ScoreResult:
    """Replica Wasserstein score of R >= 2 replicas (see the module docstring for the definition).

    Args:
        weights: `weights[i]` maps tensor names to replica i's tensors; every replica has the same
            names and shapes (e.g. `ReplicaStack.replica_weights()`).
        layers: the tensor names to score; None scores every tensor in `weights[0]`. Pass
            `default_score_layers(model)` for the default of DESIGN.md (every weight that connects
            units: conv, linear and group-conv weights; no biases or norm parameters).

    Returns:
        The parameter-count-weighted mean over layers, and each layer's mean pairwise W1 / pooled_std.

    Example:
        >>> a, b = {"w": torch.tensor([0.0, 1.0])}, {"w": torch.tensor([1.0, 0.0])}
        >>> replica_score([a, b]).value  # a permutation of the same entries
        0.0
    """
    if len(weights) < 2:
        raise ValueError(f"weights: needs at least 2 replicas, but got {len(weights)}")
    names = _resolve_layer_names(weights, layers, "weights")
    per_layer: dict[str, float] = {}
    sizes: dict[str, int] = {}
    for name in names:
        stacked = _stack_entries([replica[name] for replica in weights], name)  # (R, n)
        per_layer[name] = _mean_pairwise_w1_over_pooled_std(stacked)
        sizes[name] = stacked.shape[1]
    return ScoreResult(value=_weighted_mean(per_layer, sizes), per_layer=per_layer)


def drift_score(
    current: Sequence[Mapping[str, Tensor]],
    initial: Sequence[Mapping[str, Tensor]],
    layers: Sequence[str] | None = None,
) -> ScoreResult:
    """Drift variant: how far each replica's weight distribution has moved from its initialisation.

    For replica i and layer ℓ: W1(now_i, init_i) / sqrt((var(now_i) + var(init_i)) / 2), with the
    population variances of the module docstring (0 when both variances are 0). Averaged over
    replicas, then over layers weighted by parameter count. One replica (R = 1) is enough.

    Args:
        current: per replica, tensor name -> weights now.
        initial: per replica, tensor name -> weights at initialisation, in the same replica order.
        layers: the tensor names to score; None scores every tensor in `current[0]`.

    Returns:
        The weighted mean over layers, and each layer's mean-over-replicas drift.
    """
    if len(current) < 1:
        raise ValueError("current: needs at least 1 replica, but got 0")
    if len(initial) != len(current):
        raise ValueError(f"initial: must hold as many replicas as current ({len(current)}), but got {len(initial)}")
    names = _resolve_layer_names(current, layers, "current")
    per_layer: dict[str, float] = {}
    sizes: dict[str, int] = {}
    for name in names:
        now = _stack_entries([replica[name] for replica in current], name)  # (R, n)
        if any(name not in replica for replica in initial):
            raise ValueError(f"initial: every replica must hold {name!r}, but one does not")
        start = _stack_entries([replica[name] for replica in initial], name)  # (R, n)
        if start.shape != now.shape:
            raise ValueError(
                f"initial[{name!r}]: must have {now.shape[1]} entries like current, but got {start.shape[1]}"
            )
        per_layer[name] = _mean_drift_over_pooled_std(now, start)
        sizes[name] = now.shape[1]
    return ScoreResult(value=_weighted_mean(per_layer, sizes), per_layer=per_layer)


def _resolve_layer_names(
    replicas: Sequence[Mapping[str, Tensor]], layers: Sequence[str] | None, argument: str
) -> list[str]:
    names = list(replicas[0].keys()) if layers is None else list(layers)
    if not names:
        raise ValueError("layers: must name at least one tensor, but got an empty list")
    for index, replica in enumerate(replicas):
        missing = [name for name in names if name not in replica]
        if missing:
            raise ValueError(f"{argument}[{index}]: must hold every scored tensor, but lacks {missing}")
    return names


def _stack_entries(tensors: Sequence[Tensor], name: str) -> Tensor:
    shapes = {tuple(tensor.shape) for tensor in tensors}
    if len(shapes) != 1:
        raise ValueError(f"{name}: every replica must have the same shape, but got {sorted(shapes)}")
    return torch.stack([tensor.detach().reshape(-1) for tensor in tensors])


def _sorted_float64(rows: Tensor) -> Tensor:
    """Each row sorted; float64 keeps the sums over large layers accurate (the cast keeps the order)."""
    if rows.device.type == "cpu" and rows.dtype in _NUMPY_SORTABLE:
        # numpy's unstable sort is several times faster than torch.sort on CPU; order ties don't matter.
        return torch.from_numpy(np.sort(rows.numpy(), axis=1)).to(torch.float64)
    return rows.sort(dim=1).values.to(torch.float64)


def _population_variance(ordered: Tensor) -> Tensor:
    """Variance of each sorted row over its entries, divided by n.

    Shifting by the row's median first keeps a constant row's variance exactly 0 (its mean need
    not round to the constant) and reduces cancellation for rows far from zero.
    """
    median = ordered[:, ordered.shape[1] // 2 : ordered.shape[1] // 2 + 1]  # (R, 1)
    return (ordered - median).var(dim=1, correction=0)


def _mean_pairwise_w1_over_pooled_std(stacked: Tensor) -> float:
    """stacked: (R, n) entries of one layer, one row per replica."""
    ordered = _sorted_float64(stacked)  # (R, n), one sort per replica
    pooled_std = _population_variance(ordered).mean().sqrt().item()
    if pooled_std == 0.0:
        return 0.0
    # cdist gives every pair's L1 distance without an (R, R, n) intermediate.
    l1 = torch.cdist(ordered.unsqueeze(0), ordered.unsqueeze(0), p=1.0).squeeze(0)  # (R, R)
    rows, cols = torch.triu_indices(len(ordered), len(ordered), offset=1)
    mean_w1 = l1[rows, cols].mean().item() / ordered.shape[1]
    return mean_w1 / pooled_std


def _mean_drift_over_pooled_std(now: Tensor, start: Tensor) -> float:
    """now, start: (R, n) entries of one layer for each replica, now and at initialisation."""
    now, start = _sorted_float64(now), _sorted_float64(start)
    w1 = (now - start).abs().mean(dim=1)  # (R,)
    pooled_std = ((_population_variance(now) + _population_variance(start)) / 2).sqrt()  # (R,)
    ratio = torch.where(pooled_std > 0, w1 / pooled_std.clamp_min(torch.finfo(now.dtype).tiny), 0.0)
    return ratio.mean().item()


def _weighted_mean(per_layer: Mapping[str, float], sizes: Mapping[str, int]) -> float:
    total = sum(sizes.values())
    return sum(per_layer[name] * sizes[name] for name in per_layer) / total
