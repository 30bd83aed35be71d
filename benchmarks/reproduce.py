"""Do the paper's claims hold? Each claim measured on tasks that run here, one section per claim.

Claim 1, input dimension expansion improves networks:

- ``digits``: 8x8 digits, small CNN, Adam: final test accuracy for K in {1, 2, 3} x fill in {0, 0.5, 1} x
  stem adaptation (none, stride, kernel), with and without batch normalisation, against the ``upsample``
  layout (the same input size without any constant) and the width-matched baseline (no expansion, the
  first layer widened to the expanded model's parameter count).
- ``function``: 1-D function fitting (MLP, L-BFGS, domain [0, 2pi], zero first-layer bias: the favourable
  case of the vector study): final test MSE for K in {1, 2, 3, 5} (5 is ``[c, c, x, c, c]``) x fill in
  {0, 0.5, 1, pi}, border layout, with and without batch normalisation, against the same controls and,
  beside every expanded row with a nonzero fill, the bias-scale control (``controls.bias_scale: auto``: no
  expansion, the first layer's bias computed as s * b with s = sqrt(1 + sum c^2), the step that row's
  constants give the effective bias under L-BFGS).
- ``pi``: the ``[pi, pi, x, pi, pi]`` question on all four test functions: K = 5, fill pi against K = 1 on
  the domains [0, 2pi] and [-1, 1], with zero and with PyTorch's default first-layer bias, each with its
  bias-scale control.
- ``pde``: the same on physics-informed networks (``pde_poisson``, and ``pde_heat`` in (x, t)): trained on
  the PDE's residual and boundary conditions, judged by the MSE against the exact solution; expansion
  with its upsample, width-matched and bias-scale controls, on the setting where the 1-D study found its
  effect (domain [0, 2pi], zero first-layer bias) and where it did not ([-1, 1], default bias).

Claim 2, equivariance, dropout and normalisation help because they break symmetries, and building the
equivariance into the architecture is the most effective of them:

- ``equivariance``: on rotated digits (``digits_c4`` with the C4 rows, ``digits_d4`` with the D4 rows) and on
  plain digits (both): augmentation, the invariance penalty, and group convolutions at the stem, the early
  blocks and all blocks, against the plain CNN of the same parameter count (the builder's matching).
- ``breakers``: dropout (several rates, element and channel), normalisation (batch, group, layer),
  W-Asymmetric fractions and syre strengths, on digits and rotated digits (the CNN of ``equivariance``,
  so the two sections share their plain model and can be set side by side) and on the 1-D fit of
  ``function``. Combinations the spec refuses are listed with its reason, not run.

Every configuration runs ``--seeds`` times (the spec seed: data split, initialisation and batch order;
each seed trains ``--replicas`` replicas and takes their mean). Tables give the mean, a 95% t-interval,
and the paired difference to the plain model of the same seed (accuracy points; for MSE the ratio of
geometric means, from log10 differences), all on the test split; each verdict picks the best
configuration on validation and reports its test difference. It calls the trainer directly, two runs at
a time in two processes; a run that two sections share is trained once.

The defaults spend the time on seeds rather than replicas: 8 seeds of one network each cost about half
of 5 seeds of three replicas, and their intervals are about as wide: narrower where the seed also draws
the data split (digits: replicas share their seed's split, and the t-quantile falls from 2.78 at 5 seeds
to 2.36 at 8), up to ~15% wider where it draws only the initialisation (the function and PDE grids).
One seed of every section takes about 8.5 CPU-minutes of training, so the full run is about 35 min on
2 otherwise idle cores.

    python benchmarks/reproduce.py --out benchmarks/results/reproduce.md   # every section, ~35 min on 2 cores
    python benchmarks/reproduce.py --quick --out /tmp/quick.md             # every section, a few minutes
    python benchmarks/reproduce.py --sections equivariance,pde --out /tmp/part.md   # a subset, in the file's order
    python benchmarks/reproduce.py --sections digits,function,pi --seeds 5 --replicas 3   # the earlier claim-1 study
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from scipy import stats

from sbsearch.data import DATASETS, OBJECTIVES
from sbsearch.errors import SpecError, TrialDiverged
from sbsearch.models import build_model, count_parameters
from sbsearch.space import config_from_params
from sbsearch.spec import parse_spec
from sbsearch.strategies import STRATEGIES
from sbsearch.trainer import train
from sbsearch.trial import build_trial, train_plan

HAS_WIDTH_MATCHED = "controls" in STRATEGIES and "width_matched" in STRATEGIES["controls"].knob_by_name
HAS_BIAS_SCALE = "controls" in STRATEGIES and "bias_scale" in STRATEGIES["controls"].knob_by_name
FUNCTIONS = ("fn_smooth", "fn_highfreq", "fn_step", "fn_abs")
MAIN_FUNCTION = "fn_abs"  # non-differentiable, and converged by ~20 L-BFGS steps: the table compares fits, not speed
TWO_PI = 2 * math.pi
FAVOURABLE = ((0.0, TWO_PI), "[0, 2pi]", "zero")  # where the 1-D study found the expansion's gain
UNFAVOURABLE = ((-1.0, 1.0), "[-1, 1]", "default")  # and where it did not
CNN = {"name": "small_cnn", "width": 16, "depth": 3}  # depth 3: stem (block 1), early (1-2) and all (1-3) differ
ROTATED = {"c4": "digits_c4", "d4": "digits_d4"}


@dataclass(frozen=True)
class Config:
    """One benchmark cell; ``raw`` is the spec (without its seed) that the trainer runs."""

    table: str  # which table of its section the row goes to
    label: dict[str, str]  # the table's columns for this row
    group: tuple[str, ...]  # rows with the same group share the baseline (the plain model)
    is_baseline: bool
    raw: dict[str, Any]
    cost: float  # relative cost, to start the slow runs first
    is_control: bool = False  # a control row: shown beside the treatments, never counted among them


@dataclass(frozen=True)
class Levels:
    """The values each section tries: the full run's (``FULL``) and ``--quick``'s (``QUICK``)."""

    digits_factors: tuple[int, ...]
    digits_stems: tuple[str, ...]
    digits_fills: tuple[float, ...]
    fn_factors: tuple[int, ...]
    fn_fills: tuple[float, ...]
    pi_functions: tuple[str, ...]
    equivariance_wheres: tuple[str, ...]
    breaker_datasets: tuple[str, ...]
    dropout_rates: tuple[float, ...]
    norms: tuple[str, ...]
    asymmetry_fractions: tuple[float, ...]
    # syre's decay starts at gamma * sum (W - anchor)^2, about gamma * 40 for the CNN and gamma * 22 for the
    # MLP (each layer's anchors have its initial weights' spread): from well below the task loss at the end
    # of training (cross-entropy ~0.1; the fit's MSE ~1e-4) to above it.
    syre_gammas_cnn: tuple[float, ...]
    syre_gammas_mlp: tuple[float, ...]
    pde: tuple[tuple[str, tuple[int, ...], tuple[float, ...]], ...]  # (problem, factors, fills)


FULL = Levels(
    digits_factors=(2, 3), digits_stems=("none", "stride", "kernel"), digits_fills=(0.0, 0.5, 1.0),
    fn_factors=(2, 3, 5), fn_fills=(0.0, 0.5, 1.0, math.pi), pi_functions=FUNCTIONS,
    equivariance_wheres=("stem", "early", "all"), breaker_datasets=("digits", "digits_c4", MAIN_FUNCTION),
    dropout_rates=(0.1, 0.25, 0.5), norms=("batch", "group", "layer"), asymmetry_fractions=(0.1, 0.25, 0.5),
    syre_gammas_cnn=(1e-4, 1e-3, 1e-2), syre_gammas_mlp=(1e-7, 1e-6, 1e-5),
    pde=(("pde_poisson", (2, 5), (1.0, math.pi)), ("pde_heat", (5,), (math.pi,))),
)
QUICK = Levels(
    digits_factors=(2,), digits_stems=("stride", "kernel"), digits_fills=(0.5,),
    fn_factors=(5,), fn_fills=(1.0, math.pi), pi_functions=("fn_step", "fn_abs"),
    equivariance_wheres=("stem", "all"), breaker_datasets=("digits", MAIN_FUNCTION),
    dropout_rates=(0.25,), norms=("batch", "layer"), asymmetry_fractions=(0.25,),
    syre_gammas_cnn=(1e-3,), syre_gammas_mlp=(1e-6,),
    pde=(("pde_poisson", (5,), (math.pi,)), ("pde_heat", (5,), (math.pi,))),
)


@dataclass(frozen=True)
class Plan:
    """How long and how often every section trains."""

    seeds: int
    digits_epochs: int
    fn_epochs: int
    pde_epochs: int
    replicas: int
    levels: Levels


def _fill_name(fill: float) -> str:
    return "pi" if math.isclose(fill, math.pi) else f"{fill:g}"


# --- the specs ------------------------------------------------------------------------------------


def _digits_raw(plan: Plan, factor: int, fill: float, stem: str, norm: str, layout: str = "grid",
                width_matched: bool = False) -> dict[str, Any]:
    space: dict[str, Any] = {
        "expansion": {"factor": factor, "fill": fill, "stem": stem, "layout": layout},
        "norm": {"kind": norm},
    }
    if width_matched:
        space["controls"] = {"width_matched": True}
    return {"name": "reproduce-digits", "data": {"dataset": "digits", "val_fraction": 0.25, "batch_size": 64},
            "model": {"name": "small_cnn", "width": 16, "depth": 2},
            "train": {"epochs": plan.digits_epochs, "optimizer": "adam", "lr": 0.003, "device": "cpu",
                      "replicas": plan.replicas}, "space": space}


def _cnn_raw(plan: Plan, dataset: str, space: dict[str, Any]) -> dict[str, Any]:
    """The claim-2 CNN (``CNN``) on a digits set, with the digits section's recipe."""
    return {"name": "reproduce-cnn", "data": {"dataset": dataset, "val_fraction": 0.25, "batch_size": 64},
            "model": dict(CNN),
            "train": {"epochs": plan.digits_epochs, "optimizer": "adam", "lr": 0.003, "device": "cpu",
                      "replicas": plan.replicas}, "space": space}


