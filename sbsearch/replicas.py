"""Train R seed-replicas of one architecture together, as one batched model.

The replicas' parameters and buffers are stacked along a new leading dimension
(`torch.func.stack_module_state`) and one forward pass runs every replica at once
(`torch.func.vmap` over `torch.func.functional_call`). Summing the replicas' losses and stepping one
optimizer over the stacked parameters is then exactly R independent trainings, for every optimizer
that updates each entry from that entry's own history (SGD with momentum and weight decay, Adam,
AdamW, RMSprop, Adagrad). It is *not* exact for optimizers or steps that look at all parameters at
once: L-BFGS (its line search and curvature pairs are global), gradient clipping by total norm, and
anything else that reduces over parameters. Use `ReplicaStack(models, batched=False)` for those.

BatchNorm's running statistics are stacked buffers too. Under `vmap`, `batch_norm` updates each
replica's slice of the stacked running mean and variance in place, and BatchNorm's own
`num_batches_tracked.add_(1)` does the same, so in training mode the statistics evolve exactly as in
R separate models and eval mode reads them per replica (the tests compare against R separate models).
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

__all__ = ["ModeChoice", "ReplicaStack", "choose_replica_mode", "time_replica_modes"]

_log = logging.getLogger(__name__)


class ReplicaStack:
    """R copies of one architecture trained as one batched model.

    The stack owns its own copy of the replicas' state: after construction, train through the stack
    and read weights with `replica_weights()`; the `models` passed in are not updated.

    Args:
        models: the replicas, already built with different seeds; same architecture, same device.
        batched: False forces the sequential path (a loop over the models), which every optimizer
            handles exactly; True uses the batched path unless a module cannot be batched.

    Example:
        >>> stack = ReplicaStack([build(seed) for seed in range(3)])
        >>> optimizer = torch.optim.Adam(stack.parameters(), lr=1e-3)
        >>> loss = sum(F.cross_entropy(logits, y) for logits in stack(x))  # stack(x): (R, B, classes)
    """

    batched: bool

    def __init__(self, models: Sequence[nn.Module], batched: bool = True) -> None:
        if len(models) < 1:
            raise ValueError("models: needs at least 1 replica, but got 0")
        _check_same_architecture(models)
        reason = _why_not_batchable(models[0]) if batched else "batched=False was asked for"
        self.batched = reason is None
        self._num_replicas = len(models)
        self._models: list[nn.Module] = []
        self._params: dict[str, Tensor] = {}
        self._buffers: dict[str, Tensor] = {}
        if self.batched:
            self._params, self._buffers = stack_module_state(list(models))  # each (R, ...)
            # A state-free skeleton: functional_call supplies every parameter and buffer, and any
            # tensor a forward pass would read from the skeleton itself fails loudly on "meta".
            # deepcopy keeps each submodule's train/eval flag.
            self._skeleton = copy.deepcopy(models[0]).to("meta")
            self._forward = self._make_batched_forward()
        else:
            _log.info("ReplicaStack runs the replicas one after another: %s", reason)
            self._models = list(models)

    @property
    def num_replicas(self) -> int:
        """R, the number of replicas."""
        return self._num_replicas

    def parameters(self) -> list[Tensor]:
        """Leaf tensors to hand to one `torch.optim` optimizer (stacked `(R, ...)` when batched)."""
        if self.batched:
            return list(self._params.values())
        return [param for model in self._models for param in model.parameters()]

    def stacked_parameters(self) -> dict[str, Tensor]:
        """Every parameter stacked over replicas (R, ...), by name as `named_parameters()`.

        These are the trained tensors themselves (batched) or a stack of them (sequential): a loss
        built from them reaches every replica's own parameters, so a penalty on weights trains them.
        """
        if self.batched:
            return dict(self._params)
        per_model = [dict(model.named_parameters()) for model in self._models]
        return {name: torch.stack([params[name] for params in per_model]) for name in per_model[0]}

    def __call__(self, x: Tensor) -> Tensor:
        """Run every replica on the same batch x of shape (B, ...); returns (R, B, ...)."""
        if self.batched:
            try:
                output: Tensor = self._forward(self._params, self._buffers, x)
            except RuntimeError as error:
                raise RuntimeError(
                    f"ReplicaStack: the batched forward pass failed ({error}); if a module of this "
                    "model cannot run under torch.func.vmap, build the stack with batched=False"
                ) from error
            return output
        return torch.stack([model(x) for model in self._models])

    def train(self, mode: bool = True) -> None:
        """Set training mode (dropout on, BatchNorm updating its statistics) for every replica."""
        if self.batched:
            self._skeleton.train(mode)
        else:
            for model in self._models:
                model.train(mode)

    def eval(self) -> None:
        """Set evaluation mode for every replica."""
        self.train(False)

    def replica_weights(self, names: Sequence[str] | None = None) -> list[dict[str, Tensor]]:
        """A snapshot of each replica's parameters, or of those in `names`: name -> detached copy, names
        as `named_parameters()`."""
        wanted = set(names) if names is not None else None
        if self.batched:
            return [
                {name: stacked[index].detach().clone() for name, stacked in self._params.items()
                 if wanted is None or name in wanted}
                for index in range(self._num_replicas)
            ]
        return [{name: param.detach().clone() for name, param in model.named_parameters()
                 if wanted is None or name in wanted} for model in self._models]

    def to(self, device: torch.device | str) -> ReplicaStack:
        """Move every replica to `device` and return the stack; build the optimizer after a move."""
        if self.batched:
            if all(param.device == torch.device(device) for param in self._params.values()):
                return self  # keeps the leaves an optimizer may already hold
            self._params = {
                name: param.detach().to(device).requires_grad_(param.requires_grad)
                for name, param in self._params.items()
            }
            self._buffers = {name: buffer.to(device) for name, buffer in self._buffers.items()}
        else:
            for model in self._models:
                model.to(device)
        return self

    def _make_batched_forward(self) -> Callable[..., Any]:
        skeleton = self._skeleton

        def forward_one_replica(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Any:
            return functional_call(skeleton, (params, buffers), (x,))

        # "different": each replica draws its own dropout masks, as separately trained models would.
        return vmap(forward_one_replica, in_dims=(0, 0, None), randomness="different")


def _check_same_architecture(models: Sequence[nn.Module]) -> None:
    def signature(
        model: nn.Module,
    ) -> list[tuple[str, str, tuple[int, ...], torch.dtype, torch.device]]:
        tensors = [*model.named_parameters(), *model.named_buffers()]
        return [(name, type(t).__name__, tuple(t.shape), t.dtype, t.device) for name, t in tensors]

    def modules_and_modes(model: nn.Module) -> list[tuple[type[nn.Module], bool]]:
        return [(type(module), module.training) for module in model.modules()]

    reference = (modules_and_modes(models[0]), signature(models[0]))
    for index, model in enumerate(models[1:], start=1):
        if (modules_and_modes(model), signature(model)) != reference:
            raise ValueError(
                f"models[{index}]: every replica must have the architecture, train/eval modes, "
                "parameter shapes, dtypes and device of models[0], but it differs"
            )


def _why_not_batchable(model: nn.Module) -> str | None:
    """Why vmap over functional_call would not reproduce separate models, or None if it would."""
    for name, module in model.named_modules():
        label = f"{name or 'model'} ({type(module).__name__})"
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.track_running_stats and module.momentum is None:
                # The cumulative average reads num_batches_tracked as a Python float, which vmap
                # cannot do for a stacked counter.
                return f"{label} uses momentum=None"
            if isinstance(module, nn.SyncBatchNorm):
                return f"{label} synchronises across processes"
        if isinstance(module, nn.RNNBase):
            return f"{label} keeps flattened weight buffers that functional_call does not swap"
        plain_tensors = [key for key, value in vars(module).items() if isinstance(value, Tensor)]
        if plain_tensors:
            # Unregistered tensors are not stacked, so every replica would share models[0]'s.
            return f"{label} holds unregistered tensors {plain_tensors}"
    return None


# --- batched or sequential: the faster, measured once per machine and configuration -----------------

MEASURED_STEPS = 3
"""Timed training steps per mode (after one untimed step each), alternated between the modes so that a
machine that slows down or speeds up meanwhile weighs on both alike; the median of each is compared."""

LONG_STEP_SECONDS = 5.0
"""A warm-up step longer than this (a large model on a CPU) cuts the timed steps to one per mode."""


def replica_modes_file() -> Path:
    """Where the measured choices are kept: ``$XDG_CACHE_HOME/sbsearch/replica_modes.json``
    (``~/.cache/sbsearch``), beside the decoded-image cache's default folder."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sbsearch" / "replica_modes.json"


