from __future__ import annotations

import concurrent.futures
import copy
import json
import multiprocessing
import re
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sbsearch.replicas import ReplicaStack, choose_replica_mode, time_replica_modes

NUM_REPLICAS = 3
STEPS = 4
TOLERANCE = 1e-5

OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]

OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
}


def mlp(dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 10))


# A bias right before a BatchNorm has a true gradient of 0. In float32 its computed gradient is
# rounding noise, which Adam rescales into steps of size ~lr, so batched and separate runs part ways
# on exactly those entries; these models leave such biases out (as usual), and a float64 test keeps them.
def cnn_with_batchnorm(momentum: float | None = 0.1, bias: bool = False) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, bias=bias),  # (B, 4, 6, 6)
        nn.BatchNorm2d(4, momentum=momentum),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, bias=bias),  # (B, 8, 4, 4)
        nn.BatchNorm2d(8, momentum=momentum),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def mlp_with_batchnorm1d() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 16, bias=False),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 10),
    )


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "mlp": mlp,
    "cnn_batchnorm": cnn_with_batchnorm,
    "mlp_batchnorm1d": mlp_with_batchnorm1d,
}


def seeded_replicas(build: Callable[[], nn.Module], seeds: range = range(NUM_REPLICAS)) -> list[nn.Module]:
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(build())
    return models


def batches(steps: int = STEPS, batch_size: int = 16) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(1234)
    return [
        (
            torch.randn(batch_size, 1, 8, 8, generator=generator),
            torch.randint(0, 10, (batch_size,), generator=generator),
        )
        for _ in range(steps)
    ]


def summed_replica_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """logits: (R, B, classes); each replica's mean loss, summed so each gets its own gradient."""
    return torch.stack([F.cross_entropy(replica_logits, targets) for replica_logits in logits]).sum()


def train_independently(
    models: list[nn.Module], make_optimizer: OptimizerFactory, data: list[tuple[Tensor, Tensor]]
) -> None:
    optimizers = [make_optimizer(list(model.parameters())) for model in models]
    for model in models:
        model.train()
    for x, y in data:
        for model, optimizer in zip(models, optimizers, strict=True):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
            optimizer.step()


def train_stack(stack: ReplicaStack, make_optimizer: OptimizerFactory, data: list[tuple[Tensor, Tensor]]) -> None:
    optimizer = make_optimizer(stack.parameters())
    stack.train()
    for x, y in data:
        optimizer.zero_grad()
        summed_replica_loss(stack(x), y).backward()  # type: ignore[no-untyped-call]
        optimizer.step()


def assert_stack_matches(stack: ReplicaStack, references: list[nn.Module], x: Tensor) -> None:
    for weights, reference in zip(stack.replica_weights(), references, strict=True):
        expected = dict(reference.named_parameters())
        assert list(weights) == list(expected)
        for name, tensor in weights.items():
            torch.testing.assert_close(tensor, expected[name].detach(), atol=TOLERANCE, rtol=0)
    stack.eval()
    with torch.no_grad():
        expected_outputs = torch.stack([reference.eval()(x) for reference in references])
        torch.testing.assert_close(stack(x), expected_outputs, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "sequential"])
@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_stack_trains_exactly_like_independent_models(architecture: str, optimizer_name: str, batched: bool) -> None:
    models = seeded_replicas(ARCHITECTURES[architecture])
    references = copy.deepcopy(models)
    stack = ReplicaStack(models, batched=batched)
    assert stack.batched is batched
    data = batches()

    train_stack(stack, OPTIMIZERS[optimizer_name], data)
    train_independently(references, OPTIMIZERS[optimizer_name], data)

    assert_stack_matches(stack, references, batches(steps=1, batch_size=32)[0][0])


def test_biases_before_batchnorm_match_in_float64() -> None:
    models = [model.double() for model in seeded_replicas(partial(cnn_with_batchnorm, bias=True))]
    references = copy.deepcopy(models)
    stack = ReplicaStack(models)
    data = [(x.double(), y) for x, y in batches()]
    train_stack(stack, OPTIMIZERS["adam"], data)
    train_independently(references, OPTIMIZERS["adam"], data)
    assert_stack_matches(stack, references, data[0][0])


