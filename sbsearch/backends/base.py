"""What every search backend provides: run a sweep's trials and show how they stand."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from sbsearch.trial import SweepContext, TrialRecord

__all__ = ["Backend", "TrialView", "ProgressSink", "SweepInterrupted"]


@dataclass(frozen=True)
class TrialView:
    """One trial as the progress display shows it."""

    number: int
    state: str  # RUNNING | COMPLETE | PRUNED | FAIL
    value: float | None
    epoch: int
    label: str


ProgressSink = Callable[[list[TrialView]], None]


class SweepInterrupted(Exception):
    """The user stopped the sweep; state is saved and the same command resumes it."""


class Backend(ABC):
    """Runs the trials of a sweep until the spec's budget is met, resuming what an earlier run left."""

    stopped_because: str | None = None
    """Set by ``run`` when the sweep stopped itself before its budget (too many failures in a row)."""

    @abstractmethod
    def run(self, ctx: SweepContext, progress: ProgressSink) -> list[TrialRecord]:
        """Run (or resume) the sweep and return every counted trial's record, in trial order.

        Raises:
            SweepInterrupted: on Ctrl-C, after the running trials were recorded for re-running.
        """
