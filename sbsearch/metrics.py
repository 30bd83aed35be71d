"""Task metrics on (R, B, out) replica outputs: each replica is scored, then averaged."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["task_loss", "per_replica_metric"]


def task_loss(out: torch.Tensor, y: torch.Tensor, task: str, label_smoothing: float = 0.0) -> torch.Tensor:
    """Sum over replicas of each replica's mean loss, so every replica gets its own full gradient.

    ``out`` is (R, B, C) logits or (R, B, 1) predictions; ``y`` is (B,) classes or (B, 1) targets.
    ``label_smoothing`` (classification only) is ``F.cross_entropy``'s: the training loss may smooth,
    the reported losses (``per_replica_metric``) never do.
    """
    r = out.shape[0]
    if task == "classification":
        return F.cross_entropy(out.flatten(0, 1), y.repeat(r), reduction="sum", label_smoothing=label_smoothing) / y.shape[0]
    assert label_smoothing == 0.0, "the spec refuses label smoothing for regression"
    return F.mse_loss(out, y.expand_as(out), reduction="sum") / y.numel()


@torch.no_grad()
def per_replica_metric(out: torch.Tensor, y: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per replica: (summed loss, summed metric) over the batch, to be divided by the sample count.

    The metric is the number of correct predictions for classification, the squared error for regression.
    """
    if task == "classification":
        losses = F.cross_entropy(out.transpose(1, 2), y.expand(out.shape[0], -1), reduction="none").sum(dim=1)
        correct = (out.argmax(dim=-1) == y).sum(dim=1).to(out.dtype)
        return losses, correct
    se = ((out - y) ** 2).flatten(1).sum(dim=1)
    return se, se
