"""The trainer: R replicas of one configuration, trained together, reporting after every epoch.

It knows nothing of Optuna, Ray or MLflow: after each epoch it calls ``report(epoch, metrics)`` and
stops when that returns True.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from sbsearch.data import Split, task_objective
from sbsearch.errors import TrialDiverged
from sbsearch.metrics import per_replica_metric, task_loss
from sbsearch.models import FROZEN_MASK, FROZEN_VALUE, build_model, count_parameters, first_layer_bias_name
from sbsearch.pde import Objective
from sbsearch.replicas import ModeChoice, ReplicaStack, choose_replica_mode, time_replica_modes
from sbsearch.score import default_score_layers, drift_score, replica_score
from sbsearch.spec import TrainSpec
from sbsearch.strategies import (
    BatchInputs,
    InputTransform,
    LossBatch,
    ModelDesc,
    ReplicaStart,
    Settings,
    input_transforms,
    loss_terms,
)

__all__ = ["Report", "TrainPlan", "TrainResult", "device_name", "replica_seeds", "resolve_device", "train"]

Report = Callable[[int, dict[str, float]], bool]
"""``report(epoch, metrics) -> stop?``; epochs count from 1."""


@dataclass(frozen=True)
class TrainPlan(TrainSpec):
    """How to train one trial: the spec's ``train`` section (``trial.train_plan``), and what the trainer needs
    beyond it. ``device`` is resolved (``auto`` becomes ``cpu`` or ``cuda``); ``threads`` is the sweep's to set.

    A plan built by hand (tests, benchmarks) trains one replica on the CPU unless it says otherwise.
    """

    replicas: int = 1
    device: str = "cpu"
    batch_size: int = 64  # the spec's data.batch_size
    seed: int = 0  # the spec's seed
    score: bool = True  # log sb_score / sb_drift after every epoch
    max_steps: int | None = None  # stop after this many optimiser steps, mid-epoch if need be (sbsearch rank)
    test: bool = True  # measure the test split once, after the last epoch of a trial that ran every epoch


@dataclass
class TrainResult:
    """What a finished (or stopped) training produced."""

    epochs_run: int
    final: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    num_parameters: int = 0
    seconds: float = 0.0
    weights: list[dict[str, torch.Tensor]] = field(default_factory=list)
    """Each replica's final parameters by name (detached copies)."""
    test: dict[str, float] = field(default_factory=dict)
    """``test_<metric>`` (mean over replicas), ``test_<metric>_std`` and ``test_loss``, measured once after
    training; empty when the trial stopped early or the data has no test split. Never reported."""
    replicas_ran: str = ""
    """How the replicas ran (``batched``, ``sequential``, ``single``), and under ``train.replica_mode: auto`` the
    per-step times that chose it."""


def replica_seeds(seed: int, replicas: int) -> list[int]:
    """Initialisation seeds of the replicas: distinct, and stable for a given trial seed."""
    return [seed * 1009 + i for i in range(replicas)]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _Replicas(Protocol):
    """What training needs of its R replicas: ``ReplicaStack``, or ``_Single`` for one replica."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...  # (B, ...) -> (R, B, out)

    def parameters(self) -> list[torch.Tensor]: ...

    def train(self, mode: bool = True) -> None: ...

    def replica_weights(self, names: Sequence[str] | None = None) -> list[dict[str, torch.Tensor]]: ...

    def stacked_parameters(self) -> dict[str, torch.Tensor]: ...


class _Single:
    """One model behind the (R, B, out) interface of a replica stack, without any vmap overhead."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(x)
        return out.unsqueeze(0)  # (1, B, out)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def replica_weights(self, names: Sequence[str] | None = None) -> list[dict[str, torch.Tensor]]:
        """As ``ReplicaStack.replica_weights``: a list of one replica's detached parameters."""
        wanted = set(names) if names is not None else None
        return [{name: p.detach().clone() for name, p in self.model.named_parameters()
                 if wanted is None or name in wanted}]

    def stacked_parameters(self) -> dict[str, torch.Tensor]:
        """As ``ReplicaStack.stacked_parameters``: every parameter as a (1, ...) view, trainable through it."""
        return {name: p.unsqueeze(0) for name, p in self.model.named_parameters()}


