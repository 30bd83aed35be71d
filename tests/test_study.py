"""The sweep's store (``sbsearch.study``): one place for trials, which several processes share.

The end-to-end tests start a real PostgreSQL server (``tests.pg``) and real ``sbsearch run`` processes
that share it as ``--storage``, each with its own ``--out`` and working directory, and log to one
PostgreSQL-backed MLflow store.
"""

from __future__ import annotations

import collections
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from sbsearch.cli import main
from sbsearch.errors import SbsearchError
from sbsearch.spec import parse_spec
from sbsearch.study import Store, redact, storage_url
from tests.conftest import tiny_spec_dict
from tests.pg import postgres_server  # noqa: F401 - a fixture

RUNNING = optuna.trial.TrialState.RUNNING


# --- where the trials are -----------------------------------------------------------------------------


def test_the_default_storage_is_the_journal_under_out_and_a_relative_journal_path_is_made_absolute(tmp_path: Path) -> None:
    spec = parse_spec(tiny_spec_dict())
    assert storage_url(spec, tmp_path) == str(tmp_path / "optuna.journal")
    os.chdir(tmp_path)
    shared = parse_spec(tiny_spec_dict(search__storage="shared/sweep.journal"))
    assert storage_url(shared, tmp_path / "out") == str(tmp_path / "shared" / "sweep.journal")
    rdb = parse_spec(tiny_spec_dict(search__storage="postgresql://me:secret@db:5432/sweeps"))
    assert storage_url(rdb, tmp_path) == "postgresql://me:secret@db:5432/sweeps"


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://me:secret@db:5432/sweeps", "postgresql://me:***@db:5432/sweeps"),
    ("mysql+pymysql://me:p@ss@db/sweeps", "mysql+pymysql://me:***@db/sweeps"),
    ("postgresql://me@db/sweeps", "postgresql://me@db/sweeps"),
    ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
    ("/runs/optuna.journal", "/runs/optuna.journal"),
])
def test_a_storage_password_is_never_shown(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_the_password_stays_out_of_the_output_folder_and_mlflow(tmp_path: Path) -> None:
    from sbsearch.sweep import public_spec

    spec = parse_spec(tiny_spec_dict(search__storage="postgresql://me:secret@db/sweeps"))
    assert public_spec(spec)["search"]["storage"] == "postgresql://me:***@db/sweeps"
    assert spec.search.storage == "postgresql://me:secret@db/sweeps"  # the run itself still connects with it


def test_a_storage_of_unknown_kind_or_out_of_reach_is_one_line_and_exit_2(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_dict()), encoding="utf-8")
    for storage, words, exit_code in [
            ("redis://127.0.0.1/0", "--storage: must be a journal file's path or an RDB URL", 2),
            ("postgresql://nobody:pw@127.0.0.1:1/none",
             "search.storage: the storage postgresql://nobody:***@127.0.0.1:1/none must be reachable", 1)]:
        code = main(["run", str(path), "--out", str(tmp_path / "out"), "--storage", storage])
        err = capsys.readouterr().err.strip()
        assert code == exit_code and words in err and len(err.splitlines()) == 1, err
        assert "pw" not in err.replace("pw@", "")  # the password is not echoed
        assert not (tmp_path / "out" / "mlflow.db").exists()  # refused before anything was logged or written
        assert not (tmp_path / "out" / "spec.yaml").exists()


# --- one sweep, several processes -----------------------------------------------------------------------


def test_the_slot_index_agrees_with_a_full_look_as_trials_finish_are_interrupted_and_requeued(tmp_path: Path) -> None:
    from sbsearch.study import SlotIndex, free_slot, slots

    store = Store.open(parse_spec(tiny_spec_dict()), tmp_path, "maximize", owner="me")
    index = SlotIndex()

    def agree() -> None:
        trials = store.trials()
        held, counted, free = index.look(trials)
        assert (held, counted, free) == (slots(trials), len(store.counted(trials)), free_slot(held))

    for n in range(6):
        trial = store.study.ask()
        store.claim(trial, n, os.getpid())
        trial.suggest_float("x", 0, 1)
        agree()
        if n != 3:  # trial 3 keeps running
            store.tell(trial, 0.5)
        agree()
    store.mark_interrupted(3, "test", {"x"})  # its copy waits in slot 3
    agree()
    store.study.sampler = optuna.samplers.RandomSampler(seed=0)
    copy = store.study.ask()
    store.tell(copy, 0.7)
    agree()
    # What the index relies on: a finished trial never changes, even under a late take-over.
    store.mark_interrupted(5, "a late take-over of a finished trial", {"x"})
    assert not store.trial(5).user_attrs.get("sbsearch.interrupted") and store.trial(5).state.is_finished()
    agree()


