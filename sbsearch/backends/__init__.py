"""Search backends, by name: each module of this package but ``base`` is one, loaded only when chosen.

A backend module defines one subclass of ``Backend`` and names it ``BACKEND``; its file name is the name
a spec gives as ``search.backend`` (``spec.backend_names`` lists them, for validation and the CLI).
"""

from __future__ import annotations

import importlib

from sbsearch.backends.base import Backend, ProgressSink, SweepInterrupted, TrialView
from sbsearch.spec import backend_names

__all__ = ["Backend", "ProgressSink", "SweepInterrupted", "TrialView", "backend_names", "get_backend"]


def get_backend(name: str) -> Backend:
    """The backend ``name`` (one of ``backend_names()``), its module imported now."""
    assert name in backend_names(), f"unknown backend {name!r}; the spec validator should have caught it"
    module = importlib.import_module(f"sbsearch.backends.{name}")
    backend: type[Backend] = module.BACKEND
    return backend()
