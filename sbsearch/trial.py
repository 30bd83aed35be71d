"""One trial, start to finish: configuration -> data -> model -> training -> record.

Backends call ``run_trial`` and only decide which configuration to try and whether to stop early.
"""

from __future__ import annotations

import contextlib
import functools
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from sbsearch.data import DataSpec, Split, augmentation, load_dataset, prepare, prepare_inputs
from sbsearch.errors import TrialDiverged
from sbsearch.models import describe_model
from sbsearch.space import TrialConfig
from sbsearch.spec import Spec, stage_config
from sbsearch.strategies import ModelDesc, control_values, defers_training_inputs, input_transforms
from sbsearch.tracking import EpochMetrics, Tracker, TrackingTarget, trial_params
from sbsearch.trainer import TrainPlan, device_name, resolve_device, train

__all__ = ["SweepContext", "TrialRecord", "TrialState", "run_trial", "trial_run_name", "final_metrics", "Interrupted"]


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
    owner: str = ""  # the ``sbsearch run`` process that runs the trials (``study.new_owner``)
    study_id: str = ""  # the id of the sweep's store, shared by every process that joins it


class TrialState(str, Enum):
    """Where a trial stands. A ``str``, so that records read back from JSON, CSV and MLflow tags compare
    equal to it and it is written as its name (``COMPLETE``) everywhere."""

    COMPLETE = "COMPLETE"
    PRUNED = "PRUNED"
    FAIL = "FAIL"
    RUNNING = "RUNNING"  # claimed and training (the store and the progress display only)
    WAITING = "WAITING"  # queued to run again after an interruption (the store only)

    def __str__(self) -> str:
        return self.value


@dataclass
class TrialRecord:
    """The outcome of one trial, as every record of it (storage, MLflow, trials.csv) states it.

    ``seconds`` is the trial's own time: preparing its inputs, building its model, training and
    evaluating it. ``startup_seconds`` is what its worker process spent during the trial on set-up
    that it does once and reuses for every later trial: loading the data set and opening the MLflow
    store (MLflow's import included). It is nonzero only for a worker's first trial (and for the first
    trial of a resumed sweep's worker); the interpreter's start and the imports that come before any
    trial count in neither.
    """

    number: int
    state: TrialState  # COMPLETE, PRUNED or FAIL once the trial ends
    params: dict[str, Any]
    final: dict[str, float] = field(default_factory=dict)
    epochs_run: int = 0
    seconds: float = 0.0
    reason: str = ""
    run_id: str = ""
    history: list[dict[str, float]] = field(default_factory=list)  # metrics after each epoch
    logged: bool = True  # False when the tracking store failed: ``sbsearch relog`` catches up
    tracking_error: str = ""
    startup_seconds: float = 0.0
    # The held-out test split, measured when the trial completed. Kept apart from ``final`` so that no
    # sampler, pruner or ranking can read it; the sweep publishes it only for the configurations it
    # chose on validation (``sbsearch.heldout``).
    test: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.state = TrialState(self.state)  # a record read back from the store or a file names it as text


def final_metrics(record: TrialRecord) -> dict[str, float]:
    """A finished trial's ``final.*`` metrics in MLflow, wherever its run is closed (the trial itself, a
    backend closing a trial that could not, ``relog``): its final metrics, time, start-up and epochs."""
    return {**record.final, "duration_s": record.seconds, "startup_s": record.startup_seconds,
            "epochs_run": float(record.epochs_run)}


ShouldPrune = Callable[[int, Mapping[str, float]], "str | None"]


@functools.lru_cache(maxsize=4)
def _base_split(data: DataSpec, seed: int) -> Split:
    return load_dataset(data.dataset, data.val_fraction, seed, data)


# The sweeps this process has set itself up for (see ``_set_up_process``).
_SET_UP: set[tuple[object, ...]] = set()


def _set_up_process(ctx: SweepContext) -> float:
    """Seconds spent now on what this process does once and every later trial of the sweep reuses
    (0 once done): the modules PyTorch and the trainer import on first use, the training device, the
    data set (cached by ``_base_split``) and the MLflow store."""
    spec = ctx.spec
    key = (spec.data, spec.seed, spec.train.device, ctx.tracking)
    if key in _SET_UP:
        return 0.0
    start = time.perf_counter()
    # Imported on first use, by the first optimiser a process builds and by the trainer: seconds.
    import torch._dynamo

    import sbsearch.replicas  # noqa: F401

    # A failure here recurs inside the trial, which records it (device, data) or logs without MLflow (store).
    with contextlib.suppress(Exception):
        torch.zeros(1, device=resolve_device(spec.train.device))  # a CUDA context takes seconds
    with contextlib.suppress(Exception):
        _base_split(spec.data, spec.seed)
    if ctx.tracking is not None:
        with contextlib.suppress(Exception):
            Tracker(ctx.tracking)  # imports MLflow and opens the store, which later clients reuse
    _SET_UP.add(key)
    return time.perf_counter() - start


