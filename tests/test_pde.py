"""Physics-informed tasks: exact solutions, per-replica derivatives, the residual objective, and sweeps."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from torch import nn

from sbsearch.data import DATASETS, DataSpec, Split, load_dataset, prepare
from sbsearch.models import build_model
from sbsearch.pde import PROBLEMS, Problem, condition_points, pinn_objective, unit_derivatives
from sbsearch.replicas import ReplicaStack
from sbsearch.space import config_from_params
from sbsearch.spec import parse_spec
from sbsearch.strategies import STRATEGIES, ModelDesc
from sbsearch.trainer import TrainPlan, replica_seeds, train
from sbsearch.trial import build_trial

TWO_PI = 2 * math.pi
DOMAINS = [(0.0, 1.0), (-1.0, 1.0), (0.0, TWO_PI)]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Networks of a few dozen units: one thread is fastest, and a busy machine's second core helps nobody."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def expansion(**knobs: Any) -> dict[str, object]:
    return {**STRATEGIES["expansion"].defaults(), "offset": "center", "fill_space": "normalized", **knobs}


def exact_net(problem: Problem, domain: tuple[float, float]) -> Any:
    """The exact solution as a "network" of raw coordinates, (B, D) -> (1, B, 1), differentiable in x."""
    low, high = domain
    return lambda x: problem.solution((x - low) / (high - low)).unsqueeze(0).unsqueeze(-1)


def mlp(dims: int, seed: int, width: int = 8) -> nn.Module:
    return build_model(ModelDesc("mlp", (dims,), 1, width=width, depth=2), seed)


def alone(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """One model behind the (R, B, out) interface of a replica stack, R = 1."""
    return lambda z: model(z).unsqueeze(0)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
@pytest.mark.parametrize("domain", DOMAINS)
def test_the_exact_solution_satisfies_the_pde_and_its_conditions(name: str, domain: tuple[float, float]) -> None:
    problem = PROBLEMS[name]
    x = load_dataset(name, 0.25, 0, DataSpec(domain=domain, points=50)).x_train
    # Derivatives by autograd through the chain rule of the domain: the residual is 0 up to float32 rounding.
    d = unit_derivatives(exact_net(problem, domain), x, lambda z: z, domain[1] - domain[0], problem.second)
    t = (x - domain[0]) / (domain[1] - domain[0])
    assert float(problem.residual(t, d).detach().abs().max()) / problem.residual_scale < 2e-4
    t_edge, values = condition_points(problem, 50)
    torch.testing.assert_close(problem.solution(t_edge), values, atol=1e-12, rtol=0)
    # The whole objective of the exact solution: residual and boundary terms both (close to) 0.
    loss = pinn_objective(problem, domain, 50)(exact_net(problem, domain), x, lambda z: z)
    assert float(loss.detach()) < 1e-8


def test_the_poisson_forcing_is_minus_the_second_difference_of_the_solution() -> None:
    """An independent check of f: central differences of u in float64, not autograd."""
    problem, h = PROBLEMS["pde_poisson"], 1e-4
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64).unsqueeze(1)
    u = [problem.solution(t + s * h) for s in (-1, 0, 1)]
    second = (u[0] - 2 * u[1] + u[2]) / h**2
    from sbsearch.pde import _poisson_forcing

    torch.testing.assert_close(-second, _poisson_forcing(t[:, 0]), atol=1e-4, rtol=1e-6)
    solution = problem.solution(torch.tensor([[0.0], [1.0]], dtype=torch.float64))
    torch.testing.assert_close(solution, torch.tensor([-0.5, 0.5], dtype=torch.float64))  # non-zero Dirichlet values


def test_the_heat_solution_solves_the_heat_equation_by_finite_differences() -> None:
    problem, h = PROBLEMS["pde_heat"], 1e-4
    st = torch.cartesian_prod(*[torch.linspace(0.05, 0.95, 19, dtype=torch.float64)] * 2)
    step = torch.tensor([[h, 0.0]], dtype=torch.float64), torch.tensor([[0.0, h]], dtype=torch.float64)
    u_xx = (problem.solution(st + step[0]) - 2 * problem.solution(st) + problem.solution(st - step[0])) / h**2
    u_t = (problem.solution(st + step[1]) - problem.solution(st - step[1])) / (2 * h)
    torch.testing.assert_close(u_t, 0.1 * u_xx, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_the_split_trains_on_no_solution_and_evaluates_on_grids_of_its_own(name: str) -> None:
    problem = PROBLEMS[name]
    split = load_dataset(name, 0.25, 0, DataSpec(domain=(0.0, TWO_PI), points=49))
    info = DATASETS[name]
    assert info.task == split.task == "regression" and info.objective == ("val_mse", "minimize") and info.own_test_split
    assert split.train_objective is not None and split.x_train.shape == (49, problem.dims)
    assert torch.equal(split.y_train, torch.zeros(49, 1))  # no target: the residual's aim, never the solution
    assert torch.equal(split.mean, torch.zeros(problem.dims)) and torch.equal(split.std, torch.ones(problem.dims))
    assert split.x_test is not None and split.y_test is not None
    for x in (split.x_train, split.x_val, split.x_test):
        assert float(x.min()) >= 0 and float(x.max()) <= TWO_PI + 1e-6
    # Disjoint from validation. (A test point may be a collocation point, where only the residual is trained.)
    assert not ({tuple(row) for row in split.x_test.tolist()} & {tuple(row) for row in split.x_val.tolist()})
    assert split.x_val.shape[0] >= 1000 and split.y_val.shape == (split.x_val.shape[0], 1)
    t_val = split.x_val.double() / TWO_PI
    torch.testing.assert_close(split.y_val, problem.solution(t_val).float().unsqueeze(1), atol=1e-5, rtol=0)


def test_random_collocation_points_are_fixed_by_the_seed() -> None:
    options = DataSpec(sampling="random", points=30)
    a, b, c = (load_dataset("pde_heat", 0.25, seed, options).x_train for seed in (0, 0, 1))
    assert a.shape == (30, 2) and torch.equal(a, b) and not torch.equal(a, c)


def _replica_losses_and_gradients(x: torch.Tensor, pipeline: Any, models: list[nn.Module],
                                  objective: Any) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    stack = ReplicaStack(models, batched=True)
    loss = objective(stack, x, pipeline)
    params = stack.parameters()
    grads = torch.autograd.grad(loss, params)
    names = [n for n, _ in models[0].named_parameters()]
    return loss.detach(), [{n: g[r] for n, g in zip(names, grads)} for r in range(len(models))]


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_each_stacked_replica_gets_its_own_derivatives_loss_and_gradients(name: str) -> None:
    """A batched stack runs every replica on one x: each residual must use its replica's own derivatives."""
    problem = PROBLEMS[name]
    split = prepare(load_dataset(name, 0.25, 0, DataSpec(domain=(0.0, TWO_PI), points=25)),
                    expansion(factor=3, fill=math.pi))
    assert split.train_pipeline is not None and split.train_objective is not None
    x, pipeline, objective = split.x_train, split.train_pipeline, split.train_objective
    models = [mlp(3 * problem.dims, seed) for seed in range(3)]
    stacked = unit_derivatives(ReplicaStack(models), x, pipeline, TWO_PI, problem.second)
    for r, model in enumerate(models):
        single = unit_derivatives(alone(model), x, pipeline, TWO_PI, problem.second)
        torch.testing.assert_close(stacked.first[r], single.first[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(stacked.second[0][r], single.second[0][0], atol=1e-4, rtol=1e-4)
    loss, gradients = _replica_losses_and_gradients(x, pipeline, models, objective)
    separate = []
    for model, stacked_grads in zip(models, gradients):
        model.zero_grad()
        loss_alone = objective(alone(model), x, pipeline)
        loss_alone.backward()  # type: ignore[no-untyped-call]
        separate.append(loss_alone.detach())
        for param_name, p in model.named_parameters():
            assert p.grad is not None
            torch.testing.assert_close(stacked_grads[param_name], p.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss, torch.stack(separate).sum(), atol=1e-5, rtol=1e-5)


def _trained_weights(split: Split, optimizer: str) -> list[dict[str, torch.Tensor]]:
    plan = TrainPlan(epochs=2, optimizer=optimizer, lr=1.0 if optimizer == "lbfgs" else 0.01, replicas=2,
                     batch_size=16, score=False)
    return train(split, ModelDesc("mlp", (split.x_val.shape[1],), 1, width=8, depth=1), plan).weights


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_training_never_reads_the_targets(optimizer: str) -> None:
    split = prepare(load_dataset("pde_poisson", 0.25, 0, DataSpec(points=40)), expansion(factor=3, fill=1.0))
    other = replace(split, y_train=torch.randn_like(split.y_train))  # noise instead of the residual's aim
    for a, b in zip(_trained_weights(split, optimizer), _trained_weights(other, optimizer)):
        assert all(torch.equal(a[name], b[name]) for name in a)
    # ... while the objective does drive training: without it, the same targets train other weights.
    plain = replace(split, train_objective=None)
    assert not all(torch.equal(a[n], b[n]) for a, b in zip(_trained_weights(split, optimizer),
                                                           _trained_weights(plain, optimizer)) for n in a)


@pytest.mark.parametrize("optimizer,epochs,lr,factor", [("lbfgs", 8, 1.0, 3), ("adam", 300, 0.01, 1)])
def test_a_pinn_learns_the_poisson_solution(optimizer: str, epochs: int, lr: float, factor: int) -> None:
    split = prepare(load_dataset("pde_poisson", 0.25, 0, DataSpec(domain=(-1.0, 1.0), points=40)),
                    expansion(factor=factor, fill=1.0))
    desc = ModelDesc("mlp", (factor,), 1, width=16, depth=2)
    with torch.no_grad():  # the model the trainer starts from: seed 0's replica
        untrained = float((build_model(desc, replica_seeds(0, 1)[0])(split.x_val) - split.y_val).pow(2).mean())
    result = train(split, desc, TrainPlan(epochs=epochs, optimizer=optimizer, lr=lr, batch_size=64, score=False))
    assert result.final["val_mse"] < 0.05 * untrained, (untrained, result.final["val_mse"])
    assert result.test["test_mse"] < 0.05 * untrained


class _Recorder(nn.Module):
    """u = sin(a z_i) + b z_j^2 of chosen input positions; records every input it sees."""

    def __init__(self, first: int, second: int) -> None:
        super().__init__()
        self.first, self.second = first, second
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.seen: list[torch.Tensor] = []

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.seen.append(z.detach().clone())
        return (torch.sin(self.scale * z[:, self.first]) + z[:, self.second] ** 2).unsqueeze(1)


def test_the_objective_sees_the_expanded_input_as_evaluation_does() -> None:
    """Two coordinates, grid layout: each in its own K-cell, [c, c, x, c, c, c, c, t, c, c]; derivatives reach
    each coordinate through its own position."""
    spec = parse_spec({"data": {"dataset": "pde_heat", "points": 16, "domain": [0, "2pi"]}, "model": {"name": "mlp"},
                       "space": {"expansion": {"factor": 5, "fill": "pi", "layout": "grid"}}})
    split, desc = build_trial(spec, config_from_params(spec, {}))
    assert desc.input_shape == (10,) and split.x_train.shape == (16, 2) and split.train_pipeline is not None
    expanded = split.train_pipeline(split.x_train)
    assert torch.equal(expanded[:, [2, 7]], split.x_train)
    assert torch.allclose(expanded[:, [0, 1, 3, 4, 5, 6, 8, 9]], torch.tensor(math.pi))
    assert torch.equal(split.train_pipeline(load_dataset("pde_heat", 0.25, 0, spec.data).x_val), split.x_val)
    recorder = _Recorder(first=2, second=7)

    def net(z: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = recorder(z)
        return out.unsqueeze(0)

    d = unit_derivatives(net, split.x_train, split.train_pipeline, TWO_PI, (0, 1))
    assert torch.equal(recorder.seen[0], expanded)
    x, t = split.x_train[:, 0], split.x_train[:, 1]
    torch.testing.assert_close(d.first[0, :, 0], TWO_PI * torch.cos(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d.first[0, :, 1], TWO_PI * 2 * t, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(d.second[0][0], -TWO_PI**2 * torch.sin(x), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(d.second[1][0], torch.full_like(t, 2 * TWO_PI**2), atol=1e-4, rtol=1e-5)
    split.train_objective(net, split.x_train, split.train_pipeline)  # type: ignore[misc]
    assert all(seen.shape[1] == 10 and torch.allclose(seen[:, [0, 1, 3, 4]], torch.tensor(math.pi))
               for seen in recorder.seen)  # the condition points too


def test_upsampled_coordinates_differentiate_through_every_copy() -> None:
    """The upsample control repeats x K times: u = z_0 * z_1 is x^2, whose second derivative is 2."""
    split = prepare(load_dataset("pde_poisson", 0.25, 0, DataSpec(points=10)), expansion(factor=2, layout="upsample"))
    assert split.train_pipeline is not None

    def net(z: torch.Tensor) -> torch.Tensor:
        return (z[:, 0] * z[:, 1]).unsqueeze(0).unsqueeze(-1)

    d = unit_derivatives(net, split.x_train, split.train_pipeline, 2.0, (0,))
    torch.testing.assert_close(d.second[0][0], torch.full((10,), 2.0 * 2.0**2))


def _sweep(tmp_path: Path, dataset: str, **train: Any) -> Any:
    from sbsearch.sweep import run_sweep

    spec = parse_spec({
        "name": f"{dataset}-sweep", "data": {"dataset": dataset, "points": 25, "domain": [0, "2pi"]},
        "model": {"name": "mlp", "width": 8, "depth": 1, "first_bias": "zero"},
        "train": {"epochs": 2, "replicas": 2, **train},
        "space": {"expansion": {"factor": [1, 3], "fill": "pi", "layout": ["grid", "upsample"]},
                  "controls": {"bias_scale": [1.0, "auto"], "width_matched": [False, True]}},
        "search": {"trials": 4, "sampler": "random", "pruner": "none"},
    })
    return run_sweep(spec, tmp_path / "out", console=Console(quiet=True), track=False)


@pytest.mark.parametrize("dataset,train", [("pde_poisson", {"optimizer": "lbfgs", "lr": 1.0}),
                                           ("pde_heat", {"optimizer": "adam", "lr": 0.01})])
def test_a_short_sweep_runs_on_each_pde_data_set(tmp_path: Path, dataset: str, train: dict[str, Any]) -> None:
    result = _sweep(tmp_path, dataset, **train)
    assert result.metric == "val_mse" and result.direction == "minimize"
    assert len(result.records) == 4 and all(r.state == "COMPLETE" for r in result.records), \
        [r.reason for r in result.records]
    assert all(math.isfinite(r.final["val_mse"]) and r.test["test_mse"] >= 0 for r in result.records)


def test_the_spec_refuses_batch_normalisation_on_a_pde_set() -> None:
    """Batch statistics mix the points of a batch, and torch has no third derivative of batch norm."""
    from sbsearch.errors import SpecError

    with pytest.raises(SpecError) as info:
        parse_spec({"data": {"dataset": "pde_heat"}, "model": {"name": "mlp"},
                    "space": {"norm": {"kind": ["none", "batch"]}}})
    assert [p.path for p in info.value.problems] == ["space.norm.kind"] and "use none, layer or group" in str(info.value)
    parse_spec({"data": {"dataset": "pde_heat"}, "model": {"name": "mlp"}, "space": {"norm": {"kind": ["none", "layer"]}}})


def test_the_objective_trains_in_fp32_whatever_the_evaluation_precision() -> None:
    """Autocast reaches the evaluation only: the residual's second derivatives are taken in fp32."""
    split = prepare(load_dataset("pde_heat", 0.25, 0, DataSpec(points=16)), expansion(factor=3, fill=1.0))
    desc = ModelDesc("mlp", (6,), 1, width=8, depth=1)
    runs = [train(split, desc, TrainPlan(epochs=3, lr=0.01, replicas=2, precision=p, score=False)).history
            for p in ("fp32", "bf16")]
    for fp32, bf16 in zip(*runs):
        assert bf16["train_loss"] == pytest.approx(fp32["train_loss"], rel=1e-4)
        assert math.isfinite(bf16["val_mse"])
