"""The trainer: R replicas of one configuration, trained together, reporting after every epoch.

It knows nothing of Optuna, Ray or MLflow: after each epoch it calls ``report(epoch, metrics)`` and
stops when that returns True.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sbsearch.data import Split
from sbsearch.errors import TrialDiverged
from sbsearch.metrics import per_replica_metric, task_loss
from sbsearch.models import build_model, count_parameters
from sbsearch.strategies import ModelDesc

__all__ = ["TrainPlan", "TrainResult", "Report", "train", "replica_seeds", "resolve_device"]

Report = Callable[[int, dict[str, float]], bool]
"""``report(epoch, metrics) -> stop?``; epochs count from 1."""


@dataclass(frozen=True)
class TrainPlan:
    """How to train one trial (the ``train`` and ``data`` sections of the spec, resolved)."""

    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 3e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    replicas: int = 1
    seed: int = 0
    device: str = "cpu"


@dataclass
class TrainResult:
    """What a finished (or stopped) training produced."""

    epochs_run: int
    stopped_early: bool
    final: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    num_parameters: int = 0
    seconds: float = 0.0


def replica_seeds(seed: int, replicas: int) -> list[int]:
    """Initialisation seeds of the replicas: distinct, and stable for a given trial seed."""
    return [seed * 1009 + i for i in range(replicas)]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _Single:
    """One model behind the (R, B, out) interface of a replica stack, without any vmap overhead."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).unsqueeze(0)  # (1, B, out)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)


def _make_optimizer(params: Sequence[torch.Tensor], plan: TrainPlan) -> torch.optim.Optimizer:
    if plan.optimizer == "sgd":
        return torch.optim.SGD(params, lr=plan.lr, momentum=plan.momentum, weight_decay=plan.weight_decay)
    if plan.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=plan.lr, weight_decay=plan.weight_decay)
    assert plan.optimizer == "adam", plan.optimizer
    return torch.optim.Adam(params, lr=plan.lr, weight_decay=plan.weight_decay)


@torch.no_grad()
def _evaluate(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, task: str,
              batch: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    loss_sum: torch.Tensor | float = 0.0
    metric_sum: torch.Tensor | float = 0.0
    for i in range(0, x.shape[0], batch):
        loss, metric = per_replica_metric(net(x[i : i + batch]), y[i : i + batch], task)
        loss_sum, metric_sum = loss_sum + loss, metric_sum + metric
    n = x.shape[0]
    return torch.as_tensor(loss_sum) / n, torch.as_tensor(metric_sum) / n  # (R,), (R,)


def train(split: Split, desc: ModelDesc, plan: TrainPlan, report: Report | None = None) -> TrainResult:
    """Train ``plan.replicas`` models of ``desc`` on ``split`` and report after every epoch.

    Metrics per epoch: ``train_loss``, ``val_loss`` and ``val_<metric>`` (mean over replicas), and
    with several replicas also ``val_<metric>_std``.

    Raises:
        TrialDiverged: when the training loss becomes NaN or infinite.

    Example:
        >>> split = prepare(load_dataset("digits", 0.25, 0), expansion_defaults)
        >>> result = train(split, ModelDesc("small_cnn", (1, 8, 8), 10), TrainPlan(epochs=2))
        >>> result.final["val_accuracy"] > 0.5
    """
    start = time.perf_counter()
    device = torch.device(plan.device)
    models = [build_model(desc, s).to(device) for s in replica_seeds(plan.seed, plan.replicas)]
    net = _stack(models)
    optimizer = _make_optimizer(net.parameters(), plan)
    x_train, y_train = split.x_train.to(device), split.y_train.to(device)
    x_val, y_val = split.x_val.to(device), split.y_val.to(device)
    n, metric = x_train.shape[0], f"val_{split.metric}"
    order = torch.Generator().manual_seed(plan.seed)
    history: list[dict[str, float]] = []
    stopped = False
    epoch = 0
    for epoch in range(1, plan.epochs + 1):
        net.train()
        perm = torch.randperm(n, generator=order).to(device)
        loss_sum = torch.zeros((), device=device)
        for i in range(0, n, plan.batch_size):
            idx = perm[i : i + plan.batch_size]
            loss = task_loss(net(x_train[idx]), y_train[idx], split.task)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * idx.shape[0]
        train_loss = loss_sum.item() / n / plan.replicas
        if not math.isfinite(train_loss):
            raise TrialDiverged(f"training loss became {train_loss} at epoch {epoch}")
        net.train(False)
        val_loss, val_metric = _evaluate(net, x_val, y_val, split.task)
        metrics = {"train_loss": train_loss, "val_loss": val_loss.mean().item(), metric: val_metric.mean().item()}
        if plan.replicas > 1:
            metrics[f"{metric}_std"] = val_metric.std().item()
        history.append(metrics)
        if report is not None and report(epoch, metrics):
            stopped = epoch < plan.epochs
            break
    return TrainResult(epochs_run=epoch, stopped_early=stopped, final=dict(history[-1]), history=history,
                       num_parameters=count_parameters(models[0]), seconds=time.perf_counter() - start)


def _stack(models: list[nn.Module]) -> _Single:
    if len(models) == 1:
        return _Single(models[0])
    from sbsearch.replicas import ReplicaStack

    return ReplicaStack(models)  # type: ignore[return-value]
