"""Does input dimension expansion help? The method's main claim, measured on two tasks that run here.

Digits (8x8, small CNN, Adam): final test accuracy for K in {1, 2, 3} x fill in {0, 0.5, 1} x stem
adaptation (none, stride, kernel), with and without batch normalisation, against the ``upsample``
layout (the same input size without any constant) and the width-matched baseline (no expansion, the
first layer widened to the expanded model's parameter count).

1-D function fitting (MLP, L-BFGS, domain [0, 2pi], zero first-layer bias: the favourable case of the
vector study): final test MSE for K in {1, 2, 3, 5} (5 is ``[c, c, x, c, c]``) x fill in
{0, 0.5, 1, pi}, border layout, with and without batch normalisation, against the same controls and,
beside every expanded row with a nonzero fill, the bias-scale control (``controls.bias_scale: auto``: no
expansion, the first layer's bias computed as s * b with s = sqrt(1 + sum c^2), the step that row's
constants give the effective bias under L-BFGS); then the ``[pi, pi, x, pi, pi]`` question on all four
test functions: K = 5, fill pi against K = 1 on the domains [0, 2pi] and [-1, 1], with zero and with
PyTorch's default first-layer bias, each with its bias-scale control.

Every configuration runs ``--seeds`` times (the spec seed: data split, initialisation and batch order).
Tables give the mean, a 95% t-interval, and the paired difference to the unexpanded model of the same
seed and normalisation (accuracy points; for MSE the ratio of geometric means, from log10 differences).
It calls the trainer directly, two configurations at a time in two processes.

    python benchmarks/reproduce.py --out benchmarks/results/reproduce.md   # the full run, ~20 min on 2 cores
    python benchmarks/reproduce.py --seeds 2 --digits-epochs 1 --fn-epochs 2 --out /tmp/smoke.md  # a smoke run
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import platform
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from scipy import stats

from sbsearch.errors import TrialDiverged
from sbsearch.models import build_model
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


@dataclass(frozen=True)
class Config:
    """One benchmark cell; ``raw`` is the spec (without its seed) that the trainer runs."""

    table: str  # "digits" | "function" | "pi_question"
    label: dict[str, str]  # the table's columns for this row
    group: tuple[str, ...]  # rows with the same group share the unexpanded baseline
    is_baseline: bool
    raw: dict[str, Any]
    cost: float  # relative cost, to start the slow runs first


def _digits_raw(epochs: int, factor: int, fill: float, stem: str, norm: str, layout: str = "grid",
                width_matched: bool = False) -> dict[str, Any]:
    space: dict[str, Any] = {
        "expansion": {"factor": factor, "fill": fill, "stem": stem, "layout": layout},
        "norm": {"kind": norm},
    }
    if width_matched:
        space["controls"] = {"width_matched": True}
    return {"name": "reproduce-digits", "data": {"dataset": "digits", "val_fraction": 0.25, "batch_size": 64},
            "model": {"name": "small_cnn", "width": 16, "depth": 2},
            "train": {"epochs": epochs, "optimizer": "adam", "lr": 0.003, "device": "cpu"}, "space": space}


def _function_raw(epochs: int, dataset: str, factor: int, fill: float, norm: str, layout: str = "border",
                  domain: tuple[float, float] = (0.0, TWO_PI), first_bias: str = "zero",
                  width_matched: bool = False, bias_scale: bool = False) -> dict[str, Any]:
    space: dict[str, Any] = {"expansion": {"factor": factor, "fill": fill, "layout": layout}, "norm": {"kind": norm}}
    if width_matched:
        space["controls"] = {"width_matched": True}
    if bias_scale:  # auto: the input stays unexpanded, its constants only set the bias's step
        space["controls"] = {"bias_scale": "auto"}
    return {"name": "reproduce-function",
            "data": {"dataset": dataset, "domain": list(domain), "sampling": "grid", "points": 200},
            "model": {"name": "mlp", "width": 32, "depth": 2, "first_bias": first_bias},
            "train": {"epochs": epochs, "optimizer": "lbfgs", "lr": 1.0, "device": "cpu"}, "space": space}


def digits_configs(epochs: int) -> list[Config]:
    out = []
    for norm in ("none", "batch"):
        group = ("digits", norm)

        def add(label: dict[str, str], raw: dict[str, Any], cost: float, baseline: bool = False,
                norm: str = norm, group: tuple[str, ...] = group) -> None:
            out.append(Config("digits", {"norm": norm, **label}, group, baseline, raw, cost))

        add({"K": "1", "input": "plain", "fill": "-", "stem": "-"}, _digits_raw(epochs, 1, 0.0, "none", norm), 1, True)
        for k in (2, 3):
            for stem in ("none", "stride", "kernel"):
                cost = 1.0 if stem == "stride" else k * k
                for fill in (0.0, 0.5, 1.0):
                    add({"K": str(k), "input": "grid", "fill": f"{fill:g}", "stem": stem},
                        _digits_raw(epochs, k, fill, stem, norm), cost)
                add({"K": str(k), "input": "upsample (control)", "fill": "-", "stem": stem},
                    _digits_raw(epochs, k, 0.0, stem, norm, layout="upsample"), cost)
                if HAS_WIDTH_MATCHED:
                    add({"K": str(k), "input": "width-matched (control)", "fill": "-", "stem": stem},
                        _digits_raw(epochs, k, 0.5, stem, norm, width_matched=True), 1.5)
    return out


def function_configs(epochs: int) -> list[Config]:
    out = []
    for norm in ("none", "batch"):
        group = ("function", norm)

        def add(label: dict[str, str], raw: dict[str, Any], baseline: bool = False,
                norm: str = norm, group: tuple[str, ...] = group) -> None:
            out.append(Config("function", {"norm": norm, **label}, group, baseline, raw, 0.5))

        add({"K": "1", "input": "plain", "fill": "-"}, _function_raw(epochs, MAIN_FUNCTION, 1, 0.0, norm), True)
        for k in (2, 3, 5):
            for fill, name in ((0.0, "0"), (0.5, "0.5"), (1.0, "1"), (math.pi, "pi")):
                add({"K": str(k), "input": "border", "fill": name}, _function_raw(epochs, MAIN_FUNCTION, k, fill, norm))
                if HAS_BIAS_SCALE and fill != 0.0:  # fill 0 gives s = 1: the baseline itself
                    add({"K": str(k), "input": "bias-scale (control)", "fill": name},
                        _function_raw(epochs, MAIN_FUNCTION, k, fill, norm, bias_scale=True))
            add({"K": str(k), "input": "upsample (control)", "fill": "-"},
                _function_raw(epochs, MAIN_FUNCTION, k, 0.0, norm, layout="upsample"))
            if HAS_WIDTH_MATCHED:
                add({"K": str(k), "input": "width-matched (control)", "fill": "-"},
                    _function_raw(epochs, MAIN_FUNCTION, k, math.pi, norm, width_matched=True))
    return out


def pi_question_configs(epochs: int) -> list[Config]:
    out = []
    for dataset in FUNCTIONS:
        for domain, domain_name in (((0.0, TWO_PI), "[0, 2pi]"), ((-1.0, 1.0), "[-1, 1]")):
            for bias in ("zero", "default"):
                group = ("pi", dataset, domain_name, bias)
                label = {"function": dataset, "domain": domain_name, "first bias": bias}
                out.append(Config("pi_question", {**label, "input": "x"}, group, True,
                                  _function_raw(epochs, dataset, 1, 0.0, "none", domain=domain, first_bias=bias), 0.5))
                out.append(Config("pi_question", {**label, "input": "[pi, pi, x, pi, pi]"}, group, False,
                                  _function_raw(epochs, dataset, 5, math.pi, "none", domain=domain, first_bias=bias),
                                  0.5))
                if HAS_BIAS_SCALE:
                    out.append(Config("pi_question", {**label, "input": "x, bias-scale (control)"}, group, False,
                                      _function_raw(epochs, dataset, 5, math.pi, "none", domain=domain,
                                                    first_bias=bias, bias_scale=True), 0.5))
    return out


def _metric_name(raw: dict[str, Any]) -> str:
    return "mse" if raw["data"]["dataset"].startswith("fn_") else "accuracy"


def run_one(job: tuple[int, int, dict[str, Any]]) -> tuple[int, int, float, float, float]:
    """Train one configuration with one seed; returns (config index, seed, final validation metric,
    test metric, CPU seconds).

    The test split (digits: 20% held out, stratified by the seed; functions: 999 points between the
    validation points) is measured once, after the last epoch. CPU time rather than wall time: on a
    shared machine it still says what the run costs one core.
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


