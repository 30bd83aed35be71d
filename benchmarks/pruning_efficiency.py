"""What each pruning rule saves and what it costs: the same seeded sweep under every rule.

A sweep (3 replicas, random sampler: every rule sees the same configurations in the same order for a
given seed) runs under each rule, for several seeds, through ``sbsearch.sweep.run_sweep`` with the
Optuna backend (MLflow off to save time). For each rule: the best final metric found, the epochs trained
and the wall time, each as a ratio to ``none`` with the same seed, and the best metric's difference to
``none`` and to ``combined_metric``. The tasks (``--dataset``, one or several):

- ``digits``: a small CNN on the sklearn digits, 8 epochs of Adam (the default; its earlier results in
  benchmarks/results/pruning_efficiency*.md were measured with these settings);
- ``digits_c4``: the same sweep on the digits turned by multiples of 90 degrees;
- ``fn_highfreq``: benchmarks/score_validity.py's function space (an MLP, 20 epochs of L-BFGS, vector
  expansion and frozen asymmetric weights), whose objective is val_mse, minimised.

    python benchmarks/pruning_efficiency.py --seeds 0,1,2,3,4 --trials 30 --epochs 8 --write benchmarks/results/pruning_efficiency.md
    python benchmarks/pruning_efficiency.py --warmup 1 --quantile 0.7 --write benchmarks/results/pruning_efficiency_aggressive.md
    python benchmarks/pruning_efficiency.py --replay --verify combined_drift --dataset digits,digits_c4,fn_highfreq \\
        --pruners none,median,combined_metric,combined,combined_drift,combined_all --curves /tmp/curves.json \\
        --write benchmarks/results/pruning_efficiency_drift.md
    python benchmarks/pruning_efficiency.py --replay --verify combined_drift --dataset digits,digits_c4,fn_highfreq \\
        --pruners none,median,combined_metric,combined,combined_drift,combined_all --curves /tmp/curves.json \\
        --warmup 1 --quantile 0.7 --write benchmarks/results/pruning_efficiency_drift_aggressive.md

The combined rule's rows differ in what it fits beside the metric (``search.combined_features``):
``combined_metric`` nothing (the control), ``combined`` sb_score, ``combined_drift`` sb_drift,
``combined_all`` both.

``--replay`` runs only the ``none`` sweeps and replays every other rule on their learning curves: with
the random sampler and the fixed schedule, trial n of a seed gets the same configuration and trains
the same way under every rule, sees trials 0..n-1 as its peers, and a trial stopped after epoch e has
the first e epochs of its full curve. So the best metric, the epochs and the trials pruned are those a
real sweep under the rule gives, at the cost of one sweep per seed; the time is estimated from the
``none`` sweep's trials (a trial stopped after e of E epochs costs e/E of its time). ``--verify ROWS``
also runs those rules as real sweeps on the first seed of the first data set and compares every
trial's state and epochs with their replay.

The aim (issue 4): with wasserstein or combined, the best final metric within 0.5 points of none while
training at most half the epochs, and fewer epochs than median at the same loss. Sweeps run two at a
time (one torch thread each), so wall times share the machine with each other and anything else.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

PRUNERS = ("none", "median", "hyperband", "wasserstein", "combined", "wasserstein_low", "combined_metric",
           "combined_drift", "combined_all")
# Rows that are a rule with a fixed option: the score's direction taken from benchmarks/score_validity.py
# (on the digits, a low early sb_score went with a high final accuracy) instead of learned in the sweep;
# and the combined rule fitted on other metrics beside the objective than sb_score, its default.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "wasserstein_low": ("wasserstein", {"score_direction": "low_is_good"}),
    "combined_metric": ("combined", {"combined_features": []}),
    "combined_drift": ("combined", {"combined_features": ["sb_drift"]}),
    "combined_all": ("combined", {"combined_features": ["sb_score", "sb_drift"]}),
}

DIGITS: dict[str, Any] = {
    "data": {"dataset": "digits", "batch_size": 64},
    "model": {"name": "small_cnn", "width": 8, "depth": 1},
    "train": {"epochs": 8, "lr": 0.003, "replicas": 3, "threads": 1},
    # K=2 without an adapted stem, dropout and no normalisation make slow or poor trials to stop.
    "space": {"expansion": {"factor": [1, 2], "fill": [0.0, 0.5, 1.0], "stem": ["none", "stride"]},
              "norm": {"kind": ["none", "batch"]}, "dropout": {"rate": [0.0, 0.3]}},
}
TASKS: dict[str, dict[str, Any]] = {
    "digits": DIGITS,
    "digits_c4": {**DIGITS, "data": {**DIGITS["data"], "dataset": "digits_c4"}},
    # benchmarks/score_validity.py's function space, where sb_drift after epoch 1 and 2 followed the final
    # val_mse about as closely as the early val_mse did.
    "fn_highfreq": {
        "data": {"dataset": "fn_highfreq", "domain": [0, "2pi"], "sampling": "grid", "points": 200},
        "model": {"name": "mlp", "width": 32, "depth": 2, "first_bias": "zero"},
        "train": {"epochs": 20, "optimizer": "lbfgs", "lr": 1.0, "replicas": 3, "threads": 1},
        "space": {"expansion": {"factor": [1, 3, 5], "fill": [0.0, 1.0, "pi"], "layout": ["border", "upsample"]},
                  "asymmetry": {"fraction": [0.0, 0.25]}},
    },
}
WORDS = {
    "digits": "digits, small_cnn width 8, Adam",
    "digits_c4": "digits turned by multiples of 90 degrees (digits_c4), small_cnn width 8, Adam",
    "fn_highfreq": "fn_highfreq (val_mse, minimised), mlp width 32 depth 2, L-BFGS",
}


def sweep_dict(seed: int, row: str, trials: int, epochs: int | None = None, warmup: int = 2, quantile: float = 0.5,
               dataset: str = "digits") -> dict[str, Any]:
    pruner, options = VARIANTS.get(row, (row, {}))
    raw = copy.deepcopy(TASKS[dataset])
    if epochs is not None:
        raw["train"]["epochs"] = epochs
    return {
        "name": f"pruning-{dataset}-{row}-{seed}", "seed": seed, **raw,
        "search": {"sampler": "random", "trials": trials, "pruner": pruner, "warmup_epochs": warmup,
                   "prune_quantile": quantile, "min_finished": 5, **options},
    }


def warm_up(datasets: list[str]) -> None:
    """Imports, the data sets' caches and torch's first calls, before any sweep is timed."""
    import torch
    from rich.console import Console

    from sbsearch.spec import parse_spec
    from sbsearch.sweep import run_sweep

    torch.set_num_threads(1)
    for dataset in datasets:
        raw = sweep_dict(0, "none", 1, 1, dataset=dataset)
        with tempfile.TemporaryDirectory() as tmp, open("/dev/null", "w") as devnull:
            run_sweep(parse_spec(raw), Path(tmp) / "out", console=Console(file=devnull), track=False)


Job = tuple[str, int, str, int, int | None, int, float]  # data set, seed, rule, trials, epochs, warm-up, quantile


def run_one(job: Job) -> dict[str, Any]:
    import torch
    from rich.console import Console

    from sbsearch.spec import parse_spec
    from sbsearch.study import trial_level
    from sbsearch.sweep import run_sweep

    torch.set_num_threads(1)
    dataset, seed, pruner, trials, epochs, warmup, quantile = job
    spec = parse_spec(sweep_dict(seed, pruner, trials, epochs, warmup, quantile, dataset))
    with tempfile.TemporaryDirectory() as tmp, open("/dev/null", "w") as devnull:
        start, cpu = time.perf_counter(), time.process_time()
        result = run_sweep(spec, Path(tmp) / "out", console=Console(file=devnull), track=False)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    row = summary(dataset, seed, pruner, result.metric, result.direction, spec.train.epochs, result.records)
    # The trials as --replay needs them: each one's state, epochs, time and metrics after every epoch (as
    # the rules see them: without the per-layer scores).
    curves = [{"number": r.number, "state": str(r.state.value), "params": r.params, "final": r.final,
               "epochs_run": r.epochs_run, "seconds": r.seconds, "reason": r.reason,
               "history": [trial_level(m) for m in r.history]}
              for r in sorted(result.records, key=lambda r: r.number)]
    return {**row, "seconds": seconds, "cpu": cpu, "curves": curves}


def summary(dataset: str, seed: int, pruner: str, metric: str, direction: str, epochs_each: int,
            records: list[Any]) -> dict[str, Any]:
    """A sweep's row: the best final metric chosen on validation, epochs trained, trials pruned."""
    from sbsearch.sweep import chosen_on_validation

    chosen = chosen_on_validation(records, metric, direction)
    reasons = [r.reason for r in records if r.state == "PRUNED"]
    return {"dataset": dataset, "seed": seed, "pruner": pruner, "metric": metric, "direction": direction,
            "epochs_each": epochs_each, "best": chosen[0].final[metric] if chosen else float("nan"),
            "epochs": sum(r.epochs_run for r in records), "pruned": len(reasons),
            "by_score": sum(r.startswith(("wasserstein", "combined")) for r in reasons),
            "outcomes": [[r.number, str(r.state.value), r.epochs_run] for r in sorted(records, key=lambda r: r.number)]}


