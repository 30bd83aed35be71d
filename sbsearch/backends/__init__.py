"""Search backends by name; each is imported only when chosen."""

from __future__ import annotations

from sbsearch.backends.base import Backend, ProgressSink, SweepInterrupted, TrialView

__all__ = ["Backend", "ProgressSink", "SweepInterrupted", "TrialView", "BACKENDS", "get_backend"]

BACKENDS = ("optuna", "ray")


def get_backend(name: str) -> Backend:
    if name == "optuna":
        from sbsearch.backends.optuna import OptunaBackend

        return OptunaBackend()
    if name == "ray":
        from sbsearch.backends.ray import RayBackend

        return RayBackend()
    raise AssertionError(f"unknown backend {name!r}; the spec validator should have caught it")
