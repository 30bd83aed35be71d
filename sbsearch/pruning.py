"""Early-stopping rules with one meaning in every backend.

A rule sees the trial's metrics at an epoch and the same metric of finished peer trials at that epoch,
and answers with a reason to stop, or ``None`` to continue.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["PruningRule", "MedianRule", "NoPruning", "make_rule", "PRUNERS"]


@dataclass(frozen=True)
class PruningRule:
    """Base of the rules: never prunes."""

    metric: str
    direction: str  # "maximize" | "minimize"
    warmup_epochs: int = 2
    min_peers: int = 3

    def decide(self, epoch: int, metrics: Mapping[str, float], peers: Sequence[float]) -> str | None:
        """Return a reason to stop the trial now, or None.

        Args:
            epoch: the epoch just finished, counted from 1.
            metrics: this trial's metrics at ``epoch``.
            peers: ``self.metric`` at ``epoch`` of the finished trials that reached it.
        """
        return None


NoPruning = PruningRule


@dataclass(frozen=True)
class MedianRule(PruningRule):
    """Stop a trial whose metric is worse than the median of its finished peers at the same epoch."""

    def decide(self, epoch: int, metrics: Mapping[str, float], peers: Sequence[float]) -> str | None:
        if epoch <= self.warmup_epochs or len(peers) < self.min_peers or self.metric not in metrics:
            return None
        median, value = statistics.median(peers), metrics[self.metric]
        worse = value < median if self.direction == "maximize" else value > median
        if worse:
            return f"median: {self.metric}={value:.4g} at epoch {epoch} is worse than the median {median:.4g} of {len(peers)} finished trials"
        return None


PRUNERS: dict[str, type[PruningRule]] = {"none": NoPruning, "median": MedianRule}


def make_rule(name: str, metric: str, direction: str, warmup_epochs: int) -> PruningRule:
    return PRUNERS[name](metric=metric, direction=direction, warmup_epochs=warmup_epochs)