def replay(none: dict[str, Any], pruner: str, args: argparse.Namespace) -> dict[str, Any]:
    """The row of ``pruner`` replayed on the trials of the ``none`` sweep of the same data set and seed
    (see the module docstring), trial after trial, each judged after every epoch by the rule the spec
    gives, against the trials before it as they ended under the rule."""
    from sbsearch.pruning import PeerTrial, rule_for
    from sbsearch.spec import parse_spec
    from sbsearch.study import trial_level
    from sbsearch.trial import TrialRecord, TrialState

    dataset, seed, metric, direction = none["dataset"], none["seed"], none["metric"], none["direction"]
    spec = parse_spec(sweep_dict(seed, pruner, args.trials, args.epochs, args.warmup, args.quantile, dataset))
    rule = rule_for(spec, metric, direction)
    peers: list[PeerTrial] = []
    records: list[TrialRecord] = []
    seconds = 0.0
    for full in (TrialRecord(**c) for c in none["curves"]):
        record = full
        for epoch, metrics in enumerate(full.history, start=1):
            # As sbsearch.trial.run_trial: a trial that ran every epoch is complete, never pruned.
            reason = rule.decide(epoch, metrics, peers, full.number) if epoch < spec.train.epochs else None
            if reason is not None:
                record = dataclasses.replace(full, state=TrialState.PRUNED, reason=reason, epochs_run=epoch,
                                             history=full.history[:epoch])
                break
        seconds += full.seconds * record.epochs_run / max(1, full.epochs_run)
        records.append(record)
        final = record.final.get(metric) if record.state == TrialState.COMPLETE else None
        peers.append(PeerTrial(record.number, str(record.state.value),
                               {e: trial_level(m) for e, m in enumerate(record.history, start=1)}, final))
    base_seconds = sum(c["seconds"] for c in none["curves"])
    row = summary(dataset, seed, pruner, metric, direction, spec.train.epochs, records)
    # Times as the none sweep's: its own wall and CPU time, scaled by the trials' estimated share.
    share = seconds / base_seconds
    return {**row, "seconds": none["seconds"] * share, "cpu": none["cpu"] * share}


