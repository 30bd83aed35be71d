"""Faults caused for real: crashing, diverging and out-of-memory trials, killed controllers and
workers, Ctrl-C, parallel writers and a tracking store that goes away. Nothing finished is lost."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from rich.console import Console
from torch import nn

from sbsearch import models
from sbsearch.study import Store
from sbsearch.spec import parse_spec
from sbsearch.strategies import ModelDesc
from sbsearch.sweep import relog_sweep, run_sweep
from tests.conftest import tiny_spec_dict
from tests.test_sweep import check_records_agree

QUIET = Console(file=open(os.devnull, "w"))


class _Faulty(nn.Module):
    """A small CNN that fails in a chosen way for expanded (16x16) inputs."""

    def __init__(self, desc: ModelDesc, fault: str) -> None:
        super().__init__()
        self.net = models.MODELS["small_cnn"](desc)
        self.fault = fault

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == 16:
            if self.fault == "raise":
                raise ValueError("this layer cannot take 16x16 inputs")
            if self.fault == "oom":
                torch.empty(2**42)  # 16 TiB: the allocator really refuses it
        return self.net(x)


@pytest.fixture
def faulty_model(monkeypatch: pytest.MonkeyPatch) -> None:
    for fault in ("raise", "oom"):
        monkeypatch.setitem(models.MODELS, f"faulty_{fault}", lambda d, f=fault: _Faulty(d, f))
        monkeypatch.setitem(models.INPUT_KINDS, f"faulty_{fault}", ("image",))


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "trials.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize(("fault", "reason"), [("raise", "ValueError: this layer cannot take 16x16 inputs"),
                                               ("oom", "out of memory: ")])
def test_a_crashing_trial_fails_alone_and_the_sweep_goes_on(tmp_path: Path, faulty_model: None, fault: str, reason: str) -> None:
    raw = tiny_spec_dict(model__name=f"faulty_{fault}", search__sampler="grid", search__trials=4,
                         space__expansion__fill=0.0, space__norm__kind=["none", "batch"])
    result = run_sweep(parse_spec(raw), tmp_path / "out", console=QUIET)
    states = {r.number: (r.params["expansion.factor"], r.state, r.reason) for r in result.records}
    assert sorted(s for _, s, _ in states.values()) == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"]
    for factor, state, why in states.values():
        assert (state == "FAIL") == (factor == 2)
        assert (state != "FAIL") or why.startswith(reason)
    check_records_agree(tmp_path / "out", raw, 4)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    failed = [r for r in client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
              if r.data.tags.get("sbsearch.state") == "FAIL"]
    assert len(failed) == 2
    for run in failed:
        assert run.info.status == "FAILED" and run.data.tags["sbsearch.reason"].startswith(reason)
        assert "traceback.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert [r["reason"].startswith(reason) for r in _rows(tmp_path / "out") if r["state"] == "FAIL"] == [True, True]


@pytest.mark.parametrize(("on_divergence", "state"), [("fail", "FAIL"), ("prune", "PRUNED")])
def test_a_diverging_trial_is_recorded_as_the_spec_says(tmp_path: Path, on_divergence: str, state: str) -> None:
    raw = tiny_spec_dict(train__optimizer="sgd", train__lr=1e30, search__trials=2, search__on_divergence=on_divergence)
    result = run_sweep(parse_spec(raw), tmp_path / "out", console=QUIET)
    assert [r.state for r in result.records] == [state, state]
    assert all(r.reason.startswith("diverged: training loss became") for r in result.records)
    check_records_agree(tmp_path / "out", raw, 2)


def test_too_many_failures_in_a_row_stop_the_sweep_with_a_clear_line(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec_dict(train__optimizer="sgd", train__lr=1e30, search__trials=6,
                                                  search__max_consecutive_failures=2)), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "sbsearch.cli", "run", str(spec), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: search.max_consecutive_failures: the sweep stopped after 2 failed trials in a row (last: trial 1, diverged:")
    assert [r["state"] for r in _rows(tmp_path / "out")] == ["FAIL", "FAIL"]


def _sweep_cmd(spec: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "sbsearch.cli", "run", str(spec), "--out", str(out)]


def _finished(out: Path, name: str = "tiny") -> int:
    store = Store.load(parse_spec({"name": name}), out)
    if store is None:
        return 0
    study = store.study
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return sum(t.state in done and not t.user_attrs.get("sbsearch.interrupted") for t in study.get_trials())


def _wait_for(condition: Any, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not condition():
        assert time.time() < end, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_sigkilled_controller_resumes_without_losing_or_duplicating(tmp_path: Path) -> None:
    raw = tiny_spec_dict(search__trials=6, search__parallel=2, train__epochs=4)
    spec, out = tmp_path / "s.yaml", tmp_path / "out"
    spec.write_text(yaml.safe_dump(raw), encoding="utf-8")
    proc = subprocess.Popen(_sweep_cmd(spec, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: _finished(out) >= 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {t.number: t.params for t in Store.load(parse_spec(raw), out).study.get_trials()
              if t.state == optuna.trial.TrialState.COMPLETE}
    rerun = subprocess.run(_sweep_cmd(spec, out), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    study = Store.load(parse_spec(raw), out).study
    after = {t.number: t.params for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE}
    assert before.items() <= after.items()  # finished trials kept as they were
    interrupted = [t for t in study.get_trials() if t.user_attrs.get("sbsearch.interrupted")]
    requeued = [t for t in study.get_trials() if "sbsearch.requeued_from" in t.user_attrs]
    # An interrupted trial that had its values is run again with them; one still waiting for its slot's
    # turn to sample (the fixed schedule) had none, and gives its slot back instead.
    searched = {p.name for p in parse_spec(raw).searched}
    with_values = [t.number for t in interrupted if searched <= t.params.keys()]
    assert sorted(t.user_attrs["sbsearch.requeued_from"] for t in requeued) == sorted(with_values)
    for t in requeued:  # the interrupted configuration ran again
        assert t.params == study.trials[t.user_attrs["sbsearch.requeued_from"]].params
    check_records_agree(out, raw, 6)  # exactly 6 counted trials, one MLflow child each


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(tmp_path: Path) -> None:
    raw = tiny_spec_dict(search__trials=4, train__epochs=4)
    spec, out = tmp_path / "s.yaml", tmp_path / "out"
    spec.write_text(yaml.safe_dump(raw), encoding="utf-8")
    proc = subprocess.Popen(_sweep_cmd(spec, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _finished(out) >= 1)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "run the same command to resume" in stdout
    assert (out / "trials.csv").exists()
    rerun = subprocess.run(_sweep_cmd(spec, out), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    check_records_agree(out, raw, 4)


@pytest.mark.slow
def test_a_killed_worker_process_fails_its_trial_and_the_sweep_completes(tmp_path: Path) -> None:
    raw = tiny_spec_dict(search__trials=5, search__parallel=2, train__epochs=12)
    spec, out = tmp_path / "s.yaml", tmp_path / "out"
    spec.write_text(yaml.safe_dump(raw), encoding="utf-8")
    proc = subprocess.Popen(_sweep_cmd(spec, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def running_worker() -> int | None:
        store = Store.load(parse_spec(raw), out)
        if store is None:
            return None
        study = store.study
        for t in study.get_trials():
            if t.state == optuna.trial.TrialState.RUNNING and t.intermediate_values and "sbsearch.pid" in t.user_attrs:
                return int(t.user_attrs["sbsearch.pid"])
        return None

    _wait_for(lambda: running_worker() is not None)
    victim = running_worker()
    assert victim is not None and victim != proc.pid
    os.kill(victim, signal.SIGKILL)  # what the kernel's OOM killer does
    assert proc.wait(timeout=600) == 0
    rows = _rows(out)
    died = [r for r in rows if r["reason"].startswith("worker process died")]
    assert len(rows) == 5 and len(died) == 1 and died[0]["state"] == "FAIL"
    check_records_agree(out, raw, 5)


@pytest.mark.slow
def test_four_parallel_writers_share_one_storage(tmp_path: Path) -> None:
    raw = tiny_spec_dict(search__trials=8, search__parallel=4, train__epochs=1, search__pruner="median",
                         search__warmup_epochs=0)
    result = run_sweep(parse_spec(raw), tmp_path / "out", console=QUIET)
    assert len(result.records) == 8
    assert not [r for r in result.records if "locked" in r.reason]
    check_records_agree(tmp_path / "out", raw, 8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_mlflow(db: Path, port: int, artifacts: Path) -> subprocess.Popen[bytes]:
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", f"sqlite:///{db}", "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1", "--default-artifact-root", artifacts.as_uri()],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            assert server.poll() is None, "mlflow server exited"
            return False

    _wait_for(up, timeout=120)
    return server


def _stop(server: subprocess.Popen[bytes]) -> None:
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()


class _KillsServerOnSecondTrial(nn.Module):
    calls = 0
    server_pid = 0

    def __init__(self, desc: ModelDesc) -> None:
        super().__init__()
        self.net = models.MODELS["small_cnn"](desc)
        type(self).calls += 1
        if type(self).calls == 2:  # trial 1 builds its (one) model: the tracking server dies under the sweep
            os.killpg(type(self).server_pid, signal.SIGKILL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.slow
def test_a_store_that_goes_away_mid_sweep_loses_nothing_and_relog_catches_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setitem(models.MODELS, "server_killer", _KillsServerOnSecondTrial)
    monkeypatch.setitem(models.INPUT_KINDS, "server_killer", ("image",))
    db, port = tmp_path / "server.db", _free_port()
    server = _start_mlflow(db, port, tmp_path / "artifacts")
    _KillsServerOnSecondTrial.server_pid = server.pid
    uri = f"http://127.0.0.1:{port}"
    raw = tiny_spec_dict(model__name="server_killer", search__trials=3, train__epochs=1, train__replicas=1)
    try:
        result = run_sweep(parse_spec(raw), tmp_path / "out", tracking_uri=uri, console=QUIET)
    finally:
        if server.poll() is None:
            _stop(server)
    assert [r.state for r in result.records] == ["COMPLETE"] * 3  # training went on without the store
    assert result.unlogged == [1, 2] and result.tracking_error
    assert len(_rows(tmp_path / "out")) == 3
    server = _start_mlflow(db, port, tmp_path / "artifacts")
    try:
        written, present = relog_sweep(tmp_path / "out")
        assert (written, present) == (2, 1)
        assert relog_sweep(tmp_path / "out") == (0, 3)  # idempotent
        client = MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
        children = [r for r in runs if r.data.tags.get("sbsearch.role") == "trial"]
        assert sorted(r.data.tags["sbsearch.trial_number"] for r in children) == ["0", "1", "2"]
        assert all(r.data.tags["sbsearch.state"] == "COMPLETE" for r in children)
        assert all(len(client.get_metric_history(r.info.run_id, "val_accuracy")) == 1 for r in children)
    finally:
        _stop(server)
