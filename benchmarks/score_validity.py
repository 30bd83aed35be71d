"""Does the replica score predict the final result better than cheaper signals? Measured, in one run.

For N sampled configurations of a digits space (small CNN, Adam) and of a function-approximation space
(MLP, L-BFGS, fn_highfreq), each trained to the end with 3 replicas, the Spearman correlation with the
final validation metric (mean over replicas) of:

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
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import time
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
    task_loss(model(x).unsqueeze(0), y, split.task).backward()
    out["grad_norm_init"] = float(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.grad is not None)).detach())
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
    except Exception:  # a diverged configuration has no final metric: left out of the correlations
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", type=int, default=32, help="configurations per space (default 32)")
    parser.add_argument("--spaces", default="digits,fn_highfreq", help="comma-separated: digits, fn_highfreq")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--write", help="also write the markdown output to this file")
    args = parser.parse_args()

    from sbsearch.data import DATASETS
    from sbsearch.rank import sample_configs
    from sbsearch.spec import parse_spec

    start = time.perf_counter()
    spaces = args.spaces.split(",")
    jobs = []
    for space in spaces:
        spec = parse_spec(SPACES[space])
        for i, config in enumerate(sample_configs(spec, args.configs, seed=spec.seed)):
            jobs.append((space, i, {k: config.params[k] for k in config.searched}))
    with mp.get_context("spawn").Pool(args.processes) as pool:
        results = pool.map(run_config, jobs, chunksize=1)
    rng = np.random.default_rng(0)
    lines = ["# Score validity: Spearman correlation with the final metric",
             "",
             f"{args.configs} sampled configurations per space, 3 replicas each, trained to the end; "
             f"bootstrap 95% intervals ({args.bootstrap} resamples).",
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
    text = "\n".join(lines)
    print(text)
    if args.write:
        with open(args.write, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
