"""The training recipe of the ``train`` section: learning-rate schedules, Nesterov momentum, label smoothing,
mixed precision, channels_last and torch.compile, and the spec's rules for them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.optim import lr_scheduler
from torch.optim.optimizer import register_optimizer_step_pre_hook

from sbsearch.data import Split, load_dataset, prepare
from sbsearch.errors import SpecError
from sbsearch.models import build_model
from sbsearch.space import config_from_params
from sbsearch.spec import parse_spec
from sbsearch.strategies import STRATEGIES, ModelDesc, apply_model_edits
from sbsearch.trainer import TrainPlan, TrainResult, replica_seeds, train
from sbsearch.trial import build_trial, train_plan
from tests.conftest import strategy_settings, tiny_spec_dict

DESC = ModelDesc("small_cnn", (1, 8, 8), 10, width=4)


@pytest.fixture(scope="module")
def digits() -> Split:
    split = prepare(load_dataset("digits", 0.25, 0), STRATEGIES["expansion"].defaults())
    return replace(split, x_train=split.x_train[:256], y_train=split.y_train[:256], x_val=split.x_val[:128],
                   y_val=split.y_val[:128])


@contextlib.contextmanager
def optimizer_steps() -> Iterator[list[tuple[torch.optim.Optimizer, list[float]]]]:
    """Every optimiser step taken inside: the optimiser and each param group's learning rate as it stepped."""
    steps: list[tuple[torch.optim.Optimizer, list[float]]] = []

    def record(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        steps.append((optimizer, [group["lr"] for group in optimizer.param_groups]))

    handle = register_optimizer_step_pre_hook(record)
    try:
        yield steps
    finally:
        handle.remove()


# --- learning-rate schedules ---------------------------------------------------------------------


def reference_rates(schedule: str, warmup: float, lrs: list[float], total: int) -> list[list[float]]:
    """Each group's rate at each of ``total`` steps, from PyTorch's own schedulers on a stand-in optimiser."""
    params = [torch.zeros(1, requires_grad=True) for _ in lrs]
    optimizer = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)])
    warm = int(warmup * total)
    scheduler: lr_scheduler.LRScheduler
    if schedule == "onecycle":
        scheduler = lr_scheduler.OneCycleLR(optimizer, max_lr=lrs, total_steps=total, pct_start=warmup,
                                            anneal_strategy="linear", cycle_momentum=False, div_factor=100)
    elif schedule == "cosine" and warm:
        scheduler = lr_scheduler.SequentialLR(optimizer, [lr_scheduler.LinearLR(optimizer, 0.01, total_iters=warm),
                                                          lr_scheduler.CosineAnnealingLR(optimizer, total - warm)], [warm])
    elif schedule == "cosine":
        scheduler = lr_scheduler.CosineAnnealingLR(optimizer, total)
    else:
        scheduler = lr_scheduler.LinearLR(optimizer, 0.01, total_iters=warm)
    rates = []
    for _ in range(total):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("schedule, warmup, max_steps", [("cosine", 0.0, None), ("cosine", 0.25, None),
                                                         ("onecycle", None, None), ("onecycle", 0.1, 7),
                                                         ("constant", 0.5, None)])
def test_the_trainer_steps_the_rates_pytorch_schedules(digits: Split, schedule: str, warmup: float | None,
                                                       max_steps: int | None) -> None:
    # The first-layer bias trains at 5x the rate: its group must keep that ratio at every step.
    desc = apply_model_edits(DESC, strategy_settings(controls__bias_lr_multiplier=5.0))
    plan = TrainPlan(epochs=3, batch_size=64, lr=0.02, schedule=schedule, warmup=warmup, max_steps=max_steps,
                     replicas=2, replica_mode="batched", score=False)
    with optimizer_steps() as steps:
        train(digits, desc, plan)
    total = max_steps or 3 * 256 // 64
    expected = reference_rates(schedule, 0.3 if warmup is None else warmup, [0.02, 0.1], total)
    applied = [rates for _, rates in steps]
    assert len(applied) == total
    for step, (got, want) in enumerate(zip(applied, expected)):
        assert got == pytest.approx(want, rel=1e-12), f"step {step}"
        assert got[1] == pytest.approx(5 * got[0], rel=1e-12)
    assert min(rate for rate, _ in applied) < 0.5 * 0.02  # the rate did move


