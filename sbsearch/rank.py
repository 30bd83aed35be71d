"""Ranking before training: the replica score of sampled configurations after a few steps on a subset.

``sbsearch rank spec.yaml --configs N --steps S --subset F`` draws N distinct configurations of the
spec's space (seeded), trains each one's replicas for S optimiser steps on a fraction F of the training
data, and ranks them by ``sb_score`` next to the validation metric at that point. The table goes to the
terminal, to ``OUT/ranking.csv`` and to an MLflow run (``sbsearch.role: rank``) as an artifact.

Which end of the score is good is not known before any trial finished: the table lists high scores
first (the sign a first check on the digits found without batch normalisation) unless
``search.score_direction`` is ``low_is_good``, and prints the Spearman correlation between the score
and the metric across the ranked configurations so that the reader can judge.
"""

from __future__ import annotations

import csv
import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sbsearch.data import DATASETS, Split
from sbsearch.errors import Problem, SpecError
from sbsearch.logs import metric_text
from sbsearch.space import TrialConfig, sample_config
from sbsearch.spec import Spec
from sbsearch.tracking import Tracker, TrackingTarget, default_tracking_uri
from sbsearch.trainer import train
from sbsearch.trial import build_trial, train_plan

__all__ = ["RankRow", "Ranking", "rank_configs", "sample_configs", "format_ranking", "write_ranking"]