def _same_model_as_baseline(configs: list[Config]) -> set[int]:
    """Width-matched rows whose network is the baseline's (a CNN's parameter count does not grow with K)."""

    def network(c: Config) -> str:
        spec = parse_spec({**c.raw, "seed": 0})
        split, desc = build_trial(spec, config_from_params(spec, {}))
        return f"{tuple(split.x_train.shape[1:])} {build_model(desc, 0)}"

    baseline = {c.group: network(c) for c in configs if c.is_baseline and c.table != "pi_question"}
    return {i for i, c in enumerate(configs)
            if c.label.get("input") == "width-matched (control)" and network(c) == baseline[c.group]}


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
        mse = c.table != "digits"
        mean, lo, hi = t_interval(finite)
        failed = len(values) - len(finite)
        ci = f"[{_fmt(lo, mse)}, {_fmt(hi, mse)}]" + (f" ({failed} diverged)" if failed else "")
        if c.is_baseline:
            diff, dm, dl, dh = "(baseline)", math.nan, math.nan, math.nan
        else:
            diff, dm, dl, dh = _difference_cell(_paired(values, base[c.group], log=mse), log=mse)
        rows.append(Row(c, values, mean, lo, hi, dm, dl, dh, (*c.label.values(), _fmt(mean, mse), ci, diff)))
    return rows


