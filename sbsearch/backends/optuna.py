"""The Optuna backend: ask/tell on the sweep's store, with trials in a thread or in worker processes.

The store (``sbsearch.study``) is the sweep's source of truth: every trial's parameters, the metric
after each epoch and the trial's full record, so the same command resumes an interrupted sweep, and
several ``sbsearch run`` processes that name the same storage run one sweep between them.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from types import FrameType
from typing import Any

import numpy as np
import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial
from optuna.trial import TrialState as OptunaState

from sbsearch.backends.base import STOP_SIGNALS, Backend, ProgressSink, StopSignals, SweepInterrupted
from sbsearch.data import DATASETS
from sbsearch.pruning import PeerTrial, PruningRule, rule_for
from sbsearch.space import config_from_params, grid_values, sample_config, trial_budget
from sbsearch.spec import Spec
from sbsearch.study import (
    SlotIndex,
    Store,
    as_peer,
    failure_message,
    free_slot,
    requeued,
    slot_of,
    slots,
    stored_history,
)
from sbsearch.tracking import Tracker, trial_params
from sbsearch.trial import Interrupted, SweepContext, TrialRecord, TrialState, run_trial

__all__ = ["OptunaBackend", "OptunaSuggest", "BACKEND", "DEVICE_ATTR", "assign_devices", "sampler", "replay_study",
           "sample_on_replay", "visible_gpus", "worker_devices"]


class OptunaSuggest:
    """Adapts an Optuna trial to the backend-neutral ``Suggest`` protocol."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def categorical(self, name: str, choices: tuple[Any, ...]) -> Any:
        return self.trial.suggest_categorical(name, list(choices))

    def float(self, name: str, low: float, high: float, log: bool, step: float | None) -> float:
        return self.trial.suggest_float(name, low, high, log=log, step=step)

    def int(self, name: str, low: int, high: int, log: bool, step: int) -> int:
        return self.trial.suggest_int(name, low, high, log=log, step=step)