# --- Nesterov, label smoothing -------------------------------------------------------------------


def test_nesterov_reaches_torch_sgd(digits: Split) -> None:
    finals = {}
    for nesterov in (False, True):
        with optimizer_steps() as steps:
            finals[nesterov] = train(digits, DESC, TrainPlan(epochs=1, optimizer="sgd", momentum=0.9, lr=0.05,
                                                             nesterov=nesterov, score=False)).weights[0]
        optimizer = steps[0][0]
        assert isinstance(optimizer, torch.optim.SGD)
        assert optimizer.defaults["nesterov"] is nesterov and optimizer.defaults["momentum"] == 0.9
    assert not torch.equal(finals[False]["0.weight"], finals[True]["0.weight"])


@torch.no_grad()
def replica_outputs(weights: dict[str, torch.Tensor], seed: int, x: torch.Tensor) -> torch.Tensor:
    return torch.func.functional_call(build_model(DESC, seed), weights, (x,))  # type: ignore[no-any-return]


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_label_smoothing_shapes_the_training_loss_only(digits: Split, smoothing: float) -> None:
    # One full-batch step: the training loss is that of the initial weights on the whole training set,
    # the validation loss that of the trained weights.
    plan = TrainPlan(epochs=1, batch_size=256, optimizer="sgd", lr=0.5, label_smoothing=smoothing, replicas=2,
                     replica_mode="batched", score=False)
    result = train(digits, DESC, plan)
    seeds = replica_seeds(plan.seed, plan.replicas)
    train_losses = [F.cross_entropy(replica_outputs(dict(build_model(DESC, seed).named_parameters()), seed,
                                                    digits.x_train), digits.y_train, label_smoothing=smoothing)
                    for seed in seeds]
    val_losses = [F.cross_entropy(replica_outputs(weights, seed, digits.x_val), digits.y_val)
                  for weights, seed in zip(result.weights, seeds)]
    assert result.final["train_loss"] == pytest.approx(float(sum(train_losses)) / 2, rel=1e-5)
    assert result.final["val_loss"] == pytest.approx(float(sum(val_losses)) / 2, rel=1e-5)


# --- precision, memory format --------------------------------------------------------------------


def digits_trial(**options: Any) -> TrainResult:
    changes = {f"train__{key}": value for key, value in options.items()}
    spec = parse_spec(tiny_spec_dict(space={}, train__device="cpu", train__replicas=1, train__epochs=3, **changes))
    split, desc = build_trial(spec, config_from_params(spec, {}))
    return train(split, desc, train_plan(spec))


def test_bf16_autocast_trains_the_cnn_as_well_as_fp32() -> None:
    # One replica: under the replica stack's vmap, CPU autocast leaves convolutions in fp32 (a PyTorch
    # limitation), and this test means to see bf16 convolutions.
    fp32, bf16 = digits_trial(), digits_trial(precision="bf16")
    assert bf16.final["train_loss"] != fp32.final["train_loss"]  # bf16 arithmetic did happen
    assert abs(bf16.final["val_accuracy"] - fp32.final["val_accuracy"]) <= 0.05
    assert bf16.final["val_accuracy"] > 0.8
    assert all(w.dtype == torch.float32 for w in bf16.weights[0].values())  # the parameters stay fp32