def markdown_table(rows: list[Row], metric_header: str, diff_header: str) -> str:
    if not rows:
        return ""
    header = [*rows[0].config.label.keys(), metric_header, "95% CI", diff_header]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r.cells) + " |" for r in rows]
    return "\n".join(lines)


def verdict(rows: list[Row], chosen_by: list[Row], better: str, log: bool) -> list[str]:
    """Plain sentences: for each baseline group, how the expanded (non-control) rows compare on ``rows``
    (the test split), with the best configuration chosen on ``chosen_by`` (the same rows on validation),
    so that its difference carries no winner's curse."""
    lines = []
    groups: dict[tuple[str, ...], list[Row]] = {}
    validation = {id(r.config): r for r in chosen_by}
    for r in rows:
        groups.setdefault(r.config.group, []).append(r)
    for group, members in groups.items():
        expanded = [r for r in members if not r.config.is_baseline and "control" not in r.config.label.get("input", "")]
        if not expanded:
            continue
        sign = -1 if log else 1  # for MSE a negative log-difference is the improvement
        helped = [r for r in expanded if math.isfinite(r.diff_lo) and min(sign * r.diff_lo, sign * r.diff_hi) > 0]
        hurt = [r for r in expanded if math.isfinite(r.diff_lo) and max(sign * r.diff_lo, sign * r.diff_hi) < 0]

        def on_validation(r: Row) -> float:
            v = validation[id(r.config)].diff_mean
            return sign * v if math.isfinite(v) else -math.inf

        best = max(expanded, key=on_validation)
        where = ", ".join(f"{k}={v}" for k, v in best.config.label.items() if k not in ("norm",))
        if log:
            amount = f"MSE x{10 ** best.diff_mean:.2g} (95% CI x{10 ** best.diff_lo:.2g} to x{10 ** best.diff_hi:.2g})"
        else:
            amount = f"{best.diff_mean:+.1f} points (95% CI {best.diff_lo:+.1f} to {best.diff_hi:+.1f})"
        norm = next((v for k, v in best.config.label.items() if k == "norm"), None)
        title = f"norm={norm}" if norm else " ".join(group[1:])
        lines.append(f"- {title}: {len(helped)} of {len(expanded)} expanded configurations {better} than the "
                     f"unexpanded baseline on the test split with 95% confidence, {len(hurt)} worse; the best on "
                     f"validation ({where}) changed the test metric by {amount}.")
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