def _function_raw(plan: Plan, dataset: str, factor: int, fill: float, norm: str, layout: str = "border",
                  domain: tuple[float, float] = (0.0, TWO_PI), first_bias: str = "zero",
                  width_matched: bool = False, bias_scale: bool = False,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """An MLP fitted by L-BFGS: a function set (``fn_*``) on its targets, or a PDE set (``pde_*``) on its residual."""
    space: dict[str, Any] = {"expansion": {"factor": factor, "fill": fill, "layout": layout}, "norm": {"kind": norm},
                             **(extra or {})}
    if width_matched:
        space["controls"] = {"width_matched": True}
    if bias_scale:  # auto: the input stays unexpanded, its constants only set the bias's step
        space["controls"] = {"bias_scale": "auto"}
    epochs = plan.pde_epochs if dataset.startswith("pde_") else plan.fn_epochs
    return {"name": "reproduce-function",
            "data": {"dataset": dataset, "domain": list(domain), "sampling": "grid", "points": 200},
            "model": {"name": "mlp", "width": 32, "depth": 2, "first_bias": first_bias},
            "train": {"epochs": epochs, "optimizer": "lbfgs", "lr": 1.0, "device": "cpu", "replicas": plan.replicas},
            "space": space}


def _key(raw: dict[str, Any]) -> str:
    return json.dumps(raw, sort_keys=True)


@functools.cache
def _refusal(key: str) -> str | None:
    """The spec's one-line reasons for refusing a configuration, or None when it runs."""
    try:
        parse_spec({**json.loads(key), "seed": 0})
    except SpecError as exc:
        return str(exc).replace("\n", "; ")
    return None


@functools.cache
def _network(key: str) -> tuple[int, str]:
    """The parameter count of the model the builder makes for a configuration, and its conv widths."""
    spec = parse_spec({**json.loads(key), "seed": 0})
    _, desc = build_trial(spec, config_from_params(spec, {}))
    model = build_model(desc, 0)
    widths = [str(m.out_channels) for m in model.modules() if isinstance(getattr(m, "out_channels", None), int)]
    return count_parameters(model), "-".join(widths) or "-"


def _params(raw: dict[str, Any]) -> str:
    return "-" if _refusal(_key(raw)) else str(_network(_key(raw))[0])


def _widths(raw: dict[str, Any]) -> str:
    return "-" if _refusal(_key(raw)) else _network(_key(raw))[1]


# --- claim 1: expansion ---------------------------------------------------------------------------


def digits_configs(plan: Plan) -> list[Config]:
    lv, out = plan.levels, []
    for norm in ("none", "batch"):
        group = ("digits", norm)

        def add(label: dict[str, str], raw: dict[str, Any], cost: float, baseline: bool = False,
                control: bool = False, norm: str = norm, group: tuple[str, ...] = group) -> None:
            out.append(Config("digits", {"norm": norm, **label}, group, baseline, raw, cost, control))

        add({"K": "1", "input": "plain", "fill": "-", "stem": "-"}, _digits_raw(plan, 1, 0.0, "none", norm), 1, True)
        for k in lv.digits_factors:
            for stem in lv.digits_stems:
                cost = 1.0 if stem == "stride" else k * k
                for fill in lv.digits_fills:
                    add({"K": str(k), "input": "grid", "fill": f"{fill:g}", "stem": stem},
                        _digits_raw(plan, k, fill, stem, norm), cost)
                add({"K": str(k), "input": "upsample (control)", "fill": "-", "stem": stem},
                    _digits_raw(plan, k, 0.0, stem, norm, layout="upsample"), cost, control=True)
                if HAS_WIDTH_MATCHED:
                    add({"K": str(k), "input": "width-matched (control)", "fill": "-", "stem": stem},
                        _digits_raw(plan, k, 0.5, stem, norm, width_matched=True), 1.5, control=True)
    return out


def function_configs(plan: Plan) -> list[Config]:
    lv, out = plan.levels, []
    for norm in ("none", "batch"):
        group = ("function", norm)

        def add(label: dict[str, str], raw: dict[str, Any], baseline: bool = False, control: bool = False,
                norm: str = norm, group: tuple[str, ...] = group) -> None:
            out.append(Config("function", {"norm": norm, **label}, group, baseline, raw, 0.5, control))

        add({"K": "1", "input": "plain", "fill": "-"}, _function_raw(plan, MAIN_FUNCTION, 1, 0.0, norm), True)
        for k in lv.fn_factors:
            for fill in lv.fn_fills:
                name = _fill_name(fill)
                add({"K": str(k), "input": "border", "fill": name}, _function_raw(plan, MAIN_FUNCTION, k, fill, norm))
                if HAS_BIAS_SCALE and fill != 0.0:  # fill 0 gives s = 1: the baseline itself
                    add({"K": str(k), "input": "bias-scale (control)", "fill": name},
                        _function_raw(plan, MAIN_FUNCTION, k, fill, norm, bias_scale=True), control=True)
            add({"K": str(k), "input": "upsample (control)", "fill": "-"},
                _function_raw(plan, MAIN_FUNCTION, k, 0.0, norm, layout="upsample"), control=True)
            if HAS_WIDTH_MATCHED:
                add({"K": str(k), "input": "width-matched (control)", "fill": "-"},
                    _function_raw(plan, MAIN_FUNCTION, k, math.pi, norm, width_matched=True), control=True)
    return out


def pi_question_configs(plan: Plan) -> list[Config]:
    out = []
    for dataset in plan.levels.pi_functions:
        for domain, domain_name in (((0.0, TWO_PI), "[0, 2pi]"), ((-1.0, 1.0), "[-1, 1]")):
            for bias in ("zero", "default"):
                group = ("pi", dataset, domain_name, bias)
                label = {"function": dataset, "domain": domain_name, "first bias": bias}

                def raw(factor: int, dataset: str = dataset, domain: tuple[float, float] = domain, bias: str = bias,
                        **kw: Any) -> dict[str, Any]:
                    return _function_raw(plan, dataset, factor, math.pi if factor > 1 else 0.0, "none",
                                         domain=domain, first_bias=bias, **kw)

                out.append(Config("pi_question", {**label, "input": "x"}, group, True, raw(1), 0.5))
                out.append(Config("pi_question", {**label, "input": "[pi, pi, x, pi, pi]"}, group, False, raw(5), 0.5))
                if HAS_BIAS_SCALE:
                    out.append(Config("pi_question", {**label, "input": "x, bias-scale (control)"}, group, False,
                                      raw(5, bias_scale=True), 0.5, True))
    return out


def pde_configs(plan: Plan) -> list[Config]:
    out = []
    for problem, factors, fills in plan.levels.pde:
        if problem not in DATASETS:
            continue
        cost = 1.0 if problem == "pde_poisson" else 2.0
        for domain, domain_name, bias in (FAVOURABLE, UNFAVOURABLE):
            group = ("pde", f"{problem}, domain {domain_name}, {bias} first-layer bias")

            def add(label: dict[str, str], raw: dict[str, Any], baseline: bool = False, control: bool = False,
                    problem: str = problem, cost: float = cost, domain_name: str = domain_name, bias: str = bias,
                    group: tuple[str, ...] = group) -> None:
                out.append(Config(problem, {"domain": domain_name, "first bias": bias, **label, "params": _params(raw)},
                                  group, baseline, raw, cost, control))

            def raw(factor: int, fill: float, problem: str = problem, domain: tuple[float, float] = domain,
                    bias: str = bias, **kw: Any) -> dict[str, Any]:
                return _function_raw(plan, problem, factor, fill, "none", domain=domain, first_bias=bias, **kw)

            add({"K": "1", "input": "x", "fill": "-"}, raw(1, 0.0), baseline=True)
            for k in factors:
                for fill in fills:
                    name = _fill_name(fill)
                    add({"K": str(k), "input": "border", "fill": name}, raw(k, fill))
                    if HAS_BIAS_SCALE and fill != 0.0:
                        add({"K": str(k), "input": "bias-scale (control)", "fill": name},
                            raw(k, fill, bias_scale=True), control=True)
                add({"K": str(k), "input": "upsample (control)", "fill": "-"},
                    raw(k, 0.0, layout="upsample"), control=True)
                if HAS_WIDTH_MATCHED:
                    add({"K": str(k), "input": "width-matched (control)", "fill": "-"},
                        raw(k, math.pi, width_matched=True), control=True)
    return out


# --- claim 2: equivariance and the other symmetry breakers ----------------------------------------

_EQUIVARIANCE_COST = {("augment", "c4"): 1.0, ("augment", "d4"): 1.0, ("penalty", "c4"): 1.8, ("penalty", "d4"): 1.9,
                      ("stem", "c4"): 1.2, ("early", "c4"): 2.2, ("all", "c4"): 4.0,
                      ("stem", "d4"): 1.7, ("early", "d4"): 3.5, ("all", "d4"): 6.3}
"""CPU time per run relative to the plain CNN (measured on digits, 6 epochs)."""


def equivariance_data() -> list[tuple[str, tuple[str, ...]]]:
    """Each data set of the section with the groups whose rows run on it: the rotated sets with their own
    group (D4 rows on digits_c4 when digits_d4 is missing), and plain digits with both."""
    rotated: dict[str, list[str]] = {}
    for group in ("c4", "d4"):
        home = next((ROTATED[g] for g in (group, "c4") if ROTATED[g] in DATASETS), None)
        if home is not None:
            rotated.setdefault(home, []).append(group)
    return [*((name, tuple(groups)) for name, groups in rotated.items()), ("digits", ("c4", "d4"))]


def equivariance_configs(plan: Plan) -> list[Config]:
    out = []
    for dataset, groups in equivariance_data():
        group_key = ("equivariance", dataset)

        def add(how: str, symmetry: str, where: str, space: dict[str, Any], cost: float, baseline: bool = False,
                dataset: str = dataset, group_key: tuple[str, ...] = group_key) -> None:
            raw = _cnn_raw(plan, dataset, space)
            label = {"data": dataset, "how": how, "group": symmetry, "where": where,
                     "widths": _widths(raw), "params": _params(raw)}
            out.append(Config("equivariance", label, group_key, baseline, raw, cost))

        add("none (plain)", "-", "-", {}, 1.0, baseline=True)
        for symmetry in groups:
            for how in ("augment", "penalty"):
                add(how, symmetry, "-", {"equivariance": {"how": how, "group": symmetry}},
                    _EQUIVARIANCE_COST[how, symmetry])
            for where in plan.levels.equivariance_wheres:
                add("layers", symmetry, where, {"equivariance": {"how": "layers", "group": symmetry, "where": where}},
                    _EQUIVARIANCE_COST[where, symmetry])
    return out


def _breaker_settings(levels: Levels, mlp: bool) -> list[tuple[str, str, dict[str, Any]]]:
    """(strategy, setting, space) of every row of the breakers section on one task."""
    rows: list[tuple[str, str, dict[str, Any]]] = []
    for kind in ("element", "channel"):
        for rate in levels.dropout_rates:
            rows.append(("dropout", f"{kind} {rate:g}", {"dropout": {"rate": rate, "kind": kind}}))
    rows += [("norm", kind, {"norm": {"kind": kind}}) for kind in levels.norms]
    rows += [("asymmetry", f"fraction {f:g}", {"asymmetry": {"fraction": f}}) for f in levels.asymmetry_fractions]
    gammas = levels.syre_gammas_mlp if mlp else levels.syre_gammas_cnn
    rows += [("syre", f"gamma {g:g}", {"syre": {"gamma": g}}) for g in gammas]
    return rows


def breaker_configs(plan: Plan) -> list[Config]:
    out = []
    for dataset in plan.levels.breaker_datasets:
        if dataset not in DATASETS:
            continue
        mlp = dataset.startswith("fn_")
        group = ("breakers", dataset)

        def raw_of(space: dict[str, Any], dataset: str = dataset, mlp: bool = mlp) -> dict[str, Any]:
            if mlp:  # the function section's plain model: [0, 2pi], zero first-layer bias, no normalisation
                norm = space.get("norm", {}).get("kind", "none")
                return _function_raw(plan, dataset, 1, 0.0, norm,
                                     extra={k: v for k, v in space.items() if k != "norm"})
            return _cnn_raw(plan, dataset, space)

        table = "breakers_mlp" if mlp else "breakers_cnn"
        base = raw_of({})
        out.append(Config(table, {"data": dataset, "strategy": "none (plain)", "setting": "-",
                                  "params": _params(base)}, group, True, base, 1.0))
        for strategy, setting, space in _breaker_settings(plan.levels, mlp):
            raw = raw_of(space)
            out.append(Config(table, {"data": dataset, "strategy": strategy, "setting": setting,
                                      "params": _params(raw)}, group, False, raw, 1.2))
    return out


# --- one run --------------------------------------------------------------------------------------


def _metric_name(raw: dict[str, Any]) -> str:
    """The data set's headline metric: ``accuracy`` for classification, ``mse`` for regression (fn_*, pde_*)."""
    return OBJECTIVES[DATASETS[raw["data"]["dataset"]].task][0]


def _is_mse(config: Config) -> bool:
    return _metric_name(config.raw) == "mse"


def run_one(job: tuple[int, int, dict[str, Any]]) -> tuple[int, int, float, float, float]:
    """Train one configuration with one seed; returns (config index, seed, final validation metric,
    test metric, CPU seconds).

    The test split (digits: 20% held out, stratified by the seed; functions and PDEs: a grid halfway
    between the validation grid's points) is measured once, after the last epoch. CPU time rather than
    wall time: on a shared machine it still says what the run costs one core.
    """
    index, seed, raw = job
    torch.set_num_threads(1)  # two processes on two cores
    spec = parse_spec({**raw, "seed": seed})
    config = config_from_params(spec, {})
    split, desc = build_trial(spec, config)
    start = time.process_time()
    metric = _metric_name(raw)
    try:
        result = train(split, desc, train_plan(spec), strategies=config.all_settings())
        val, test = result.final[f"val_{metric}"], result.test[f"test_{metric}"]
    except TrialDiverged:
        val = test = math.nan
    return index, seed, val, test, time.process_time() - start


def _same_model_as_baseline(configs: list[Config], skip: set[int]) -> set[int]:
    """Width-matched rows whose network is the baseline's (a CNN's parameter count does not grow with K)."""

    def network(c: Config) -> str:
        spec = parse_spec({**c.raw, "seed": 0})
        split, desc = build_trial(spec, config_from_params(spec, {}))
        return f"{tuple(split.x_train.shape[1:])} {build_model(desc, 0)}"

    candidates = [i for i, c in enumerate(configs)
                  if i not in skip and c.label.get("input") == "width-matched (control)"]
    if not candidates:
        return set()
    baseline = {c.group: network(c) for c in configs if c.is_baseline}
    return {i for i in candidates if network(configs[i]) == baseline.get(configs[i].group)}


# --- statistics and tables -------------------------------------------------------------------


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and the two ends of its 95% t-interval (NaN ends for fewer than two values)."""
    n = len(values)
    mean = statistics.fmean(values) if values else math.nan
    if n < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


def _paired(values: dict[int, float], base: dict[int, float], log: bool) -> list[float]:
    seeds = sorted(s for s in values if s in base and math.isfinite(values[s]) and math.isfinite(base[s]))
    if log:
        return [math.log10(max(values[s], 1e-30)) - math.log10(max(base[s], 1e-30)) for s in seeds]
    return [100 * (values[s] - base[s]) for s in seeds]


def _fmt(x: float, mse: bool) -> str:
    if not math.isfinite(x):
        return "-"
    return f"{x:.3g}" if mse else f"{100 * x:.1f}"


def _difference_cell(diffs: list[float], log: bool) -> tuple[str, float, float, float]:
    mean, lo, hi = t_interval(diffs)
    if not diffs:
        return "-", math.nan, math.nan, math.nan
    if log:  # a ratio of geometric means, below 1 = lower MSE = better
        cell = f"x{10 ** mean:.2g} [{10 ** lo:.2g}, {10 ** hi:.2g}]" if math.isfinite(lo) else f"x{10 ** mean:.2g}"
    else:
        cell = f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}]" if math.isfinite(lo) else f"{mean:+.1f}"
    return cell, mean, lo, hi


@dataclass
class Row:
    config: Config
    values: dict[int, float]
    mean: float = math.nan
    lo: float = math.nan
    hi: float = math.nan
    diff_mean: float = math.nan
    diff_lo: float = math.nan
    diff_hi: float = math.nan
    cells: tuple[str, ...] = ()


def build_rows(configs: list[Config], results: dict[int, dict[int, float]], skipped: set[int]) -> list[Row]:
    base = {c.group: results.get(i, {}) for i, c in enumerate(configs) if c.is_baseline}
    rows = []
    for i, c in enumerate(configs):
        if i in skipped:
            continue
        values = results.get(i, {})
        finite = [v for v in values.values() if math.isfinite(v)]
        mse = _is_mse(c)
        mean, lo, hi = t_interval(finite)
        failed = len(values) - len(finite)
        ci = f"[{_fmt(lo, mse)}, {_fmt(hi, mse)}]" + (f" ({failed} diverged)" if failed else "")
        if c.is_baseline:
            diff, dm, dl, dh = "(baseline)", math.nan, math.nan, math.nan
        else:
            diff, dm, dl, dh = _difference_cell(_paired(values, base.get(c.group, {}), log=mse), log=mse)
        rows.append(Row(c, values, mean, lo, hi, dm, dl, dh, (*c.label.values(), _fmt(mean, mse), ci, diff)))
    return rows


def markdown_table(rows: list[Row], metric_header: str, diff_header: str) -> str:
    if not rows:
        return ""
    header = [*rows[0].config.label.keys(), metric_header, "95% CI", diff_header]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r.cells) + " |" for r in rows]
    return "\n".join(lines)


def _by_group(rows: list[Row]) -> list[list[Row]]:
    """Rows by baseline group, in table order."""
    groups: dict[tuple[str, ...], list[Row]] = {}
    for row in rows:
        groups.setdefault(row.config.group, []).append(row)
    return list(groups.values())


def _amount(mean: float, lo: float, hi: float, log: bool) -> str:
    if not math.isfinite(mean):
        return "no finite paired runs"
    if log:
        ci = f" (95% CI x{10 ** lo:.2g} to x{10 ** hi:.2g})" if math.isfinite(lo) else ""
        return f"MSE x{10 ** mean:.2g}{ci}"
    ci = f" (95% CI {lo:+.1f} to {hi:+.1f})" if math.isfinite(lo) else ""
    return f"{mean:+.1f} points{ci}"


def _where(config: Config, hidden: tuple[str, ...] = ("norm", "data", "params", "widths")) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.label.items() if k not in hidden)


def _best_on_validation(rows: list[Row], validation: dict[int, Row], log: bool) -> Row:
    sign = -1 if log else 1  # for MSE a negative log-difference is the improvement

    def on_validation(r: Row) -> float:
        v = validation[id(r.config)].diff_mean
        return sign * v if math.isfinite(v) else -math.inf

    return max(rows, key=on_validation)


def verdict(rows: list[Row], chosen_by: list[Row], better: str, log: bool, treated: str = "expanded",
            baseline: str = "the unexpanded baseline") -> list[str]:
    """Plain sentences: for each baseline group, how the treated (non-control) rows compare on ``rows``
    (the test split), with the best configuration chosen on ``chosen_by`` (the same rows on validation),
    so that its difference carries no winner's curse."""
    lines = []
    groups: dict[tuple[str, ...], list[Row]] = {}
    validation = {id(r.config): r for r in chosen_by}
    for r in rows:
        groups.setdefault(r.config.group, []).append(r)
    for group, members in groups.items():
        expanded = [r for r in members if not r.config.is_baseline and not r.config.is_control]
        if not expanded:
            continue
        sign = -1 if log else 1
        helped = [r for r in expanded if math.isfinite(r.diff_lo) and min(sign * r.diff_lo, sign * r.diff_hi) > 0]
        hurt = [r for r in expanded if math.isfinite(r.diff_lo) and max(sign * r.diff_lo, sign * r.diff_hi) < 0]
        best = _best_on_validation(expanded, validation, log)
        norm = next((v for k, v in best.config.label.items() if k == "norm"), None)
        title = f"norm={norm}" if norm else " ".join(group[1:])
        lines.append(f"- {title}: {len(helped)} of {len(expanded)} {treated} configurations {better} than "
                     f"{baseline} on the test split with 95% confidence, {len(hurt)} worse; the best on "
                     f"validation ({_where(best.config)}) changed the test metric by "
                     f"{_amount(best.diff_mean, best.diff_lo, best.diff_hi, log)}.")
    return lines


def family_verdict(members: list[Row], validation: dict[int, Row], family: Callable[[Config], str], log: bool,
                   focus: str | None = None) -> list[str]:
    """For rows that share one baseline: each family's best on validation with its test difference to the
    baseline, the family whose best leads on validation, and (``focus``) that family's best against each
    other family's best, paired by seed on the test split."""
    families: dict[str, list[Row]] = {}
    for r in members:
        if not r.config.is_baseline and not r.config.is_control:
            families.setdefault(family(r.config), []).append(r)
    if not families:
        return []
    best = {name: _best_on_validation(rs, validation, log) for name, rs in families.items()}
    sign = -1 if log else 1

    def lead(name: str) -> float:
        v = validation[id(best[name].config)].diff_mean
        return sign * v if math.isfinite(v) else -math.inf

    leader = max(best, key=lead)
    parts = [f"{name} ({_where(b.config)}): {_amount(b.diff_mean, b.diff_lo, b.diff_hi, log)}"
             for name, b in best.items()]
    lines = [f"  - best of each on validation, its test difference to the plain model: {'; '.join(parts)}.",
             f"  - leading on validation: {leader} ({_where(best[leader].config)})."]
    if focus is not None and focus in best and len(best) > 1:
        cells = []
        for name, b in best.items():
            if name == focus:
                continue
            cell, _, lo, hi = _difference_cell(_paired(best[focus].values, b.values, log), log)
            word = ("-" if not math.isfinite(lo) else "better" if sign * lo > 0 and sign * hi > 0
                    else "worse" if sign * lo < 0 and sign * hi < 0 else "no clear difference")
            cells.append(f"vs {name}: {cell} ({word})")
        unit = "MSE ratio" if log else "points"
        lines.append(f"  - the best of {focus} minus the best of each other, paired by seed on test ({unit}, 95% CI): "
                     + "; ".join(cells) + ".")
    return lines


def control_verdict(rows: list[Row], chosen_by: list[Row], log: bool) -> list[str]:
    """For each group: the best expanded row on validation beside its own controls (same K; the bias-scale
    control of its fill), each as a difference to the plain model and as a ratio to the expanded row."""
    lines = []
    validation = {id(r.config): r for r in chosen_by}
    for members in _by_group(rows):
        expanded = [r for r in members if not r.config.is_baseline and not r.config.is_control]
        if not expanded:
            continue
        best = _best_on_validation(expanded, validation, log)
        k, fill = best.config.label["K"], best.config.label["fill"]
        own = [r for r in members if r.config.is_control and r.config.label["K"] == k
               and (r.config.label["input"] != "bias-scale (control)" or r.config.label["fill"] == fill)]
        parts = []
        for r in own:
            against, *_ = _difference_cell(_paired(r.values, best.values, log), log)
            parts.append(f"{r.config.label['input'].replace(' (control)', '')}: "
                         f"{_amount(r.diff_mean, r.diff_lo, r.diff_hi, log)} against the plain model, {against} "
                         "against the expanded row")
        if parts:
            lines.append(f"  - its controls (K={k}, fill={fill}): " + "; ".join(parts) + ".")
    return lines


def pi_verdict(rows: list[Row]) -> list[str]:
    lines = []
    for r in rows:
        if r.config.is_baseline:
            continue
        label = r.config.label
        what = "" if label["input"] == "[pi, pi, x, pi, pi]" else f" ({label['input']})"
        if not math.isfinite(r.diff_lo):
            lines.append(f"- {label['function']}, domain {label['domain']}, {label['first bias']} bias{what}: too few runs")
            continue
        word = "better" if r.diff_hi < 0 else "worse" if r.diff_lo > 0 else "no clear difference"
        lines.append(f"- {label['function']}, domain {label['domain']}, {label['first bias']} bias{what}: "
                     f"x{10 ** r.diff_mean:.2g} ({10 ** r.diff_lo:.2g} to {10 ** r.diff_hi:.2g}): {word}")
    return lines


# --- sections -------------------------------------------------------------------------------------


@dataclass
class SectionResult:
    """One section's configurations and what its runs measured."""

    configs: list[Config]
    results: dict[int, dict[int, float]]  # on the test split: what the tables show
    validation: dict[int, dict[int, float]]  # what the verdicts choose the best configuration on
    refused: dict[int, str]  # configurations the spec refuses, with its reason
    same_as_baseline: set[int]  # width-matched rows whose network is the baseline's
    trained: int = 0  # runs this section trained
    reused: int = 0  # runs another section had already trained, whose results it shows too
    wall: float = 0.0
    cpu: float = 0.0
    rows_cache: dict[tuple[str, bool], list[Row]] = field(default_factory=dict)

    def rows(self, table: str, validation: bool = False) -> list[Row]:
        """The rows of one table, on the test split or (``validation``) on validation."""
        key = (table, validation)
        if key not in self.rows_cache:
            skip = set(self.refused) | self.same_as_baseline | {i for i, c in enumerate(self.configs) if c.table != table}
            self.rows_cache[key] = build_rows(self.configs, self.validation if validation else self.results, skip)
        return self.rows_cache[key]

    def timing(self) -> str:
        reused = f", and {self.reused} more that an earlier section had trained" if self.reused else ""
        return (f"_{self.trained} runs{reused}: {self.wall / 60:.1f} min wall, {self.cpu / 60:.1f} CPU-minutes of "
                "training._")


def _refused_lines(result: SectionResult) -> str:
    if not result.refused:
        return ""
    lines = [f"- {_where(result.configs[i], hidden=('params', 'widths'))}: {why}" for i, why in result.refused.items()]
    return "Skipped, because the spec refuses them (its reason):\n\n" + "\n".join(lines) + "\n"


def digits_report(r: SectionResult, plan: Plan, done: dict[str, SectionResult]) -> str:
    rows, val = r.rows("digits"), r.rows("digits", validation=True)
    note = ""
    if r.same_as_baseline:
        note = (f"\n{len(r.same_as_baseline)} width-matched rows are left out: their network is the baseline's (stem "
                "none or stride leaves a CNN's parameter count unchanged by K).\n")
    stride_note = ""
    if "stride" in plan.levels.digits_stems and len(plan.levels.digits_factors) > 1:
        stride_note = ("With `stride`, the 3x3 first conv strided by K sees one original pixel and its constant "
                       "neighbours for every\nK >= 2, so K = 2 and K = 3 give the same network on the same numbers, "
                       "and the same results.\n")
    return f"""## Claim 1 on digits: small CNN ({plan.digits_epochs} epochs of Adam, lr 0.003, batch 64)

Test accuracy in %. `grid`: original pixels every K-th position, the fill constant elsewhere (raw pixel
units, then normalised). Stem: `none` = the network unchanged, `stride` = first conv strided by K, `kernel` =
first kernel 2K+1. Controls: `upsample` repeats each pixel K x K times (same input size, no constant);
`width-matched` keeps the 8x8 input and widens the first layer to the expanded model's parameter count.
{stride_note}{note}
{markdown_table(rows, "test acc %", "vs K=1 (points)")}

Verdict:
{chr(10).join(verdict(rows, val, "more accurate", log=False))}

{r.timing()}
"""


def function_report(r: SectionResult, plan: Plan, done: dict[str, SectionResult]) -> str:
    rows, val = r.rows("function"), r.rows("function", validation=True)
    return f"""## Claim 1 on a 1-D fit: {MAIN_FUNCTION}, MLP 32x2, L-BFGS ({plan.fn_epochs} steps of up to 20 iterations)

Domain [0, 2pi], 200 grid training points, test MSE on 999 points, first-layer bias initialised to zero.
`border`: K-1 constants around x (K = 5: `[c, c, x, c, c]`). Difference: ratio of geometric-mean MSE to K = 1
(below 1 = better). `bias-scale (control)`: x alone, the first layer's bias computed as s * b with
s = sqrt(1 + sum c^2) over the constants of the row above it, so that L-BFGS steps the effective bias as the
expanded model steps its effective bias (it starts where the plain model's does: zero here). When the
control recovers the row's gain, the gain is the larger bias step, not the constants as inputs.

{markdown_table(rows, "test MSE", "vs K=1 (MSE ratio)")}

Verdict:
{chr(10).join(verdict(rows, val, "lower in MSE", log=True))}

{r.timing()}
"""


def pi_report(r: SectionResult, plan: Plan, done: dict[str, SectionResult]) -> str:
    rows = r.rows("pi_question")
    return f"""## Claim 1: the `[pi, pi, x, pi, pi]` question ({len(plan.levels.pi_functions)} functions, no normalisation)

As the 1-D fit above ({plan.fn_epochs} L-BFGS steps), on the domains [0, 2pi] and [-1, 1], with the first
layer's bias initialised to zero or left at PyTorch's default. `x, bias-scale (control)`: x alone with
s = sqrt(1 + 4 pi^2) on the first layer's bias.

{markdown_table(rows, "test MSE", "vs x (MSE ratio)")}

Verdict, `[pi, pi, x, pi, pi]` and its bias-scale control against x (MSE ratio, 95% CI):
{chr(10).join(pi_verdict(rows))}

{r.timing()}
"""


def pde_report(r: SectionResult, plan: Plan, done: dict[str, SectionResult]) -> str:
    problems = [p for p, *_ in plan.levels.pde if p in DATASETS]
    missing = [p for p, *_ in plan.levels.pde if p not in DATASETS]
    tables, verdicts = [], []
    for problem in problems:
        rows, val = r.rows(problem), r.rows(problem, validation=True)
        tables.append(f"### {problem}: {DATASETS[problem].doc}\n\n{markdown_table(rows, 'test MSE', 'vs K=1 (MSE ratio)')}")
        for members in _by_group(rows):
            verdicts += verdict(members, val, "lower in MSE", log=True)
            verdicts += control_verdict(members, val, log=True)
    absent = f"\nNot registered here, so not run: {', '.join(missing)}.\n" if missing else ""
    return f"""## Claim 1 on physics-informed networks: MLP 32x2, L-BFGS ({plan.pde_epochs} steps of up to 20 iterations)

Each network is trained on the PDE's residual at 200 interior grid collocation points (`pde_heat`: a 14 x 14
grid) plus the misfit at its boundary (and initial) points, never on the solution, and judged by its MSE
against the exact solution on a dense test grid between the validation grid's points. The same rows as
the 1-D fit: `border` constants around the input (K = 5: `[c, c, x, c, c]`; for (x, t) around both),
`upsample` repeats each coordinate K times, `width-matched` widens the first layer of the unexpanded model
to the expanded model's parameter count (`params`), `bias-scale` gives the unexpanded model's first-layer
bias the step that row's constants give it (s = sqrt(1 + sum c^2)). Two settings: the one where the 1-D
study found its gain (domain [0, 2pi], first-layer bias zero) and one where it did not ([-1, 1], PyTorch's
default bias). Difference: ratio of geometric-mean MSE to K = 1 (below 1 = better).
{absent}
{chr(10).join(tables)}

Verdict (best expanded row chosen on validation; then that row's own controls, each against the plain model
and as the ratio control / expanded on test, paired by seed):
{chr(10).join(verdicts)}

{r.timing()}
"""


def _how_family(config: Config) -> str:
    return config.label["how"]


def _equivariance_matching(rows: list[Row]) -> str:
    plain = {r.config.group: r for r in rows if r.config.is_baseline}
    worst, where = 0.0, ""
    for r in rows:
        base = plain.get(r.config.group)
        if base is None or r.config.is_baseline or "-" in (r.config.label["params"], base.config.label["params"]):
            continue
        ratio = int(r.config.label["params"]) / int(base.config.label["params"]) - 1
        if abs(ratio) > abs(worst):
            worst, where = ratio, f"{r.config.label['how']} {r.config.label['group']} {r.config.label['where']}"
    if not where:
        return "none"
    warning = " (more than 10%: these rows do not compare at matched capacity)" if abs(worst) > 0.1 else ""
    return f"{worst:+.1%} ({where}){warning}"


def equivariance_report(r: SectionResult, plan: Plan, done: dict[str, SectionResult]) -> str:
    rows, val = r.rows("equivariance"), r.rows("equivariance", validation=True)
    validation = {id(v.config): v for v in val}
    out = []
    for members in _by_group(rows):
        out += verdict(members, val, "more accurate", log=False, treated="equivariance", baseline="the plain model")
        out += family_verdict(members, validation, _how_family, log=False, focus="layers")
    data = ", ".join(f"`{name}` ({'/'.join(g.upper() for g in groups)} rows)" for name, groups in equivariance_data())
    return f"""## Claim 2: equivariance by augmentation, by a penalty, or built into the layers

Small CNN (width {CNN['width']}, depth {CNN['depth']}: `stem` = block 1, `early` = blocks 1-2, `all` = blocks 1-3 are
group convolutions; `stem` and `early` hand the next ordinary conv every orientation map as a channel (the
group axis folded into the channels), and with `all` the logits are invariant), {plan.digits_epochs} epochs of Adam (lr 0.003, batch 64), no
normalisation, on {data}. `digits_c4` turns every image (train, validation and test) by a seeded random
multiple of 90 degrees, `digits_d4` also mirrors at random; the labels stay the ten digits. `augment`
turns each training image by a random group element; `penalty` adds mean |f(g.x) - f(x)|^2 over the logits
(weight 1) for one random non-identity g per batch.

Parameter matching is the model builder's (`models.equivariant_block_widths`): a group block of c channels
holds c maps per group element, so at the plain widths a group model would get up to |G| times the plain
model's parameters and compare capacity as much as symmetry. The builder scales the group blocks' widths
(16-32-64 in the plain model) by one factor, each rounded, chosen so that the whole network's parameter
count comes closest to the plain model's, and sets the widths after them as its docstring says. `widths`
lists every conv's output channels as built (per group element in a group block), `params` the count of
`build_model(desc, 0)`. Largest deviation from the plain model's count: {_equivariance_matching(rows)}.

{markdown_table(rows, "test acc %", "vs plain (points)")}

Verdict (the best of each approach chosen on validation; differences on test):
{chr(10).join(out)}

{r.timing()}
"""


def _strategy_family(config: Config) -> str:
    return config.label["strategy"]


def _claim_two_summary(r: SectionResult, done: dict[str, SectionResult]) -> list[str]:
    """Equivariance beside the other breakers on the data sets both sections ran (the same plain model)."""
    equivariance = done.get("equivariance")
    if equivariance is None:
        return []
    out = []
    for dataset in ("digits", "digits_c4"):
        eq = [row for row in equivariance.rows("equivariance") if row.config.group == ("equivariance", dataset)]
        br = [row for row in r.rows("breakers_cnn") if row.config.group == ("breakers", dataset)]
        if not eq or not br:
            continue
        validation = {id(v.config): v for v in [*equivariance.rows("equivariance", validation=True),
                                                 *r.rows("breakers_cnn", validation=True)]}
        members = eq + [row for row in br if not row.config.is_baseline]

        def family(config: Config) -> str:
            return f"equivariance {config.label['how']}" if config.table == "equivariance" else config.label["strategy"]

        out.append(f"- {dataset}:")
        out += family_verdict(members, validation, family, log=False, focus="equivariance layers")
    if out:
        out.insert(0, "Claim 2 across both sections (equivariance and the other breakers on the same CNN, same plain "
                      "model and seeds):")
    return out


def breakers_report(r: SectionResult, plan: Plan, done: dict[str, SectionResult]) -> str:
    parts = []
    for table, metric, diff, log, better in (("breakers_cnn", "test acc %", "vs plain (points)", False, "more accurate"),
                                             ("breakers_mlp", "test MSE", "vs plain (MSE ratio)", True, "lower in MSE")):
        rows, val = r.rows(table), r.rows(table, validation=True)
        if not rows:
            continue
        validation = {id(v.config): v for v in val}
        text = []
        for members in _by_group(rows):
            text += verdict(members, val, better, log=log, treated="symmetry-breaking", baseline="the plain model")
            text += family_verdict(members, validation, _strategy_family, log=log)
        parts.append(f"{markdown_table(rows, metric, diff)}\n\nVerdict:\n" + "\n".join(text))
    summary = _claim_two_summary(r, done)
    return f"""## Claim 2: dropout, normalisation, W-Asymmetry and syre

Each row changes one strategy of the plain model. Digits sets: the CNN of the equivariance section
(width {CNN['width']}, depth {CNN['depth']}, {plan.digits_epochs} epochs of Adam). 1-D fit: the MLP 32x2 of the function
section ({MAIN_FUNCTION}, domain [0, 2pi], zero first-layer bias, {plan.fn_epochs} L-BFGS steps). `dropout`:
after every block, `element` drops units, `channel` whole feature maps. `norm`: after every hidden layer
(a CNN's convs then have no bias). `asymmetry`: that share of each unit's incoming weights frozen at
random values (W-Asymmetric networks; `round(fraction * fan_in)` per unit, so none in the MLP's first layer,
whose fan-in is 1). `syre`: weight decay of strength gamma toward a fixed random anchor instead of 0.
Under L-BFGS, dropout draws one set of masks per step: every evaluation of that step's line search sees
the same masks, and the next step draws new ones.

{_refused_lines(r)}
{(chr(10) * 2).join(parts)}

{chr(10).join(summary)}

{r.timing()}
"""


@dataclass(frozen=True)
class Section:
    name: str
    configs: Callable[[Plan], list[Config]]
    report: Callable[[SectionResult, Plan, dict[str, SectionResult]], str]


SECTIONS: dict[str, Section] = {s.name: s for s in (
    Section("digits", digits_configs, digits_report),
    Section("function", function_configs, function_report),
    Section("pi", pi_question_configs, pi_report),
    Section("pde", pde_configs, pde_report),
    Section("equivariance", equivariance_configs, equivariance_report),
    Section("breakers", breaker_configs, breakers_report),  # after equivariance: it sets the two side by side
)}
"""Every section, in the order it runs and is written."""


# --- the run --------------------------------------------------------------------------------------


def _load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


Cache = dict[tuple[str, int], tuple[float, float, float]]
"""(spec, seed) -> (validation metric, test metric, CPU seconds): a run two sections share is trained once."""


def run_section(section: Section, plan: Plan, pool: Any, cache: Cache) -> SectionResult:
    configs = section.configs(plan)
    refused = {i: why for i, c in enumerate(configs) if (why := _refusal(_key(c.raw))) is not None}
    same = _same_model_as_baseline(configs, set(refused))
    keys = {i: _key(c.raw) for i, c in enumerate(configs)}
    pending: dict[tuple[str, int], list[int]] = {}  # one run per distinct spec, its result shared by every row
    for i in range(len(configs)):
        if i not in refused and i not in same:
            for seed in range(plan.seeds):
                pending.setdefault((keys[i], seed), []).append(i)
    jobs = [(rows[0], seed, configs[rows[0]].raw) for (key, seed), rows in pending.items() if (key, seed) not in cache]
    result = SectionResult(configs, {}, {}, refused, same, trained=len(jobs), reused=len(pending) - len(jobs))
    jobs.sort(key=lambda j: -configs[j[0]].cost)  # slow runs first, so the two processes finish together
    start = time.perf_counter()
    for done, (index, seed, val, test, seconds) in enumerate(pool.imap_unordered(run_one, jobs), start=1):
        cache[keys[index], seed] = (val, test, seconds)
        result.cpu += seconds
        if done % 25 == 0 or done == len(jobs):
            print(f"{section.name}: {done}/{len(jobs)} runs, {time.perf_counter() - start:.0f} s", file=sys.stderr,
                  flush=True)
    result.wall = time.perf_counter() - start
    for (key, seed), rows in pending.items():
        val, test, _ = cache[key, seed]
        for i in rows:
            result.results.setdefault(i, {})[seed] = test
            result.validation.setdefault(i, {})[seed] = val
    return result


def _header(args: argparse.Namespace, plan: Plan, names: list[str], done: dict[str, SectionResult],
            wall: float) -> str:
    command = (f"python benchmarks/reproduce.py{' --quick' if args.quick else ''} --seeds {plan.seeds} "
               f"--digits-epochs {plan.digits_epochs} --fn-epochs {plan.fn_epochs} --pde-epochs {plan.pde_epochs} "
               f"--replicas {plan.replicas} --workers {args.workers}"
               + (f" --sections {','.join(names)}" if names != list(SECTIONS) else ""))
    cpu = sum(r.cpu for r in done.values())
    runs = sum(r.trained for r in done.values())
    timing = ["| section | runs | wall min | CPU min (training) |", "|---|---:|---:|---:|"]
    timing += [f"| {name} | {r.trained} | {r.wall / 60:.1f} | {r.cpu / 60:.1f} |" for name, r in done.items()]
    return f"""# Reproduction: do the paper's claims hold here?

`{command}`
— {runs} runs in {wall / 60:.1f} min wall on {args.workers} processes; training took {cpu / 60:.1f} CPU-minutes
(one thread per process), i.e. {cpu / 60 / args.workers:.1f} min on {args.workers} otherwise idle cores
(the wall time is longer when other work shares the cores: load average {_load()}). {platform.machine()},
torch {torch.__version__}, CPU.

Claim 1: expanding the input with constants improves networks (sections on digits, a 1-D fit, the
`[pi, pi, x, pi, pi]` question, PDEs). Claim 2: equivariance, dropout and normalisation help by breaking
symmetries, and equivariance built into the architecture is the most effective of them (sections on
equivariance and on the other breakers).

Each row: {plan.seeds} seeds (data split, initialisation and batch order; each seed trains {plan.replicas}
replica(s) and takes their mean); mean, 95% t-interval, and the paired difference to the plain model (K = 1,
no strategy) with the same seed, with its 95% t-interval. Every number is on the **test split**, which no
choice below was made on: the digits' 20% held out per class (disjoint from the 25% validation and the
training images, fixed by the seed), the functions' and PDEs' grid halfway between the validation grid's
points. Each verdict picks the best configuration on validation and reports its test difference, so
that difference is not inflated by the choice.

{chr(10).join(timing)}
"""


def _plan(args: argparse.Namespace) -> Plan:
    quick = args.quick

    def pick(value: int | None, full: int, fast: int) -> int:
        return value if value is not None else fast if quick else full

    return Plan(seeds=pick(args.seeds, 8, 2), digits_epochs=pick(args.digits_epochs, 6, 2),
                fn_epochs=pick(args.fn_epochs, 25, 5), pde_epochs=pick(args.pde_epochs, 25, 5),
                replicas=pick(args.replicas, 1, 1), levels=QUICK if quick else FULL)


def _sections(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"must list sections of {', '.join(SECTIONS)}, but got {text!r}")
    return [name for name in SECTIONS if name in names]  # run and written in the file's order


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a few minutes: 2 seeds, 2 Adam epochs, 5 L-BFGS steps, fewer levels (any option "
                             "given explicitly still applies)")
    parser.add_argument("--sections", type=_sections, default=list(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--seeds", type=int, default=None, help="runs per configuration (default 8)")
    parser.add_argument("--digits-epochs", type=int, default=None, help="Adam epochs on the digits sets (default 6)")
    parser.add_argument("--fn-epochs", type=int, default=None,
                        help="L-BFGS steps (of up to 20 iterations) on the functions (default 25)")
    parser.add_argument("--pde-epochs", type=int, default=None, help="L-BFGS steps on the PDEs (default 25)")
    parser.add_argument("--replicas", type=int, default=None,
                        help="replicas per run, averaged into the seed's value (default 1: seeds, not replicas, give "
                             "the intervals)")
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    args = parser.parse_args(list(argv) if argv is not None else None)
    plan = _plan(args)

    done: dict[str, SectionResult] = {}
    texts: list[str] = []
    cache: Cache = {}
    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")  # no fork after torch has started its thread pools
    with ctx.Pool(args.workers) as pool:
        for name in args.sections:
            result = run_section(SECTIONS[name], plan, pool, cache)
            done[name] = result
            texts.append(SECTIONS[name].report(result, plan, done))
            print(texts[-1], flush=True)
            report = _header(args, plan, args.sections, done, time.perf_counter() - start) + "\n" + "\n".join(texts)
            if args.out is not None:  # after every section: a long run's finished sections are kept
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(report, encoding="utf-8")
    print(_header(args, plan, args.sections, done, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