LBFGS_ITERATIONS = 20
"""Iterations of the one L-BFGS step that makes an epoch (PyTorch's default ``max_iter``)."""

LBFGS_CHUNK = 8192
"""L-BFGS sees the full training set; larger sets are summed over chunks of this many samples."""


def _make_optimizer(params: Sequence[torch.Tensor] | list[dict[str, Any]], plan: TrainPlan) -> torch.optim.Optimizer:
    if plan.optimizer == "lbfgs":
        # No weight_decay argument here: _lbfgs_epoch adds the L2 term to the loss itself.
        return torch.optim.LBFGS(params, lr=plan.lr, max_iter=LBFGS_ITERATIONS, line_search_fn="strong_wolfe")
    # fp16's gradient scaler hands a fused optimiser its scale and inf flag on the device; an unfused
    # one would make the scaler read the flag on the host, a synchronisation every step.
    fused = True if plan.precision == "fp16" else None
    if plan.optimizer == "sgd":
        return torch.optim.SGD(params, lr=plan.lr, momentum=plan.momentum, weight_decay=plan.weight_decay,
                               nesterov=plan.nesterov, fused=fused)
    if plan.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=plan.lr, weight_decay=plan.weight_decay, fused=fused)
    assert plan.optimizer == "adam", plan.optimizer
    return torch.optim.Adam(params, lr=plan.lr, weight_decay=plan.weight_decay, fused=fused)


WARMUP_START = 0.01
"""A warmup rises from this share of the learning rate; onecycle starts there too (its ``div_factor``)."""

ONECYCLE_WARMUP = 0.3
"""onecycle's rising share when ``warmup`` is null: OneCycleLR's default ``pct_start``."""


