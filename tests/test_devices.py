"""Trials that share a machine's GPUs: which GPU each worker slot gets (``search.devices``,
``search.trials_per_gpu``), what the spec refuses, that a spawned worker really trains under its own
``CUDA_VISIBLE_DEVICES``, and that a trial that runs out of GPU memory fails alone.

This machine has no GPU: the assignment is a pure function of a device list, the spec's check of the GPU
count goes through ``spec._cuda_device_count``, and the sweeps train on the CPU with a device list handed
to the backend in place of ``worker_devices``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import torch
from rich.console import Console

import sbsearch.spec
from sbsearch import models
from sbsearch.backends import optuna as optuna_backend
from sbsearch.backends.optuna import DEVICE_ATTR, assign_devices, worker_devices
from sbsearch.errors import SpecError
from sbsearch.spec import parse_spec, spec_to_dict
from sbsearch.strategies import ModelDesc
from sbsearch.study import Store, same_sweep_changes
from sbsearch.sweep import run_sweep
from tests.conftest import tiny_spec_dict

QUIET = Console(file=open(os.devnull, "w"))

# --- which GPU each worker slot gets ---------------------------------------------------------------


def test_workers_are_spread_evenly_and_no_gpu_gets_more_than_trials_per_gpu() -> None:
    assert assign_devices(5, ["0", "1", "2"], 2) == ["0", "1", "2", "0", "1"]
    for gpus in (["0"], ["0", "1"], ["2", "5", "7"]):
        for per_gpu in (1, 2, 3):
            for workers in range(1, len(gpus) * per_gpu + 1):
                counts = Counter(assign_devices(workers, gpus, per_gpu))
                assert set(counts) <= set(gpus)
                used = [counts.get(g, 0) for g in gpus]
                assert max(used) - min(used) <= 1 and max(used) <= per_gpu, (workers, gpus, per_gpu, counts)


def test_worker_devices_pick_the_listed_gpus_of_those_this_process_sees() -> None:
    # This process sees three GPUs, physical 4, 6 and 7 (its own CUDA_VISIBLE_DEVICES=4,6,7): index 2 is GPU 7.
    spec = parse_spec(tiny_spec_dict(train__device="cuda", search__parallel=3, search__devices=[2, 0],
                                     search__trials_per_gpu=2))
    assert worker_devices(spec, gpus=["4", "6", "7"]) == ["7", "4", "7"]
    every = parse_spec(tiny_spec_dict(train__device="auto", search__parallel=3))
    assert worker_devices(every, gpus=["4", "6", "7"]) == ["4", "6", "7"]
    assert worker_devices(every, gpus=[]) == [None, None, None], "no GPU: nothing is pinned"
    on_cpu = parse_spec(tiny_spec_dict(train__device="cpu", search__parallel=2, search__devices=[0]))
    assert worker_devices(on_cpu, gpus=["4", "6"]) == [None, None], "trials on the CPU ignore search.devices"


# --- what the spec refuses -------------------------------------------------------------------------


def _problems(monkeypatch: pytest.MonkeyPatch, gpus: int, **changes: object) -> list[str]:
    monkeypatch.setattr(sbsearch.spec, "_cuda_device_count", lambda: gpus)
    try:
        parse_spec(tiny_spec_dict(**changes))
    except SpecError as exc:
        return [line.strip() for line in str(exc).strip().splitlines()]
    return []


def test_more_parallel_trials_than_the_gpus_take_are_refused_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _problems(monkeypatch, 2, search__parallel=3) == [
        ("search.parallel: must be at most 2 on 2 GPU(s) with search.trials_per_gpu 1 (raise it to let more trials "
         "share a GPU), but got 3")]
    assert _problems(monkeypatch, 2, search__parallel=4, search__trials_per_gpu=2) == []
    assert len(_problems(monkeypatch, 2, search__parallel=3, search__devices=[1], search__trials_per_gpu=2)) == 1
    # train.device: cuda on a machine without CUDA: the listed devices still bound search.parallel.
    assert len(_problems(monkeypatch, 0, train__device="cuda", search__parallel=3, search__devices=[0, 1])) == 1
    # On the CPU nothing is pinned and nothing bounds search.parallel.
    assert _problems(monkeypatch, 0, search__parallel=3, search__devices=[0]) == []
    assert _problems(monkeypatch, 2, train__device="cpu", search__parallel=8) == []


def test_devices_this_machine_lacks_are_refused_where_cuda_is(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _problems(monkeypatch, 2, search__devices=[0, 2]) == [
        "search.devices: must list GPUs this machine has (indices 0 to 1), but got [0, 2]"]
    assert _problems(monkeypatch, 2, search__devices=[1]) == []
    assert _problems(monkeypatch, 0, search__devices=[0, 3]) == [], "without CUDA the trials run on the CPU"
    assert _problems(monkeypatch, 0, search__devices=[0, 0])[0].startswith("search.devices: must be a non-empty list")
    assert _problems(monkeypatch, 0, search__devices="0,1")[0].startswith("search.devices: must be a list of integers")


def test_the_ray_backend_refuses_the_optuna_device_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = _problems(monkeypatch, 0, search__backend="ray", search__devices=[0], search__trials_per_gpu=2)
    assert [line.split(":")[0] for line in lines] == ["search.devices", "search.trials_per_gpu"]
    assert all("ray.gpus_per_trial" in line for line in lines)
    assert parse_spec(tiny_spec_dict(search__backend="ray", ray__gpus_per_trial=0.25)).ray.gpus_per_trial == 0.25


def test_a_sweep_resumes_on_other_gpus_and_from_a_spec_without_the_keys() -> None:
    old = spec_to_dict(parse_spec(tiny_spec_dict()))
    del old["search"]["devices"], old["search"]["trials_per_gpu"]
    new = spec_to_dict(parse_spec(tiny_spec_dict(search__devices=[1], search__trials_per_gpu=2)))
    assert new["search"]["devices"] == [1]
    assert same_sweep_changes(old, new) == []


# --- workers really train under their own CUDA_VISIBLE_DEVICES -------------------------------------


def _trials(raw: dict[str, object], out: Path) -> list[optuna.trial.FrozenTrial]:
    store = Store.load(parse_spec(raw), out)
    return [] if store is None else store.study.get_trials()


@pytest.mark.slow
def test_each_spawned_worker_trains_under_its_slots_gpu_and_a_restarted_worker_keeps_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Trials train on the CPU; the backend pins its two worker slots to "GPUs" 3 and 5 all the same, and
    # each worker records the CUDA_VISIBLE_DEVICES it runs under with every trial it claims.
    monkeypatch.setattr(optuna_backend, "worker_devices", lambda spec: assign_devices(spec.search.parallel, ["3", "5"], 1))
    # Trials of a few seconds, and enough of them, that the replacement worker (several seconds to start)
    # claims some before the survivor has run them all, however fast the machine.
    raw = tiny_spec_dict(train__device="cpu", train__epochs=40, train__replicas=1, search__trials=10, search__parallel=2)
    out = tmp_path / "out"
    done: list[object] = []
    sweep = threading.Thread(target=lambda: done.append(run_sweep(parse_spec(raw), out, console=QUIET, track=False)))
    sweep.start()
    victim: dict[str, object] = {}
    end = time.time() + 300
    while not victim and time.time() < end and sweep.is_alive():
        running = [t for t in _trials(raw, out) if t.state == optuna.trial.TrialState.RUNNING and t.intermediate_values]
        if running:
            victim = dict(running[0].user_attrs)
            os.kill(int(victim["sbsearch.pid"]), signal.SIGKILL)  # what the kernel's OOM killer does
        time.sleep(0.2)
    sweep.join(600)
    assert victim and done, "a worker was killed and the sweep finished"
    trials = _trials(raw, out)
    device_of_pid = {t.user_attrs["sbsearch.pid"]: t.user_attrs[DEVICE_ATTR] for t in trials}
    assert all(t.user_attrs[DEVICE_ATTR] in ("3", "5") for t in trials)
    assert Counter(device_of_pid.values()) == {"3": 2, "5": 1} or Counter(device_of_pid.values()) == {"3": 1, "5": 2}
    # The worker started in the killed one's place got its slot, and so its GPU.
    first_two = {t.user_attrs["sbsearch.pid"] for t in trials[:2]}
    later = {pid: device for pid, device in device_of_pid.items() if pid not in first_two}
    assert list(later.values()) == [victim[DEVICE_ATTR]]
    assert len({device_of_pid[pid] for pid in first_two}) == 2, "the first two workers have a GPU each"


# --- running out of GPU memory -----------------------------------------------------------------------


class _OutOfMemoryOn16x16(torch.nn.Module):
    """A small CNN whose forward pass raises what the CUDA allocator raises, for expanded (16x16) inputs."""

    def __init__(self, desc: ModelDesc) -> None:
        super().__init__()
        self.net = models.MODELS["small_cnn"](desc)
        self.net.register_forward_pre_hook(self._allocate)

    @staticmethod
    def _allocate(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if args[0].shape[-1] == 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
                                         "capacity of 139.72 GiB of which 1.02 GiB is free.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def test_a_trial_that_runs_out_of_gpu_memory_fails_with_that_reason_and_the_others_complete(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(models.MODELS, "oom_at_16", _OutOfMemoryOn16x16)
    monkeypatch.setitem(models.INPUT_KINDS, "oom_at_16", ("image",))
    raw = tiny_spec_dict(model__name="oom_at_16", space={"expansion": {"factor": [1, 2, 3]}}, train__replicas=1,
                         search__trials=3, search__sampler="grid")
    result = run_sweep(parse_spec(raw), tmp_path / "out", console=QUIET, track=False)
    by_factor = {r.params["expansion.factor"]: r for r in result.records}
    assert sorted(by_factor) == [1, 2, 3]
    assert by_factor[2].state == "FAIL"
    assert by_factor[2].reason.startswith("out of memory: CUDA out of memory. Tried to allocate 20.00 GiB")
    assert [by_factor[k].state for k in (1, 3)] == ["COMPLETE", "COMPLETE"]
