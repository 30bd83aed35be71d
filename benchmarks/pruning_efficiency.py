"""What each pruning rule saves and what it costs: the same seeded sweep under every rule.

A digits sweep (small CNN, 3 replicas, random sampler: every rule sees the same configurations in the
same order for a given seed) runs under none, median, hyperband, wasserstein and combined, for several
seeds, through ``sbsearch.sweep.run_sweep`` with the Optuna backend (MLflow off to save time). For each
rule: the best final accuracy found, the epochs trained and the wall time, each as a ratio to ``none``
with the same seed, and the best accuracy's difference to ``none`` in percentage points.

    python benchmarks/pruning_efficiency.py --seeds 0,1,2,3,4 --trials 30 --epochs 8 --write benchmarks/results/pruning_efficiency.md
    python benchmarks/pruning_efficiency.py --warmup 1 --quantile 0.7 --write benchmarks/results/pruning_efficiency_aggressive.md

``combined_metric`` (the combined rule on the metric alone) is the control for what ``sb_score`` adds.

The aim (issue 4): with wasserstein or combined, the best final metric within 0.5 points of none while
training at most half the epochs, and fewer epochs than median at the same loss. Sweeps run two at a
time (one torch thread each), so wall times share the machine with each other and anything else.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

PRUNERS = ("none", "median", "hyperband", "wasserstein", "combined", "wasserstein_low", "combined_metric")
# Rows that are a rule with a fixed option: the score's direction taken from benchmarks/score_validity.py
# (on the digits, a low early sb_score went with a high final accuracy) instead of learned in the sweep.
# `combined_metric` is the combined rule fitted on the metric alone: what is left when the score is taken out.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"wasserstein_low": ("wasserstein", {"score_direction": "low_is_good"}),
                                                   "combined_metric": ("combined", {"combined_score": False})}


def sweep_dict(seed: int, row: str, trials: int, epochs: int, warmup: int = 2, quantile: float = 0.5) -> dict[str, Any]:
    pruner, options = VARIANTS.get(row, (row, {}))
    return {
        "name": f"pruning-{row}-{seed}", "seed": seed,
        "data": {"dataset": "digits", "batch_size": 64},
        "model": {"name": "small_cnn", "width": 8, "depth": 1},
        "train": {"epochs": epochs, "lr": 0.003, "replicas": 3, "threads": 1},
        # K=2 without an adapted stem, dropout and no normalisation make slow or poor trials to stop.
        "space": {"expansion": {"factor": [1, 2], "fill": [0.0, 0.5, 1.0], "stem": ["none", "stride"]},
                  "norm": {"kind": ["none", "batch"]}, "dropout": {"rate": [0.0, 0.3]}},
        "search": {"sampler": "random", "trials": trials, "pruner": pruner, "warmup_epochs": warmup,
                   "prune_quantile": quantile, "min_finished": 5, **options},
    }


def warm_up() -> None:
    """Imports, the data set's cache and torch's first calls, before any sweep is timed."""
    import torch
    from rich.console import Console

    from sbsearch.spec import parse_spec
    from sbsearch.sweep import run_sweep

    torch.set_num_threads(1)
    raw = sweep_dict(0, "none", 1, 1)
    with tempfile.TemporaryDirectory() as tmp, open("/dev/null", "w") as devnull:
        run_sweep(parse_spec(raw), Path(tmp) / "out", console=Console(file=devnull), track=False)


def run_one(job: tuple[int, str, int, int, int, float]) -> dict[str, Any]:
    import torch
    from rich.console import Console

    from sbsearch.spec import parse_spec
    from sbsearch.sweep import run_sweep

    torch.set_num_threads(1)
    seed, pruner, trials, epochs, warmup, quantile = job
    spec = parse_spec(sweep_dict(seed, pruner, trials, epochs, warmup, quantile))
    with tempfile.TemporaryDirectory() as tmp, open("/dev/null", "w") as devnull:
        start, cpu = time.perf_counter(), time.process_time()
        result = run_sweep(spec, Path(tmp) / "out", console=Console(file=devnull), track=False)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    best = result.best
    reasons = [r.reason for r in result.records if r.state == "PRUNED"]
    return {"seed": seed, "pruner": pruner, "best": best.final[result.metric] if best else float("nan"),
            "epochs": sum(r.epochs_run for r in result.records), "seconds": seconds, "cpu": cpu,
            "pruned": len(reasons), "by_score": sum(r.startswith(("wasserstein", "combined")) for r in reasons)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--pruners", default=",".join(PRUNERS))
    parser.add_argument("--warmup", type=int, default=2, help="search.warmup_epochs of every rule")
    parser.add_argument("--quantile", type=float, default=0.5, help="search.prune_quantile of wasserstein and combined")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--write", help="also write the markdown output to this file")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    pruners = args.pruners.split(",")
    assert pruners[0] == "none", "ratios are to none: list it first"
    start = time.perf_counter()
    jobs = [(seed, p, args.trials, args.epochs, args.warmup, args.quantile) for seed in seeds for p in pruners]
    with mp.get_context("spawn").Pool(args.processes, initializer=warm_up) as pool:
        rows = pool.map(run_one, jobs, chunksize=1)
    by = {(r["seed"], r["pruner"]): r for r in rows}

    lines = ["# Pruning efficiency: the same seeded sweep under each rule", "",
             (f"digits, small_cnn width 8, 3 replicas, {args.trials} random-sampler trials of {args.epochs} epochs, "
              f"warm-up {args.warmup} epochs, prune_quantile {args.quantile}, min_finished 5; seeds {args.seeds}. "
              "Ratios are to `none` with the same seed, then averaged over seeds (mean, and min to max). "
              "CPU time is the sweep process's own (one torch thread), which other jobs on the machine "
              "disturb less than wall time. `wasserstein_low` is wasserstein with score_direction: low_is_good; "
              "`combined_metric` is combined with combined_score: false (the metric alone)."), "",
             ("| rule | best final accuracy | difference to none (points) | best ratio | epochs ratio | wall-time ratio | "
              "CPU-time ratio | pruned trials | pruned by the score rule itself |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in pruners:
        mine = [by[(s, p)] for s in seeds]
        base = [by[(s, "none")] for s in seeds]

        def span(values: list[float], fmt: str) -> str:
            return f"{statistics.mean(values):{fmt}} ({min(values):{fmt}} to {max(values):{fmt}})"

        lines.append(
            f"| {p} | {statistics.mean(r['best'] for r in mine):.4f} "
            f"| {span([100 * (r['best'] - b['best']) for r, b in zip(mine, base)], '+.2f')} "
            f"| {span([r['best'] / b['best'] for r, b in zip(mine, base)], '.4f')} "
            f"| {span([r['epochs'] / b['epochs'] for r, b in zip(mine, base)], '.2f')} "
            f"| {span([r['seconds'] / b['seconds'] for r, b in zip(mine, base)], '.2f')} "
            f"| {span([r['cpu'] / b['cpu'] for r, b in zip(mine, base)], '.2f')} "
            f"| {statistics.mean(r['pruned'] for r in mine):.1f} of {args.trials} "
            f"| {statistics.mean(r['by_score'] for r in mine):.1f} |")
    lines += ["", "Per seed (best accuracy / epochs trained / wall seconds):", "",
              "| seed | " + " | ".join(pruners) + " |", "|---|" + "---|" * len(pruners)]
    for s in seeds:
        lines.append(f"| {s} | " + " | ".join(
            f"{by[(s, p)]['best']:.4f} / {by[(s, p)]['epochs']} / {by[(s, p)]['seconds']:.0f}" for p in pruners) + " |")
    lines += ["", f"Wall time of the benchmark: {time.perf_counter() - start:.0f} s with {args.processes} sweeps at a time."]
    text = "\n".join(lines)
    print(text)
    if args.write:
        with open(args.write, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