class SeededSuggest:
    """The ``Suggest`` protocol over Python's seeded ``random.Random``: uniform draws, log-uniform for
    log ranges, on the step grid when the range has a step."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def categorical(self, name: str, choices: tuple[Any, ...]) -> Any:
        return choices[self.rng.randrange(len(choices))]

    def float(self, name: str, low: float, high: float, log: bool, step: float | None) -> float:
        if step:
            return low + step * self.rng.randint(0, int(round((high - low) / step)))
        if log:
            return math.exp(self.rng.uniform(math.log(low), math.log(high)))
        return self.rng.uniform(low, high)

    def int(self, name: str, low: int, high: int, log: bool, step: int) -> int:
        if log:
            return min(high, max(low, int(round(math.exp(self.rng.uniform(math.log(low), math.log(high + 1) - 1e-9))))))
        return low + step * self.rng.randint(0, (high - low) // step)


def sample_configs(spec: Spec, n: int, seed: int) -> list[TrialConfig]:
    """``n`` distinct configurations (fewer when the space holds fewer), the same for the same seed."""
    rng, found, seen = random.Random(seed), [], set()
    for _ in range(50 * n):
        config = sample_config(spec, SeededSuggest(rng))
        key = tuple(sorted((k, repr(v)) for k, v in config.params.items()))
        if key not in seen:
            seen.add(key)
            found.append(config)
        if len(found) == n:
            break
    return found


@dataclass(frozen=True)
class RankRow:
    """One configuration after ``steps`` optimiser steps."""

    label: str
    params: dict[str, Any]
    score: float  # sb_score (nan when the replicas diverged)
    metric: float  # the validation objective at that point, mean over replicas
    seconds: float  # training and scoring


@dataclass(frozen=True)
class Ranking:
    rows: list[RankRow]  # best first, by the score
    metric: str
    high_first: bool
    steps: int
    subset: float
    replicas: int
    spearman: float  # between the score and the metric across rows (nan when undefined)


def _subset(split: Split, fraction: float, seed: int) -> Split:
    if fraction >= 1.0:
        return split
    n = split.x_train.shape[0]
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: max(1, int(round(n * fraction)))]
    return replace(split, x_train=split.x_train[keep], y_train=split.y_train[keep])


def check_rank_args(configs: int, steps: int, subset: float) -> None:
    """Raises SpecError with one line per bad argument."""
    problems = []
    if configs < 1:
        problems.append(Problem("--configs", "must be >= 1", configs))
    if steps < 1:
        problems.append(Problem("--steps", "must be >= 1", steps))
    if not 0 < subset <= 1:
        problems.append(Problem("--subset", "must be in (0, 1]", subset))
    if problems:
        raise SpecError(problems)


def rank_configs(spec: Spec, configs: int = 10, steps: int = 50, subset: float = 0.25,
                 progress: Any = None) -> Ranking:
    """Train the replicas of ``configs`` sampled configurations for ``steps`` steps on ``subset`` of the
    training data and rank them by ``sb_score``.

    Example:
        >>> ranking = rank_configs(load_spec("search_spaces/quickstart.yaml"), configs=4, steps=20)
        >>> print(format_ranking(ranking))
    """
    check_rank_args(configs, steps, subset)
    metric_name = DATASETS[spec.data.dataset].objective[0]
    replicas = max(2, spec.train.replicas)  # the score compares replicas: it needs two at least
    plan = replace(train_plan(spec), replicas=replicas, epochs=steps, max_steps=steps, test=False)
    rows = []
    for i, config in enumerate(sample_configs(spec, configs, spec.seed)):
        start = time.perf_counter()
        try:
            split, desc = build_trial(spec, config)
            result = train(_subset(split, subset, spec.seed), desc, plan, strategies=config.all_settings())
            score, metric = result.final.get("sb_score", math.nan), result.final.get(metric_name, math.nan)
        except Exception:  # a diverging or failing configuration ranks last, it does not end the ranking
            score = metric = math.nan
        rows.append(RankRow(config.label(), {k: config.params[k] for k in config.searched}, score, metric,
                            time.perf_counter() - start))
        if progress is not None:
            progress(i + 1, rows[-1])
    high_first = spec.search.score_direction != "low_is_good"
    finite = [r for r in rows if math.isfinite(r.score)]
    ordered = sorted(finite, key=lambda r: -r.score if high_first else r.score) + [r for r in rows if r not in finite]
    return Ranking(ordered, metric_name, high_first, steps, subset, replicas, _spearman(finite))


def _spearman(rows: list[RankRow]) -> float:
    pairs = [(r.score, r.metric) for r in rows if math.isfinite(r.metric)]
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return math.nan
    from scipy.stats import spearmanr

    return float(spearmanr([a for a, _ in pairs], [b for _, b in pairs])[0])


def format_ranking(ranking: Ranking) -> str:
    """The ranking as a markdown table with a line on how to read it."""
    lines = [f"| rank | configuration | sb_score | {ranking.metric} | seconds |", "|---:|---|---:|---:|---:|"]
    for i, r in enumerate(ranking.rows, 1):
        lines.append(f"| {i} | {r.label or '(fixed)'} | {r.score:.4f} | {metric_text(r.metric)} | {r.seconds:.1f} |")
    rho = "n/a" if math.isnan(ranking.spearman) else f"{ranking.spearman:+.2f}"
    lines += ["", (f"{ranking.replicas} replicas, {ranking.steps} steps on {ranking.subset:.0%} of the training data; "
                   f"{'high' if ranking.high_first else 'low'} sb_score first; Spearman(sb_score, {ranking.metric}) = {rho}.")]
    return "\n".join(lines)


def write_ranking(ranking: Ranking, spec: Spec, out_dir: Path, tracking_uri: str | None = None,
                  track: bool = True) -> tuple[Path, str | None]:
    """``OUT/ranking.csv`` and an MLflow run with the table (``ranking.md``) and the CSV as artifacts.

    Returns the CSV's path and the run id (None when ``track`` is false)."""
    out_dir = out_dir.resolve()  # artifact locations are file URIs, which a relative path cannot be
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "ranking.csv"
    searched = [p.name for p in spec.searched]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rank", "label", *searched, "sb_score", ranking.metric, "seconds"])
        for i, r in enumerate(ranking.rows, 1):
            writer.writerow([i, r.label, *[r.params.get(k, "") for k in searched], repr(r.score), repr(r.metric),
                             f"{r.seconds:.3f}"])
    if not track:
        return path, None
    uri = tracking_uri or spec.tracking.uri or default_tracking_uri(out_dir)
    tracker = Tracker(TrackingTarget(uri, spec.tracking.experiment or spec.name, (out_dir / "mlartifacts").as_uri()))
    tracker.check_reachable()
    client = tracker.client
    run = client.create_run(tracker.experiment_id(), run_name=f"rank {spec.name}",
                            tags={"sbsearch.role": "rank"})
    run_id = run.info.run_id
    for key, value in {"configs": len(ranking.rows), "steps": ranking.steps, "subset": ranking.subset,
                       "replicas": ranking.replicas, "seed": spec.seed, "dataset": spec.data.dataset,
                       "model": spec.model.name}.items():
        client.log_param(run_id, key, str(value))
    if not math.isnan(ranking.spearman):
        client.log_metric(run_id, "spearman_score_metric", ranking.spearman)
    client.log_text(run_id, format_ranking(ranking) + "\n", "ranking.md")
    tracker.log_artifact(run_id, path)
    client.set_terminated(run_id, status="FINISHED")
    return path, run_id