def sampler(spec: Spec, first: int) -> optuna.samplers.BaseSampler:
    """The spec's sampler, seeded by the spec's seed and ``first``, the trial it samples first.

    The Optuna backend makes a fresh one for every trial, so trial n's values depend on
    (seed, n) and the trials it sees, never on which worker asked or when.
    """
    if spec.search.sampler == "grid":
        # The grid sampler shuffles the grid with its seed and gives trial n the n-th cell: every
        # trial of the sweep must see the same order, or cell n would differ from trial to trial.
        grid_seed = int(np.random.SeedSequence([spec.seed]).generate_state(1)[0])
        return optuna.samplers.GridSampler(grid_values(spec) or {"_": [0]}, seed=grid_seed)
    seed = int(np.random.SeedSequence([spec.seed, first]).generate_state(1)[0])
    if spec.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    startup = min(10, max(4, spec.search.trials // 4))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True)


class _Chosen(optuna.samplers.BaseSampler):
    """Gives the sweep's trial the values drawn for it on the replay study (none at all while the trial
    is being claimed), so the storage records exactly what was sampled."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.values = dict(values)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return {}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: Any) -> Any:
        assert param_name in self.values, f"{param_name} was not sampled on the replay study"
        return self.values[param_name]


def _objective(ctx: SweepContext) -> tuple[str, str]:
    """The data set's objective: (metric, maximize or minimize)."""
    metric, direction = DATASETS[ctx.spec.data.dataset].objective
    return metric, direction


def open_store(ctx: SweepContext) -> Store:
    """The sweep's store, as this sweep's owner."""
    return Store.open(ctx.spec, ctx.out_dir, _objective(ctx)[1], owner=ctx.owner)


# --- the fixed schedule -----------------------------------------------------------------------------------
# In the fixed schedule the trial in slot n (``sbsearch.study.slots``) is claimed only once slots
# 0..n-lag are finished and slots n-lag+1..n-1 have their values; it samples on a replay study that
# holds exactly those trials (the later ones as running, whatever they have done since) with a sampler
# seeded by (seed, n), and its pruning rule sees slots 0..n-lag. So what it tries and how it is judged
# follow from the spec alone, not from timing, from which worker runs it, or from which machine.

_TURN_POLL_SECONDS = 0.1


def _turn_has_come(held: Mapping[int, FrozenTrial], slot: int, lag: int, names: set[str], start: int = 0) -> bool:
    """Whether the trial in ``slot`` may sample: slots up to ``slot - lag`` finished, the later ones
    holding every searched value (``names``). Slots below ``start`` are known to be finished."""
    for n in range(start, slot):
        t = held.get(n)
        if t is None:
            return False
        if not t.state.is_finished() and (n <= slot - lag or not names <= t.params.keys()):
            return False
    return True


def _wait_for_turn(store: Store, slot: int, lag: int, names: set[str],
                   ended: Callable[[], bool]) -> dict[int, FrozenTrial] | None:
    """The trials in the slots before ``slot`` once its turn has come, or None if ``ended()`` first."""
    while True:
        held = slots(store.trials())
        if _turn_has_come(held, slot, lag, names):
            return {n: held[n] for n in range(slot)}
        if ended():
            return None
        time.sleep(_TURN_POLL_SECONDS)


def replay_study(direction: str, held: Mapping[int, FrozenTrial], slot: int, lag: int) -> optuna.Study:
    """An in-memory study of what the trial in ``slot`` may see, in slot order: slots up to
    ``slot - lag`` as they finished (values, per-epoch values), the later ones as running, with their
    parameters only. Its trial numbers are the slots, so the next trial it asks for is ``slot``."""
    replay = optuna.create_study(direction=direction)  # type: ignore[arg-type]
    for n in range(slot):
        t = held[n]
        if n <= slot - lag:
            assert t.state.is_finished(), f"slot {n} must be finished before slot {slot} samples"
            replay.add_trial(optuna.trial.create_trial(
                state=t.state, value=t.value if t.state == OptunaState.COMPLETE else None, params=t.params,
                distributions=t.distributions, intermediate_values=t.intermediate_values))
        else:
            replay.add_trial(optuna.trial.create_trial(state=OptunaState.RUNNING, params=t.params,
                                                       distributions=t.distributions))
    return replay


def sample_on_replay(spec: Spec, direction: str, held: Mapping[int, FrozenTrial], slot: int, lag: int) -> dict[str, Any]:
    """The searched values of the trial in ``slot``, drawn by a sampler seeded by (seed, slot) from
    exactly the trials the schedule lets it see (``replay_study``)."""
    replay = replay_study(direction, held, slot, lag)
    replay.sampler = sampler(spec, slot)
    trial = replay.ask()
    assert trial.number == slot
    sample_config(spec, OptunaSuggest(trial))
    return dict(trial.params)


class _ReplayStorage(optuna.storages.InMemoryStorage):
    """An in-memory storage that can drop its last trials again (running ones only)."""

    def drop_after(self, study_id: int, count: int) -> None:
        with self._lock:
            trials = self._studies[study_id].trials
            for t in trials[count:]:
                assert t.state == OptunaState.RUNNING, "only the running slots and the asked trial are dropped"
                del self._trial_id_to_study_id_and_number[t._trial_id]
            del trials[count:]


class _ScheduleCache:
    """One worker's replay study and peers, kept from one trial it samples to the next.

    ``sample_on_replay`` rebuilt the replay study of all earlier slots for every trial (65 µs a slot:
    0.65 s per trial at 10,000) and the pruning rule's peers with it. The slots up to ``slot - lag`` are
    finished when a trial samples, and a finished trial never changes, so they stay here in slot order;
    each sample adds the slots finished since the last one, then the running ones and the asked trial,
    which it drops again. The replay study holds the same trials in the same order as
    ``replay_study``'s, so the sampler (seeded by (seed, slot)) draws the same values.
    """

    def __init__(self, direction: str, metric: str) -> None:
        self.direction, self.metric = direction, metric
        self._reset()

    def _reset(self) -> None:
        self.storage = _ReplayStorage()
        self.study = optuna.create_study(storage=self.storage, direction=self.direction)  # type: ignore[arg-type]
        self.ids: list[int] = []  # the store's trial id in each finished slot held here
        self.peers: list[PeerTrial] = []

    def _finished_until(self, held: Mapping[int, FrozenTrial], count: int) -> None:
        """Hold slots 0..count-1, all finished, starting over when a lower slot is asked for (an
        interruption freed it) or a slot changed hands."""
        if len(self.ids) > count or (self.ids and held[len(self.ids) - 1]._trial_id != self.ids[-1]):
            self._reset()
        for n in range(len(self.ids), count):
            t = held[n]
            assert t.state.is_finished(), f"slot {n} must be finished before slot {count} samples"
            self.study.add_trial(optuna.trial.create_trial(
                state=t.state, value=t.value if t.state == OptunaState.COMPLETE else None, params=t.params,
                distributions=t.distributions, intermediate_values=t.intermediate_values))
            self.ids.append(t._trial_id)
            self.peers.append(as_peer(t, self.metric, n))

    def peers_of(self, held: Mapping[int, FrozenTrial], slot: int, lag: int) -> list[PeerTrial]:
        """``[as_peer(held[n], metric, n) for n in range(slot - lag + 1)]``."""
        self._finished_until(held, max(0, slot - lag + 1))
        return self.peers[: max(0, slot - lag + 1)]

    def sample(self, spec: Spec, held: Mapping[int, FrozenTrial], slot: int, lag: int) -> dict[str, Any]:
        """``sample_on_replay(spec, direction, held, slot, lag)``."""
        finished = max(0, slot - lag + 1)
        self._finished_until(held, finished)
        for n in range(finished, slot):
            t = held[n]
            self.study.add_trial(optuna.trial.create_trial(state=OptunaState.RUNNING, params=t.params,
                                                           distributions=t.distributions))
        try:
            self.study.sampler = sampler(spec, slot)
            trial = self.study.ask()
            assert trial.number == slot
            sample_config(spec, OptunaSuggest(trial))
            return dict(trial.params)
        finally:
            self.storage.drop_after(self.study._study_id, finished)


# --- which GPU each worker trains on --------------------------------------------------------------------------

DEVICE_ATTR = "sbsearch.device"
"""The user attribute of a trial that names the GPU it ran on (``CUDA_VISIBLE_DEVICES`` of its worker)."""


def assign_devices(workers: int, devices: Sequence[str], trials_per_gpu: int) -> list[str]:
    """The device of each worker slot: round robin over ``devices``, so that the counts per device differ by at
    most one, and none holds more than ``trials_per_gpu`` (the spec refuses more workers than that allows).

    Example:
        >>> assign_devices(3, ["0", "1"], trials_per_gpu=2)
        ['0', '1', '0']
    """
    assert devices and 0 < workers <= len(devices) * trials_per_gpu, (workers, devices, trials_per_gpu)
    return [devices[slot % len(devices)] for slot in range(workers)]


def visible_gpus() -> list[str]:
    """The GPUs this process sees, as a worker's ``CUDA_VISIBLE_DEVICES`` must name them: index i is the i-th
    entry of this process's own ``CUDA_VISIBLE_DEVICES`` when it has one. Empty without CUDA."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(count)]
    return ids[:count]


def worker_devices(spec: Spec, gpus: Sequence[str] | None = None) -> list[str | None]:
    """The ``CUDA_VISIBLE_DEVICES`` of each worker slot (``search.parallel`` of them) among ``gpus`` (default
    ``visible_gpus()``), picked by ``search.devices``; None for every slot when the trials train on the CPU."""
    gpus = visible_gpus() if gpus is None else gpus
    if spec.train.device == "cpu" or not gpus:
        return [None] * spec.search.parallel
    indices = spec.search.devices if spec.search.devices is not None else range(len(gpus))
    pinned: list[str | None] = list(assign_devices(spec.search.parallel, [gpus[i] for i in indices],
                                                   spec.search.trials_per_gpu))
    return pinned


# --- a worker: claim a trial, run it, record it ------------------------------------------------------------

_WAIT_SECONDS = 1.0  # how often a worker with nothing to claim looks again (other processes' trials running)


def take_over_orphans(ctx: SweepContext, store: Store, earlier_runs: bool = True, requeue: bool = True) -> int:
    """Queue again the running trials whose owner is gone (``Store.take_over``) and delete their MLflow
    runs, wherever their process logged them; returns how many."""
    taken = store.take_over(ctx.spec.search.stale_after, {p.name for p in ctx.spec.searched}, earlier_runs, requeue)
    for t in taken:
        _delete_runs(ctx, t.number, str(t.user_attrs.get("sbsearch.owner", ctx.owner)))
    return len(taken)


class _TakenOver(BaseException):
    """Another process took this process's running trial over (it was silent too long): stop it, quietly.
    A BaseException, so that ``run_trial`` does not record it as the trial's failure."""


def _worker_loop(ctx: SweepContext, deadline: float | None, stop: threading.Event | None, since: float = 0.0,
                 device: str | None = None) -> None:
    """Claim trials and run them until the budget, the deadline, a stop request or too many failures in
    a row end the sweep. When the budget is claimed but other processes still run trials, wait for them:
    a trial whose process died is taken over and run here. ``device``: the GPU the worker is pinned to,
    recorded with each trial it claims (``DEVICE_ATTR``)."""
    spec = ctx.spec
    metric, direction = _objective(ctx)
    store = open_store(ctx)
    rule = rule_for(spec, metric, direction)
    budget = trial_budget(spec)
    fixed, lag = spec.search.fixed_schedule, spec.search.schedule_lag
    names = {p.name for p in spec.searched}
    next_check = 0.0
    index = SlotIndex()  # what this worker read of the store already: each claim reads what changed since
    cache = _ScheduleCache(direction, rule.metric) if fixed else None

    def ended() -> bool:
        return ((stop is not None and stop.is_set()) or (deadline is not None and time.time() > deadline)
                or store.stop_reason(since) is not None)

    while True:
        if ended():
            return
        if time.monotonic() >= next_check:
            if take_over_orphans(ctx, store):
                index.forget()
            next_check = time.monotonic() + min(10.0, spec.search.stale_after / 4)
        with store.lock.held():
            trials = store.trials()
            held, count, slot = index.look(trials)
            full = count >= budget
            others_running, start = False, index.prefix
            if full:  # the end of the sweep is decided on a full look at the store, not on the index
                index.forget()
                counted = store.counted(trials)
                full = len(counted) >= budget
                others_running = full and any(t.state == OptunaState.RUNNING and t.user_attrs.get("sbsearch.owner") != ctx.owner
                                              for t in counted)
                held, start = slots(trials), 0
                slot = free_slot(held)
            # A requeued trial (WAITING) goes first and has its values; a new one waits for its turn
            # unclaimed, so that an interruption never finds a claimed trial without values.
            waiting = any(t.state == OptunaState.WAITING for t in trials[index.settled:])  # a finished trial never waits
            ready = not full and (waiting or not fixed or _turn_has_come(held, slot, lag, names, start))
            if ready:
                # The fixed schedule gives the trial its values below, from the replay study.
                store.study.sampler = _Chosen({}) if fixed else sampler(spec, slot)
                trial = store.study.ask()
                slot = slot_of(trial) if requeued(trial) else slot
                store.claim(trial, slot, os.getpid())
                if device is not None:
                    trial.set_user_attr(DEVICE_ATTR, device)
        if full and not others_running:
            return
        if not ready:
            time.sleep(_WAIT_SECONDS if full else _TURN_POLL_SECONDS)
            continue
        # Its turn came at the claim (a new trial in the fixed schedule): what the claim saw is what it may
        # see, since finished slots never change and a running one only lends its values.
        turn = held if fixed and not waiting and not requeued(trial) else None
        _run_claimed(ctx, store, trial, slot, rule, since, stop, ended, turn, cache)


def _run_claimed(ctx: SweepContext, store: Store, trial: optuna.Trial, slot: int, rule: PruningRule, since: float,
                 stop: threading.Event | None, ended: Callable[[], bool],
                 turn: Mapping[int, FrozenTrial] | None = None, cache: _ScheduleCache | None = None) -> None:
    """Sample the claimed ``trial``'s values (in the fixed schedule, on its replay study), run it, record it.
    ``turn``: the slots as the claim saw them when the trial's turn had come; ``cache``: the worker's
    replay study and peers (``_ScheduleCache``)."""
    spec = ctx.spec
    metric, direction = _objective(ctx)
    fixed, lag = spec.search.fixed_schedule, spec.search.schedule_lag
    names = {p.name for p in spec.searched}
    peers: list[PeerTrial] | None = None  # the fixed schedule's peers; free: whatever the store holds now
    try:
        if fixed:
            before = turn if turn is not None else _wait_for_turn(store, slot, lag, names, ended)  # waits for a requeued trial
            if before is None:
                _mark_interrupted(ctx, store, trial.number, "the sweep ended before this trial's turn came")
                return
            cache = cache or _ScheduleCache(direction, rule.metric)
            if not requeued(trial):
                store.study.sampler = _Chosen(cache.sample(spec, before, slot, lag))
            peers = cache.peers_of(before, slot, lag)
        config = sample_config(spec, OptunaSuggest(trial))
    except KeyboardInterrupt:
        _mark_interrupted(ctx, store, trial.number, "the sweep was stopped before this trial started")
        return
    except Exception as exc:  # the sampler itself failed: record it, do not spin
        store.finish(trial, TrialRecord(trial.number, TrialState.FAIL, {}, reason=f"sampling: {exc}"), metric)
        return

    history: list[dict[str, float]] = []

    def should_prune(epoch: int, metrics: Mapping[str, float]) -> str | None:
        try:
            store.report_epoch(trial, epoch, rule.metric, metrics, history)
        except UpdateFinishedTrialError:  # another process took it over (this one was silent too long)
            raise _TakenOver() from None
        if peers is not None:
            return rule.decide(epoch, metrics, peers, slot)
        return rule.decide(epoch, metrics, store.peers(trial.number, rule.metric), trial.number)

    try:
        record = run_trial(ctx, trial.number, config, should_prune,
                           stop_requested=(stop.is_set if stop is not None else lambda: False), first_attempt=True)
        try:
            store.finish(trial, record, rule.metric)
        except UpdateFinishedTrialError:
            raise _TakenOver() from None
    except (Interrupted, KeyboardInterrupt):
        _mark_interrupted(ctx, store, trial.number, "the sweep was stopped while this trial ran")
        return
    except _TakenOver:
        _delete_runs(ctx, trial.number, ctx.owner)
        return
    limit = spec.search.max_consecutive_failures
    if record.state == "FAIL" and limit:
        failed = store.failures_in_a_row(since)
        if len(failed) >= limit:
            store.stop(since, failure_message(failed))


def _mark_interrupted(ctx: SweepContext, store: Store, number: int, why: str) -> None:
    """Record an unfinished trial as interrupted and queue its configuration again in its slot, so the
    sweep re-runs it (``Store.mark_interrupted``); its MLflow run is deleted, since the re-run logs a fresh one."""
    store.mark_interrupted(number, why, {p.name for p in ctx.spec.searched})
    _delete_runs(ctx, number, ctx.owner)


def _delete_runs(ctx: SweepContext, number: int, owner: str) -> None:
    """Delete the MLflow runs of an attempt of trial ``number`` that will not be its record: under this
    process's parent run, and under every parent of the sweep when another process (``owner``) ran it."""
    if ctx.tracking is None:
        return
    with contextlib.suppress(Exception):  # a store that is down: relog catches up
        tracker = Tracker(ctx.tracking)
        if ctx.parent_run_id is not None:
            tracker.delete_trial_runs(ctx.parent_run_id, number)
        if owner != ctx.owner and ctx.study_id:
            tracker.delete_runs_of_trial(ctx.study_id, number)


def _stop_on_signals(stop: threading.Event) -> None:
    """In a worker process: SIGINT and SIGTERM set ``stop``, which the running trial honours at its next
    epoch end, as in the thread; the controller kills the workers on a second signal. Installed whatever
    the worker inherited, since a sweep that a script started with ``&`` ignores SIGINT."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for s in STOP_SIGNALS:
        signal.signal(s, on_signal)


def _requeue_running_trials_of(ctx: SweepContext, store: Store, pids: set[int | None]) -> None:
    """The trials that killed worker processes left running (a second signal, or no stop within the grace
    time) are queued again, so the resumed sweep runs them."""
    for t in store.running_of(ctx.owner, pids):
        _mark_interrupted(ctx, store, t.number, "its worker process was killed when the sweep was stopped")


# What writes the study's journal and MLflow: an exception raised inside them can leave the journal's
# lock broken and fail the trial, so a trial is interrupted only outside them.
_WRITERS = ("optuna", "mlflow", "sqlalchemy", "sbsearch.tracking")


def _interrupt_outside_writes(thread: threading.Thread, patience: float = 5.0) -> None:
    """Raise KeyboardInterrupt in ``thread`` (signals reach only the main thread) while it is not inside
    ``_WRITERS``; after ``patience`` seconds of writing, leave it to stop at its epoch end."""
    end = time.monotonic() + patience
    while thread.ident is not None and time.monotonic() < end:
        frame = sys._current_frames().get(thread.ident)
        if frame is None:  # it has ended
            return
        writing = False
        while frame is not None and not writing:
            writing = str(frame.f_globals.get("__name__", "")).startswith(_WRITERS)
            frame = frame.f_back
        if not writing:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                       ctypes.py_object(KeyboardInterrupt))
            return
        time.sleep(0.005)


def _process_worker(ctx: SweepContext, deadline: float | None, since: float, device: str | None = None) -> None:
    if device is not None:
        # Before anything creates a CUDA context, which reads it once: from here on cuda is this GPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    from sbsearch.logs import log_to_file

    with contextlib.suppress(OSError):  # a spawned process starts with the frameworks logging to the terminal
        log_to_file(ctx.out_dir)
    with contextlib.suppress(Exception):  # Linux: die with the controller, so a killed sweep leaves no orphans
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)
    if os.getppid() == 1:
        return
    stop = threading.Event()
    _stop_on_signals(stop)
    _worker_loop(ctx, deadline, stop, since, os.environ["CUDA_VISIBLE_DEVICES"] if device is not None else None)
    if stop.is_set():
        # Its trial is queued again. Not a clean exit: a controller that was not stopped itself (the signal
        # was for this worker alone) starts another worker in its place.
        raise SystemExit(1)


class OptunaBackend(Backend):
    """Runs a sweep in this process (``search.parallel: 1``) or in worker processes."""

    poll_seconds = 0.5

    def run(self, ctx: SweepContext, progress: ProgressSink) -> list[TrialRecord]:
        in_thread = ctx.spec.search.parallel == 1
        with StopSignals("stopping after the running trial's current epoch" if in_thread
                         else "stopping after the running trials' current epochs") as signals:
            try:
                study = open_store(ctx)
                # Trials an earlier, killed run of this folder left running (this process holds the folder's
                # lock), and those of processes sharing the storage that have gone silent, are run again.
                take_over_orphans(ctx, study)
                deadline = time.time() + ctx.spec.search.timeout if ctx.spec.search.timeout else None
                since = time.time()
                if in_thread:
                    self._run_in_thread(ctx, study, deadline, progress, since, signals)
                else:
                    self._run_in_processes(ctx, study, deadline, progress, since, signals)
                progress(study.views(ctx.spec))
            except KeyboardInterrupt:  # a second signal before or after the trials ran: stop now
                raise SweepInterrupted(signals.signum) from None
        self.stopped_because = study.stop_reason(since)
        return study.records()

    def _run_in_thread(self, ctx: SweepContext, study: Store, deadline: float | None, progress: ProgressSink,
                       since: float, signals: StopSignals) -> None:
        stop = signals.requested  # the trial honours it at its next epoch end
        errors: list[BaseException] = []
        finished = threading.Event()  # Thread.join cannot tell once a KeyboardInterrupt has interrupted it
        [device] = worker_devices(ctx.spec)

        def target() -> None:
            try:
                if device is not None:  # CUDA's current device is per thread: cuda in this thread is this GPU
                    torch.cuda.set_device((ctx.spec.search.devices or (0,))[0])
                _worker_loop(ctx, deadline, stop, since, device)
            except BaseException as exc:  # surfaced in the controller's thread below
                errors.append(exc)
            finally:
                finished.set()

        worker = threading.Thread(target=target, name="sbsearch-trials", daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                progress(study.views(ctx.spec))
                worker.join(self.poll_seconds)
        except KeyboardInterrupt:  # a second signal: the trial stops within its current batch, not epoch
            _interrupt_outside_writes(worker)
            # Then it queues itself again; a process that exited while it trained would abort.
            finished.wait(30)
            raise SweepInterrupted(signals.signum) from None
        if errors:
            raise errors[0]
        if stop.is_set():
            raise SweepInterrupted(signals.signum)

    def _run_in_processes(self, ctx: SweepContext, study: Store, deadline: float | None, progress: ProgressSink,
                          since: float, signals: StopSignals) -> None:
        spawn = mp.get_context("spawn")
        procs: list[Any] = []
        devices = worker_devices(ctx.spec)
        slot_by_worker: dict[Any, int] = {}  # a worker's slot fixes its GPU; a restarted worker takes the dead one's

        def start_one(slot: int) -> None:
            p = spawn.Process(target=_process_worker, args=(ctx, deadline, since, devices[slot]), name="sbsearch-worker",
                              daemon=True)
            p.start()
            procs.append(p)
            slot_by_worker[p] = slot

        try:
            for slot in range(ctx.spec.search.parallel):
                start_one(slot)
            while any(p.is_alive() for p in procs):
                progress(study.views(ctx.spec))
                time.sleep(self.poll_seconds)
                if signals.requested.is_set():  # a worker the same signal ended is stopped, not dead
                    break
                for p in [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]:
                    procs.remove(p)
                    self._bury(ctx, study, p.pid, p.exitcode)
                    if len(study.counted()) < trial_budget(ctx.spec) and not study.stop_reason(since):
                        start_one(slot_by_worker[p])
            if not signals.requested.is_set():
                return
            # The first signal: each worker stops its trial at the epoch's end and queues it again, as the
            # thread does. SIGTERM, because a worker still starting up may have inherited SIGINT ignored.
            for p in procs:
                if p.is_alive() and p.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signal.SIGTERM)
            grace = time.monotonic() + 60
            for p in procs:
                p.join(max(0.0, grace - time.monotonic()))
        except KeyboardInterrupt:  # a second signal: stop now
            pass
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        _requeue_running_trials_of(ctx, study, {p.pid for p in procs})
        raise SweepInterrupted(signals.signum)

    def _bury(self, ctx: SweepContext, study: Store, pid: int | None, exitcode: int | None) -> None:
        """A worker process died (killed, out of memory): its running trial fails, and the sweep goes on."""
        metric = _objective(ctx)[0]

        def report_missing(t: FrozenTrial, values: Mapping[int, float]) -> FrozenTrial:
            """Report for ``t`` the objective of every epoch in ``values`` it has not reported."""
            for epoch, value in values.items():
                if epoch not in t.intermediate_values and math.isfinite(value):
                    study.storage.set_trial_intermediate_value(t._trial_id, epoch, value)
            return study.trial(t.number)

        for t in study.running_of(ctx.owner, {pid}):
            reason = f"worker process died (exit code {exitcode})"
            runs = []
            if ctx.tracking is not None and ctx.parent_run_id is not None:
                tracker = Tracker(ctx.tracking)
                runs = tracker.runs_of_trial(ctx.parent_run_id, t.number)
                # A worker killed between logging an epoch to MLflow and reporting it to the store
                # leaves MLflow one epoch ahead: the store takes the epochs MLflow has, so the two agree.
                for run in runs[:1]:
                    t = report_missing(t, tracker.metric_history(run.info.run_id, metric))
            # A worker killed between storing an epoch's metrics and reporting its objective (``report_epoch``
            # writes them in that order) leaves the objective to report from the stored history.
            t = report_missing(t, {epoch: metrics[metric] for epoch, metrics in enumerate(stored_history(t), start=1)
                                   if metric in metrics})
            # The epochs it reported are in the store (and in its MLflow run); keep the count honest.
            study.finish(t.number, TrialRecord(t.number, TrialState.FAIL, dict(t.params), reason=reason,
                                               epochs_run=len(t.intermediate_values)), metric)
            if runs:
                # A trial writes its params and epochs to MLflow every few seconds: those it had not written
                # yet come from the store, so the run shows every epoch the store has.
                config = config_from_params(ctx.spec, {**{p.name: None for p in ctx.spec.space}, **t.params})
                history = stored_history(t)
            for run in runs:
                tracker.end_trial(run.info.run_id, "FAIL", {}, {"sbsearch.reason": reason},
                                  epochs=tracker.missing_epochs(run.info.run_id, history, metric),
                                  params=trial_params(t.number, config.params))


BACKEND = OptunaBackend