def _load() -> str:
    try:
        import os

        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="runs per configuration (default 5)")
    parser.add_argument("--digits-epochs", type=int, default=6, help="Adam epochs on digits (default 6)")
    parser.add_argument("--fn-epochs", type=int, default=25,
                        help="L-BFGS steps (of up to 20 iterations) on the functions (default 25)")
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    args = parser.parse_args(list(argv) if argv is not None else None)

    configs = digits_configs(args.digits_epochs) + function_configs(args.fn_epochs) + pi_question_configs(args.fn_epochs)
    skipped = _same_model_as_baseline(configs)
    jobs = [(i, seed, c.raw) for i, c in enumerate(configs) if i not in skipped for seed in range(args.seeds)]
    jobs.sort(key=lambda j: -configs[j[0]].cost)  # slow runs first, so the two processes finish together
    results: dict[int, dict[int, float]] = {}  # on the test split: what the tables show
    validation: dict[int, dict[int, float]] = {}  # what the verdict chooses the best configuration on
    start = time.perf_counter()
    cpu = 0.0
    ctx = multiprocessing.get_context("spawn")  # no fork after torch has started its thread pools
    with ctx.Pool(args.workers) as pool:
        for done, (index, seed, val, test, seconds) in enumerate(pool.imap_unordered(run_one, jobs), start=1):
            results.setdefault(index, {})[seed] = test
            validation.setdefault(index, {})[seed] = val
            cpu += seconds
            if done % 25 == 0 or done == len(jobs):
                print(f"{done}/{len(jobs)} runs, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    wall = time.perf_counter() - start

    def rows_of(table: str, values: dict[int, dict[int, float]]) -> list[Row]:
        return build_rows(configs, values, skipped | {i for i, c in enumerate(configs) if c.table != table})

    digits_rows, fn_rows, pi_rows = (rows_of(t, results) for t in ("digits", "function", "pi_question"))
    digits_val, fn_val = rows_of("digits", validation), rows_of("function", validation)
    same_note = ""
    if skipped:
        same_note = (f"\n{len(skipped)} width-matched rows are left out: their network is the baseline's (stem none or "
                     "stride leaves a CNN's parameter count unchanged by K).\n")
    report = f"""# Reproduction: does input dimension expansion help?

`python benchmarks/reproduce.py --seeds {args.seeds} --digits-epochs {args.digits_epochs} --fn-epochs {args.fn_epochs} --workers {args.workers}`
— {len(jobs)} runs in {wall / 60:.1f} min wall on {args.workers} processes; training took {cpu / 60:.1f} CPU-minutes
(one thread per process), i.e. {cpu / 60 / args.workers:.1f} min on {args.workers} otherwise idle cores
(the wall time is longer when other work shares the cores: load average {_load()}). {platform.machine()},
torch {torch.__version__}, CPU.

Each row: {args.seeds} seeds (data split, initialisation and batch order); mean, 95% t-interval, and the paired
difference to the unexpanded model (K = 1) with the same seed and normalisation, with its 95% t-interval.
Every number is on the **test split**, which no choice below was made on: the digits' 20% held out per class
(disjoint from the 25% validation and the training images, fixed by the seed), the functions' 999 points
halfway between the 1000 validation points. The verdict picks the best configuration on validation and
reports its test difference.

## Digits, small CNN ({args.digits_epochs} epochs of Adam, lr 0.003, batch 64)

Test accuracy in %. `grid`: original pixels every K-th position, the fill constant elsewhere (raw pixel
units, then normalised). Stem: `none` = the network unchanged, `stride` = first conv strided by K, `kernel` =
first kernel 2K+1. Controls: `upsample` repeats each pixel K x K times (same input size, no constant);
`width-matched` keeps the 8x8 input and widens the first layer to the expanded model's parameter count.
With `stride`, the 3x3 first conv strided by K sees one original pixel and its constant neighbours for every
K >= 2, so K = 2 and K = 3 give the same network on the same numbers, and the same results.
{same_note}
{markdown_table(digits_rows, "test acc %", "vs K=1 (points)")}

## 1-D function fitting: {MAIN_FUNCTION}, MLP 32x2, L-BFGS ({args.fn_epochs} steps of up to 20 iterations)

Domain [0, 2pi], 200 grid training points, test MSE on 999 points, first-layer bias initialised to zero.
`border`: K-1 constants around x (K = 5: `[c, c, x, c, c]`). Difference: ratio of geometric-mean MSE to K = 1
(below 1 = better). `bias-scale (control)`: x alone, the first layer's bias computed as s * b with
s = sqrt(1 + sum c^2) over the constants of the row above it, so that L-BFGS steps the effective bias as the
expanded model steps its effective bias (it starts where the plain model's does: zero here). When the
control recovers the row's gain, the gain is the larger bias step, not the constants as inputs.

{markdown_table(fn_rows, "test MSE", "vs K=1 (MSE ratio)")}

## The `[pi, pi, x, pi, pi]` question, all four functions (no normalisation)

`x, bias-scale (control)`: x alone with s = sqrt(1 + 4 pi^2) on the first layer's bias.

{markdown_table(pi_rows, "test MSE", "vs x (MSE ratio)")}

## Verdict (computed from the tables above)

Digits:
{chr(10).join(verdict(digits_rows, digits_val, "more accurate", log=False))}

Function fitting ({MAIN_FUNCTION}):
{chr(10).join(verdict(fn_rows, fn_val, "lower in MSE", log=True))}

`[pi, pi, x, pi, pi]` and its bias-scale control against x (MSE ratio, 95% CI):
{chr(10).join(pi_verdict(pi_rows))}

The best configuration is chosen on validation and measured on test, so its difference is not inflated by
the choice.
"""
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
