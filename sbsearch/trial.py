"""One trial, start to finish: configuration -> data -> model -> training -> record.

Backends call ``run_trial`` and only decide which configuration to try and whether to stop early.
"""

from __future__ import annotations

import functools
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sbsearch.data import Split, load_dataset, prepare
from sbsearch.errors import TrialDiverged
from sbsearch.space import TrialConfig
from sbsearch.spec import Spec
from sbsearch.strategies import ModelDesc, apply_model_edits
from sbsearch.tracking import Tracker, TrackingTarget
from sbsearch.trainer import TrainPlan, resolve_device, train

__all__ = ["SweepContext", "TrialRecord", "run_trial", "trial_run_name", "Interrupted"]


class Interrupted(Exception):
    """The user asked the sweep to stop (Ctrl-C); the running trial is re-run on resume."""


@dataclass(frozen=True)
class SweepContext:
    """Everything a trial needs, in a form that pickles to a worker process."""

    spec: Spec
    out_dir: Path
    tracking: TrackingTarget | None
    parent_run_id: str | None
    threads: int = 0


@dataclass
class TrialRecord:
    """The outcome of one trial, as every record of it (storage, MLflow, trials.csv) states it."""

    number: int
    state: str  # COMPLETE | PRUNED | FAIL
    params: dict[str, Any]
    final: dict[str, float] = field(default_factory=dict)
    epochs_run: int = 0
    seconds: float = 0.0
    reason: str = ""
    run_id: str = ""


ShouldPrune = Callable[[int, Mapping[str, float]], "str | None"]


@functools.lru_cache(maxsize=4)
def _base_split(dataset: str, val_fraction: float, seed: int) -> Split:
    return load_dataset(dataset, val_fraction, seed)


def trial_run_name(number: int, config: TrialConfig) -> str:
    """``trial-007 K=2 fill=0.5 norm=batch``: readable in MLflow's run list."""
    label = config.label()
    return f"trial-{number:03d} {label}".strip()


def build_trial(spec: Spec, config: TrialConfig) -> tuple[Split, ModelDesc]:
    """The data and model description of one configuration."""
    settings = config.all_settings()
    base = _base_split(spec.data.dataset, spec.data.val_fraction, spec.seed)
    split = prepare(base, settings["expansion"], normalize=spec.data.normalize)
    desc = ModelDesc(spec.model.name, tuple(base.x_train.shape[1:]), base.num_outputs,
                     width=spec.model.width, depth=spec.model.depth)
    return split, apply_model_edits(desc, settings)


def train_plan(spec: Spec) -> TrainPlan:
    t = spec.train
    return TrainPlan(epochs=t.epochs, batch_size=spec.data.batch_size, optimizer=t.optimizer, lr=t.lr,
                     momentum=t.momentum, weight_decay=t.weight_decay, replicas=t.replicas, seed=spec.seed,
                     device=str(resolve_device(t.device)))


def run_trial(ctx: SweepContext, number: int, config: TrialConfig, should_prune: ShouldPrune,
              stop_requested: Callable[[], bool] = lambda: False) -> TrialRecord:
    """Train one configuration, log it, and return its record. Never raises for a trial's own fault.

    Raises:
        Interrupted: when ``stop_requested()`` turns true between epochs.
    """
    start = time.perf_counter()
    if ctx.threads > 0:
        torch.set_num_threads(ctx.threads)
    tracker = Tracker(ctx.tracking) if ctx.tracking is not None else None
    run_id = ""
    if tracker is not None:
        assert ctx.parent_run_id is not None
        run_id = tracker.start_trial(ctx.parent_run_id, number, config.params, trial_run_name(number, config))
    record = TrialRecord(number, "COMPLETE", {k: config.params[k] for k in config.searched}, run_id=run_id)
    prune_reason: list[str] = []

    def report(epoch: int, metrics: dict[str, float]) -> bool:
        if tracker is not None:
            tracker.log_epoch(run_id, epoch, metrics)
        if stop_requested():
            raise Interrupted()
        if epoch >= ctx.spec.train.epochs:  # a trial that ran every epoch is complete, never pruned
            return False
        reason = should_prune(epoch, metrics)
        if reason:
            prune_reason.append(reason)
            return True
        return False

    try:
        split, desc = build_trial(ctx.spec, config)
        result = train(split, desc, train_plan(ctx.spec), report)
        record.final, record.epochs_run = {**result.final, "num_parameters": float(result.num_parameters)}, result.epochs_run
        if prune_reason:
            record.state, record.reason = "PRUNED", prune_reason[0]
    except Interrupted:
        raise
    except TrialDiverged as exc:
        record.state, record.reason = "FAIL", f"diverged: {exc}"
        record.epochs_run = _epoch_of(exc)
    except Exception as exc:  # a crashing trial must not take the sweep down
        record.state, record.reason = "FAIL", f"{type(exc).__name__}: {exc}"[:500]
        if tracker is not None:
            tracker.client.log_text(run_id, traceback.format_exc(), "traceback.txt")
    record.seconds = time.perf_counter() - start
    if tracker is not None:
        final = {**record.final, "duration_s": record.seconds, "epochs_run": float(record.epochs_run)}
        tracker.end_trial(run_id, record.state, final, {"sbsearch.reason": record.reason} if record.reason else {})
    return record


def _epoch_of(exc: TrialDiverged) -> int:
    words = str(exc).rsplit("epoch ", 1)
    return int(words[1]) if len(words) == 2 and words[1].isdigit() else 0