def test_a_process_with_another_spec_cannot_join_the_sweep(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'trials.db'}"
    raw = tiny_spec_dict(search__storage=url)
    from sbsearch.sweep import public_spec

    spec = parse_spec(raw)
    Store.open(spec, tmp_path / "a", "maximize", owner="a", resolved=public_spec(spec))
    same_but_more_trials = parse_spec({**raw, "search": {**raw["search"], "trials": 9}})
    Store.open(same_but_more_trials, tmp_path / "b", "maximize", owner="b", resolved=public_spec(same_but_more_trials))
    other = parse_spec({**raw, "train": {**raw["train"], "lr": 0.5}})
    with pytest.raises(SbsearchError, match=r"started with a different spec \(it differs at train.lr\)"):
        Store.open(other, tmp_path / "c", "maximize", owner="c", resolved=public_spec(other))


def test_running_trials_of_a_silent_process_are_orphaned_and_of_a_live_one_are_not(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'trials.db'}"
    spec = parse_spec(tiny_spec_dict(search__storage=url))
    alive, dead = (Store.open(spec, tmp_path / name, "maximize", owner=name) for name in ("alive", "dead"))
    for store in (alive, dead):
        store.heartbeat()
        store.claim(store.study.ask(), 0, os.getpid())
    me = Store.open(spec, tmp_path / "me", "maximize", owner="me")
    assert me.orphaned(stale_after=60) == []
    dead.study.set_user_attr("sbsearch.alive.dead", time.time() - 61)  # its last heartbeat, a minute ago
    assert [t.user_attrs["sbsearch.owner"] for t in me.orphaned(stale_after=60)] == ["dead"]
    # A run in the dead process's own folder takes its trials over at once: that folder's lock says it is gone.
    again = Store.open(spec, tmp_path / "dead", "maximize", owner="dead-again")
    dead.study.set_user_attr("sbsearch.alive.dead", time.time())
    assert [t.user_attrs["sbsearch.owner"] for t in again.orphaned(stale_after=60)] == ["dead"]
    assert again.orphaned(stale_after=60, earlier_runs=False) == []


def test_a_restored_driver_adopts_its_folders_running_trials_and_no_one_elses(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'trials.db'}"
    spec = parse_spec(tiny_spec_dict(search__storage=url))
    killed, other = (Store.open(spec, tmp_path / name, "maximize", owner=name) for name in ("killed", "other"))
    for store in (killed, other):
        store.claim(store.study.ask(), 0, os.getpid())
    restored = Store.open(spec, tmp_path / "killed", "maximize", owner="restored")
    assert restored.adopt_earlier_runs() == [0]
    assert [t.number for t in restored.running_of("restored")] == [0]
    assert [t.number for t in restored.running_of("other")] == [1]
    other.heartbeat()
    assert restored.orphaned(stale_after=60, earlier_runs=True) == []  # its own now; the other's owner is alive