def test_batchnorm_statistics_are_kept_per_replica() -> None:
    models = seeded_replicas(cnn_with_batchnorm)
    references = copy.deepcopy(models)
    stack = ReplicaStack(models)
    data = batches()
    train_stack(stack, OPTIMIZERS["sgd"], data)
    train_independently(references, OPTIMIZERS["sgd"], data)

    # Reaching into the stack: eval outputs already depend on these, this names the culprit on failure.
    for index, reference in enumerate(references):
        for name, buffer in reference.named_buffers():
            torch.testing.assert_close(stack._buffers[name][index], buffer, atol=TOLERANCE, rtol=0)
    assert int(stack._buffers["1.num_batches_tracked"][0]) == STEPS
    running_means = stack._buffers["1.running_mean"]
    assert not torch.allclose(running_means[0], running_means[1])


def test_unbatchable_modules_fall_back_to_the_sequential_path() -> None:
    # momentum=None averages the statistics with a Python float of a stacked counter.
    models = seeded_replicas(partial(cnn_with_batchnorm, momentum=None))
    references = copy.deepcopy(models)
    stack = ReplicaStack(models)
    assert stack.batched is False
    data = batches()
    train_stack(stack, OPTIMIZERS["adam"], data)
    train_independently(references, OPTIMIZERS["adam"], data)
    assert_stack_matches(stack, references, batches(steps=1)[0][0])


class _PlainTensorAttribute(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)
        self.mask = torch.rand(10)  # not a buffer: it would not be stacked per replica

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.linear(x.flatten(1))
        return logits * self.mask


def test_unregistered_tensors_fall_back_to_the_sequential_path() -> None:
    stack = ReplicaStack(seeded_replicas(_PlainTensorAttribute))
    assert stack.batched is False
    x = batches(steps=1)[0][0]
    assert stack(x).shape == (NUM_REPLICAS, 16, 10)


class _DataDependentBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.linear(x.flatten(1))
        return logits if logits.sum() > 0 else -logits


def test_a_failing_batched_forward_points_to_the_sequential_path() -> None:
    x = batches(steps=1)[0][0]
    with pytest.raises(RuntimeError, match="batched=False"):
        ReplicaStack(seeded_replicas(_DataDependentBranch))(x)
    assert ReplicaStack(seeded_replicas(_DataDependentBranch), batched=False)(x).shape == (NUM_REPLICAS, 16, 10)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "sequential"])
def test_call_shape_weights_and_replica_count(batched: bool) -> None:
    models = seeded_replicas(cnn_with_batchnorm)
    stack = ReplicaStack(models, batched=batched)
    leaves = stack.parameters()
    assert stack.to("cpu") is stack
    assert all(before is after for before, after in zip(leaves, stack.parameters(), strict=True))
    x = batches(steps=1)[0][0]
    assert stack.num_replicas == NUM_REPLICAS
    assert stack(x).shape == (NUM_REPLICAS, 16, 10)
    weights = stack.replica_weights()
    assert [list(w) for w in weights] == [[name for name, _ in models[0].named_parameters()]] * NUM_REPLICAS
    assert not torch.equal(weights[0]["0.weight"], weights[1]["0.weight"])
    assert all(not tensor.requires_grad for w in weights for tensor in w.values())
    # The score copies only the weights it scores each epoch.
    scored = stack.replica_weights(["0.weight"])
    assert [list(w) for w in scored] == [["0.weight"]] * NUM_REPLICAS
    assert all(torch.equal(s["0.weight"], w["0.weight"]) for s, w in zip(scored, weights, strict=True))
    assert sum(p.numel() for p in stack.parameters()) == NUM_REPLICAS * sum(p.numel() for p in models[0].parameters())


def test_replica_weights_are_snapshots() -> None:
    stack = ReplicaStack(seeded_replicas(mlp))
    before = stack.replica_weights()
    train_stack(stack, OPTIMIZERS["sgd"], batches(steps=1))
    after = stack.replica_weights()
    assert not torch.equal(before[0]["1.weight"], after[0]["1.weight"])


def test_batched_dropout_draws_different_masks_per_replica() -> None:
    identical = seeded_replicas(lambda: mlp(dropout=0.5), seeds=range(1)) * 2
    stack = ReplicaStack([copy.deepcopy(model) for model in identical])
    assert stack.batched
    x = batches(steps=1)[0][0]
    stack.train()
    outputs = stack(x)
    assert not torch.allclose(outputs[0], outputs[1])
    stack.eval()
    outputs = stack(x)
    torch.testing.assert_close(outputs[0], outputs[1])


def test_replicas_must_share_one_architecture() -> None:
    with pytest.raises(ValueError, match="models\\[1\\]: every replica must have the architecture"):
        ReplicaStack([mlp(), cnn_with_batchnorm()])
    with pytest.raises(ValueError, match="at least 1 replica, but got 0"):
        ReplicaStack([])


