"""What the replica score is worth: does it predict the final result, and does it follow symmetry-breaking knobs?

Part ``predict`` (the default). For N sampled configurations of a digits space (small CNN, Adam) and of a
function-approximation space (MLP, L-BFGS, fn_highfreq), each trained to the end with 3 replicas, the
Spearman correlation with the final validation metric (mean over replicas) of:

- sb_score after epoch 1, 2 and 3 (the replica Wasserstein score, sbsearch/score.py), and the same
  among the configurations without and with batch normalisation (DESIGN.md expects the sign to differ);
- the first scored layer's own score (``sb_score.<layer>``; the mean is dominated by the largest layer)
  and sb_drift (each replica against its own initialisation) after the same epochs;
- the validation metric after epoch 1, 2 and 3 (what the median rule looks at);
- the parameter count, and synflow and the gradient norm at initialisation (zero-cost proxies).

Each correlation comes with a bootstrap 95% confidence interval (configurations resampled with
replacement). Configurations run in 2 worker processes with one torch thread each.

    python benchmarks/score_validity.py --configs 32 --write benchmarks/results/score_validity.md

Reading the table: digits' metric is accuracy (higher is better), the function's is MSE (lower is
better), so a useful predictor has a positive rho on digits and a positive rho on the function when
it is itself an error (val_mse) -- or a negative one when high values of it should mean a low error.
What matters for pruning is |rho| and whether its interval excludes 0.

Part ``monotonicity`` asks what the score measures. Strategies whose symmetry-breaking strength is set by
one knob (asymmetry's frozen fraction, syre's gamma, the dropout rate, the expansion factor, how many conv
blocks are group convolutions) are trained at four levels of that knob for several trial seeds each, with
the data split held fixed; a learning-rate sweep, which changes how fast training goes but breaks no
symmetry, is the control. For each sweep and for the initial weights (epoch 0) and epochs 1, 3 and the last:

- Spearman's rho between the knob's level and sb_score / sb_drift over every level x seed run, with a
  bootstrap 95% interval (runs resampled within each level), and the per-level means;
- the mechanical side of each knob: parameter and scored-entry counts, the score at initialisation, and for
  asymmetry the score over the trainable entries only (frozen entries are scored, and never move);
- whether the score tells apart levels that end at the same validation metric (within the replicas'
  spread), and the partial Spearman correlation of the score with the knob given the final metric, and
  given sb_drift (how far training has moved the weights);
- a verdict from fixed rules, with the figures it rests on.

    python benchmarks/score_validity.py --part monotonicity --write benchmarks/results/score_validity_knobs.md
"""

from __future__ import annotations

import argparse
import copy
import math
import multiprocessing as mp
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

EARLY = (1, 2, 3)

SPACES: dict[str, dict[str, Any]] = {
    # The digits_cnn search space at width 8 (half the example's), 8 epochs, 3 replicas.
    "digits": {
        "name": "validity_digits", "seed": 0,
        "data": {"dataset": "digits", "batch_size": 64},
        "model": {"name": "small_cnn", "width": 8, "depth": 2},
        "train": {"epochs": 8, "lr": 0.003, "replicas": 3},
        "space": {"expansion": {"factor": [1, 2, 3], "fill": [0.0, 0.5, 1.0], "layout": ["grid", "upsample"],
                                "stem": ["none", "stride", "kernel"]},
                  "norm": {"kind": ["none", "batch"]}, "dropout": {"rate": [0.0, 0.2]}},
    },
    # The function_approx example's space plus frozen asymmetric weights, 20 L-BFGS epochs.
    "fn_highfreq": {
        "name": "validity_function", "seed": 0,
        "data": {"dataset": "fn_highfreq", "domain": [0, "2pi"], "sampling": "grid", "points": 200},
        "model": {"name": "mlp", "width": 32, "depth": 2, "first_bias": "zero"},
        "train": {"epochs": 20, "optimizer": "lbfgs", "lr": 1.0, "replicas": 3},
        "space": {"expansion": {"factor": [1, 3, 5], "fill": [0.0, 1.0, "pi"], "layout": ["border", "upsample"]},
                  "asymmetry": {"fraction": [0.0, 0.25]}},
    },
}


def _init_signals(split: Any, desc: Any, seed: int) -> dict[str, float]:
    """Parameter count, synflow and the gradient norm of one batch, at initialisation."""
    import torch

    from sbsearch.metrics import task_loss
    from sbsearch.models import build_model, count_parameters

    model = build_model(desc, seed)
    out: dict[str, float] = {"parameters": float(count_parameters(model))}
    model.train()
    torch.manual_seed(seed)  # the dropout masks of this one batch: the same in every run
    x, y = split.x_train[:256], split.y_train[:256]
    model.zero_grad()
    task_loss(model(x).unsqueeze(0), y, split.task).backward()  # type: ignore[no-untyped-call]
    out["grad_norm_init"] = float(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.grad is not None)).detach())  # type: ignore[arg-type]
    # Synflow (Tanaka et al. 2020): |theta| weights, an all-ones input, R = sum of the output;
    # score = sum |theta * dR/dtheta|. Double precision and eval mode keep it finite and data-free.
    synflow_model = build_model(desc, seed).double().eval()
    with torch.no_grad():
        for p in synflow_model.parameters():
            p.abs_()
    synflow_model.zero_grad()
    synflow_model(torch.ones((1, *split.x_train.shape[1:]), dtype=torch.float64)).sum().backward()
    with torch.no_grad():
        out["synflow_init"] = float(sum((p * p.grad).abs().sum() for p in synflow_model.parameters() if p.grad is not None))
    return out