def _make_schedule(optimizer: torch.optim.Optimizer, plan: TrainPlan,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The plan's learning-rate schedule over every optimiser step of the training, stepped after each
    one; None for a constant rate without warmup.

    PyTorch's schedulers scale each param group's own rate, so the first-layer bias group keeps its
    ``bias_lr_multiplier``. They compute Python floats: stepping one never waits for the device.
    """
    sched = torch.optim.lr_scheduler
    total = plan.epochs * steps_per_epoch if plan.max_steps is None else min(plan.epochs * steps_per_epoch,
                                                                             plan.max_steps)
    if plan.schedule == "onecycle":
        # The user's momentum stays as set: cycling it would override train.momentum (and Adam's betas).
        return sched.OneCycleLR(optimizer, max_lr=[group["lr"] for group in optimizer.param_groups],
                                total_steps=total, pct_start=ONECYCLE_WARMUP if plan.warmup is None else plan.warmup,
                                anneal_strategy="linear", cycle_momentum=False, div_factor=1 / WARMUP_START)
    warm = int((plan.warmup or 0.0) * total)
    rise = sched.LinearLR(optimizer, start_factor=WARMUP_START, total_iters=warm) if warm else None
    if plan.schedule == "constant":
        return rise
    assert plan.schedule == "cosine", plan.schedule
    cosine = sched.CosineAnnealingLR(optimizer, T_max=max(1, total - warm))
    return cosine if rise is None else sched.SequentialLR(optimizer, [rise, cosine], milestones=[warm])


PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""``train.precision`` below fp32: the autocast dtype."""

Forward = Callable[[torch.Tensor], torch.Tensor]


def _forward(net: _Replicas, plan: TrainPlan) -> Forward:
    """``net`` as training and evaluation call it: compiled if the plan asks, on inputs in its memory format,
    under its autocast precision, with fp32 outputs (R, B, out) for the losses and metrics."""
    # Static shapes: the batch, the epoch's last partial batch and the evaluation batches are a handful of
    # shapes, each compiled once (a grad-mode change recompiles too), into faster kernels than dynamic ones.
    call: Forward = torch.compile(net.__call__, dynamic=False) if plan.compile else net
    device_type, dtype = torch.device(plan.device).type, PRECISIONS.get(plan.precision)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if plan.channels_last and x.dim() == 4:  # other inputs have no channels_last layout: left as they are
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            out = call(x)
        return out.float()

    return forward


EVAL_INPUT_ELEMENTS = 2**24
"""Input elements (times replicas) one evaluation batch may hold: 1024 samples of 3x32x32 images for 3
replicas fit; smaller inputs get larger batches (up to 4096 samples), larger ones smaller (down to 256)."""


def _eval_batch(x: torch.Tensor, replicas: int) -> int:
    per_sample = max(1, x[0].numel() * replicas)
    return max(256, min(4096, 1 << int(math.log2(max(1, EVAL_INPUT_ELEMENTS // per_sample)))))


@torch.inference_mode()
def _evaluate(net: Forward, x: torch.Tensor, y: torch.Tensor, task: str,
              batch: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    loss_sum: torch.Tensor | float = 0.0
    metric_sum: torch.Tensor | float = 0.0
    for i in range(0, x.shape[0], batch):
        loss, metric = per_replica_metric(net(x[i : i + batch]), y[i : i + batch], task)
        loss_sum, metric_sum = loss_sum + loss, metric_sum + metric
    n = x.shape[0]
    return torch.as_tensor(loss_sum) / n, torch.as_tensor(metric_sum) / n  # (R,), (R,)


def train(split: Split, desc: ModelDesc, plan: TrainPlan, report: Report | None = None,
          strategies: Mapping[str, Settings] | None = None) -> TrainResult:
    """Train ``plan.replicas`` models of ``desc`` on ``split`` and report after every epoch.

    Metrics per epoch: ``train_loss``, ``val_loss`` and ``val_<metric>`` (mean over replicas), and
    with several replicas also ``val_<metric>_std``. The test split is measured once, after a trial
    that ran every epoch, into ``TrainResult.test``; ``report`` never sees it, so nothing that decides
    during a sweep (sampler, pruner, ranking) can.

    The plan's training recipe (``TrainSpec``: learning-rate schedule and warmup, Nesterov momentum, label
    smoothing of the training loss, autocast precision, channels_last, torch.compile) applies to the
    minibatch optimisers; the spec refuses what L-BFGS cannot follow.

    ``strategies`` (every strategy's settings, by name) brings in the strategies' training-time hooks:
    each training batch goes through their ``symmetry`` input steps (augmentation) before the rest of
    the pipeline (``split.train_pipeline``, when the split deferred it), and their loss terms join the
    task loss. Without it, the trainer trains ``desc`` on the split as prepared.

    A split with a training objective of its own (``split.train_objective``: the PDE sets' residuals) trains on
    it in place of the task loss, with Adam and L-BFGS alike; validation and test still measure the task's metric.

    Raises:
        TrialDiverged: when the training loss becomes NaN or infinite.

    Example:
        >>> split = prepare(load_dataset("digits", 0.25, 0), expansion_defaults)
        >>> result = train(split, ModelDesc("small_cnn", (1, 8, 8), 10), TrainPlan(epochs=2))
        >>> result.final["val_accuracy"] > 0.5
    """
    # Dropout draws from the global generator: seeded here and restored after, so a trial's result
    # does not depend on which trials ran before it in the same process (or on how long they ran).
    with torch.random.fork_rng(devices=[] if torch.device(plan.device).type != "cuda" else None):
        torch.manual_seed(plan.seed + 2)
        return _train(split, desc, plan, report, strategies or {})


def _train(split: Split, desc: ModelDesc, plan: TrainPlan, report: Report | None,
           strategies: Mapping[str, Settings]) -> TrainResult:
    start = time.perf_counter()
    device = torch.device(plan.device)
    models = [build_model(desc, s).to(device) for s in replica_seeds(plan.seed, plan.replicas)]
    if plan.channels_last:  # before stacking: the stack copies the replicas' tensors as they are
        models = [model.to(memory_format=torch.channels_last) for model in models]
    lbfgs = plan.optimizer == "lbfgs"
    # L-BFGS's line search and curvature pairs span all the parameters it is given, so stacked
    # replicas would share one step size: each replica gets its own optimiser and runs on its own.
    choice = _replica_mode(models, desc, plan, split) if not lbfgs else ModeChoice("sequential")
    net = _stack(models, batched=choice.mode == "batched")
    forward = _forward(net, plan)
    optimizer = _make_optimizer(_param_groups(net.parameters(), models[0], desc, plan), plan) if not lbfgs else None
    scaler = torch.amp.GradScaler(device.type, enabled=plan.precision == "fp16")
    frozen = _frozen_entries(net.parameters(), models)
    augment = torch.Generator().manual_seed(plan.seed + 1)  # its own stream: the batch order stays the same
    lbfgs_optimizers = [_make_optimizer(list(m.parameters()), plan) for m in models] if lbfgs else []
    x_train, y_train = split.x_train.to(device), split.y_train.to(device)
    x_val, y_val = split.x_val.to(device), split.y_val.to(device)
    pipeline = split.train_pipeline
    symmetry = [*split.augment,  # the data's own augmentation (crop, flip) first, then the strategies'
                *(step for step in input_transforms(strategies, split.input_kind) if step.stage == "symmetry")]
    terms = _start_loss_terms(strategies, net, models[0], plan)
    assert not (lbfgs and symmetry), "the spec refuses random input transforms under full-batch L-BFGS"
    objective = split.train_objective  # the data's own training loss (a PDE's residual), in place of the task loss
    if pipeline is not None and lbfgs and objective is None:  # full-batch steps have no per-batch transform to come first
        x_train, pipeline = pipeline(x_train), None
    n, metric = x_train.shape[0], task_objective(split.task)[0]
    schedule = _make_schedule(optimizer, plan, math.ceil(n / plan.batch_size)) if optimizer is not None else None
    eval_batch = _eval_batch(x_val, plan.replicas)
    score_layers = _score_layers(models[0], plan.score_layers)
    initial = net.replica_weights(score_layers) if plan.score and score_layers else []
    order = torch.Generator().manual_seed(plan.seed)
    history: list[dict[str, float]] = []
    stopped = False
    epoch = steps = 0
    for epoch in range(1, plan.epochs + 1):
        net.train()
        if lbfgs:
            train_loss = _lbfgs_epoch(models, lbfgs_optimizers, x_train, y_train, split.task, plan.weight_decay, frozen,
                                      terms, plan.label_smoothing, objective, pipeline)
            _restore_frozen(frozen)
            steps += 1
        else:
            assert optimizer is not None
            perm = torch.randperm(n, generator=order).to(device)
            # Nothing in the loop reads a device value on the host (the loss sum stays on the device until the
            # epoch ends; schedulers compute Python floats; fp16's scaler hands its inf flag to a fused optimiser),
            # so a GPU never waits for the host between steps.
            loss_sum = torch.zeros((), device=device)
            seen = 0
            for i in range(0, n, plan.batch_size):
                idx = perm[i : i + plan.batch_size]
                loss = _batch_loss(net, x_train[idx], y_train[idx], split.task, augment, pipeline, symmetry, terms,
                                   plan.label_smoothing, forward, objective)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
                scaler.step(optimizer)  # optimizer.step(), unless fp16's scaler finds inf gradients
                scaler.update()
                if schedule is not None:
                    schedule.step()
                _restore_frozen(frozen)
                loss_sum += loss.detach() * idx.shape[0]
                seen, steps = seen + idx.shape[0], steps + 1
                if plan.max_steps is not None and steps >= plan.max_steps:
                    break
            train_loss = loss_sum.item() / seen / plan.replicas
        if not math.isfinite(train_loss):
            raise TrialDiverged(f"training loss became {train_loss} at epoch {epoch}")
        net.train(False)
        val_loss, val_metric = _evaluate(forward, x_val, y_val, split.task, eval_batch)
        # The objective first: MLflow's compare view colours its charts by a run's first logged metric.
        metrics = {metric: val_metric.mean().item(), "val_loss": val_loss.mean().item(), "train_loss": train_loss}
        if plan.replicas > 1:
            metrics[f"{metric}_std"] = val_metric.std().item()
        if initial:
            metrics.update(_score_metrics(net.replica_weights(score_layers), initial, score_layers))
        history.append(metrics)
        if report is not None and report(epoch, metrics):
            stopped = epoch < plan.epochs
            break
        if plan.max_steps is not None and steps >= plan.max_steps:
            break
    test: dict[str, float] = {}
    if plan.test and not stopped and epoch == plan.epochs and split.x_test is not None and split.y_test is not None:
        net.train(False)
        test_loss, test_metric = _evaluate(forward, split.x_test.to(device), split.y_test.to(device), split.task,
                                           eval_batch)
        test = {f"test_{split.metric}": test_metric.mean().item(), "test_loss": test_loss.mean().item()}
        if plan.replicas > 1:
            test[f"test_{split.metric}_std"] = test_metric.std().item()
    return TrainResult(epochs_run=epoch, final=dict(history[-1]), history=history,
                       num_parameters=count_parameters(models[0]), seconds=time.perf_counter() - start,
                       weights=net.replica_weights(), test=test, replicas_ran=_replicas_ran(net, choice))


def _named(params: list[torch.Tensor], model: nn.Module) -> list[tuple[str, int, torch.Tensor]]:
    """(name, replica, tensor) for a stack's parameters: one stacked set, or one set per replica."""
    names = [name for name, _ in model.named_parameters()]
    assert len(params) % len(names) == 0, "a stack's parameters come in whole sets"
    return [(names[i % len(names)], i // len(names), p) for i, p in enumerate(params)]


def _param_groups(params: list[torch.Tensor], model: nn.Module, desc: ModelDesc,
                  plan: TrainPlan) -> list[dict[str, Any]]:
    """One group at the plan's learning rate, and the first layer's bias at ``bias_lr_multiplier`` times it."""
    multiplier = desc.bias_lr_multiplier
    assert isinstance(multiplier, float), f"bias_lr_multiplier must be resolved before training, got {multiplier!r}"
    bias = first_layer_bias_name(model)
    if multiplier == 1.0 or bias is None:
        return [{"params": params}]
    boosted = [p for name, _, p in _named(params, model) if name == bias]
    rest = [p for name, _, p in _named(params, model) if name != bias]
    return [{"params": rest}, {"params": boosted, "lr": plan.lr * multiplier}]


def _frozen_entries(params: list[torch.Tensor], models: list[nn.Module]) -> list[tuple[torch.Tensor, ...]]:
    """(parameter, mask, value) for every weight with frozen entries (``strategies.asymmetry``)."""
    entries: list[tuple[torch.Tensor, ...]] = []
    stacked = len(models) > 1 and len(params) == len(list(models[0].parameters()))
    buffer_names = {name for name, _ in models[0].named_buffers()}
    for name, replica, p in _named(params, models[0]):
        owners = models if stacked else [models[replica]]
        if name + FROZEN_MASK not in buffer_names:
            continue
        masks = [m.get_buffer(name + FROZEN_MASK) for m in owners]
        values = [m.get_buffer(name + FROZEN_VALUE) for m in owners]
        entries.append((p, torch.stack(masks), torch.stack(values)) if stacked else (p, masks[0], values[0]))
    return entries


@torch.no_grad()
def _restore_frozen(entries: list[tuple[torch.Tensor, ...]]) -> None:
    # Weight decay and optimiser momentum would move frozen entries; putting them back keeps them exact.
    for p, mask, value in entries:
        p.copy_(torch.where(mask, value, p))


Pipeline = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


LossFn = Callable[[LossBatch], torch.Tensor]


def _start_loss_terms(strategies: Mapping[str, Settings], net: _Replicas, model: nn.Module,
                      plan: TrainPlan) -> list[LossFn]:
    """Set up every strategy's loss term once, from the replicas as they start."""
    terms = loss_terms(strategies)
    if not terms:
        return []
    stacked = net.stacked_parameters()
    start = ReplicaStart(tuple(replica_seeds(plan.seed, plan.replicas)),
                         {name: stacked[name].detach().clone() for name in default_score_layers(model)})
    return [term.start(start) for term in terms]


def _batch_loss(net: _Replicas, x: torch.Tensor, y: torch.Tensor, task: str, generator: torch.Generator,
                pipeline: Pipeline | None = None, symmetry: Sequence[InputTransform] = (),
                terms: Sequence[LossFn] = (), label_smoothing: float = 0.0,
                forward: Forward | None = None, objective: Objective | None = None) -> torch.Tensor:
    """The task loss of one batch, with the strategies' ``symmetry`` input steps and loss terms.

    ``forward`` runs ``net`` as the plan asks (``_forward``: compiled, autocast); the loss terms see
    ``net`` itself.

    The symmetry steps act on ``x`` before the input pipeline (expansion, normalisation), so the
    expansion's constants stay where validation and test inputs have them; the loss terms see the batch
    between the two.

    ``objective`` (``Split.train_objective``) replaces the task loss; ``y`` is then not read. It gets ``net``
    itself, in fp32 and uncompiled: it differentiates through the network with respect to ``x`` and trains
    on those derivatives (double backward, which compiled graphs do not support).
    """
    for step in symmetry:
        x = step.apply(x, generator)
    if objective is not None:
        loss = objective(net, x, pipeline or _identity)
        if not terms:
            return loss
    out = (forward or net)(pipeline(x) if pipeline is not None else x)
    if objective is None:
        loss = task_loss(out, y, task, label_smoothing)
    if terms:
        batch = LossBatch(net.stacked_parameters(), tuple(range(out.shape[0])),
                          BatchInputs(net, x, out, pipeline or _identity, generator))
        for term in terms:
            loss = loss + term(batch)
    return loss


def _score_layers(model: nn.Module, pattern: str | None) -> list[str]:
    """The weights the score looks at: every weight that connects units (conv, linear and group-conv
    weights; see ``default_score_layers``), or those of them whose name ``pattern`` matches (``re.search``)."""
    layers = default_score_layers(model)
    if pattern is None:
        return layers
    chosen = [name for name in layers if re.search(pattern, name)]
    if not chosen:  # a score over nothing would log nothing, and nobody would notice
        names = ", ".join(layers)
        raise ValueError(f"train.score_layers: must match at least one scored weight of this model ({names[:300]}), "
                         f"but got {pattern!r}")
    return chosen


def _score_metrics(weights: list[dict[str, torch.Tensor]], initial: list[dict[str, torch.Tensor]],
                   layers: list[str]) -> dict[str, float]:
    """``sb_score`` (replicas against each other; needs 2 or more) with its per-layer values
    ``sb_score.<layer>``, and ``sb_drift`` (each replica against its own initialisation)."""
    out: dict[str, float] = {}
    if len(weights) >= 2:
        score = replica_score(weights, layers)
        out["sb_score"] = score.value
        out.update({f"sb_score.{name}": v for name, v in score.per_layer.items()})
    out["sb_drift"] = drift_score(weights, initial, layers).value
    return out


def _replica_mode(models: list[nn.Module], desc: ModelDesc, plan: TrainPlan, split: Split) -> ModeChoice:
    """Batched or sequential replicas: as ``plan.replica_mode`` says, or under ``auto`` the faster of the two
    for this model, input, batch, optimiser, precision and device, timed once on this machine over a few
    training steps on the first training batch (``replicas.choose_replica_mode``)."""
    if len(models) == 1 or plan.replica_mode != "auto":
        return ModeChoice("sequential" if plan.replica_mode == "sequential" else "batched")
    device = torch.device(plan.device)
    raw = split.x_train[: plan.batch_size].to(device)
    x = split.train_pipeline(raw) if split.train_pipeline is not None else raw
    y = split.y_train[: plan.batch_size].to(device)
    objective = split.train_objective
    key = {"model": asdict(desc), "input": list(x.shape), "replicas": len(models), "optimizer": plan.optimizer,
           "precision": plan.precision, "channels_last": plan.channels_last, "device": device_name(device),
           "torch": torch.__version__, "task": split.task}
    # Not the thread count: it follows search.parallel, and a sweep must run its replicas the same way at
    # every parallelism (the two ways draw dropout masks differently) to give the same results.
    unbatched = replace(plan, compile=False)  # compiling both ways would cost more than the sweep saves
    optimizers: dict[int, torch.optim.Optimizer] = {}

    def step(stack: ReplicaStack) -> None:
        optimizer = optimizers.setdefault(id(stack), _make_optimizer(stack.parameters(), plan))
        if objective is not None:  # the data's own training loss (a PDE's residual), as training runs it
            loss = objective(stack, raw, split.train_pipeline or _identity)
        else:
            loss = task_loss(_forward(stack, unbatched)(x), y, split.task)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    clock = time.perf_counter if device.type == "cuda" else time.process_time
    return choose_replica_mode(key, lambda: time_replica_modes(models, step, synchronize, clock))


def device_name(device: torch.device | str) -> str:
    """The device's kind and model: ``cuda:0 NVIDIA H200``, ``cpu AMD EPYC 7B13``; a worker pinned to a GPU
    by ``CUDA_VISIBLE_DEVICES`` says which (``cuda:0 NVIDIA H200 (CUDA_VISIBLE_DEVICES=3)``)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        pinned = os.environ.get("CUDA_VISIBLE_DEVICES")
        return (f"cuda:{index} {torch.cuda.get_device_name(index)}"
                + (f" (CUDA_VISIBLE_DEVICES={pinned})" if pinned else ""))
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu {line.partition(':')[2].strip()}"
    return f"{device.type} {platform.processor()}"


def _replicas_ran(net: _Replicas, choice: ModeChoice) -> str:
    """How the replicas ran, for the trial's record: ``batched``, ``sequential`` or ``single``, with the timing
    that chose it under ``replica_mode: auto``."""
    ran = "single" if isinstance(net, _Single) else "batched" if getattr(net, "batched", False) else "sequential"
    if choice.batched_seconds is None or choice.sequential_seconds is None or ran == "single":
        return ran
    return (f"{ran} (measured per step: batched {choice.batched_seconds * 1e3:.3g} ms, "
            f"sequential {choice.sequential_seconds * 1e3:.3g} ms)")


def _stack(models: list[nn.Module], batched: bool = True) -> _Replicas:
    if len(models) == 1:
        return _Single(models[0])
    return ReplicaStack(models, batched=batched)


def _lbfgs_epoch(models: list[nn.Module], optimizers: list[torch.optim.Optimizer], x: torch.Tensor,
                 y: torch.Tensor, task: str, weight_decay: float,
                 frozen: Sequence[tuple[torch.Tensor, ...]], terms: Sequence[LossFn] = (),
                 label_smoothing: float = 0.0, objective: Objective | None = None,
                 pipeline: Pipeline | None = None) -> float:
    """One full-batch L-BFGS step per replica, one replica after another; the mean loss before the steps.

    The unbatched replica stack runs these same module objects, so evaluation sees the new weights.
    ``objective`` (``Split.train_objective``) replaces the task loss, on the raw ``x`` and the ``pipeline``
    still owed to it (without an objective, ``x`` comes prepared).
    """
    n = x.shape[0]
    losses = []
    cuda = [x.device] if x.device.type == "cuda" else []
    for index, (model, optimizer) in enumerate(zip(models, optimizers)):
        # One step's line search must evaluate one objective: every closure call of the step draws the same
        # dropout masks (from this seed), and the next step draws new ones. Masks redrawn per call made the
        # line search compare losses of different networks, and training stalled.
        masks = int(torch.randint(0, 2**62, ()))

        def loss_and_gradients(model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer,
                               index: int = index) -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            total = torch.zeros((), device=x.device)
            for i in range(0, n, LBFGS_CHUNK):
                xb, yb = x[i : i + LBFGS_CHUNK], y[i : i + LBFGS_CHUNK]
                if objective is not None:  # weighted by the chunk's share: the residual's mean, and the boundary term once
                    loss = objective(lambda z: model(z).unsqueeze(0), xb, pipeline or _identity) * (xb.shape[0] / n)
                else:
                    loss = task_loss(model(xb).unsqueeze(0), yb, task, label_smoothing) * (xb.shape[0] / n)  # (1, B, out)
                loss.backward()  # type: ignore[no-untyped-call]
                total += loss.detach()
            if weight_decay > 0:
                l2 = 0.5 * weight_decay * sum(p.pow(2).sum() for p in model.parameters())
                l2.backward()  # type: ignore[union-attr]
                total += l2.detach()  # type: ignore[union-attr]
            if terms:  # the strategies' loss terms of this replica alone; they see no batch here
                batch = LossBatch({name: p.unsqueeze(0) for name, p in model.named_parameters()}, (index,), None)
                extra = sum(term(batch) for term in terms)
                extra.backward()  # type: ignore[union-attr]
                total += extra.detach()  # type: ignore[union-attr]
            # Frozen entries get no gradient, so every L-BFGS direction (built from gradients and
            # steps alone) leaves them where they are, during the line search too.
            for p, mask, _ in frozen:
                if p.grad is not None:
                    p.grad.masked_fill_(mask, 0.0)
            return total

        def closure(evaluate: Callable[[], torch.Tensor] = loss_and_gradients, masks: int = masks) -> torch.Tensor:
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(masks)
                return evaluate()

        losses.append(float(optimizer.step(closure)))  # type: ignore[arg-type]
    return sum(losses) / len(losses)