def _write_spec(folder: Path, raw: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _start(folder: Path, spec: Path, storage: str, tracking: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "sbsearch.cli", "run", str(spec), "--out", str(folder / "out"),
                             "--storage", storage, "--tracking-uri", tracking, *extra],
                            cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_for(condition: Any, procs: list[subprocess.Popen[str]], timeout: float = 300) -> None:
    end = time.time() + timeout
    while not condition():
        for p in procs:
            assert p.poll() is None, f"a process ended early:\n{p.communicate()[0][-3000:]}"
        assert time.time() < end, "timed out"
        time.sleep(0.2)


def _check_one_sweep(store: Store, trials: int, tracking: str, processes: int) -> list[optuna.trial.FrozenTrial]:
    """The sweep's trial count is met exactly, every trial ran once, MLflow has a parent per process and
    one child per trial; returns the counted trials."""
    counted = store.counted()
    assert len(counted) == trials and all(t.state.is_finished() for t in counted), [(t.number, t.state) for t in counted]
    numbers = [t.number for t in counted]
    assert len(set(numbers)) == trials
    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name("tiny").experiment_id
    runs = client.search_runs([experiment], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sbsearch.role") == "sweep"]
    assert len(parents) == processes and {r.data.tags["sbsearch.study_id"] for r in parents} == {store.study_id}
    children = collections.Counter(int(r.data.tags["sbsearch.trial_number"]) for r in runs
                                   if r.data.tags.get("sbsearch.role") == "trial")
    assert children == collections.Counter(numbers), (children, numbers)
    return counted


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["optuna", "ray"])
def test_processes_on_postgresql_share_one_sweep_and_a_killed_one_is_taken_over(
        tmp_path: Path, postgres_server: Any, backend: str) -> None:  # noqa: F811 - the fixture
    """Two ``sbsearch run`` processes (each with its own folder, working directory and, with Ray, its own
    local Ray) share a PostgreSQL storage; one is killed with SIGKILL mid-trial, a third joins later."""
    storage, tracking = postgres_server(f"trials_{backend}"), postgres_server(f"mlflow_{backend}")
    trials, epochs = 8, 12  # a warm 3-epoch trial lasts 0.4 s, a narrow window to catch one mid-trial
    raw = tiny_spec_dict(search__trials=trials, search__stale_after=5, train__epochs=epochs, search__sampler="tpe",
                         search__backend=backend)
    folders = [tmp_path / name for name in ("a", "b", "c")]
    specs = [_write_spec(f, raw) for f in folders]
    # MLflow creates its tables on first use; two processes doing that at once on an empty database collide.
    MlflowClient(tracking_uri=tracking).search_experiments()
    first, second = (_start(f, s, storage, tracking) for f, s in zip(folders[:2], specs[:2]))
    spec = parse_spec({**raw, "search": {**raw["search"], "storage": storage}})
    _wait_for(lambda: Store.load(spec, tmp_path) is not None, [first, second])
    store = Store.load(spec, tmp_path)
    assert store is not None
    first_folder = f"@{(folders[0] / 'out').resolve()}"

    def of_first() -> list[optuna.trial.FrozenTrial]:
        return [t for t in store.running() if str(t.user_attrs.get("sbsearch.folder", "")).endswith(first_folder)]

    killed: list[int] = []

    def first_is_mid_trial() -> bool:  # after one trial of the sweep finished, so the sampler has seen one
        killed[:] = [t.number for t in of_first() if t.intermediate_values and len(t.intermediate_values) < epochs]
        return bool(killed) and any(t.state.is_finished() for t in store.counted())

    _wait_for(first_is_mid_trial, [first, second])
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    third = _start(folders[2], specs[2], storage, tracking)
    outputs = [p.communicate(timeout=600)[0] for p in (second, third)]
    for p, out in zip((second, third), outputs):
        assert p.returncode == 0, out[-3000:]
    counted = _check_one_sweep(store, trials, tracking, processes=3)
    # The killed process's trial was run again, by another process, with the same values.
    interrupted = [t for t in store.trials() if t.user_attrs.get("sbsearch.interrupted")]
    assert killed and {t.number for t in interrupted} >= set(killed), (killed, [(t.number, t.state) for t in store.trials()])
    reruns = {t.user_attrs.get("sbsearch.requeued_from"): t for t in counted if "sbsearch.requeued_from" in t.user_attrs}
    for t in interrupted:
        assert reruns[t.number].params == t.params
    # Each folder's trials.csv lists the whole sweep.
    for folder in folders[1:]:
        with open(folder / "out" / "trials.csv", newline="", encoding="utf-8") as handle:
            assert sorted(int(r["number"]) for r in csv.DictReader(handle)) == sorted(t.number for t in counted)
