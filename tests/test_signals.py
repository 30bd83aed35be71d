"""Stopping a sweep with the signals job schedulers send: SIGTERM (Slurm, Kubernetes, ``timeout``) stops
it as cleanly as Ctrl-C, and SIGINT works even when the shell started the sweep with it ignored.

Each test runs the real CLI in a subprocess, stops it, checks the exit code and that trials.csv was
written, then runs the same command again and checks that nothing was lost or run twice.
"""

from __future__ import annotations

import collections
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

from sbsearch.study import Store
from sbsearch.spec import parse_spec
from tests.conftest import tiny_spec_dict
from tests.test_sweep import check_records_agree

# Once a worker is warm a 3-epoch trial of this size takes 0.4 s, too short for the poller below to see it
# running on a fast machine; 40 epochs (about 5 s warm) leave it a wide window on any machine.
_TRIALS = 3
_EPOCHS = 40


def _spec(tmp_path: Path, parallel: int) -> tuple[dict[str, Any], Path]:
    raw = tiny_spec_dict(search__trials=_TRIALS, search__parallel=parallel, train__epochs=_EPOCHS)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return raw, path


def _sweep_cmd(spec: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "sbsearch.cli", "run", str(spec), "--out", str(out)]


def _trials(raw: dict[str, Any], out: Path) -> list[optuna.trial.FrozenTrial]:
    store = Store.load(parse_spec(raw), out)
    return [] if store is None else store.trials()


def _wait_until_a_trial_runs_after_one_finished(raw: dict[str, Any], out: Path, proc: subprocess.Popen[str],
                                                timeout: float = 300) -> None:
    end = time.time() + timeout
    while True:
        trials = [t for t in _trials(raw, out) if not t.user_attrs.get("sbsearch.interrupted")]
        if (any(t.state.is_finished() for t in trials)
                and any(t.state == optuna.trial.TrialState.RUNNING and t.intermediate_values for t in trials)):
            return
        assert proc.poll() is None, f"the sweep ended before it could be stopped:\n{proc.communicate()[0][-3000:]}"
        assert time.time() < end, "timed out waiting for a running trial"
        time.sleep(0.2)


def _check_stopped_then_resumed(raw: dict[str, Any], spec: Path, out: Path, code: int, output: str,
                                expected_code: int) -> None:
    """The stopped sweep said how to resume and wrote trials.csv; the same command then completes it
    with every slot run once and one MLflow child run per finished trial."""
    assert code == expected_code, output[-3000:]
    assert "run the same command to resume" in output
    assert (out / "trials.csv").exists()
    rerun = subprocess.run(_sweep_cmd(spec, out), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    trials = _trials(raw, out)
    counted = [t for t in trials if not t.user_attrs.get("sbsearch.interrupted")]
    # A trial the signal stopped runs again: none is recorded as failed (these never fail on their own).
    assert [t.state for t in counted] == [optuna.trial.TrialState.COMPLETE] * _TRIALS, [t.state for t in counted]
    slots = collections.Counter(int(t.user_attrs.get("sbsearch.slot", t.number)) for t in counted)
    assert sorted(slots) == list(range(_TRIALS)) and set(slots.values()) == {1}, slots
    interrupted = sorted(t.number for t in trials if t.user_attrs.get("sbsearch.interrupted"))
    # Each worker stopped its own trial (at the epoch's end): the controller had to kill none.
    assert not [t.number for t in trials if "killed" in t.user_attrs.get("sbsearch.interrupted", "")]
    requeued = sorted(t.user_attrs["sbsearch.requeued_from"] for t in trials
                      if "sbsearch.requeued_from" in t.user_attrs)
    assert requeued == [n for n in interrupted if trials[n].params], (interrupted, requeued)
    check_records_agree(out, raw, _TRIALS)  # one active MLflow child run per counted trial


def _ignores_sigint_once_started(pid: int, timeout: float = 30) -> bool:
    """Whether the process ``pid`` ignores SIGINT right after it has become the sweep (its ``exec``)."""
    proc = Path(f"/proc/{pid}")
    end = time.time() + timeout
    while (proc / "cmdline").read_bytes().split(b"\0")[0] != sys.executable.encode():
        assert time.time() < end, "the sweep did not start"
        time.sleep(0.01)
    ignored = next(line for line in (proc / "status").read_text().splitlines() if line.startswith("SigIgn:"))
    return bool(int(ignored.split()[1], 16) & (1 << (signal.SIGINT - 1)))


def _communicate(proc: subprocess.Popen[str], timeout: float = 180) -> tuple[int, str]:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the sweep did not stop within {timeout} s of the signal:\n{output[-3000:]}")
    return proc.returncode, output


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_stops_a_sweep_in_a_thread_like_ctrl_c(tmp_path: Path) -> None:
    raw, spec = _spec(tmp_path, parallel=1)
    out = tmp_path / "out"
    proc = subprocess.Popen(_sweep_cmd(spec, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    _wait_until_a_trial_runs_after_one_finished(raw, out, proc)
    proc.send_signal(signal.SIGTERM)  # what Kubernetes sends to the container's first process
    code, output = _communicate(proc)
    _check_stopped_then_resumed(raw, spec, out, code, output, expected_code=128 + signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_to_the_process_group_stops_a_sweep_in_worker_processes(tmp_path: Path) -> None:
    raw, spec = _spec(tmp_path, parallel=2)
    out = tmp_path / "out"
    proc = subprocess.Popen(_sweep_cmd(spec, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    _wait_until_a_trial_runs_after_one_finished(raw, out, proc)
    # Slurm and `timeout` signal every process of the job: the workers get SIGTERM as well as the controller.
    os.killpg(proc.pid, signal.SIGTERM)
    code, output = _communicate(proc)
    _check_stopped_then_resumed(raw, spec, out, code, output, expected_code=128 + signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigint_stops_a_sweep_that_a_script_started_in_the_background(tmp_path: Path) -> None:
    raw, spec = _spec(tmp_path, parallel=2)
    out = tmp_path / "out"
    # A non-interactive shell starts `cmd &` with SIGINT ignored, and the sweep's processes inherit that.
    script = '"$@" & echo $!; wait $!'
    proc = subprocess.Popen(["bash", "-c", script, "bash", *_sweep_cmd(spec, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.strip().isdigit(), first + proc.communicate()[0]
    sweep = int(first)
    assert _ignores_sigint_once_started(sweep)  # the way it was started, not sbsearch, decides this
    _wait_until_a_trial_runs_after_one_finished(raw, out, proc)
    os.kill(sweep, signal.SIGINT)  # `kill -INT`, to the sweep alone
    code, output = _communicate(proc)
    _check_stopped_then_resumed(raw, spec, out, code, output, expected_code=128 + signal.SIGINT)
