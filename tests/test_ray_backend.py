"""The Ray Tune backend end to end: real Ray (a local one, and a three-node cluster on this machine),
real MLflow (SQLite), the real journal study, and `sbsearch run` as users start it, in a subprocess.

Each test keeps token authentication on with a token of its own (``RAY_AUTH_MODE=token``), and stops
only the Ray processes it started: the local Ray ends with its driver, the cluster with
``Cluster.shutdown()`` in a helper process the test owns.
"""

from __future__ import annotations

import collections
import csv
import glob
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

# Trials of a few seconds: long enough to interrupt one, short enough for CI on two cores.
_SPEC = {
    "name": "ray-tiny",
    "seed": 0,
    "data": {"dataset": "digits", "batch_size": 32},
    "model": {"name": "small_cnn", "width": 8, "depth": 1},
    "train": {"epochs": 2, "lr": 0.01},
    "space": {"expansion": {"factor": [1, 2]}, "norm": {"kind": ["none", "batch"]}},
    "search": {"backend": "ray", "sampler": "random", "trials": 4, "parallel": 2, "pruner": "median",
               "warmup_epochs": 0},
    "ray": {"max_failures": 3},
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=_TOKEN, PYTHONUNBUFFERED="1")
    return env


_TOKEN = secrets.token_hex(16)


def _write_spec(tmp_path: Path, **changes: Any) -> Path:
    spec = json.loads(json.dumps(_SPEC))
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        spec[section][key] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def _sbsearch(spec: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "sbsearch.cli", "run", str(spec), "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            cwd=out.parent, start_new_session=True)


def _finish(proc: subprocess.Popen[str], timeout: float = 240) -> tuple[int, str]:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"sbsearch did not finish in {timeout} s:\n{output[-3000:]}")
    return proc.returncode, output


def _wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float = 180) -> str:
    """Read the sweep's output until a line holds ``needle``; returns what was read."""
    seen = []
    deadline = time.time() + timeout
    assert proc.stdout is not None
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"no line with {needle!r}:\n{''.join(seen)[-3000:]}")