def trial_run_name(number: int, config: TrialConfig) -> str:
    """``trial-007 K=2 fill=0.5 norm=batch``: readable in MLflow's run list."""
    label = config.label()
    return f"trial-{number:03d} {label}".strip()


def build_trial(spec: Spec, config: TrialConfig) -> tuple[Split, ModelDesc]:
    """The data and model description of one configuration; train them with
    ``train(split, desc, plan, strategies=config.all_settings())``, which runs the strategies'
    training-time hooks (augmentation, loss terms)."""
    settings = config.all_settings()
    base = _base_split(spec.data, spec.seed)
    plain = stage_config(spec.model, ModelDesc, input_shape=tuple(base.x_train.shape[1:]), num_outputs=base.num_outputs)
    desc = describe_model(plain, settings, _expansion_constants(base, settings["expansion"], spec.data.normalize),
                          optimizer=spec.train.optimizer)
    # Symmetry transforms of the data act on the image, before the expansion: the trainer gets the
    # training inputs unexpanded and applies the pipeline to each batch after transforming it.
    # (A control that stands in for the expansion leaves the data unexpanded: ``input_transforms``.)
    # The data's own augmentation (crop, flip) is such a transform too, and runs before the strategies'.
    split = prepare_inputs(base, input_transforms(settings, base.input_kind), normalize=spec.data.normalize,
                           defer_train=defers_training_inputs(settings, base.input_kind),
                           augment=augmentation(spec.data))
    return split, desc


def _expansion_constants(base: Split, expansion: dict[str, object], normalize: bool) -> torch.Tensor:
    """One expanded sample holding the constants, in model units, and 0 where original values go.

    A NaN sample run through the real ``prepare`` keeps NaN exactly at the original positions. (Read from the
    validation part, which ``prepare`` always runs through the pipeline; the training part may stay raw.)
    """
    nan = torch.full((1, *base.x_train.shape[1:]), float("nan"))
    probe = prepare(replace(base, x_train=nan, x_val=nan, x_test=None), expansion, normalize=normalize).x_val[0]
    return torch.nan_to_num(probe, nan=0.0)


def train_plan(spec: Spec) -> TrainPlan:
    """The spec's ``train`` section as the trainer takes it, with the batch size, the seed and the device."""
    return stage_config(spec.train, TrainPlan, batch_size=spec.data.batch_size, seed=spec.seed,
                        device=str(resolve_device(spec.train.device)))


def run_trial(ctx: SweepContext, number: int, config: TrialConfig, should_prune: ShouldPrune,
              stop_requested: Callable[[], bool] = lambda: False, first_attempt: bool = False,
              log_every_epoch: bool = False) -> TrialRecord:
    """Train one configuration, log it, and return its record. Never raises for a trial's own fault:
    an exception, a diverging loss or running out of memory becomes a FAIL (or PRUNED) record.

    If the tracking store fails mid-trial, training goes on: the record (kept by the backend's
    storage and trials.csv) says so in ``logged``, and ``sbsearch relog`` writes it to MLflow later.

    The record's ``seconds`` cover the trial's own work; the worker's one-time set-up, done first,
    goes to ``startup_seconds`` (see ``TrialRecord``).

    ``first_attempt``: no process ever started trial ``number`` before (the Optuna backend's trials: an
    interrupted one comes back under a new number), so its MLflow run is created without first looking
    for an earlier attempt's run to reuse. ``log_every_epoch``: write each epoch to MLflow before
    ``should_prune`` sees it, for a backend whose scheduler may end the trial's thread inside that call
    (Ray's): otherwise epochs go out together, at most every ``_TrialLog.FLUSH_SECONDS``.

    Raises:
        Interrupted: when ``stop_requested()`` turns true between epochs.
    """
    if ctx.threads > 0:
        torch.set_num_threads(ctx.threads)
    record = TrialRecord(number, TrialState.COMPLETE, {k: config.params[k] for k in config.searched})
    record.startup_seconds = _set_up_process(ctx)
    log = _TrialLog(ctx, record, config, first_attempt, flush_seconds=0.0 if log_every_epoch else None)
    prune_reason: list[str] = []

    def report(epoch: int, metrics: dict[str, float]) -> bool:
        record.history.append(dict(metrics))
        log.epoch(epoch, metrics)
        if stop_requested():
            raise Interrupted()
        reason = should_prune(epoch, metrics)
        if reason and epoch < ctx.spec.train.epochs:  # a trial that ran every epoch is complete, never pruned
            prune_reason.append(reason)
            return True
        return False

    start = time.perf_counter()
    try:
        plan = train_plan(ctx.spec)
        log.tags["sbsearch.device"] = device_name(plan.device)
        split, desc = build_trial(ctx.spec, config)
        result = train(split, desc, plan, report, strategies=config.all_settings())
        log.tags["sbsearch.replicas"] = result.replicas_ran
        record.final, record.epochs_run = {**result.final, "num_parameters": float(result.num_parameters),
                                           **control_values(desc)}, result.epochs_run
        record.test = dict(result.test)
        if prune_reason:
            record.state, record.reason = TrialState.PRUNED, prune_reason[0]
    except Interrupted:
        raise
    except TrialDiverged as exc:
        record.state = TrialState.PRUNED if ctx.spec.search.on_divergence == "prune" else TrialState.FAIL
        record.reason, record.epochs_run = f"diverged: {exc}", len(record.history)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        record.state, record.reason = TrialState.FAIL, f"out of memory: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"[:500]
        record.epochs_run = len(record.history)
        log.traceback(traceback.format_exc())
    except Exception as exc:  # a crashing trial must not take the sweep down
        text = str(exc)
        # PyTorch's CPU allocator reports running out of memory as a plain RuntimeError.
        kind = "out of memory" if "can't allocate memory" in text or "out of memory" in text.lower() else type(exc).__name__
        record.state, record.reason = TrialState.FAIL, f"{kind}: {text.strip()}"[:500]
        record.epochs_run = len(record.history)
        log.traceback(traceback.format_exc())
    record.seconds = time.perf_counter() - start
    log.end()
    return record