def run_config(job: tuple[str, int, dict[str, Any]]) -> dict[str, float]:
    """Train one configuration to the end; its signals and final metric."""
    import torch

    from sbsearch.data import DATASETS
    from sbsearch.space import config_from_params
    from sbsearch.spec import parse_spec
    from sbsearch.trainer import train
    from sbsearch.trial import build_trial, train_plan

    torch.set_num_threads(1)
    space, index, params = job
    spec = parse_spec(SPACES[space])
    metric = DATASETS[spec.data.dataset].objective[0]
    config = config_from_params(spec, params)
    split, desc = build_trial(spec, config)
    row: dict[str, float] = {"index": float(index), **_init_signals(split, desc, spec.seed)}
    start = time.perf_counter()
    try:
        result = train(split, desc, train_plan(spec), strategies=config.all_settings())
    except Exception:  # noqa: BLE001 - a diverged configuration has no final metric: left out of the correlations
        return {**row, "final": math.nan}
    first = next((k for k in result.history[0] if k.startswith("sb_score.")), None)  # in layer order
    norm = params.get("norm.kind", "none")
    for e in EARLY:
        epoch = result.history[e - 1]
        row[f"sb_score@{e}"] = epoch.get("sb_score", math.nan)
        for kind in ("none", "batch"):  # one split per normalisation; the other stays NaN, out of the rho
            row[f"sb_score[norm {kind}]@{e}"] = epoch.get("sb_score", math.nan) if norm == kind else math.nan
        row[f"sb_score.first@{e}"] = epoch.get(first, math.nan) if first else math.nan
        row[f"sb_drift@{e}"] = epoch.get("sb_drift", math.nan)
        row[f"{metric}@{e}"] = epoch[metric]
    row["final"] = result.final[metric]
    row["seconds"] = time.perf_counter() - start
    return row


def spearman_ci(x: np.ndarray, y: np.ndarray, boot: int, rng: np.random.Generator) -> tuple[float, float, float, int]:
    """rho and its bootstrap 95% interval over the finite pairs; and how many pairs there were."""
    from scipy.stats import spearmanr

    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 4:
        return math.nan, math.nan, math.nan, len(x)
    rho = float(spearmanr(x, y)[0])
    draws = []
    for _ in range(boot):
        idx = rng.integers(0, len(x), len(x))
        if len(set(x[idx])) > 1 and len(set(y[idx])) > 1:
            draws.append(spearmanr(x[idx], y[idx])[0])
    lo, hi = np.nanpercentile(draws, [2.5, 97.5]) if draws else (math.nan, math.nan)
    return rho, float(lo), float(hi), len(x)


def prediction_part(args: argparse.Namespace) -> str:
    """Part ``predict``: the Spearman table of early signals against the final metric, as markdown."""
    from sbsearch.data import DATASETS
    from sbsearch.rank import sample_configs
    from sbsearch.spec import parse_spec

    start = time.perf_counter()
    spaces = args.spaces.split(",")
    configs = 4 if args.quick else args.configs
    jobs = []
    for space in spaces:
        spec = parse_spec(SPACES[space])
        for i, config in enumerate(sample_configs(spec, configs, seed=spec.seed)):
            jobs.append((space, i, {k: config.params[k] for k in config.searched}))
    with mp.get_context("spawn").Pool(args.processes) as pool:
        results = pool.map(run_config, jobs, chunksize=1)
    rng = np.random.default_rng(0)
    lines = ["# Score validity: Spearman correlation with the final metric",
             "",
             (f"{configs} sampled configurations per space, 3 replicas each, trained to the end; "
              f"bootstrap 95% intervals ({args.bootstrap} resamples)."),
             ""]
    header = "| signal | " + " | ".join(f"{s} (final {DATASETS[parse_spec(SPACES[s]).data.dataset].objective[0]})"
                                          for s in spaces) + " |"
    lines += [header, "|---|" + "---:|" * len(spaces)]
    by_space = {s: [r for r, (sp, _, _) in zip(results, jobs) if sp == s] for s in spaces}
    signal_names: list[str] = []
    for s in spaces:
        metric = DATASETS[parse_spec(SPACES[s]).data.dataset].objective[0]
        for name in [*(f"sb_score@{e}" for e in EARLY),
                     *(f"sb_score[norm {kind}]@{e}" for kind in ("none", "batch") for e in EARLY),
                     *(f"sb_score.first@{e}" for e in EARLY), *(f"sb_drift@{e}" for e in EARLY),
                     *(f"{metric}@{e}" for e in EARLY), "parameters", "synflow_init", "grad_norm_init"]:
            key = name.replace(metric, "metric")
            if key not in signal_names:
                signal_names.append(key)
    for key in signal_names:
        cells = []
        for s in spaces:
            metric = DATASETS[parse_spec(SPACES[s]).data.dataset].objective[0]
            name = key.replace("metric", metric)
            rows = by_space[s]
            x = np.array([r.get(name, math.nan) for r in rows], dtype=float)
            y = np.array([r["final"] for r in rows], dtype=float)
            rho, lo, hi, n = spearman_ci(x, y, args.bootstrap, rng)
            cells.append("n/a" if math.isnan(rho) else f"{rho:+.2f} [{lo:+.2f}, {hi:+.2f}] (n={n})")
        subset = {"[norm none]": " (no norm only)", "[norm batch]": " (batch norm only)"}
        label = key.replace("metric", "val metric").replace("sb_score.first", "first layer's sb_score")
        label = label.replace("@", " after epoch ")
        for tag, words in subset.items():
            if tag in label:
                label = label.replace(tag, "") + words
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for s in spaces:
        finals = np.array([r["final"] for r in by_space[s]], dtype=float)
        ok = finals[np.isfinite(finals)]
        secs = sum(r.get("seconds", 0.0) for r in by_space[s])
        lines.append(f"- {s}: final metric from {ok.min():.4g} to {ok.max():.4g} (median {np.median(ok):.4g}); "
                     f"{len(ok)} of {len(finals)} configurations finished; {secs:.0f} s of training.")
    lines.append(f"- wall time {time.perf_counter() - start:.0f} s with {args.processes} processes.")
    return "\n".join(lines)