@dataclass(frozen=True)
class ModeChoice:
    """How a trial's replicas run, and the measurement that chose it (None when nothing was measured)."""

    mode: str  # "batched" or "sequential"
    batched_seconds: float | None = None  # one training step of every replica, median
    sequential_seconds: float | None = None
    measured_now: bool = False  # False: read from the file, measured earlier on this machine


def time_replica_modes(models: Sequence[nn.Module], step: Callable[[ReplicaStack], None],
                       synchronize: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.perf_counter,
                       steps: int = MEASURED_STEPS) -> dict[str, float]:
    """Seconds per training step of R replicas run batched and run one after another (median of ``steps``).

    ``step(stack)`` runs one training step (forward, loss, backward, optimiser step) on ``stack``. It runs on
    copies of ``models`` under a forked random state, so the models, their BatchNorm statistics and the
    random streams the training draws from are as they were. ``clock``: wall time between ``synchronize()``
    calls for a GPU; the process's CPU time for the CPU, which other processes on a shared machine do not
    stretch (they stretch its wall time at random, and could tip the choice).
    """
    with torch.random.fork_rng(devices=[] if not torch.cuda.is_initialized() else None):  # type: ignore[no-untyped-call]
        copies = [copy.deepcopy(model) for model in models]
        stacks = {"batched": ReplicaStack(copies, batched=True), "sequential": ReplicaStack(copies, batched=False)}
        if not stacks["batched"].batched:
            return {}
        times: dict[str, list[float]] = {mode: [] for mode in stacks}

        def timed(mode: str) -> float:
            synchronize()
            start = clock()
            step(stacks[mode])
            synchronize()
            return clock() - start

        warm = max(timed("batched"), timed("sequential"))
        for _ in range(1 if warm > LONG_STEP_SECONDS else steps):
            for mode in stacks:
                times[mode].append(timed(mode))
    return {mode: statistics.median(seconds) for mode, seconds in times.items()}


