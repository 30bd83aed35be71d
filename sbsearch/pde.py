"""Physics-informed tasks: PDEs with a known solution, their residuals, and the training loss of a PINN.

Every problem is posed on the unit interval or square, in unit coordinates ``t`` in [0, 1]^D. A data set
maps the spec's ``data.domain`` [a, b] onto it, coordinate by coordinate, with ``t = (x - a) / (b - a)``, as
the function sets do: the solution has the same shape whatever the domain, and only the scale and offset
of the input the network sees change. The network reads raw ``x`` (through the trial's input pipeline:
expansion and normalisation); derivatives are taken with respect to raw ``x`` by autograd and turned into
unit-coordinate derivatives by the chain rule, ``d/dt = (b - a) d/dx``, so the residual, and with it the
training loss, is the same function of ``u(t)`` on every domain.

Problems (``PROBLEMS``):

- ``pde_poisson``: ``-u''(t) = f(t)`` on [0, 1] with Dirichlet values ``u(0) = -1/2``, ``u(1) = 1/2``; ``f``
  is chosen so that ``u(t) = sin(pi t) + 0.3 sin(4 pi t) + t - 1/2``. On the domain [a, b] that is
  ``-u''(x) = f(t(x)) / (b - a)^2``; the residual is taken in unit coordinates (``(b - a)^2 u''(x) + f``)
  and divided by the root mean square of ``f`` over [0, 1], so that a network that outputs 0 starts
  with a residual loss of 1, on the scale of the boundary term.
- ``pde_heat``: ``u_t = nu u_xx`` (``nu = 0.1``) on (x, t) in [0, 1]^2 with ``u(x, 0) = sin(pi x)`` and
  ``u(0, t) = u(1, t) = 0``; ``u = exp(-nu pi^2 t) sin(pi x)``. Inputs are (x, t) pairs, both mapped from the
  domain.

Training (``pinn_objective``) sees the residual and the boundary and initial conditions only, never the
solution: per replica, the mean squared residual at the batch's interior collocation points plus the
mean squared misfit at every condition point (each batch gets all of them: the two ends for Poisson; for
the heat equation the initial line and both walls, ``grid_side(points) + 2`` points each). Validation and
test measure the squared error against the exact solution on dense grids of their own (``evaluation_points``);
a test point may fall on a collocation point, where only the residual was trained, never the solution.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["PROBLEMS", "Derivatives", "Objective", "Problem", "collocation_points", "condition_points",
           "evaluation_points", "pinn_objective", "unit_derivatives"]

Net = Callable[[torch.Tensor], torch.Tensor]
"""The replicas as one callable: (B, F) model inputs -> (R, B, 1) outputs."""

Pipeline = Callable[[torch.Tensor], torch.Tensor]

Objective = Callable[[Net, torch.Tensor, Pipeline], torch.Tensor]
"""``objective(net, x, pipeline)``: the training loss of the raw points ``x`` (B, D), summed over replicas."""


@dataclass(frozen=True)
class Derivatives:
    """A network's value and derivatives at B points, per replica, in unit coordinates.

    ``first[r, b, d]`` is ``du/dt_d`` of replica r at point b; ``second[d]`` is ``d2u/dt_d^2`` (R, B) for
    each coordinate d the problem asks for (``Problem.second``).
    """

    u: torch.Tensor  # (R, B)
    first: torch.Tensor  # (R, B, D)
    second: dict[int, torch.Tensor]


@dataclass(frozen=True)
class Problem:
    """A PDE on [0, 1]^D with its exact solution and its boundary (and initial) conditions.

    Args:
        doc: one line on the problem.
        coordinates: the input features' names, one per coordinate (``("x", "t")``).
        solution: unit coordinates (N, D) -> the exact ``u`` (N,).
        residual: unit coordinates (B, D) and ``Derivatives`` -> the residual (R, B), 0 where the PDE holds.
        second: the coordinates whose second derivative ``residual`` reads.
        conditions: ``data.points`` -> the unit coordinates (M, D) of the boundary and initial points.
        condition: the prescribed values (M,) of ``u`` at those points (the problem's data, not its solution).
        residual_scale: the residual is divided by it in the loss.
    """

    doc: str
    coordinates: tuple[str, ...]
    solution: Callable[[torch.Tensor], torch.Tensor]
    residual: Callable[[torch.Tensor, Derivatives], torch.Tensor]
    second: tuple[int, ...]
    conditions: Callable[[int], torch.Tensor]
    condition: Callable[[torch.Tensor], torch.Tensor]
    residual_scale: float = 1.0

    @property
    def dims(self) -> int:
        return len(self.coordinates)


# --- pde_poisson -----------------------------------------------------------------------------------


def _poisson_solution(t: torch.Tensor) -> torch.Tensor:
    s = t[:, 0]
    return torch.sin(math.pi * s) + 0.3 * torch.sin(4 * math.pi * s) + s - 0.5


def _poisson_forcing(s: torch.Tensor) -> torch.Tensor:
    """f = -u'' of the solution above (the linear part has none)."""
    return math.pi**2 * torch.sin(math.pi * s) + 0.3 * (4 * math.pi) ** 2 * torch.sin(4 * math.pi * s)


POISSON_FORCING_RMS = math.pi**2 * math.sqrt((1 + (0.3 * 16) ** 2) / 2)
"""The root mean square of ``f`` over [0, 1] (its two sines are orthogonal there): about 34."""


def _poisson_residual(t: torch.Tensor, d: Derivatives) -> torch.Tensor:
    return d.second[0] + _poisson_forcing(t[:, 0])  # u'' + f: 0 where -u'' = f


def _endpoints(points: int) -> torch.Tensor:
    return torch.tensor([[0.0], [1.0]], dtype=torch.float64)


POISSON = Problem(
    doc="1-D Poisson equation -u'' = f on the domain, Dirichlet ends; u(t) = sin(pi t) + 0.3 sin(4 pi t) + t - 1/2",
    coordinates=("x",),
    solution=_poisson_solution,
    residual=_poisson_residual,
    second=(0,),
    conditions=_endpoints,
    condition=_poisson_solution,  # the Dirichlet values -1/2 and 1/2 at the two ends
    residual_scale=POISSON_FORCING_RMS,
)


# --- pde_heat --------------------------------------------------------------------------------------

HEAT_DIFFUSIVITY = 0.1
"""``nu`` of the heat equation: the solution decays to exp(-0.1 pi^2), about 0.37, by t = 1."""


def _heat_solution(t: torch.Tensor) -> torch.Tensor:
    return torch.exp(-HEAT_DIFFUSIVITY * math.pi**2 * t[:, 1]) * torch.sin(math.pi * t[:, 0])


def _heat_residual(t: torch.Tensor, d: Derivatives) -> torch.Tensor:
    return d.first[..., 1] - HEAT_DIFFUSIVITY * d.second[0]  # u_t - nu u_xx


def _heat_edges(points: int) -> torch.Tensor:
    """The initial line t = 0 and the two walls x = 0 and x = 1, each at ``grid_side(points) + 2`` evenly
    spaced points (ends included: the corners belong to both, and their values agree)."""
    s = torch.linspace(0, 1, grid_side(points) + 2, dtype=torch.float64)
    zeros, ones = torch.zeros_like(s), torch.ones_like(s)
    return torch.cat([torch.stack([s, zeros], 1), torch.stack([zeros, s], 1), torch.stack([ones, s], 1)])


def _heat_condition(t: torch.Tensor) -> torch.Tensor:
    """sin(pi x) on the initial line, 0 on the walls (where sin(pi x) is 0 too, up to rounding)."""
    wall = (t[:, 0] == 0) | (t[:, 0] == 1)
    return torch.where(wall, 0.0, torch.sin(math.pi * t[:, 0]))


HEAT = Problem(
    doc="heat equation u_t = 0.1 u_xx on (x, t) in the domain squared, u(x, 0) = sin(pi x), u = 0 at both walls; "
        "u = exp(-0.1 pi^2 t) sin(pi x)",
    coordinates=("x", "t"),
    solution=_heat_solution,
    residual=_heat_residual,
    second=(0,),
    conditions=_heat_edges,
    condition=_heat_condition,
)


PROBLEMS: dict[str, Problem] = {"pde_poisson": POISSON, "pde_heat": HEAT}
"""The physics-informed data sets, by the name ``data.dataset`` gives them."""


# --- points ----------------------------------------------------------------------------------------


def grid_side(points: int) -> int:
    """Points per axis of a 2-D grid of about ``points`` points: the nearest square, at least 2 x 2."""
    return max(2, round(math.sqrt(points)))


def collocation_points(problem: Problem, points: int, sampling: str, seed: int) -> torch.Tensor:
    """Interior collocation points (N, D) in unit coordinates, float64, strictly inside [0, 1]^D.

    ``grid``: 1-D, ``points`` evenly spaced points between the ends; 2-D, a ``grid_side(points)``-square grid
    (so N is the nearest square to ``points``). ``random``: ``points`` uniform draws, fixed by ``seed``
    (sorted in 1-D, as the function sets' are).
    """
    if sampling == "grid":
        if problem.dims == 1:
            return torch.linspace(0, 1, points + 2, dtype=torch.float64)[1:-1].unsqueeze(1)
        axis = torch.linspace(0, 1, grid_side(points) + 2, dtype=torch.float64)[1:-1]
        return torch.cartesian_prod(*[axis] * problem.dims)
    assert sampling == "random", sampling
    draws = torch.as_tensor(np.random.default_rng(seed).uniform(0, 1, (points, problem.dims)))
    return draws.sort(dim=0).values if problem.dims == 1 else draws


def condition_points(problem: Problem, points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The boundary (and initial) points (M, D) in unit coordinates and the prescribed ``u`` there (M,)."""
    t = problem.conditions(points)
    return t, problem.condition(t)


VALIDATION_POINTS_1D = 1000
"""1-D problems validate on this many evenly spaced points, ends included, and test halfway between them."""

VALIDATION_SIDE_2D = 64
"""2-D problems validate on a 64 x 64 grid, edges included, and test on the 63 x 63 grid of its cell centres."""


def evaluation_points(problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation and test points (N, D) in unit coordinates, float64: a dense grid over [0, 1]^D and the grid
    of the midpoints between its points, so that no test point is a validation or grid collocation point."""
    side = VALIDATION_POINTS_1D if problem.dims == 1 else VALIDATION_SIDE_2D
    axis = torch.linspace(0, 1, side, dtype=torch.float64)
    middle = (axis[:-1] + axis[1:]) / 2
    if problem.dims == 1:
        return axis.unsqueeze(1), middle.unsqueeze(1)
    return torch.cartesian_prod(*[axis] * problem.dims), torch.cartesian_prod(*[middle] * problem.dims)


# --- derivatives and the training loss ------------------------------------------------------------


def _per_replica_gradient(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``d values[r, b] / d x[b]`` for every replica r: (R, B) values of (B, D) points -> (R, B, D).

    Every replica of a stack reads the same ``x``, so the gradient of ``values.sum()`` would add the
    replicas' derivatives together: one backward pass per replica keeps each replica's own. Summing over
    the batch is exact for networks that map each point on its own (no batch statistics in training).
    """
    if not values.requires_grad:  # u does not depend on x here (a network that ignores it): all zeros
        return torch.zeros((*values.shape, x.shape[1]), dtype=x.dtype, device=x.device)
    return torch.stack([torch.autograd.grad(v.sum(), x, create_graph=True, materialize_grads=True)[0]
                        for v in values])


def unit_derivatives(net: Net, x: torch.Tensor, pipeline: Pipeline, span: float,
                     second: tuple[int, ...]) -> Derivatives:
    """``u`` and its derivatives at raw points ``x`` (B, D), per replica, in unit coordinates.

    ``x`` goes through ``pipeline`` (the trial's expansion and normalisation) as it does at evaluation, and
    autograd differentiates through it, so the expansion's constants enter exactly as they do there; the
    chain rule then turns ``d/dx`` into ``d/dt = span d/dx`` (``span = b - a``). The derivatives keep their
    graph, so a loss built from them trains the network.
    """
    x = x.detach().requires_grad_(True)
    u = net(pipeline(x))[..., 0]  # (R, B)
    first = _per_replica_gradient(u, x) * span  # (R, B, D)
    return Derivatives(u, first, {d: _per_replica_gradient(first[..., d], x)[..., d] * span for d in second})


def pinn_objective(problem: Problem, domain: tuple[float, float], points: int) -> Objective:
    """The training loss of a PINN for ``problem`` on ``domain`` (``data.domain``, every coordinate).

    ``objective(net, x, pipeline)`` returns, summed over the replicas of ``net`` (as the task loss is), each
    replica's mean squared residual at the raw interior points ``x`` (B, D), divided by
    ``problem.residual_scale``, plus its mean squared misfit to the prescribed values at every condition
    point (``condition_points(problem, points)``). It reads no target: the exact solution stays out of
    training.
    """
    low, high = domain
    span = high - low
    t_conditions, values = condition_points(problem, points)
    x_conditions = (low + span * t_conditions).to(torch.float32)  # (M, D) raw coordinates
    on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def objective(net: Net, x: torch.Tensor, pipeline: Pipeline) -> torch.Tensor:
        assert x.shape[1:] == (problem.dims,), f"raw coordinates (B, {problem.dims}) expected, got {tuple(x.shape)}"
        if x.device not in on_device:
            on_device[x.device] = (x_conditions.to(x.device), values.to(x.device, torch.float32))
        x_edge, u_edge = on_device[x.device]
        d = unit_derivatives(net, x, pipeline, span, problem.second)
        residual = problem.residual((x.detach() - low) / span, d) / problem.residual_scale  # (R, B)
        misfit = net(pipeline(x_edge))[..., 0] - u_edge  # (R, M)
        return residual.pow(2).mean(dim=1).sum() + misfit.pow(2).mean(dim=1).sum()

    return objective