# --- part monotonicity: what the score measures --------------------------------------------------


def _knob_base(space: str, **model: Any) -> dict[str, Any]:
    """One of ``SPACES`` without its search space: every strategy at its default (off)."""
    raw = copy.deepcopy(SPACES[space])
    raw.pop("space")
    raw["model"].update(model)
    if raw["train"].get("optimizer") != "lbfgs":  # L-BFGS runs its replicas one after another anyway
        # Fixed, not auto: a timing made on a busy machine would otherwise decide how dropout masks are drawn.
        raw["train"]["replica_mode"] = "batched"
    return raw


KNOB_BASES: dict[str, dict[str, Any]] = {
    "digits": _knob_base("digits"),
    # Three conv blocks, so that stem (1 group block), early (2) and all (3) are three different networks:
    # at depth 2, early is the stem.
    "digits_depth3": _knob_base("digits", depth=3),
    "fn_highfreq": _knob_base("fn_highfreq"),
}

BASE_WORDS = {"digits": "small_cnn 8x2 on digits, Adam", "digits_depth3": "small_cnn 8x3 on digits, Adam",
              "fn_highfreq": "MLP 32x2 on fn_highfreq, L-BFGS"}


@dataclass(frozen=True)
class KnobSweep:
    """One knob at four levels on one base: what a level changes in the spec, and what it changes besides
    symmetry breaking (``mechanical``; empty when the scored weights are the same draws at every level)."""

    knob: str
    base: str
    labels: tuple[str, ...]
    patches: tuple[dict[str, Any], ...]
    mechanical: str = ""
    control: bool = False  # breaks no symmetry: the learning-rate control

    def level_spec(self, level: int) -> dict[str, Any]:
        return _merged(KNOB_BASES[self.base], self.patches[level])