def _records(out: Path) -> dict[str, Any]:
    """Every record of the sweep in ``out``: MLflow runs, the Optuna study, trials.csv and Ray's state."""
    from mlflow.tracking import MlflowClient
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(str(_SPEC["name"]))
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    storage = JournalStorage(JournalFileBackend(str(out / "optuna.journal")))
    study_id = storage.get_study_id_from_name(str(_SPEC["name"]))
    optuna_trials = [t for t in storage.get_all_trials(study_id) if not t.user_attrs.get("sbsearch.interrupted")]
    with open(out / "trials.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    ray_trials = []
    for experiment in glob.glob(str(out / "ray" / "experiment*")):  # one more per resume that adds trials
        state_file = max(glob.glob(str(Path(experiment) / "experiment_state-*.json")))
        ray_trials += [(json.loads(t[0]), json.loads(t[1])) for t in json.loads(Path(state_file).read_text())["trial_data"]]
    return {"client": client, "runs": runs, "optuna": optuna_trials, "csv": rows, "ray": ray_trials}


def _check_agreement(out: Path, trials: int) -> dict[str, Any]:
    """One parent run, one child run per trial with params, per-epoch metrics and a state tag that
    agrees with the Optuna record, trials.csv and the trial's last Ray result."""
    r = _records(out)
    parents = [run for run in r["runs"] if run.data.tags.get("sbsearch.role") == "sweep"]
    children = [run for run in r["runs"] if run.data.tags.get("sbsearch.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    numbers = collections.Counter(run.data.tags["sbsearch.trial_number"] for run in children)
    assert len(children) == trials and set(numbers.values()) == {1}, numbers
    mlflow_state = {int(run.data.tags["sbsearch.trial_number"]): run.data.tags["sbsearch.state"] for run in children}
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert {"expansion.factor", "norm.kind"} <= set(run.data.params)
        history = r["client"].get_metric_history(run.info.run_id, "val_accuracy")
        assert sorted(m.step for m in history) == list(range(1, len(history) + 1)), "an epoch was logged twice"
        assert len(history) >= 1, (run.data.tags, {t.number: t.user_attrs for t in r["optuna"]})
    optuna_state = {t.number: t.state.name for t in r["optuna"]}
    csv_state = {int(row["number"]): row["state"] for row in r["csv"]}
    ray_state = {cfg["config"]["sbsearch.number"]: meta["last_result"].get("sbsearch_state") for cfg, meta in r["ray"]}
    assert mlflow_state == optuna_state == csv_state, (mlflow_state, optuna_state, csv_state)
    assert {n: s for n, s in ray_state.items() if s is not None} == {n: mlflow_state[n] for n in ray_state if ray_state[n]}
    assert len(mlflow_state) == trials and set(mlflow_state.values()) <= {"COMPLETE", "PRUNED"}
    return r


@pytest.mark.slow
def test_tiny_sweep_gives_one_parent_and_one_child_per_trial(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    # Ray's ASHA scheduler stops trials from outside them: the driver records those PRUNED.
    spec = _write_spec(tmp_path, train__epochs=3, search__pruner="asha", search__warmup_epochs=1)
    code, output = _finish(_sbsearch(spec, out))
    assert code == 0, output[-3000:]
    assert "4 trials in" in output
    _check_agreement(out, trials=4)


@pytest.mark.slow
@pytest.mark.timeout(600)  # two sweeps, or a three-node cluster, on two cores
def test_interrupted_sweep_resumes_without_duplicate_runs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    spec = _write_spec(tmp_path, train__epochs=6, search__trials=6, search__pruner="none")
    first = _sbsearch(spec, out)
    _wait_for_line(first, " COMPLETE ")  # one trial done, others running
    os.kill(first.pid, signal.SIGINT)  # Ctrl-C: Tune saves its state and the CLI exits 130
    code, output = _finish(first)
    assert code == 130, output[-3000:]
    assert "run the same command to resume" in output
    done_before = {row["number"] for row in _records(out)["csv"]}
    assert 1 <= len(done_before) < 6

    code, output = _finish(_sbsearch(spec, out))
    assert code == 0, output[-3000:]
    r = _check_agreement(out, trials=6)
    assert done_before <= {row["number"] for row in r["csv"]}, "a finished trial was lost"
    assert all(meta["last_result"].get("sbsearch_state") == "COMPLETE" for _, meta in r["ray"])

    # Asked for more trials, the finished sweep runs only the new ones, as a second Ray experiment.
    code, output = _finish(_sbsearch(spec, out, "--trials", "8"))
    assert code == 0, output[-3000:]
    r = _check_agreement(out, trials=8)
    assert sorted(p.name for p in (out / "ray").glob("experiment*")) == ["experiment", "experiment-2"]
    assert len(r["ray"]) == 8 and all(meta["last_result"].get("sbsearch_state") == "COMPLETE" for _, meta in r["ray"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_driver_resumes_without_losing_or_duplicating(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    spec = _write_spec(tmp_path, train__epochs=6, search__trials=6, search__pruner="none")
    first = _sbsearch(spec, out)
    _wait_for_line(first, " COMPLETE ")
    # The machine goes away: the driver, its local Ray and the trials die at once, with no chance to save.
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(60)
    before = _finished_params(out)
    assert 1 <= len(before) < 6
    code, output = _finish(_sbsearch(spec, out))
    assert code == 0, output[-3000:]
    r = _check_agreement(out, trials=6)
    after = {int(row["number"]): row for row in r["csv"]}
    for number, params in before.items():  # finished trials are kept as they were
        assert number in after and after[number]["state"] == "COMPLETE", (number, after)
        assert {k: str(v) for k, v in params.items()} == {k: after[number][k] for k in params}


def _finished_params(out: Path) -> dict[int, dict[str, Any]]:
    """Finished trials of a sweep whose driver was killed (no trials.csv yet): number -> parameters."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(out / "optuna.journal")))
    study_id = storage.get_study_id_from_name(str(_SPEC["name"]))
    return {t.number: t.params for t in storage.get_all_trials(study_id) if t.state.name == "COMPLETE"}


_CLUSTER = """
import os
import sys
import time
from ray.cluster_utils import Cluster
# The head takes no trials (the driver and the sweep's board live there); each worker takes one.
cluster = Cluster(initialize_head=True, connect=False, head_node_args={
    "num_cpus": 0, "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
cluster.wait_for_nodes()
print(cluster.address, flush=True)

def training_actor(node):
    # A trial runs in an actor process started by the node's raylet, titled ray::<class>.<method>
    # while a method runs: ray::<class>.train while the trial trains (not while it starts or stops).
    raylet = node.all_processes["raylet"][0].process.pid
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            title = open(f"/proc/{pid}/cmdline").read().split("\\0")[0].strip()
        except (OSError, IndexError, ValueError):
            continue
        if parent == raylet and title.startswith("ray::") and title.endswith(".train"):
            return title
    return None

for line in sys.stdin:
    if line.strip() == "kill":
        # Kill the node only while a trial runs on it, so that trial has to fail and run again.
        deadline, busy = time.time() + 120, None
        while busy is None and time.time() < deadline:
            busy = training_actor(workers[1])
            time.sleep(0 if busy else 0.02)
        cluster.remove_node(workers[1], allow_graceful=False)
        print(f"killed {busy}" if busy else "killed an idle node", flush=True)
    else:
        break
cluster.shutdown()
print("down", flush=True)
"""


@pytest.fixture
def cluster() -> Any:
    """A head and two one-CPU workers, with token authentication, in a process this test owns."""
    proc = subprocess.Popen([sys.executable, "-c", _CLUSTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=_env())
    assert proc.stdout is not None and proc.stdin is not None
    address = proc.stdout.readline().strip()
    assert address, "the cluster did not start"
    try:
        yield address, proc
    finally:
        if proc.poll() is None:
            with __import__("contextlib").suppress(BrokenPipeError):
                proc.stdin.write("quit\n")
                proc.stdin.flush()
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.slow
@pytest.mark.timeout(600)  # two sweeps, or a three-node cluster, on two cores
def test_sweep_survives_losing_a_worker_node(tmp_path: Path, cluster: Any) -> None:
    address, helper = cluster
    out = tmp_path / "out"
    out.mkdir()
    # The median rule decides inside the trials, from their peers' curves on the driver's node.
    spec = _write_spec(tmp_path, train__epochs=6, search__trials=6, search__warmup_epochs=2)
    sweep = _sbsearch(spec, out, "--address", address)
    _wait_for_line(sweep, " COMPLETE ")
    helper.stdin.write("kill\n")  # once a trial runs on the second worker
    helper.stdin.flush()
    killed = helper.stdout.readline().strip()
    assert killed.startswith("killed ray::"), killed
    code, output = _finish(sweep)
    assert code == 0, output[-3000:]
    r = _check_agreement(out, trials=6)
    # The trial on the lost node failed there and was run again on the other worker.
    assert sum(meta["num_failures"] for _, meta in r["ray"]) >= 1, (killed, output[-3000:])


@pytest.mark.slow
def test_a_sweep_without_an_address_starts_its_own_ray_beside_a_running_cluster(tmp_path: Path, cluster: Any) -> None:
    # Someone else's cluster runs on this machine, with a token this sweep does not hold: plain
    # ray.init() would try to join it (and fail on the token, or worse, succeed and use its nodes).
    out = tmp_path / "out"
    out.mkdir()
    spec = _write_spec(tmp_path, train__epochs=1, search__trials=2)
    proc = subprocess.Popen([sys.executable, "-m", "sbsearch.cli", "run", str(spec), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**_env(), "RAY_AUTH_TOKEN": secrets.token_hex(16)}, cwd=tmp_path,
                            start_new_session=True)
    code, output = _finish(proc, timeout=180)
    assert code == 0, output[-3000:]
    _check_agreement(out, trials=2)


@pytest.mark.slow
def test_bad_address_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    code, output = _finish(_sbsearch(_write_spec(tmp_path), out, "--address", "127.0.0.1:1"), timeout=120)
    assert code == 1, output[-3000:]
    assert "error: ray.address: a Ray head must listen at 127.0.0.1:1" in output


# --- fast checks of the pieces, without starting Ray ----------------------------------------------------


def test_board_gives_rules_every_other_trial_and_forgets_a_lost_attempt() -> None:
    from sbsearch.backends.ray import _Board
    from sbsearch.pruning import PeerTrial

    # Trial 0 finished in an earlier run of the sweep: its record is there from the start.
    board = _Board([PeerTrial(0, "COMPLETE", {1: {"val_accuracy": 0.9}}, 0.9)], {0: {"number": 0, "state": "COMPLETE"}})
    assert board.record(0) == {"number": 0, "state": "COMPLETE"}
    board.report(1, 1, {"val_accuracy": 0.5})
    board.report(1, 2, {"val_accuracy": 0.6})
    peers = board.report(2, 1, {"val_accuracy": 0.7})
    assert {p.number: p.state for p in peers} == {0: "COMPLETE", 1: "RUNNING"}
    board.report(1, 1, {"val_accuracy": 0.4})  # trial 1 runs again after its node was lost
    assert dict(board.trials[1].history) == {1: {"val_accuracy": 0.4}}
    board.finish({"number": 1, "state": "PRUNED", "history": [{"val_accuracy": 0.4, "sb_score.conv1": 0.1}]}, 0.4)
    assert board.trials[1].state == "PRUNED" and board.trials[1].final is None
    assert dict(board.trials[1].history) == {1: {"val_accuracy": 0.4}}, "per-layer scores stay out"
    assert board.record(1) is not None and board.record(2) is None


def test_a_trial_ray_stopped_is_pruned_unless_it_ran_every_epoch(tmp_path: Path) -> None:
    from sbsearch.backends.ray import _record_of_stopped_trial
    from sbsearch.spec import parse_spec
    from sbsearch.trial import SweepContext

    spec = parse_spec({**_SPEC, "train": {"epochs": 3}, "search": {**_SPEC["search"], "pruner": "asha"}})
    ctx = SweepContext(spec, tmp_path, None, None)
    result = {"epoch": 1, "val_accuracy": 0.5, "training_iteration": 1, "time_total_s": 2.0, "config/x": 1}
    pruned = _record_of_stopped_trial(ctx, 4, {"norm.kind": "none"}, result, error=False)
    assert (pruned.state, pruned.epochs_run, pruned.final) == ("PRUNED", 1, {"val_accuracy": 0.5})
    assert pruned.reason.startswith("asha:")
    done = _record_of_stopped_trial(ctx, 4, {}, {**result, "epoch": 3}, error=False)
    assert done.state == "COMPLETE"
    failed = _record_of_stopped_trial(ctx, 4, {}, result, error=True)
    assert failed.state == "FAIL" and "4 time(s)" in failed.reason  # ray.max_failures: 3, plus the first try


def test_ray_schedulers_need_the_ray_backend() -> None:
    from sbsearch.errors import SpecError
    from sbsearch.spec import parse_spec

    with pytest.raises(SpecError) as caught:
        parse_spec({**_SPEC, "search": {**_SPEC["search"], "backend": "optuna", "pruner": "ray_hyperband"}})
    assert "search.pruner: is a Ray Tune scheduler and needs search.backend: ray" in str(caught.value)
    spec = parse_spec({**_SPEC, "ray": {"gpus_per_trial": 0.25, "cpus_per_trial": 2}})
    assert (spec.ray.gpus_per_trial, spec.ray.cpus_per_trial) == (0.25, 2.0)
    with pytest.raises(SpecError, match="ray.gpus_per_trial"):
        parse_spec({**_SPEC, "ray": {"gpus_per_trial": 1.5}})


@pytest.mark.slow
@pytest.mark.parametrize("limit", [0, 2])
def test_diverging_ray_trials_fail_alone_and_too_many_in_a_row_stop_the_sweep(tmp_path: Path, limit: int) -> None:
    spec = _write_spec(tmp_path, train__optimizer="sgd", train__lr=1e30, search__trials=4, search__parallel=1,
                       search__max_consecutive_failures=limit, search__pruner="none")
    code, output = _finish(_sbsearch(spec, tmp_path / "out"))
    with open(tmp_path / "out" / "trials.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert all(r["state"] == "FAIL" and r["reason"].startswith("diverged") for r in rows), rows
    if limit == 0:  # every trial fails on its own; the sweep goes on to its budget
        assert code == 0, output[-3000:]
        assert len(rows) == 4
    else:
        assert code == 1, output[-3000:]
        assert "error: search.max_consecutive_failures: the sweep stopped after 2 failed trials in a row" in output
        assert 2 <= len(rows) < 4


def test_only_the_latest_attempt_of_a_trial_speaks_for_it() -> None:
    # A process that lost its node may still reach the board while Ray runs the trial again elsewhere.
    from sbsearch.backends.ray import _Board

    board = _Board([], {7: {"number": 7, "state": "FAIL", "history": []}})
    assert board.begin(7) == (0, {"number": 7, "state": "FAIL", "history": []}), "an earlier run's record stands"
    first, none = board.begin(3)
    assert (first, none) == (1, None)
    assert board.report(3, 1, {"val_accuracy": 0.5}, first) == []  # no other trial has reported
    # The first attempt's process dies while it fails: its FAIL is not taken as the trial's outcome.
    assert board.finish({"number": 3, "state": "FAIL", "history": []}, None, first)
    second, none = board.begin(3)
    assert (second, none) == (2, None) and board.record(3) is None
    # The dying first attempt can no longer report or finish the trial; the second one can.
    assert board.report(3, 2, {"val_accuracy": 0.6}, first) is None
    assert not board.finish({"number": 3, "state": "COMPLETE", "history": [{}]}, 0.9, first)
    assert board.record(3) is None
    assert board.finish({"number": 3, "state": "COMPLETE", "history": [{"val_accuracy": 0.9}]}, 0.9, second)
    # A process that dies after its trial COMPLETED: the next attempt reports that record, no training.
    assert board.begin(3) == (0, board.record(3)) and board.record(3)["state"] == "COMPLETE"
    # The driver's own records (attempt 0) always stand.
    assert board.finish({"number": 4, "state": "PRUNED", "history": []}, None)
    assert board.begin(4)[0] == 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_stops_the_driver_like_ctrl_c_and_the_sweep_resumes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    spec = _write_spec(tmp_path, train__epochs=3, search__trials=3, search__pruner="none")
    first = _sbsearch(spec, out)
    _wait_for_line(first, " COMPLETE ")  # one trial done, another running, one waiting
    os.kill(first.pid, signal.SIGTERM)  # what Kubernetes sends: Tune saves its state, the CLI exits 128 + 15
    code, output = _finish(first)
    assert code == 143, output[-3000:]
    assert "run the same command to resume" in output
    done_before = {row["number"] for row in _records(out)["csv"]}
    assert 1 <= len(done_before) < 3

    code, output = _finish(_sbsearch(spec, out))
    assert code == 0, output[-3000:]
    r = _check_agreement(out, trials=3)  # one MLflow child run per trial, none twice
    assert done_before <= {row["number"] for row in r["csv"]}, "a finished trial was lost"