def test_channels_last_trains_the_same_model(digits: Split) -> None:
    plain, last = (train(digits, DESC, TrainPlan(epochs=2, replicas=2, replica_mode="batched", lr=0.01,
                                                 channels_last=flag, score=False))
                   for flag in (False, True))
    assert plain.final == pytest.approx(last.final, rel=1e-4, abs=1e-5)
    # The second conv (4 input channels; with one, both layouts are the same) trained in channels_last.
    assert last.weights[0]["2.weight"].is_contiguous(memory_format=torch.channels_last)
    assert not plain.weights[0]["2.weight"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow  # compiling takes 20-60 s on two cores
@pytest.mark.parametrize("replicas", [1, 2])
def test_compiled_network_trains_as_eager(digits: Split, replicas: int) -> None:
    # replicas=2 compiles the batched replica stack (vmap over functional_call), 1 a plain module.
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    eager, compiled = (train(digits, DESC, TrainPlan(epochs=2, replicas=replicas, replica_mode="batched", lr=0.01,
                                                     compile=flag, score=False))
                       for flag in (False, True))
    assert counters["stats"]["unique_graphs"] > graphs  # dynamo did compile the network
    assert compiled.final == pytest.approx(eager.final, rel=1e-3, abs=1e-4)


# --- the spec's rules ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"train__precision": "fp16", "train__device": "cpu"},
         "train.precision: fp16 needs a CUDA device (train.device: cpu trains on the CPU here; use bf16), but got 'fp16'"),
        ({"train__nesterov": True, "train__optimizer": "adam"},
         "train.nesterov: applies to train.optimizer: sgd only, and train.optimizer is adam, but got True"),
        ({"train__nesterov": True, "train__optimizer": "sgd", "train__momentum": 0.0},
         "train.nesterov: needs train.momentum > 0, but got True"),
        ({"train__label_smoothing": 0.1, "data__dataset": "fn_smooth", "model__name": "mlp", "space": {}},
         "train.label_smoothing: applies to classification only, and data set 'fn_smooth' is regression, but got 0.1"),
        ({"train__schedule": "cosine", "train__optimizer": "lbfgs"},
         ("train.schedule: needs a minibatch optimiser (train.optimizer lbfgs takes one full-batch step per epoch), "
         "but got 'cosine'")),
        ({"train__precision": "bf16", "train__optimizer": "lbfgs"},
         ("train.precision: needs a minibatch optimiser (train.optimizer lbfgs takes one full-batch step per epoch), "
         "but got 'bf16'")),
        ({"train__schedule": "onecycle", "train__warmup": 0.0},
         "train.warmup: must be > 0 under train.schedule: onecycle (its rising part; null = 0.3), but got 0.0"),
        ({"train__channels_last": True, "data__dataset": "fn_smooth", "model__name": "mlp", "space": {}},
         "train.channels_last: applies to image inputs only, and data set 'fn_smooth' has vector inputs, but got True"),
        ({"train__label_smoothing": 1.0}, "train.label_smoothing: must be in [0, 1), but got 1.0"),
        ({"train__schedule": "linear"}, "train.schedule: must be a registered name, but got 'linear' (allowed: constant, cosine, onecycle)"),
    ],
)
def test_a_recipe_the_trainer_cannot_follow_is_one_line(changes: dict[str, Any], expected: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(tiny_spec_dict(**changes))
    assert [str(p) for p in info.value.problems] == [expected]


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks cuda here")
def test_fp16_is_refused_where_auto_means_the_cpu() -> None:
    with pytest.raises(SpecError, match=r"^train.precision: fp16 needs a CUDA device \(train.device: auto trains"):
        parse_spec(tiny_spec_dict(train__precision="fp16"))


def test_the_recipe_defaults_change_nothing() -> None:
    train_section = parse_spec(tiny_spec_dict()).train
    assert (train_section.schedule, train_section.warmup, train_section.nesterov, train_section.label_smoothing,
            train_section.precision, train_section.channels_last, train_section.compile) == \
        ("constant", None, False, 0.0, "fp32", False, False)