@functools.lru_cache(maxsize=4)
def _tracker(target: TrackingTarget) -> Tracker:
    """One tracker per store and process: a new one looked the experiment up again for every trial."""
    return Tracker(target)


class _TrialLog:
    """The trial's MLflow child run; a failing store turns logging off instead of failing the trial.

    The run is created when the trial starts, named after its configuration. Its params and epoch
    metrics are written together, at most every ``FLUSH_SECONDS`` and at the end, where they join the
    final metrics: a trial of a few short epochs costs the store three writes instead of one per epoch
    plus four, which was most of the sweep's own time per trial in ``benchmarks/controller.py``.
    """

    FLUSH_SECONDS = 2.0

    def __init__(self, ctx: SweepContext, record: TrialRecord, config: TrialConfig, first_attempt: bool = False,
                 flush_seconds: float | None = None) -> None:
        self.record = record
        self.flush_seconds = self.FLUSH_SECONDS if flush_seconds is None else flush_seconds
        self.tracker: Tracker | None = None
        self.pending: list[EpochMetrics] = []
        self.params: dict[str, str] | None = trial_params(record.number, config.params)  # None once written
        self.flushed = time.monotonic()
        self.tags: dict[str, str] = {}  # written with the final metrics: the device, how the replicas ran
        if ctx.tracking is None:
            record.logged = False
            return
        assert ctx.parent_run_id is not None
        self._safely(lambda: self._start(ctx, config, first_attempt))

    def _start(self, ctx: SweepContext, config: TrialConfig, first_attempt: bool) -> None:
        assert ctx.tracking is not None and ctx.parent_run_id is not None
        tracker = _tracker(ctx.tracking)
        self.record.run_id = tracker.start_trial(ctx.parent_run_id, self.record.number, None,
                                                 trial_run_name(self.record.number, config), first_attempt)
        self.tracker = tracker

    def _safely(self, write: Callable[[], object]) -> None:
        try:
            write()
        except Exception as exc:
            self.tracker = None
            self.record.logged = False
            self.record.tracking_error = f"{type(exc).__name__}: {str(exc).strip()[:200]}"

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.tracker is None:
            return
        self.pending.append((epoch, int(time.time() * 1000), dict(metrics)))
        if time.monotonic() - self.flushed >= self.flush_seconds:
            tracker, pending, params = self.tracker, self.pending, self.params
            self.pending, self.params, self.flushed = [], None, time.monotonic()
            self._safely(lambda: tracker.log_epochs(self.record.run_id, pending, params))

    def traceback(self, text: str) -> None:
        if self.tracker is not None:
            tracker = self.tracker
            self._safely(lambda: tracker.client.log_text(self.record.run_id, text, "traceback.txt"))

    def end(self) -> None:
        if self.tracker is not None:
            tracker, r, pending, params = self.tracker, self.record, self.pending, self.params
            self.pending, self.params = [], None
            tags = {**self.tags, **({"sbsearch.reason": r.reason} if r.reason else {})}
            self._safely(lambda: tracker.end_trial(r.run_id, r.state, final_metrics(r), tags,
                                                   epochs=pending, params=params))
