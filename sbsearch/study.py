"""The one store of a sweep's trials, shared by every backend, the sweep, ``relog`` and the report.

A sweep's trials live in an Optuna study: by default a journal file under ``--out``
(``OUT/optuna.journal``), or in the storage that ``search.storage`` / ``--storage`` names: another
journal file, or one of Optuna's RDB URLs (``postgresql://…``, ``mysql://…``, ``sqlite:///…``).
Several ``sbsearch run`` processes, on one machine or many, each with its own ``--out``, join one sweep
by naming the same storage; between them they run exactly the spec's number of trials.

What the store keeps, beyond Optuna's own parameters, states and values:

- each trial's full record (``sbsearch.record``) and its metrics after each epoch while it runs;
- who runs a trial: the owner (one ``sbsearch run`` process) and its worker's pid; each owner's last
  sign of life (a heartbeat, written every few seconds), so that a trial whose owner died is taken over
  by another process once the owner has been silent for ``search.stale_after`` seconds;
- each trial's slot in the fixed schedule, kept by a re-run of an interrupted trial;
- the resolved spec of the sweep, so that a process with a different spec cannot join it;
- why a run of the sweep stopped itself (too many failures in a row).

Claims (taking the next trial, requeueing an interrupted one) happen under the store's claim lock:
a lock file beside a journal or SQLite file, and a lock of the database server itself for PostgreSQL
(``pg_advisory_lock``) and MySQL (``GET_LOCK``), which the server releases when a process dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial
from optuna.trial import TrialState as OptunaState

from sbsearch.errors import Problem, SbsearchError, SpecError
from sbsearch.pruning import PeerTrial
from sbsearch.space import config_from_params
from sbsearch.spec import Spec
from sbsearch.trial import TrialRecord, TrialState

__all__ = ["JOURNAL", "RDB_SCHEMES", "Store", "TrialView", "storage_url", "redact", "new_owner", "trial_level",
           "failure_message", "same_sweep_changes"]

JOURNAL = "optuna.journal"
"""The default storage: a journal file of this name under ``--out``."""

RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
"""URL schemes of the RDB storages (a driver may follow: ``postgresql+psycopg2://``)."""

_STATES = {OptunaState.COMPLETE: TrialState.COMPLETE, OptunaState.PRUNED: TrialState.PRUNED,
           OptunaState.FAIL: TrialState.FAIL, OptunaState.RUNNING: TrialState.RUNNING,
           OptunaState.WAITING: TrialState.WAITING}
_RECORD = "sbsearch.record"
_HISTORY = "sbsearch.history"
_INTERRUPTED = "sbsearch.interrupted"
_REQUEUED_FROM = "sbsearch.requeued_from"
_SLOT = "sbsearch.slot"
_OWNER = "sbsearch.owner"
_PID = "sbsearch.pid"
_ALIVE = "sbsearch.alive."  # + owner: the owner's last heartbeat (a time.time())
_STOPPED = "sbsearch.stopped"
_SPEC = "sbsearch.spec"
_STUDY_ID = "sbsearch.study_id"
_FOLDER = "sbsearch.folder"


@dataclass(frozen=True)
class TrialView:
    """One trial as the progress display shows it."""

    number: int
    state: str  # RUNNING | COMPLETE | PRUNED | FAIL
    value: float | None
    epoch: int
    label: str


# --- where the trials are ---------------------------------------------------------------------------------


def _scheme(url: str) -> str:
    return url.partition("://")[0].partition("+")[0].lower() if "://" in url else ""


def storage_url(spec: Spec, out_dir: Path) -> str:
    """The sweep's storage: ``search.storage`` (an RDB URL, or a journal file's path), else the journal
    file under ``out_dir``. A journal's path is made absolute, so workers in other folders find it."""
    given = spec.search.storage
    if given and _scheme(given):
        return given
    return str(Path(given).expanduser().resolve() if given else out_dir / JOURNAL)


def redact(url: str) -> str:
    """``url`` without its password, for files, logs and MLflow (``postgresql://me:***@host/db``).

    A process that reads a redacted URL back connects without a password, which PostgreSQL's client then
    takes from ``PGPASSWORD`` or ``~/.pgpass`` (MySQL's from its option files).
    """
    if not _scheme(url) or "@" not in url.partition("://")[2]:
        return url
    head, _, rest = url.partition("://")
    userinfo, _, host = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{head}://{user}{':***' if colon else ''}@{host}"


def _unredacted(url: str) -> str:
    """A redacted URL as a connectable one: its ``***`` password dropped, for the client's own sources."""
    return url.replace(":***@", "@", 1) if _scheme(url) else url


def new_owner() -> str:
    """A name for one ``sbsearch run`` process, unique across machines: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _open_storage(url: str) -> BaseStorage:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    scheme = _scheme(url)
    if not scheme:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(url))
    if scheme not in RDB_SCHEMES:
        raise SpecError([Problem("search.storage", "must be a journal file's path or an RDB URL (" +
                                 ", ".join(f"{s}://" for s in RDB_SCHEMES) + ")", redact(url))])
    try:
        # pool_pre_ping: a connection the server closed while a trial trained (hours) is replaced, not failed.
        return RDBStorage(_unredacted(url), engine_kwargs={"pool_pre_ping": True}, skip_compatibility_check=False)
    except Exception as exc:  # noqa: BLE001 - a driver missing, a server down, a bad password: the user's to fix
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SbsearchError(f"search.storage: the storage {redact(url)} must be reachable, but opening it failed: "
                            f"{type(exc).__name__}: {first[:300]}") from None


# --- the claim lock ----------------------------------------------------------------------------------------


class _FileLock:
    """A lock file beside a journal or SQLite file: what every process on the machines sharing it sees."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.Lock()  # flock is per open file, so threads of one process queue here

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._local, open(self.path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


class _ServerLock:
    """A lock held by the database server for one connection (PostgreSQL's advisory lock, MySQL's named
    lock): every process that shares the storage waits on it, and the server frees it when the holder dies."""

    def __init__(self, storage: RDBStorage, scheme: str, name: str) -> None:
        self.engine = storage.engine
        self.scheme, self.name = scheme, name
        self.key = zlib.crc32(name.encode()) - 2**31  # a signed 32-bit key for pg_advisory_lock
        self._local = threading.Lock()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        from sqlalchemy import text

        args: dict[str, object]
        with self._local, self.engine.connect() as conn:
            if self.scheme == "postgresql":
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
                unlock, args = "SELECT pg_advisory_unlock(:k)", {"k": self.key}
            else:
                conn.execute(text("SELECT GET_LOCK(:n, -1)"), {"n": self.name[:64]})
                unlock, args = "SELECT RELEASE_LOCK(:n)", {"n": self.name[:64]}
            try:
                yield
            finally:
                conn.execute(text(unlock), args)
                conn.commit()


def _claim_lock(url: str, storage: BaseStorage, study_name: str) -> _FileLock | _ServerLock:
    scheme = _scheme(url)
    if scheme in ("postgresql", "mysql"):
        rdb = getattr(storage, "_backend", storage)  # Optuna puts a cache in front of an RDBStorage
        assert isinstance(rdb, RDBStorage), type(rdb)
        return _ServerLock(rdb, scheme, f"sbsearch:{study_name}")
    if scheme == "sqlite":
        path = url.partition(":///")[2] or "sqlite.db"
        return _FileLock(Path(f"{path}.{_safe(study_name)}.claim.lock"))
    return _FileLock(Path(f"{url}.claim.lock"))


def _safe(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()[:12]


# --- rules every backend shares -------------------------------------------------------------------------


def trial_level(metrics: Mapping[str, float]) -> dict[str, float]:
    """A trial's metrics without the per-layer scores (``sb_score.<layer>``): what the pruning rules of
    other trials see, and what the store keeps after each epoch."""
    return {k: float(v) for k, v in metrics.items() if not k.startswith("sb_score.")}


def failure_message(failed: list[FrozenTrial]) -> str:
    """Why a sweep stopped itself after ``failed`` (the last one first) failed in a row."""
    last = failed[0]
    reason = str((last.user_attrs.get(_RECORD) or {}).get("reason", ""))[:200]
    return (f"search.max_consecutive_failures: the sweep stopped after {len(failed)} failed trials in a row "
            f"(last: trial {last.number}, {reason}); fix the cause and run the same command to go on")


def record_from(stored: Mapping[str, Any]) -> TrialRecord:
    """A stored record as a ``TrialRecord``. A worker may run a newer or older sbsearch than the driver
    during an upgrade: the fields this version knows are kept."""
    known = {f.name for f in fields(TrialRecord)}
    return TrialRecord(**{k: v for k, v in stored.items() if k in known})


# Keys a resumed or joining run of a sweep may change without it becoming a different sweep.
RESUMABLE_CHANGES = {"search.trials", "search.parallel", "search.devices", "search.trials_per_gpu", "search.timeout",
                     "search.stale_after", "tracking.uri", "tracking.experiment", "ray.address", "data.cache",
                     "train.replica_mode"}


def _diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            keys += _diff_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return keys
    return [] if old == new else [prefix.rstrip(".")]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping's leaves by dotted key."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def same_sweep_changes(old: Mapping[str, Any], new: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """The keys at which resolved spec ``new`` differs from ``old`` so that it is another sweep.

    Keys in ``RESUMABLE_CHANGES`` (and ``ignore``) may change; a key of ``ADDED_KEYS_SAFE_AT_DEFAULT`` that
    ``old`` lacks (a newer sbsearch added it) may stand at its default; a key that a newer sbsearch replaced
    (``sbsearch.spec.REPLACED_KEYS``) is read in ``old`` as the key that replaced it.
    """
    from sbsearch.spec import parse_spec, replace_old_keys, spec_to_dict

    old = replace_old_keys(old)
    defaults = _flat(spec_to_dict(parse_spec({})))
    now, before = _flat(dict(new)), _flat(dict(old))
    return [k for k in _diff_keys(dict(old), dict(new)) if k not in RESUMABLE_CHANGES and k not in ignore
            and not (_added_later(k) and k not in before and now.get(k) == defaults.get(k))]


ADDED_KEYS_SAFE_AT_DEFAULT = ("search.repeat", "search.storage", "search.stale_after", "space.syre", "train.nesterov",
                              "train.schedule", "train.warmup", "train.label_smoothing", "train.precision",
                              "train.channels_last", "train.compile", "data.augment_crop", "data.augment_flip")
"""Keys (or sections) added in later versions that an older sweep may lack and still resume, when they keep
their defaults: each leaves what the older sweep's trials trained on, and how, as it was."""


def _added_later(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in ADDED_KEYS_SAFE_AT_DEFAULT)


# --- the store ----------------------------------------------------------------------------------------


class Store:
    """A sweep's trials in its storage, and the rules for claiming, finishing and requeueing them."""

    def __init__(self, study: optuna.Study, url: str, owner: str = "", out_dir: Path | None = None) -> None:
        self.study = study
        self.url = url
        self.owner = owner
        # The machine and output folder of this run of the sweep: its trials are its own to resume.
        self.folder = f"{socket.gethostname()}@{out_dir}" if out_dir is not None else ""
        self.lock = _claim_lock(url, study._storage, study.study_name)
        self._study_id = study._study_id
        # The progress display's view of each finished trial: it never changes, and building its label
        # (config_from_params) for every trial twice a second cost the controller O(n) per poll.
        self._finished_views: dict[int, TrialView] = {}

    # -- opening

    @classmethod
    def open(cls, spec: Spec, out_dir: Path, direction: str, owner: str = "",
             resolved: Mapping[str, Any] | None = None) -> Store:
        """Create or join the sweep's study (``storage_url``) as ``owner``.

        ``resolved`` (the resolved spec as a dict) is checked against the spec the sweep was created
        with: a process with another spec must not add trials to it.

        Raises:
            SbsearchError: when the storage cannot be opened, the study optimises the other way, or it
                was created with a different spec.
        """
        url = storage_url(spec, out_dir)
        storage = _open_storage(url)
        study = optuna.create_study(storage=storage, study_name=spec.name, direction=direction,  # type: ignore[arg-type]
                                    load_if_exists=True)
        where = redact(url)
        if study.direction.name.lower() != direction:
            raise SbsearchError(f"--out: the study {spec.name!r} in {where} must {direction} its metric, but it was "
                                f"created to {study.direction.name.lower()}; use another --out, storage or name")
        store = cls(study, url, owner, out_dir.resolve())
        if resolved is not None:
            store._check_spec(resolved, where)
        return store

    def _check_spec(self, resolved: Mapping[str, Any], where: str) -> None:
        with self.lock.held():  # the first process to open the sweep sets its spec and id
            attrs = self.study.user_attrs
            if _STUDY_ID not in attrs:
                self.study.set_user_attr(_STUDY_ID, uuid.uuid4().hex[:12])
            stored = attrs.get(_SPEC)
            if stored is None:
                self.study.set_user_attr(_SPEC, dict(resolved))
                return
        changed = same_sweep_changes(stored, resolved, ignore=("search.storage",))
        if changed:
            raise SbsearchError(f"search.storage: the sweep {self.study.study_name!r} in {where} was started with a "
                                f"different spec (it differs at {', '.join(changed[:5])}); join it with the same spec, "
                                "or name another sweep or storage")

    @classmethod
    def load(cls, spec: Spec, out_dir: Path) -> Store | None:
        """The sweep's store for reading, when it holds the sweep: unlike ``open`` it creates nothing."""
        url = storage_url(spec, out_dir)
        if not _scheme(url) and not Path(url).exists():
            return None
        try:
            study = optuna.load_study(study_name=spec.name, storage=_open_storage(url))
        except KeyError:
            return None
        return cls(study, url)

    @property
    def study_id(self) -> str:
        """The sweep's id, the same for every process that joins it (the tag of its MLflow runs)."""
        return str(self.study.user_attrs.get(_STUDY_ID, ""))

    @property
    def storage(self) -> BaseStorage:
        return self.study._storage

    # -- reading

    def trials(self) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    def trial(self, number: int) -> FrozenTrial:
        return self.trials()[number]

    def counted(self, trials: list[FrozenTrial] | None = None) -> list[FrozenTrial]:
        """The trials that count towards the budget: not the interrupted ones (their re-run counts)
        nor those queued to be run again."""
        return [t for t in (self.trials() if trials is None else trials)
                if not t.user_attrs.get(_INTERRUPTED) and t.state != OptunaState.WAITING]

    def finished(self) -> int:
        """Counted trials that have finished."""
        return sum(t.state.is_finished() for t in self.counted())

    def records(self) -> list[TrialRecord]:
        """Every counted, finished trial's record (the source of ``trials.csv``)."""
        records = []
        for t in self.counted():
            if t.state == OptunaState.RUNNING:
                continue
            stored = t.user_attrs.get(_RECORD)
            records.append(record_from(stored) if stored else TrialRecord(
                t.number, _STATES[t.state], dict(t.params), reason=str(t.user_attrs.get("sbsearch.reason", ""))))
        return records

    def finished_records(self) -> dict[int, dict[str, Any]]:
        """The stored records of finished trials, by number."""
        return {t.number: t.user_attrs[_RECORD] for t in self.trials()
                if t.state.is_finished() and _RECORD in t.user_attrs}

    def peers(self, exclude: int, metric: str) -> list[PeerTrial]:
        """Every other counted trial with its metrics after each epoch, for the pruning rule."""
        return [as_peer(t, metric) for t in self.counted() if t.number != exclude]

    def views(self, spec: Spec) -> list[TrialView]:
        """The counted trials as the progress display shows them."""
        views = []
        for t in self.counted():
            known = self._finished_views.get(t.number)
            if known is not None:
                views.append(known)
                continue
            record = t.user_attrs.get(_RECORD)
            value = t.value if t.state == OptunaState.COMPLETE else (
                t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
            epoch = record["epochs_run"] if record else (max(t.intermediate_values) if t.intermediate_values else 0)
            label = (config_from_params(spec, {**{p.name: None for p in spec.space}, **t.params}).label()
                     if t.params else "")
            views.append(TrialView(t.number, _STATES.get(t.state, str(t.state)), value, epoch, label))
            if t.state.is_finished():
                self._finished_views[t.number] = views[-1]
        return views

    def learning_curves(self) -> dict[int, dict[int, float]]:
        """The objective after each epoch (what the trial reported to the pruner), by trial number."""
        return {t.number: dict(t.intermediate_values) for t in self.counted()}

    def param_importances(self, seed: int = 0) -> dict[str, float]:
        """Optuna's fANOVA importance of each searched parameter for the objective (they sum to 1)."""
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        return dict(optuna.importance.get_param_importances(self.study, evaluator=evaluator))

    def failures_in_a_row(self, since: float) -> list[FrozenTrial]:
        """The failed trials at the end of the list of trials finished after ``since`` (a timestamp),
        the last one first."""
        done = [t for t in self.counted() if t.datetime_complete is not None and t.datetime_complete.timestamp() >= since]
        done.sort(key=lambda t: t.datetime_complete)  # type: ignore[arg-type,return-value]
        run: list[FrozenTrial] = []
        for t in reversed(done):
            if t.state != OptunaState.FAIL:
                break
            run.append(t)
        return run

    def stop_reason(self, since: float) -> str | None:
        """Why the run of the sweep that began at ``since`` stopped itself, if it did."""
        value = self.study.user_attrs.get(_STOPPED)
        return str(value["reason"]) if value and value.get("since") == since else None

    def stop(self, since: float, reason: str) -> None:
        self.study.set_user_attr(_STOPPED, {"since": since, "reason": reason})

    # -- writing

    def set_attr(self, number: int, key: str, value: Any) -> None:
        self.storage.set_trial_user_attr(self.trial(number)._trial_id, key, value)

    def tell(self, trial: optuna.Trial | int, value: float | None = None, state: OptunaState | None = None) -> None:
        try:
            self.study.tell(trial, value, state=state)
        except RuntimeError as exc:
            # The grid sampler calls study.stop() when the grid is used up, which only works inside
            # study.optimize; the trial's state is stored before that, and the budget ends the sweep.
            if "Study.stop" not in str(exc):
                raise

    def finish(self, trial: optuna.Trial | int, record: TrialRecord, metric: str) -> None:
        """Store a finished trial's record and its outcome for the sampler: the objective when it completed."""
        number = trial if isinstance(trial, int) else trial.number
        self.set_attr(number, _RECORD, asdict(record))
        value = record.final.get(metric)
        if record.state == TrialState.COMPLETE and value is not None and math.isfinite(value):
            self.tell(trial, value)
        else:
            self.tell(trial, state=OptunaState.PRUNED if record.state == TrialState.PRUNED else OptunaState.FAIL)

    def report_epoch(self, trial: optuna.Trial, epoch: int, metric: str, metrics: Mapping[str, float],
                     history: list[dict[str, float]]) -> None:
        """A running trial's metrics after ``epoch``: the objective for Optuna, the rest for peers' rules."""
        # The history first: a process killed between the two writes then leaves an epoch whose metrics are all
        # stored, which the sweep's clean-up (``_bury``) reports for it, rather than an objective without them.
        history.append(trial_level(metrics))
        trial.set_user_attr(_HISTORY, history)
        value = metrics.get(metric)
        if value is not None and math.isfinite(value):
            trial.report(value, epoch)

    def claim(self, trial: optuna.Trial, slot: int, pid: int) -> None:
        """Mark ``trial`` as run by this store's owner (worker ``pid``) in ``slot``."""
        trial.set_user_attr(_SLOT, slot)
        trial.set_user_attr(_OWNER, self.owner)
        trial.set_user_attr(_PID, pid)
        trial.set_user_attr(_FOLDER, self.folder)

    def mark_interrupted(self, number: int, why: str, searched: set[str], requeue: bool = True) -> None:
        """Record an unfinished trial as failed-and-interrupted (not counted) and, with ``requeue``, queue
        its configuration again in its slot, so that the sweep re-runs it. A trial interrupted before it
        had every searched value gives its slot back instead. Under the claim lock: no process takes the
        slot in between."""
        with self.lock.held():
            self._interrupt(self.trial(number), why, searched, requeue)

    def _interrupt(self, frozen: FrozenTrial, why: str, searched: set[str], requeue: bool) -> bool:
        if frozen.user_attrs.get(_INTERRUPTED):
            return False  # another process took it over already
        try:
            self.storage.set_trial_user_attr(frozen._trial_id, _INTERRUPTED, why)
        except UpdateFinishedTrialError:  # it finished meanwhile (its owner records outside the claim lock)
            return False
        with contextlib.suppress(Exception):  # already finished by a racing writer
            self.tell(frozen.number, state=OptunaState.FAIL)
        if requeue and frozen.params and searched <= frozen.params.keys():
            self.study.enqueue_trial(dict(frozen.params), user_attrs={_REQUEUED_FROM: frozen.number, _SLOT: slot_of(frozen)})
        return True

    def take_over(self, stale_after: float, searched: set[str], earlier_runs: bool = True,
                  requeue: bool = True) -> list[FrozenTrial]:
        """Interrupt (and with ``requeue``, queue again) the running trials whose owner is gone
        (``orphaned``); returns them. Under the claim lock, where every claimed trial has its owner."""
        with self.lock.held():
            taken = []
            for t in self.orphaned(stale_after, earlier_runs):
                who = t.user_attrs.get(_OWNER) or "an earlier run of the sweep"
                if self._interrupt(t, f"its process ({who}) stopped while it ran", searched, requeue):
                    taken.append(t)
            return taken

    def taken_over(self, trial: optuna.Trial) -> bool:
        """Whether another process took the running ``trial`` over (this one was silent too long)."""
        return bool(self.storage.get_trial(trial._trial_id).user_attrs.get(_INTERRUPTED))

    # -- owners

    def heartbeat(self) -> None:
        """This owner's sign of life, which keeps its running trials its own."""
        self.study.set_user_attr(_ALIVE + self.owner, time.time())

    @contextlib.contextmanager
    def heartbeats(self, stale_after: float) -> Iterator[None]:
        """Say this owner is alive now and every ``stale_after / 4`` seconds (at most 10) while the block runs."""
        self.heartbeat()
        done = threading.Event()

        def beat() -> None:
            while not done.wait(min(10.0, stale_after / 4)):
                with contextlib.suppress(Exception):  # a storage that hiccups: the next beat is soon
                    self.heartbeat()

        thread = threading.Thread(target=beat, name="sbsearch-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def running(self) -> list[FrozenTrial]:
        return [t for t in self.counted() if t.state == OptunaState.RUNNING]

    def running_of(self, owner: str, pids: set[int | None] | None = None) -> list[FrozenTrial]:
        """The running trials of ``owner`` (of its workers ``pids`` only, when given)."""
        return [t for t in self.running() if t.user_attrs.get(_OWNER, "") == owner
                and (pids is None or t.user_attrs.get(_PID) in pids)]

    def adopt_earlier_runs(self) -> list[int]:
        """Make this owner the owner of the running trials an earlier run of the sweep in this folder left
        (or that have no owner): a backend that carries them on itself (Ray restores its experiment) keeps
        them from being taken over by other processes, and can tell them from those of live processes."""
        with self.lock.held():
            adopted = []
            for t in self.running():
                owner = t.user_attrs.get(_OWNER, "")
                if owner != self.owner and (not owner or (self.folder and t.user_attrs.get(_FOLDER) == self.folder)):
                    self.storage.set_trial_user_attr(t._trial_id, _OWNER, self.owner)
                    adopted.append(t.number)
            return adopted

    def orphaned(self, stale_after: float, earlier_runs: bool = True) -> list[FrozenTrial]:
        """Running trials whose owner is gone (call it under the claim lock: a trial is claimed, and gets
        its owner, under it): an owner silent for more than ``stale_after`` seconds (the
        machines' clocks must agree to well within that) and, with ``earlier_runs``, an earlier run of the
        sweep in this store's folder (the caller holds that folder's lock, so it is not running) or one
        from before owners were recorded."""
        alive = {k[len(_ALIVE):]: float(v) for k, v in self.study.user_attrs.items() if k.startswith(_ALIVE)}
        now = time.time()
        gone = []
        for t in self.running():
            owner = str(t.user_attrs.get(_OWNER, ""))
            if owner == self.owner:
                continue
            earlier = not owner or (self.folder and t.user_attrs.get(_FOLDER) == self.folder)
            if (earlier_runs and earlier) or (not earlier and now - alive.get(owner, 0.0) > stale_after):
                gone.append(t)
        return gone


def stored_history(t: FrozenTrial) -> list[dict[str, float]]:
    """A trial's metrics per epoch as the store has them: its record's, or, while it runs (or after its
    process died), what it reported epoch by epoch (``sb_score.<layer>`` left out)."""
    stored = t.user_attrs.get(_RECORD)
    history = stored["history"] if stored and stored.get("history") else t.user_attrs.get(_HISTORY, [])
    return list(history)


def as_peer(t: FrozenTrial, metric: str, number: int | None = None) -> PeerTrial:
    """A stored trial as a pruning rule sees it, under ``number`` when given (its slot in the fixed schedule)."""
    history = stored_history(t)
    curve = {epoch + 1: trial_level(metrics) for epoch, metrics in enumerate(history)}
    for epoch, value in t.intermediate_values.items():  # a trial recorded without its history
        curve.setdefault(epoch, {metric: value})
    final = t.value if t.state == OptunaState.COMPLETE else None
    return PeerTrial(t.number if number is None else number, _STATES.get(t.state, t.state.name), curve, final)


# --- slots: the order in which trials are claimed ---------------------------------------------------------
# Every trial holds a slot: 0, 1, 2, ... in the order trials are claimed (a trial requeued after an
# interruption keeps its original's). The fixed schedule lets the trial in slot n sample only once the
# earlier slots allow it (see backends.optuna).


def slot_of(t: FrozenTrial | optuna.Trial) -> int:
    return int(t.user_attrs.get(_SLOT, t.number))


def slots(trials: list[FrozenTrial]) -> dict[int, FrozenTrial]:
    """The trial holding each slot; an interrupted trial has given its slot to its requeued copy."""
    return {slot_of(t): t for t in trials if not t.user_attrs.get(_INTERRUPTED)}


def free_slot(held: Mapping[int, FrozenTrial]) -> int:
    """The lowest slot that no trial holds: one an interruption freed before the trial had values, else the next."""
    return next(n for n in range(len(held) + 1) if n not in held)


def requeued(t: FrozenTrial | optuna.Trial) -> bool:
    """Whether ``t`` re-runs an interrupted trial (and so has its values already)."""
    return _REQUEUED_FROM in t.user_attrs


class SlotIndex:
    """``slots(trials)``, the number of counted trials and the first free slot, kept from one claim to
    the next by one worker: the trials at the front of the list that have finished keep their slot and
    state, so each look reads only the trials after them. Walking all n trials several times per claim
    made a sweep O(n²) (about 45 ms per claim at 10,000 trials). Optuna refuses any change to a finished
    trial (``UpdateFinishedTrialError``), so what the index holds stays true.
    """

    def __init__(self) -> None:
        self.forget()

    def forget(self) -> None:
        self.settled = 0  # trials[:settled] have finished and are indexed
        self._counted = 0
        self._held: dict[int, FrozenTrial] = {}
        self.prefix = 0  # slots 0..prefix-1 are held by indexed (finished) trials

    def look(self, trials: list[FrozenTrial]) -> tuple[dict[int, FrozenTrial], int, int]:
        """(``slots(trials)``, how many of ``trials`` count, ``free_slot`` of them)."""
        n = self.settled
        while n < len(trials) and trials[n].state.is_finished():
            if not trials[n].user_attrs.get(_INTERRUPTED):
                self._held[slot_of(trials[n])] = trials[n]
                self._counted += 1
            n += 1
        self.settled = n
        while self.prefix in self._held:
            self.prefix += 1
        tail = trials[n:]
        held = {**self._held, **slots(tail)}  # later trials hold a slot over earlier ones, as in ``slots``
        counted = self._counted + len(self.counted_tail(tail))
        return held, counted, next(s for s in range(self.prefix, len(held) + 1) if s not in held)

    @staticmethod
    def counted_tail(tail: list[FrozenTrial]) -> list[FrozenTrial]:
        return [t for t in tail if not t.user_attrs.get(_INTERRUPTED) and t.state != OptunaState.WAITING]