# --- batched or sequential: measured once per machine and configuration -------------------------------


def test_a_configuration_is_measured_once_and_the_faster_way_is_read_back_by_every_later_trial(tmp_path: Path) -> None:
    measured: list[str] = []

    def measure(batched: float, sequential: float, name: str) -> Callable[[], dict[str, float]]:
        return lambda: (measured.append(name), {"batched": batched, "sequential": sequential})[1]

    path = tmp_path / "modes.json"
    first = choose_replica_mode({"model": "big"}, measure(2.0, 1.0, "big"), path)
    assert (first.mode, first.batched_seconds, first.sequential_seconds, first.measured_now) == ("sequential", 2.0, 1.0, True)
    again = choose_replica_mode({"model": "big"}, measure(0.1, 9.0, "big again"), path)  # not measured again
    assert (again.mode, again.measured_now) == ("sequential", False)
    other = choose_replica_mode({"model": "small"}, measure(1.0, 3.0, "small"), path)
    assert other.mode == "batched" and measured == ["big", "small"]
    assert choose_replica_mode({"model": "small"}, measure(9.0, 0.1, "-"), path).mode == "batched"


def _choose_in_a_process(path: str, log: str) -> str:
    def slow_measure() -> dict[str, float]:
        with open(log, "a") as f:
            f.write("measured\n")
        time.sleep(0.5)
        return {"batched": 1.0, "sequential": 2.0}

    return choose_replica_mode({"model": "shared"}, slow_measure, Path(path)).mode


def test_two_processes_that_meet_a_new_configuration_at_once_measure_it_once(tmp_path: Path) -> None:
    log = tmp_path / "measurements.log"
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        modes = list(pool.map(_choose_in_a_process, [str(tmp_path / "modes.json")] * 2, [str(log)] * 2))
    assert modes == ["batched", "batched"]
    assert log.read_text().splitlines() == ["measured"]


def test_timing_the_two_ways_leaves_the_models_and_the_random_streams_as_they_were() -> None:
    models = seeded_replicas(lambda: nn.Sequential(cnn_with_batchnorm(), nn.Dropout(0.5)))  # statistics and draws
    before = [copy.deepcopy(m.state_dict()) for m in models]
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    rng = torch.random.get_rng_state()
    steps: list[bool] = []

    def step(stack: ReplicaStack) -> None:
        steps.append(stack.batched)
        stack.train()
        F.cross_entropy(stack(x).flatten(0, 1), y.repeat(NUM_REPLICAS)).backward()

    seconds = time_replica_modes(models, step, steps=2)
    assert set(seconds) == {"batched", "sequential"} and all(s > 0 for s in seconds.values())
    assert steps == [True, False] * 3  # one untimed step each, then the two ways in turn
    assert torch.equal(torch.random.get_rng_state(), rng)
    for model, state in zip(models, before):
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, state[name]), name
        assert all(p.grad is None for p in model.parameters())


def test_the_trainer_runs_the_replicas_as_the_plan_says_and_auto_records_its_measurement(tmp_path: Path,
                                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from sbsearch.data import load_dataset, prepare
    from sbsearch.strategies import STRATEGIES, ModelDesc
    from sbsearch.trainer import TrainPlan, train

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    split = prepare(load_dataset("digits", 0.25, 0), STRATEGIES["expansion"].defaults())
    desc = ModelDesc("small_cnn", (1, 8, 8), 10, width=4, depth=1)
    ran = {mode: train(split, desc, TrainPlan(epochs=1, replicas=3, replica_mode=mode)) for mode in
           ("batched", "sequential", "auto")}
    assert ran["batched"].replicas_ran == "batched" and ran["sequential"].replicas_ran == "sequential"
    assert re.fullmatch(r"(batched|sequential) \(measured per step: batched .* ms, sequential .* ms\)",
                        ran["auto"].replicas_ran)
    stored = json.loads((tmp_path / "sbsearch" / "replica_modes.json").read_text())
    (entry,) = stored.values()
    assert ran["auto"].replicas_ran.startswith(entry["mode"]) and entry["key"]["input"] == [64, 1, 8, 8]
    # The two ways train the same replicas: without dropout they agree to float rounding.
    for a, b in zip(ran["batched"].weights, ran["sequential"].weights):
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-4)
    assert train(split, desc, TrainPlan(epochs=1, replicas=1, replica_mode="auto")).replicas_ran == "single"
