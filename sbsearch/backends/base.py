"""What every search backend provides: run a sweep's trials and show how they stand."""

from __future__ import annotations

import contextlib
import signal
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from types import FrameType
from typing import Any

from sbsearch.study import TrialView
from sbsearch.trial import SweepContext, TrialRecord

__all__ = ["Backend", "TrialView", "ProgressSink", "SweepInterrupted", "StopSignals", "STOP_SIGNALS"]


ProgressSink = Callable[[list[TrialView]], None]


class SweepInterrupted(Exception):
    """A signal stopped the sweep (``signum``: SIGINT for Ctrl-C, SIGTERM from a job scheduler); state is
    saved and the same command resumes it."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


# Ctrl-C, and how Slurm, Kubernetes and `timeout` stop a job: both stop a sweep the same way.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Handles SIGINT and SIGTERM while a backend runs a sweep: the first one sets ``requested`` (and
    ``signum``), says so and calls ``on_first``; a second one raises KeyboardInterrupt, to stop now.

    The handlers replace whatever the process inherited, since a shell script's ``sbsearch run ... &``
    starts the sweep with SIGINT ignored. Only the main thread can install them; elsewhere nothing changes.
    """

    def __init__(self, announce: str, on_first: Callable[[], None] = lambda: None) -> None:
        self.requested = threading.Event()
        self.signum: int = signal.SIGINT
        self._announce, self._on_first = announce, on_first
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._received) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _received(self, signum: int, frame: FrameType | None) -> None:
        if self.requested.is_set():
            raise KeyboardInterrupt
        self.signum = signum
        self.requested.set()
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        with contextlib.suppress(RuntimeError):  # it came while stdout was being written: no line, rather than a crash
            print(f"\n{name}: {self._announce} ({name} again to stop now)", flush=True)
        self._on_first()


class Backend(ABC):
    """Runs the trials of a sweep until the spec's budget is met, resuming what an earlier run left."""

    stopped_because: str | None = None
    """Set by ``run`` when the sweep stopped itself before its budget (too many failures in a row)."""

    @abstractmethod
    def run(self, ctx: SweepContext, progress: ProgressSink) -> list[TrialRecord]:
        """Run (or resume) the sweep and return every counted trial's record, in trial order.

        Raises:
            SweepInterrupted: on Ctrl-C or SIGTERM, after the running trials were recorded for re-running.
        """