def _merged(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        out[key] = _merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _sweep(path: str, base: str, values: tuple[Any, ...], mechanical: str = "", control: bool = False) -> KnobSweep:
    """``path`` as in a spec (``space.asymmetry.fraction``, ``train.lr``), one level per value."""
    patches = []
    for value in values:
        patch: Any = value
        for key in reversed(path.split(".")):
            patch = {key: patch}
        patches.append(patch)
    knob = path.removeprefix("space.")
    return KnobSweep(knob, base, tuple(str(v) for v in values), tuple(patches), mechanical, control)


_FROZEN_WORDS = ("frozen entries are scored (default_score_layers scores whole tensors) and never move; at "
                 "initialisation they are normal draws where the rest is PyTorch's uniform draw")

SWEEPS: dict[str, KnobSweep] = {
    "asymmetry": _sweep("space.asymmetry.fraction", "digits", (0.0, 0.1, 0.3, 0.5), _FROZEN_WORDS),
    "syre": _sweep("space.syre.gamma", "digits", (0.0, 1e-4, 1e-3, 1e-2)),
    "dropout": _sweep("space.dropout.rate", "digits", (0.0, 0.1, 0.3, 0.5)),
    # Grid layout, the paper's fill 0.5, stem unchanged: the scored weights keep their shapes (the head pools
    # to 4x4 whatever the input size), so every level scores the same draws at initialisation.
    "expansion": KnobSweep("expansion.factor", "digits", ("1", "2", "3", "4"), tuple(
        {"space": {"expansion": {"factor": k, "fill": 0.5, "layout": "grid", "stem": "none"}}} for k in (1, 2, 3, 4))),
    "equivariance": KnobSweep(
        "equivariance.where (how: layers, C4)", "digits_depth3", ("none", "stem", "early", "all"),
        ({"space": {"equivariance": {"how": "none"}}},
         *({"space": {"equivariance": {"how": "layers", "where": w, "group": "c4"}}}
           for w in ("stem", "early", "all"))),
        "the scored tensors change: group blocks are narrower (parameter-matched) and their base filters gain a "
        "group axis; with all, the head is the invariant readout"),
    "lr": _sweep("train.lr", "digits", (0.001, 0.002, 0.004, 0.008), control=True),
    "asymmetry_fn": _sweep("space.asymmetry.fraction", "fn_highfreq", (0.0, 0.1, 0.3, 0.5),
                           _FROZEN_WORDS + "; the first layer (fan-in 1) has none: round(f) = 0"),
    "syre_fn": _sweep("space.syre.gamma", "fn_highfreq", (0.0, 1e-4, 1e-3, 1e-2)),
    "dropout_fn": _sweep("space.dropout.rate", "fn_highfreq", (0.0, 0.1, 0.3, 0.5),
                         "none on the scored tensors (the same draws at every level of a seed); L-BFGS keeps one "
                         "dropout mask per step, seen by every evaluation of its line search"),
}
"""The knob sweeps, by name (``--sweeps``)."""

TIME_POINTS = ("init", "1", "3", "last")
"""When the score is read: the initial weights (epoch 0), after epochs 1 and 3, after the last epoch."""


def _epoch_of(point: str, epochs: int) -> int:
    return {"init": 0, "last": epochs}.get(point, int(point) if point.isdigit() else -1)


def _entries_kept(weights: list[dict[str, Any]], masks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each replica's weights without its frozen entries, flattened (every unit freezes as many entries in
    every replica, so the replicas keep equal sizes)."""
    return [{name: w[~mask[name]] if name in mask else w.reshape(-1) for name, w in replica.items()}
            for replica, mask in zip(weights, masks)]


def run_knob_level(job: tuple[str, int, int, int]) -> dict[str, Any]:
    """Train one level of one sweep at one trial seed (``epochs`` 0: the base's own); its scores over time."""
    import torch

    from sbsearch.data import DATASETS
    from sbsearch.models import FROZEN_MASK, build_model, count_parameters
    from sbsearch.score import default_score_layers, drift_score, replica_score
    from sbsearch.space import config_from_params
    from sbsearch.spec import parse_spec
    from sbsearch.trainer import replica_seeds, train
    from sbsearch.trial import build_trial, train_plan

    torch.set_num_threads(1)
    name, level, seed, epochs = job
    raw = SWEEPS[name].level_spec(level)
    if epochs:
        raw["train"]["epochs"] = epochs
    spec = parse_spec(raw)
    metric = DATASETS[spec.data.dataset].objective[0]
    config = config_from_params(spec, {})
    split, desc = build_trial(spec, config)  # the base seed's split: the same data at every level and seed
    plan = replace(train_plan(spec), seed=seed)
    # The replicas' initial weights as the trainer draws them, from the description the strategies edited.
    models = [build_model(desc, s) for s in replica_seeds(seed, plan.replicas)]
    layers = default_score_layers(models[0])
    initial = [{n: p.detach().clone() for n, p in m.named_parameters() if n in layers} for m in models]
    masks = [{n: m.get_buffer(n + FROZEN_MASK) for n in layers if n + FROZEN_MASK in dict(m.named_buffers())}
             for m in models]
    row: dict[str, Any] = {"sweep": name, "level": level, "seed": seed, "epochs": plan.epochs,
                           "parameters": count_parameters(models[0]),
                           "scored_entries": sum(initial[0][n].numel() for n in layers),
                           "frozen_entries": sum(int(mask.sum()) for mask in masks[0].values()),
                           "sb_score@init": replica_score(initial, layers).value, "sb_drift@init": 0.0,
                           "sb_score_trainable@init": replica_score(_entries_kept(initial, masks), layers).value}
    start, cpu = time.perf_counter(), time.process_time()
    try:
        result = train(split, desc, plan, strategies=config.all_settings())
    except Exception as err:  # noqa: BLE001 - a diverged run has no scores after epoch 0: left out of the correlations
        return {**row, "failed": f"{type(err).__name__}: {err}"}
    for point in TIME_POINTS[1:]:
        epoch = result.history[_epoch_of(point, plan.epochs) - 1]
        row[f"sb_score@{point}"], row[f"sb_drift@{point}"] = epoch["sb_score"], epoch["sb_drift"]
        row[f"metric@{point}"] = epoch[metric]
    last = result.history[-1]
    row["metric_std@last"], row["train_loss@last"] = last[f"{metric}_std"], last["train_loss"]
    final = [{n: w[n] for n in layers} for w in result.weights]
    # The initial weights above must be the trainer's own: its last sb_drift is measured against them.
    assert abs(drift_score(final, initial, layers).value - last["sb_drift"]) < 1e-6, "initial weights differ"
    row["sb_score_trainable@last"] = replica_score(_entries_kept(final, masks), layers).value
    row["sb_drift_trainable@last"] = drift_score(_entries_kept(final, masks), _entries_kept(initial, masks)).value
    row["seconds"], row["cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
    return row


def _level_resamples(levels: np.ndarray, boot: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap index sets (boot, n) that resample the runs within each level (every level keeps its count)."""
    groups = [np.flatnonzero(levels == level) for level in np.unique(levels)]
    return np.stack([np.concatenate([rng.choice(g, len(g)) for g in groups]) for _ in range(boot)])


def _partial_spearman_rows(x: np.ndarray, y: np.ndarray, z: np.ndarray | None = None) -> np.ndarray:
    """Spearman's rho of x and y along each row of (B, n) arrays, or with z given: the correlation of the rank
    residuals after a straight-line fit on z's ranks. NaN where a row has no spread left."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x, axis=1), rankdata(y, axis=1)
    rx, ry = rx - rx.mean(axis=1, keepdims=True), ry - ry.mean(axis=1, keepdims=True)
    if z is not None:
        rz = rankdata(z, axis=1)
        rz = rz - rz.mean(axis=1, keepdims=True)
        spread = (rz * rz).sum(axis=1, keepdims=True)
        spread = np.where(spread > 0, spread, 1.0)  # a constant z leaves rz = 0: nothing to take out
        rx = rx - (rx * rz).sum(axis=1, keepdims=True) / spread * rz
        ry = ry - (ry * rz).sum(axis=1, keepdims=True) / spread * rz
    norm = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 1e-9, (rx * ry).sum(axis=1) / norm, math.nan)


def _partial_spearman(x: np.ndarray, y: np.ndarray, z: np.ndarray | None) -> float:
    """``_partial_spearman_rows`` of one sample."""
    return float(_partial_spearman_rows(x[None], y[None], None if z is None else z[None])[0])


@dataclass(frozen=True)
class Rho:
    value: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        if math.isnan(self.value):
            return "n/a"
        if math.isnan(self.low):
            return f"{self.value:+.2f} [n/a]"
        return f"{self.value:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def _rho(x: np.ndarray, y: np.ndarray, draws: np.ndarray, z: np.ndarray | None = None) -> Rho:
    """(Partial) Spearman rho over the runs where every value is finite, with its bootstrap 95% interval
    (``draws``: (boot, n) index sets; a resample with no spread left is dropped)."""
    keep = np.isfinite(x) & np.isfinite(y) & (np.isfinite(z) if z is not None else True)
    if keep.sum() < 4:
        return Rho(math.nan, math.nan, math.nan, int(keep.sum()))
    value = _partial_spearman(x[keep], y[keep], None if z is None else z[keep])
    if keep.all():
        boot = _partial_spearman_rows(x[draws], y[draws], None if z is None else z[draws])
    else:  # resamples of different sizes: one at a time
        boot = np.array([_partial_spearman(x[idx], y[idx], None if z is None else z[idx])
                         for idx in (row[keep[row]] for row in draws)])
    finite = boot[np.isfinite(boot)]
    if math.isnan(value) or len(finite) < len(boot) / 2:
        return Rho(value, math.nan, math.nan, int(keep.sum()))
    low, high = np.percentile(finite, [2.5, 97.5])
    return Rho(value, float(low), float(high), int(keep.sum()))


def _column(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([float(r.get(key, math.nan)) for r in rows], dtype=float)


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


@dataclass
class SweepStats:
    """What the verdict and the summary read of one sweep, at the last epoch."""

    name: str
    metric: str
    score: Rho
    drift: Rho
    trainable: Rho | None
    given_metric: Rho
    given_drift: Rho
    score_vs_drift: Rho
    metric_vs_knob: Rho
    init: Rho


def _sweep_section(name: str, rows: list[dict[str, Any]], boot: int, rng: np.random.Generator,
                   seeds: int) -> tuple[list[str], SweepStats, list[str]]:
    """The markdown of one sweep's table, its summary figures, and its rows of accuracy-tied level pairs."""
    from scipy.stats import mannwhitneyu

    from sbsearch.data import DATASETS

    sweep = SWEEPS[name]
    metric = DATASETS[KNOB_BASES[sweep.base]["data"]["dataset"]].objective[0]
    epochs = int(rows[0]["epochs"])
    rows = sorted(rows, key=lambda r: (r["level"], r["seed"]))
    level = _column(rows, "level")
    draws = _level_resamples(level, boot, rng)
    present = [i for i in range(len(sweep.labels)) if (level == i).any()]
    point_words = {"init": "init", "1": "epoch 1", "3": "epoch 3", "last": f"epoch {epochs} (last)"}

    def line(label: str, point: str, key: str, rho: bool = True) -> str:
        values = _column(rows, key)
        means = [_fmt(float(np.nanmean(values[level == i]))) if np.isfinite(values[level == i]).any() else "n/a"
                 for i in present]
        cell = str(_rho(level, values, draws)) if rho else ""
        return f"| {label} | {point_words.get(point, point)} | " + " | ".join(means) + f" | {cell} |"

    failed = [r for r in rows if "failed" in r]
    lines = [(f"### {sweep.knob}{' (control: breaks no symmetry)' if sweep.control else ''} — "
              f"{BASE_WORDS[sweep.base]}, {epochs} epochs"),
             "",
             f"Levels {', '.join(sweep.labels[i] for i in present)}; {seeds} trial seeds x 3 replicas per level"
             + (f"; {len(failed)} runs diverged" if failed else "") + ". "
             + (f"Mechanical effect: {sweep.mechanical}." if sweep.mechanical else
                "The scored tensors are the same draws at every level of a seed (no mechanical effect)."),
             "",
             "| signal | after | " + " | ".join(sweep.labels[i] for i in present) + " | rho with level [95%] |",
             "|---|---|" + "---:|" * len(present) + "---:|"]
    for point in TIME_POINTS:
        lines.append(line("sb_score", point, f"sb_score@{point}"))
    for point in TIME_POINTS[1:]:
        lines.append(line("sb_drift", point, f"sb_drift@{point}"))
    frozen = any(r["frozen_entries"] > 0 for r in rows)
    if frozen:
        lines.append(line("sb_score, trainable entries only", "init", "sb_score_trainable@init"))
        lines.append(line("sb_score, trainable entries only", "last", "sb_score_trainable@last"))
        lines.append(line("sb_drift, trainable entries only", "last", "sb_drift_trainable@last"))
    lines.append(line(metric, "last", "metric@last"))
    lines.append(line(f"replicas' std of {metric}", "last", "metric_std@last"))
    lines.append(line("parameters", "init", "parameters", rho=False))
    lines.append(line("scored entries", "init", "scored_entries", rho=False))
    if frozen:
        lines.append(line("frozen entries among them", "init", "frozen_entries", rho=False))
    lines.append("")

    score, drift, final = _column(rows, "sb_score@last"), _column(rows, "sb_drift@last"), _column(rows, "metric@last")
    # With frozen entries, the partial correlations read the trainable entries: the frozen ones move the
    # score by construction.
    moving = _column(rows, "sb_score_trainable@last") if frozen else score
    moving_drift = _column(rows, "sb_drift_trainable@last") if frozen else drift
    stats = SweepStats(
        name=name, metric=metric, score=_rho(level, score, draws), drift=_rho(level, drift, draws),
        trainable=_rho(level, moving, draws) if frozen else None,
        given_metric=_rho(level, moving, draws, final), given_drift=_rho(level, moving, draws, moving_drift),
        score_vs_drift=_rho(moving, moving_drift, draws), metric_vs_knob=_rho(level, final, draws),
        init=_rho(level, _column(rows, "sb_score@init"), draws))

    # Levels that end at the same metric: |difference of level means| below the replicas' own spread.
    noise = float(np.nanmean(_column(rows, "metric_std@last")))
    ties = []
    for a in present:
        for b in present:
            if b <= a:
                continue
            fa, fb = final[level == a], final[level == b]
            sa, sb = moving[level == a], moving[level == b]
            sa, sb = sa[np.isfinite(sa)], sb[np.isfinite(sb)]
            if len(sa) < 2 or len(sb) < 2 or abs(np.nanmean(fa) - np.nanmean(fb)) >= noise:
                continue
            spread = math.sqrt((np.var(sa, ddof=1) + np.var(sb, ddof=1)) / 2)
            effect = (sb.mean() - sa.mean()) / spread if spread > 0 else math.nan
            p = float(mannwhitneyu(sa, sb, alternative="two-sided", method="exact").pvalue)
            ties.append(f"| {name} | {sweep.labels[a]} vs {sweep.labels[b]} | {_fmt(float(np.nanmean(fa)))} vs "
                        f"{_fmt(float(np.nanmean(fb)))} | {_fmt(noise)} | {_fmt(float(sa.mean()))} vs "
                        f"{_fmt(float(sb.mean()))} | {effect:+.1f} "
                        f"| {p:.3f} |")
    return lines, stats, ties


def _progress_lines(rows: list[dict[str, Any]], boot: int,
                    rng: np.random.Generator) -> tuple[list[str], dict[str, Rho]]:
    """How the score moves with training itself, per base: its mean at each time point over every run,
    how often it grew from epoch 1 to the last, and its rank correlation with sb_drift over runs x epochs."""
    lines = [("| base | mean sb_score init / 1 / 3 / last | mean sb_drift 1 / 3 / last | runs whose sb_score grew "
              "from epoch 1 to the last | rho(sb_score, sb_drift), runs x epochs 1, 3, last |"),
             "|---|---|---|---:|---:|"]
    pooled: dict[str, Rho] = {}
    for base in KNOB_BASES:
        mine = [r for r in rows if SWEEPS[r["sweep"]].base == base and "failed" not in r]
        if not mine:
            continue
        scores = [float(np.mean(_column(mine, f"sb_score@{p}"))) for p in TIME_POINTS]
        drifts = [float(np.mean(_column(mine, f"sb_drift@{p}"))) for p in TIME_POINTS[1:]]
        grew = int(np.sum(_column(mine, "sb_score@last") > _column(mine, "sb_score@1")))
        x = np.concatenate([_column(mine, f"sb_score@{p}") for p in TIME_POINTS[1:]])
        y = np.concatenate([_column(mine, f"sb_drift@{p}") for p in TIME_POINTS[1:]])
        runs = len(mine)
        # Resample runs, keeping each run's three time points together.
        picked = rng.integers(0, runs, (boot, runs))
        draws = np.concatenate([picked + k * runs for k in range(3)], axis=1)
        pooled[base] = _rho(x, y, draws)
        lines.append(f"| {BASE_WORDS[base]} | {' / '.join(_fmt(v) for v in scores)} | "
                     f"{' / '.join(_fmt(v) for v in drifts)} | {grew} of {runs} | {pooled[base]} |")
    return lines, pooled


def _verdict(stats: dict[str, SweepStats], pooled: dict[str, Rho]) -> list[str]:
    """The plain verdict from fixed rules, each with the figures it rests on.

    Counted knobs: every non-control sweep whose scored weights are the same draws at every level, and
    asymmetry through its trainable entries; equivariance changes the scored population itself and is
    reported but not counted. A knob "moves the score" when the interval of rho(level, sb_score) at the last
    epoch excludes 0; its effect is "beyond training progress" when rho(level, sb_score | sb_drift) excludes
    0 with the same sign.
    """
    counted = {name: (s.trainable if s.trainable is not None else s.score) for name, s in stats.items()
               if not SWEEPS[name].control and name != "equivariance"}
    moved = {name: r for name, r in counted.items() if r.excludes_zero()}
    signs = {name: int(np.sign(r.value)) for name, r in moved.items()}
    beyond = [name for name, r in moved.items()
              if stats[name].given_drift.excludes_zero() and np.sign(stats[name].given_drift.value) == signs[name]]
    control = stats.get("lr")
    tracks_drift = [base for base, r in pooled.items() if r.excludes_zero() and abs(r.value) >= 0.5]
    lines = ["## Verdict", ""]
    if not counted:
        return [*lines, "No knob sweep was run: no verdict."]
    lines.append(f"- Knobs counted: {', '.join(counted)} (equivariance is left out: its levels score different "
                 "tensors; asymmetry is read through its trainable entries).")
    lines.append(f"- The score moves with the knob (interval excluding 0 at the last epoch) in {len(moved)} of "
                 f"{len(counted)}: " + (", ".join(f"{n} {counted[n]}" for n in moved) or "none") +
                 (f"; not in {', '.join(f'{n} {counted[n]}' for n in counted if n not in moved)}"
                  if len(moved) < len(counted) else "") + ".")
    if moved:
        same = len(set(signs.values())) == 1
        lines.append(f"- Direction: {'the same in all of them' if same else 'mixed'} "
                     f"({', '.join(f'{n} {s:+d}' for n, s in signs.items())}; + = a stronger knob, a higher score).")
        lines.append(f"- Beyond training progress (rho given sb_drift still excludes 0, same sign): {len(beyond)} of "
                     f"{len(moved)}"
                     + (f" ({', '.join(f'{n} {stats[n].given_drift}' for n in beyond)})" if beyond else "")
                     + "; given sb_drift the others read " +
                     (", ".join(f"{n} {stats[n].given_drift}" for n in moved if n not in beyond) or "nothing") + ".")
    if control is not None:
        lines.append(f"- Control (learning rate, breaks no symmetry): rho(level, sb_score) {control.score}, "
                     f"rho(level, sb_drift) {control.drift}.")
    lines.append("- Score against drift over runs x epochs: " +
                 ", ".join(f"{BASE_WORDS[b]} {r}" for b, r in pooled.items()) + ".")
    lines.append("")
    consistent = bool(moved) and len(set(signs.values())) == 1
    control_moves = control is not None and control.score.excludes_zero()
    strongest = float(np.median([abs(r.value) for r in moved.values()])) if moved else 0.0
    if (len(moved) * 3 >= 2 * len(counted) and consistent and len(beyond) * 2 >= len(moved)
            and not (control_moves and abs(control.score.value) >= strongest)):  # type: ignore[union-attr]
        words = ("**It measures symmetry breaking**, by these rules: the score moves with most of the knobs, in one "
                 "direction, beyond what their effect on training progress explains, and the learning rate moves "
                 "it less.")
    # Progress needs both: a score that tracks drift, and a learning rate (which breaks no symmetry) that moves it.
    elif control_moves and tracks_drift and len(beyond) * 2 < max(1, len(moved)):
        words = ("**It measures training progress rather than symmetry breaking**, by these rules: "
                 + ("the learning-rate control, which breaks no symmetry, moves it" if control_moves else "")
                 + (" and " if control_moves and tracks_drift else "")
                 + (f"it tracks sb_drift ({', '.join(tracks_drift)})" if tracks_drift else "")
                 + ("; where a knob moves it, that effect does not survive holding sb_drift fixed in most cases"
                    if moved else "; no counted knob moves it")
                 + ("" if consistent or not moved else ", and the knobs move it in mixed directions") + ".")
    else:
        words = ("**Neither, by these rules**: the score is not monotone in most knobs in one direction beyond "
                 "training progress, nor is it explained by training progress alone.")
    lines.append(words)
    return lines


def monotonicity_part(args: argparse.Namespace) -> str:
    """Part ``monotonicity``: the knob sweeps, their tables, the tied pairs and the verdict, as markdown."""
    start = time.perf_counter()
    names = [n for n in args.sweeps.split(",") if n] if args.sweeps else list(SWEEPS)
    unknown = [n for n in names if n not in SWEEPS]
    if unknown:
        raise SystemExit(f"--sweeps: must name sweeps of {', '.join(SWEEPS)}, but got {', '.join(unknown)}")
    seeds = 2 if args.quick else args.seeds
    epochs = 3 if args.quick else 0
    jobs = [(name, level, seed, epochs) for name in names
            for level in ((0, len(SWEEPS[name].labels) - 1) if args.quick else range(len(SWEEPS[name].labels)))
            for seed in range(seeds)]
    # The costliest first (group convolutions, large expanded inputs), so that no worker is left with them at the end.
    jobs.sort(key=lambda job: -(job[1] + 1) * (4 if job[0] in ("equivariance", "expansion") else 1))
    with mp.get_context("spawn").Pool(args.processes) as pool:
        rows = list(pool.imap_unordered(run_knob_level, jobs, chunksize=1))
    rng = np.random.default_rng(0)
    lines = ["# What the score measures: monotonicity in symmetry-breaking knobs", "",
             (f"Each knob at each level, {seeds} trial seeds x 3 replicas, the data split fixed (the base seed's); "
              f"Spearman's rho over every level x seed run, bootstrap 95% intervals ({args.bootstrap} resamples of "
              "the runs within each level). Level columns hold the means over seeds. sb_drift is 0 at "
              "initialisation by definition."), ""]
    stats: dict[str, SweepStats] = {}
    ties: list[str] = []
    for name in names:
        mine = [r for r in rows if r["sweep"] == name]
        section, stats[name], tied = _sweep_section(name, mine, args.bootstrap, rng, seeds)
        lines += section
        ties += tied
    lines += ["## At the last epoch, all sweeps", "",
              ("Where a sweep freezes entries (asymmetry), the two partial correlations and rho(sb_score, sb_drift) "
               "read the trainable entries' sb_score and sb_drift."), "",
              ("| sweep | rho(level, sb_score) | rho(level, sb_score), trainable entries | rho(level, sb_drift) | "
               "rho(level, sb_score given final metric) | rho(level, sb_score given sb_drift) | "
               "rho(sb_score, sb_drift) | "
               "rho(level, final metric) |"),
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in stats.items():
        lines.append(f"| {name} ({s.metric}) | {s.score} | {s.trainable or ''} | {s.drift} | {s.given_metric} | "
                     f"{s.given_drift} | {s.score_vs_drift} | {s.metric_vs_knob} |")
    lines += ["", "## Does the score separate levels that end at the same metric?", "",
              ("Pairs of levels of one sweep whose mean final metrics differ by less than the replicas' mean standard "
               "deviation of it; the last epoch's sb_score (asymmetry: its trainable entries') compared by a two-sided "
               "exact Mann-Whitney test over the seeds, and its difference in units of the within-level standard "
               "deviation."), ""]
    if ties:
        lines += ["| sweep | levels | final metric | replicas' std | sb_score | difference / sd | p |",
                  "|---|---|---:|---:|---:|---:|---:|", *ties]
    else:
        lines.append("No two levels of any sweep ended within the replicas' spread of each other.")
    progress, pooled = _progress_lines(rows, args.bootstrap, rng)
    lines += ["", "## How the score moves with training itself", "", *progress, "", *_verdict(stats, pooled), ""]
    failed = [r for r in rows if "failed" in r]
    for r in failed:
        lines.append(f"- diverged: {r['sweep']} level {SWEEPS[r['sweep']].labels[r['level']]} seed {r['seed']}: "
                     f"{r['failed'][:200]}")
    seconds = sum(float(r.get("seconds", 0.0)) for r in rows)
    cpu = sum(float(r.get("cpu_seconds", 0.0)) for r in rows)
    lines.append(f"- {len(rows)} runs, {seconds:.0f} s of training ({cpu:.0f} s of CPU time); wall time "
                 f"{time.perf_counter() - start:.0f} s with {args.processes} processes"
                 f"{' (--quick)' if args.quick else ''}.")
    return "\n".join(lines)


PARTS = {"predict": prediction_part, "monotonicity": monotonicity_part}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=tuple(PARTS), default="predict",
                        help="predict: early signals against the final metric; monotonicity: the score against "
                             "symmetry-breaking knobs")
    parser.add_argument("--configs", type=int, default=32, help="predict: configurations per space (default 32)")
    parser.add_argument("--spaces", default="digits,fn_highfreq", help="predict: comma-separated: digits, fn_highfreq")
    parser.add_argument("--sweeps", default="", help=f"monotonicity: comma-separated, of {', '.join(SWEEPS)} "
                                                     "(default: all)")
    parser.add_argument("--seeds", type=int, default=5, help="monotonicity: trial seeds per level (default 5)")
    parser.add_argument("--quick", action="store_true",
                        help="a minute or two: predict with 4 configurations; monotonicity with the outer two levels, "
                             "2 seeds and 3 epochs")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--write", help="also write the markdown output to this file")
    args = parser.parse_args()
    text = PARTS[args.part](args)
    print(text)
    if args.write:
        with open(args.write, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