def span(values: list[float], fmt: str) -> str:
    return f"{statistics.mean(values):{fmt}} ({min(values):{fmt}} to {max(values):{fmt}})"


def section(dataset: str, rows: list[dict[str, Any]], seeds: list[int], pruners: list[str],
            args: argparse.Namespace, heading: str) -> list[str]:
    by = {(r["seed"], r["pruner"]): r for r in rows}
    metric, direction, epochs = rows[0]["metric"], rows[0]["direction"], rows[0]["epochs_each"]
    accuracy = metric.endswith("accuracy")
    # Differences in the metric's own terms, positive when better: points for an accuracy, the raw
    # difference for an error.
    scale, unit, fmt = (100.0, "points", "+.2f") if accuracy else (1.0, metric, "+.4f")
    sign = 1.0 if direction == "maximize" else -1.0

    def gain(r: dict[str, Any], base: dict[str, Any]) -> float:
        return sign * scale * (r["best"] - base["best"]) + 0.0  # + 0.0: no -0.00

    control = "combined_metric" if "combined_metric" in pruners else None
    lines = [heading, "",
             (f"{WORDS[dataset]}, 3 replicas, {args.trials} random-sampler trials of {epochs} epochs, "
              f"warm-up {args.warmup} epochs, prune_quantile {args.quantile}, min_finished 5; seeds {args.seeds}. "
              "Ratios are to `none` with the same seed, then averaged over seeds (mean, and min to max). "
              f"Differences of the best final {metric} are in {unit}, positive when better than the other rule. "
              + ("Every rule but `none` is replayed on the `none` sweep's learning curves (--replay); its "
                 "times are estimated from the `none` sweep's trials. " if args.replay else
                 "CPU time is the sweep process's own (one torch thread), which other jobs on the machine "
                 "disturb less than wall time. ")
              + "`wasserstein_low` is wasserstein with score_direction: low_is_good; "
              "`combined_metric`, `combined`, `combined_drift` and `combined_all` are combined with "
              "combined_features [], [sb_score], [sb_drift] and [sb_score, sb_drift]."), "",
             (f"| rule | best final {metric} | difference to none | "
              + ("difference to combined_metric | " if control else "")
              + "best ratio | epochs ratio | "
              + ("time ratio (estimated) | " if args.replay else "wall-time ratio | CPU-time ratio | ")
              + "pruned trials | pruned by the rule itself, not its fallback |"),
             "|---|---:|---:|" + ("---:|" if control else "") + "---:|---:|" + ("---:|" if args.replay else "---:|---:|")
             + "---:|---:|"]
    for p in pruners:
        mine = [by[(s, p)] for s in seeds]
        base = [by[(s, "none")] for s in seeds]
        versus = f"| {span([gain(r, by[(r['seed'], control)]) for r in mine], fmt)} " if control else ""
        lines.append(
            f"| {p} | {statistics.mean(r['best'] for r in mine):.4f} "
            f"| {span([gain(r, b) for r, b in zip(mine, base)], fmt)} "
            f"{versus}"
            f"| {span([r['best'] / b['best'] for r, b in zip(mine, base)], '.4f')} "
            f"| {span([r['epochs'] / b['epochs'] for r, b in zip(mine, base)], '.2f')} "
            + ("" if args.replay else f"| {span([r['seconds'] / b['seconds'] for r, b in zip(mine, base)], '.2f')} ")
            + f"| {span([r['cpu'] / b['cpu'] for r, b in zip(mine, base)], '.2f')} "
            f"| {statistics.mean(r['pruned'] for r in mine):.1f} of {args.trials} "
            f"| {statistics.mean(r['by_score'] for r in mine):.1f} |")
    seconds = "seconds, estimated but for none" if args.replay else "wall seconds"
    lines += ["", f"Per seed (best {metric} / epochs trained / {seconds}):", "",
              "| seed | " + " | ".join(pruners) + " |", "|---|" + "---|" * len(pruners)]
    for s in seeds:
        lines.append(f"| {s} | " + " | ".join(
            f"{by[(s, p)]['best']:.4f} / {by[(s, p)]['epochs']} / {by[(s, p)]['seconds']:.0f}" for p in pruners) + " |")
    return lines


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a stored none sweep must share with this run to be replayed in it (the rules' own settings,
    warm-up and quantile among them, may differ: that is what replaying them again is for)."""
    return {"trials": args.trials, "epochs": args.epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="digits", help="comma-separated: " + ", ".join(TASKS))
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: 8 on the digits, 20 on "
                                                                 "fn_highfreq)")
    parser.add_argument("--pruners", default=",".join(PRUNERS))
    parser.add_argument("--warmup", type=int, default=2, help="search.warmup_epochs of every rule")
    parser.add_argument("--quantile", type=float, default=0.5, help="search.prune_quantile of wasserstein and combined")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--replay", action="store_true", help="run the none sweeps only and replay every other "
                                                                  "rule on their learning curves")
    parser.add_argument("--verify", default="", help="with --replay: comma-separated rules also run as real sweeps "
                                                     "on the first seed of the first data set, to compare with their "
                                                     "replay")
    parser.add_argument("--curves", help="with --replay: a JSON file that keeps the none sweeps (read when present, "
                                         "written when not), so that rules can be replayed again without training")
    parser.add_argument("--write", help="also write the markdown output to this file")
    args = parser.parse_args()
    datasets = args.dataset.split(",")
    unknown = [d for d in datasets if d not in TASKS]
    assert not unknown, f"--dataset: {unknown} not among {list(TASKS)}"
    seeds = [int(s) for s in args.seeds.split(",")]
    pruners = args.pruners.split(",")
    assert pruners[0] == "none", "ratios are to none: list it first"
    verify = [v for v in args.verify.split(",") if v]
    assert args.replay or not (verify or args.curves), "--verify and --curves go with --replay"
    start = time.perf_counter()
    stored: list[dict[str, Any]] = []
    if args.curves and Path(args.curves).exists():
        stored = json.loads(Path(args.curves).read_text(encoding="utf-8"))
        assert stored[0]["settings"] == settings(args), f"--curves: {args.curves} holds sweeps of other settings"
    have = {(r["dataset"], r["seed"]) for r in stored}
    # The longest sweeps (none, then the function task's) first, so that the pool does not end on one.
    jobs: list[Job] = [(d, seed, p, args.trials, args.epochs, args.warmup, args.quantile)
                       for p in (["none"] if args.replay else pruners) for d in reversed(datasets) for seed in seeds
                       if (d, seed) not in have or p != "none"]
    jobs += [(datasets[0], seeds[0], p, args.trials, args.epochs, args.warmup, args.quantile) for p in verify]
    if jobs:
        with mp.get_context("spawn").Pool(args.processes, initializer=warm_up, initargs=(datasets,)) as pool:
            ran = pool.map(run_one, jobs, chunksize=1)
    else:
        ran = []
    rows = [r for r in ran if args.replay is False or r["pruner"] == "none"] + stored
    if args.curves and len(rows) > len(stored):
        keep = [{**r, "settings": settings(args)} for r in rows if r["pruner"] == "none"]
        Path(args.curves).write_text(json.dumps(keep), encoding="utf-8")
    checks: list[str] = []
    if args.replay:
        nones = {(r["dataset"], r["seed"]): r for r in rows if r["pruner"] == "none"}
        rows = [nones[(d, s)] for d in datasets for s in seeds]
        rows += [replay(nones[(d, s)], p, args) for p in pruners[1:] for d in datasets for s in seeds]
        by = {(r["dataset"], r["seed"], r["pruner"]): r for r in rows}
        for real in (r for r in ran if r["pruner"] in verify):
            mine = by.get((real["dataset"], real["seed"], real["pruner"])) or replay(
                nones[(real["dataset"], real["seed"])], real["pruner"], args)
            same = all(mine[k] == real[k] for k in ("best", "epochs", "pruned", "by_score", "outcomes"))
            checks.append(f"{real['dataset']} seed {real['seed']} {real['pruner']}: every trial's state and epochs "
                          f"{'the same' if same else 'DIFFERENT'} (real sweep: best {real['best']:.4f}, {real['epochs']} "
                          f"epochs, {real['pruned']} pruned, {real['by_score']} by the rule itself; replay: "
                          f"{mine['best']:.4f}, {mine['epochs']}, {mine['pruned']}, {mine['by_score']})")

    lines: list[str] = []
    for d in datasets:
        if lines:
            lines.append("")
        title = "Pruning efficiency: the same seeded sweep under each rule"
        heading = f"# {title}" if len(datasets) == 1 else f"## {d}"
        if len(datasets) > 1 and len(lines) == 0:
            lines += [f"# {title}", ""]
        lines += section(d, [r for r in rows if r["dataset"] == d], seeds, pruners, args, heading)
    if checks:
        lines += ["", "Replays checked against real sweeps of the same rule:", "", *(f"- {c}" for c in checks)]
    lines += ["", f"Wall time of the benchmark: {time.perf_counter() - start:.0f} s with {args.processes} sweeps at a time"
              + (f" ({len(jobs)} run, the rest replayed" if args.replay else "")
              + (f"; {len(stored)} none sweeps read from --curves, trained in an earlier run)." if stored else
                 ")." if args.replay else ".")]
    text = "\n".join(lines)
    print(text)
    if args.write:
        with open(args.write, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