def choose_replica_mode(key: Mapping[str, object], measure: Callable[[], dict[str, float]],
                        path: Path | None = None) -> ModeChoice:
    """The faster way to run these replicas, as measured by ``measure()`` the first time this machine met
    ``key`` (the model, input, batch, replicas, optimiser, precision, device and PyTorch version), and read back
    from ``path`` every later time, by every process: a sweep's trials of one configuration, and a rerun of
    the sweep, then run their replicas the same way.

    Measuring and writing happen under a lock on the file, so two workers that meet a new configuration at
    once measure it once. An unwritable file leaves the choice to this process alone.
    """
    path = path or replica_modes_file()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a+")  # noqa: SIM115 - held until the choice is on disk
    except OSError as error:
        _log.warning("cannot keep replica-mode measurements in %s (%s): measuring for this process only", path, error)
        return _measured_choice(measure)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        known = _read_choices(path)
        if digest in known:
            entry = known[digest]
            return ModeChoice(str(entry["mode"]), entry.get("batched_seconds"), entry.get("sequential_seconds"))
        choice = _measured_choice(measure)
        known[digest] = {**{k: v for k, v in asdict(choice).items() if k != "measured_now"}, "key": dict(key)}
        _write_choices(path, known)
        return choice


def _measured_choice(measure: Callable[[], dict[str, float]]) -> ModeChoice:
    seconds = measure()
    if not seconds:
        return ModeChoice("sequential", measured_now=True)
    mode = "sequential" if seconds["sequential"] < seconds["batched"] else "batched"
    _log.info("replicas run %s here: %.4g s per step batched, %.4g s sequential", mode, seconds["batched"],
              seconds["sequential"])
    return ModeChoice(mode, seconds["batched"], seconds["sequential"], measured_now=True)


def _read_choices(path: Path) -> dict[str, dict[str, Any]]:
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _write_choices(path: Path, known: dict[str, dict[str, Any]]) -> None:
    try:
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as tmp:
            json.dump(known, tmp, indent=1, sort_keys=True, default=str)
        os.replace(tmp.name, path)
    except OSError as error:
        _log.warning("cannot write replica-mode measurements to %s: %s", path, error)
