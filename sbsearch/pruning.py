"""Early-stopping rules with one meaning in every backend.

After each epoch a backend asks its rule ``decide(epoch, metrics, peers)``: ``metrics`` are the running
trial's metrics at ``epoch``; ``peers`` are the sweep's other trials (any state), each with its
metrics after every epoch it ran and, when it completed, its final objective. The rule answers with a
reason to stop (stored as the trial's ``reason``) or ``None`` to continue. Rules are plain frozen data
with no framework imports, so the Optuna and Ray backends share them.

Every rule judges a trial first at epoch ``max(1, warmup_epochs)`` and never with fewer than
``min_peers`` comparable peers:

- ``none``: never stops.
- ``median``: worse than the median of the completed trials at the same epoch.
- ``successive_halving``: at the rungs ``max(1, warmup) * eta**k``, keep the best ``1/eta`` of the trials
  that reached the rung (at least one).
- ``hyperband``: successive halving in brackets ``b = number % brackets`` whose first rung is
  ``max(1, warmup) * eta**b``; a trial is compared only with trials of its own bracket.
- ``wasserstein``: ``sb_score`` at the epoch ranks in the worst ``quantile`` of the trials that reached it.
  Which end is worst is fixed (``low_is_good`` / ``high_is_good``) or ``learned``: the sign of the
  Spearman correlation between the score at the epoch and the final objective over completed trials,
  once it is significant (``p < alpha``, at least ``min_finished`` trials); until then ``fallback``.
- ``combined``: a least-squares fit of the final objective on the objective and the ``features`` at the
  epoch (``sb_score``, ``sb_drift``, both or none) over completed trials predicts every trial that
  reached the epoch; a prediction in the worst ``quantile`` stops the trial. A feature the trial did
  not log (``sb_score`` with one replica) is left out of its fit, and peers that lack a feature the
  fit uses are left out of it. Before ``min_finished`` completed trials with every feature, ``fallback``.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from sbsearch.spec import Spec

__all__ = ["PeerTrial", "PruningRule", "NoPruning", "MedianRule", "SuccessiveHalvingRule", "HyperbandRule",
           "WassersteinRule", "CombinedRule", "PRUNERS", "make_rule", "rule_for", "learned_sign"]

SCORE = "sb_score"


@dataclass(frozen=True)
class PeerTrial:
    """Another trial of the sweep, as a rule sees it.

    ``history[epoch]`` holds the metrics the trial reported after ``epoch`` (counted from 1);
    ``final`` is its final objective when it completed, else None.
    """

    number: int
    state: str  # COMPLETE | PRUNED | FAIL | RUNNING
    history: Mapping[int, Mapping[str, float]] = field(default_factory=dict)
    final: float | None = None

    def at(self, epoch: int, key: str) -> float | None:
        """``key`` after ``epoch``, or None when the trial did not reach it or the value is not finite."""
        value = self.history.get(epoch, {}).get(key)
        return value if value is not None and math.isfinite(value) else None


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


@dataclass(frozen=True)
class PruningRule:
    """Base of the rules: never prunes.

    Attributes:
        metric: the objective's name in the metrics (``val_accuracy``, ``val_mse``).
        direction: ``maximize`` or ``minimize`` the objective.
        warmup_epochs: a trial is judged first after epoch ``max(1, warmup_epochs)``.
        min_peers: fewest comparable peers a judgement needs.
    """

    metric: str
    direction: str  # "maximize" | "minimize"
    warmup_epochs: int = 2
    min_peers: int = 3

    def decide(self, epoch: int, metrics: Mapping[str, float], peers: Sequence[PeerTrial],
               number: int = -1) -> str | None:
        """Return a reason to stop the trial now, or None.

        Args:
            epoch: the epoch just finished, counted from 1.
            metrics: this trial's metrics at ``epoch``.
            peers: the sweep's other trials (any state, this one excluded).
            number: this trial's number (``hyperband`` assigns brackets by it).
        """
        if epoch < max(1, self.warmup_epochs):
            return None
        return self.judge(epoch, metrics, peers, number)

    def judge(self, epoch: int, metrics: Mapping[str, float], peers: Sequence[PeerTrial], number: int) -> str | None:
        """``decide`` past the warm-up: what each rule implements."""
        return None

    def better(self, a: float, b: float) -> bool:
        """Whether objective value ``a`` is strictly better than ``b``."""
        return a > b if self.direction == "maximize" else a < b


NoPruning = PruningRule


def _worse_than_share(value: float, others: Sequence[float], high_is_good: bool) -> float:
    """The share of ``others`` strictly better than ``value``."""
    better = sum((o > value) if high_is_good else (o < value) for o in others)
    return better / len(others)


def _in_worst(value: float, others: Sequence[float], high_is_good: bool, quantile: float) -> bool:
    """Whether ``value`` lies in the worst ``quantile`` of ``others``: more than ``1 - quantile`` of them
    are strictly better (ties never prune)."""
    return _worse_than_share(value, others, high_is_good) > 1 - quantile


@dataclass(frozen=True)
class MedianRule(PruningRule):
    """Stop a trial whose objective is worse than the median of the completed trials at the same epoch."""

    def judge(self, epoch: int, metrics: Mapping[str, float], peers: Sequence[PeerTrial], number: int) -> str | None:
        value = metrics.get(self.metric)
        done = [v for p in peers if p.state == "COMPLETE" and (v := p.at(epoch, self.metric)) is not None]
        if not _finite(value) or len(done) < self.min_peers:
            return None
        assert value is not None
        median = float(statistics.median(done))
        if self.better(median, value):
            return (f"median: {self.metric}={value:.4g} at epoch {epoch} is worse than the median {median:.4g} "
                    f"of {len(done)} completed trials")
        return None


@dataclass(frozen=True)
class SuccessiveHalvingRule(PruningRule):
    """At the rungs ``max(1, warmup) * eta**k``, keep the best ``max(1, n // eta)`` of the ``n`` trials
    (this one included) that reached the rung, whatever their state."""

    reduction_factor: int = 3

    def first_rung(self, number: int) -> int:
        return max(1, self.warmup_epochs)

    def is_rung(self, epoch: int, first: int) -> bool:
        rung = first
        while rung < epoch:
            rung *= self.reduction_factor
        return rung == epoch

    def comparable(self, peer: PeerTrial, number: int) -> bool:
        return True

    def judge(self, epoch: int, metrics: Mapping[str, float], peers: Sequence[PeerTrial], number: int) -> str | None:
        value = metrics.get(self.metric)
        first = self.first_rung(number)
        if not _finite(value) or epoch < first or not self.is_rung(epoch, first):
            return None
        assert value is not None
        reached = [v for p in peers if self.comparable(p, number) and (v := p.at(epoch, self.metric)) is not None]
        if len(reached) < self.min_peers:
            return None
        keep = max(1, (len(reached) + 1) // self.reduction_factor)
        rank = 1 + sum(self.better(v, value) for v in reached)
        if rank > keep:
            return (f"{self.label(number)}: {self.metric}={value:.4g} at rung epoch {epoch} ranks {rank} of {len(reached) + 1} "
                    f"trials that reached it; the best {keep} go on")
        return None

    def label(self, number: int) -> str:
        return "successive_halving"


@dataclass(frozen=True)
class HyperbandRule(SuccessiveHalvingRule):
    """Successive halving in ``brackets`` brackets: trial ``number`` belongs to bracket ``number % brackets``,
    whose first rung is ``max(1, warmup) * eta**bracket``; trials are compared within their bracket.

    ``decide`` needs the trial's ``number``.
    """

    epochs: int = 10  # the longest a trial runs: brackets whose first rung lies beyond it are not used

    @property
    def brackets(self) -> int:
        low, count = max(1, self.warmup_epochs), 1
        while low * self.reduction_factor ** count < self.epochs:
            count += 1
        return count

    def first_rung(self, number: int) -> int:
        return int(max(1, self.warmup_epochs) * self.reduction_factor ** (max(number, 0) % self.brackets))

    def comparable(self, peer: PeerTrial, number: int) -> bool:
        return peer.number >= 0 and peer.number % self.brackets == max(number, 0) % self.brackets

    def label(self, number: int) -> str:
        return f"hyperband (bracket {max(number, 0) % self.brackets} of {self.brackets})"


def _spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Spearman's rho and its two-sided p-value; (nan, 1) when either side is constant."""
    from scipy.stats import rankdata, spearmanr

    if len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan, 1.0
    rho, p = spearmanr(x, y)
    if len(x) <= _EXACT_UP_TO:
        # The t approximation calls a perfect order of 4 trials significant (p = 0); with few trials
        # the exact permutation p-value is the honest one (4 trials can never reach p < 0.05).
        rx, ry = rankdata(x), rankdata(y)
        perms = np.array(list(itertools.permutations(ry)))  # (n!, n)
        centred = perms - perms.mean(axis=1, keepdims=True)
        cx = rx - rx.mean()
        rhos = centred @ cx / (np.linalg.norm(centred, axis=1) * np.linalg.norm(cx))
        p = float(np.mean(np.abs(rhos) >= abs(rho) - 1e-12))
    return float(rho), float(p) if math.isfinite(p) else 1.0


_EXACT_UP_TO = 7  # 7! = 5040 permutations: a millisecond


def learned_sign(peers: Sequence[PeerTrial], epoch: int, key: str, alpha: float, min_finished: int) -> tuple[int, str]:
    """The sign (+1, -1, or 0 while not significant) of the Spearman correlation between ``key`` at
    ``epoch`` and the final objective over completed peers, with a few words on the evidence."""
    pairs = [(v, p.final) for p in peers
             if p.state == "COMPLETE" and p.final is not None and math.isfinite(p.final) and (v := p.at(epoch, key)) is not None]
    # A trial that repeats an earlier one's network (a sweep's trials share their seeds) brings the same
    # pair to the last bit: it is no new evidence, and counting it would shrink the p-value.
    pairs = list(dict.fromkeys(pairs))
    if len(pairs) < min_finished:
        return 0, f"{len(pairs)} of {min_finished} completed trials needed"
    rho, p = _spearman([a for a, _ in pairs], [b for _, b in pairs])
    words = f"Spearman {rho:+.2f}, p={p:.2g} over {len(pairs)} completed trials"
    if not math.isfinite(rho) or p >= alpha or rho == 0:
        return 0, words
    return (1 if rho > 0 else -1), words


@dataclass(frozen=True)
class WassersteinRule(PruningRule):
    """Stop a trial whose ``sb_score`` at the epoch ranks in the worst ``quantile`` of the trials that
    reached the epoch; the worst end comes from ``score_direction`` or is learned (see the module)."""

    quantile: float = 0.5
    score_direction: str = "learned"
    fallback: str = "median"
    alpha: float = 0.05
    min_finished: int = 5

    def high_is_good(self, epoch: int, peers: Sequence[PeerTrial]) -> tuple[bool | None, str]:
        """Whether a high score is good at ``epoch`` (None: not known yet), and why."""
        if self.score_direction != "learned":
            return self.score_direction == "high_is_good", f"score_direction: {self.score_direction}"
        sign, words = learned_sign(peers, epoch, SCORE, self.alpha, self.min_finished)
        if sign == 0:
            return None, words
        # A positive correlation with an objective to maximise makes a high score good.
        good = (sign > 0) == (self.direction == "maximize")
        return good, f"learned: {'high' if good else 'low'} is good, {words}"

    def judge(self, epoch: int, metrics: Mapping[str, float], peers: Sequence[PeerTrial], number: int) -> str | None:
        score = metrics.get(SCORE)
        high_is_good, why = self.high_is_good(epoch, peers)
        if high_is_good is None or not _finite(score):
            return _fallback(self, epoch, metrics, peers, number, f"wasserstein: direction not known yet ({why})")
        assert score is not None
        reached = [v for p in peers if (v := p.at(epoch, SCORE)) is not None]
        if len(reached) < self.min_peers:
            return None
        if _in_worst(score, reached, high_is_good, self.quantile):
            return (f"wasserstein: {SCORE}={score:.4g} at epoch {epoch} is in the worst {self.quantile:.0%} of "
                    f"{len(reached)} trials that reached it ({why})")
        return None


def _fallback(rule: WassersteinRule | CombinedRule, epoch: int, metrics: Mapping[str, float],
              peers: Sequence[PeerTrial], number: int, because: str) -> str | None:
    if rule.fallback == "none":
        return None
    reason = MedianRule(rule.metric, rule.direction, rule.warmup_epochs, rule.min_peers).judge(epoch, metrics, peers, number)
    return f"{reason}; {because}" if reason else None


def _least_squares(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Coefficients of ``y ~ 1 + x`` (x: (n, k)), with a small ridge so that near-collinear columns do
    not blow up; the columns are standardised first, so the ridge treats them alike."""
    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std == 0] = 1.0
    z = np.hstack([np.ones((len(x), 1)), (x - mean) / std])  # (n, 1 + k)
    ridge = 1e-3 * np.eye(z.shape[1])
    ridge[0, 0] = 0.0
    beta = np.linalg.solve(z.T @ z + ridge, z.T @ y)
    # Fold the standardisation into the coefficients: prediction = beta0' + x @ beta'.
    slopes = beta[1:] / std
    return np.concatenate([[beta[0] - float(mean @ slopes)], slopes])


@dataclass(frozen=True)
class CombinedRule(PruningRule):
    """Predict the final objective from the objective and the ``features`` at the epoch (least squares
    over completed trials) and stop a trial whose prediction is in the worst ``quantile`` of the
    predictions for the trials that reached the epoch.

    ``features`` are metric names: ``sb_score`` (replicas against each other), ``sb_drift`` (each replica
    against its own initialisation). With none, the objective alone: the control that shows what they
    add. A feature this trial did not log (``sb_score`` with one replica) is left out of its fit, and the
    reason says so.
    """

    quantile: float = 0.5
    fallback: str = "median"
    min_finished: int = 5
    features: tuple[str, ...] = (SCORE,)

    def judge(self, epoch: int, metrics: Mapping[str, float], peers: Sequence[PeerTrial], number: int) -> str | None:
        if not _finite(metrics.get(self.metric)):
            return None
        absent = [k for k in self.features if not _finite(metrics.get(k))]
        keys = [self.metric, *(k for k in self.features if k not in absent)]

        def features(p: PeerTrial) -> list[float] | None:
            values = [p.at(epoch, k) for k in keys]
            return None if any(v is None for v in values) else values  # type: ignore[return-value]

        done = [(f, p.final) for p in peers if p.state == "COMPLETE" and _finite(p.final) and (f := features(p)) is not None]
        # One more completed trial than coefficients, at the least, for a fit that is not exact.
        if len(done) < max(self.min_finished, len(keys) + 2):
            return _fallback(self, epoch, metrics, peers, number, f"combined: {len(done)} of {self.min_finished} completed trials needed")
        coef = _least_squares(np.array([f for f, _ in done], dtype=float), np.array([y for _, y in done], dtype=float))

        def predict(f: Sequence[float]) -> float:
            return float(coef[0] + np.dot(coef[1:], f))

        reached = [predict(f) for p in peers if (f := features(p)) is not None]
        if len(reached) < self.min_peers:
            return None
        mine = predict([float(metrics[k]) for k in keys])
        if _in_worst(mine, reached, self.direction == "maximize", self.quantile):
            terms = " ".join(f"{c:+.3g}*{k}" for c, k in zip(coef[1:], keys))
            without = f"; without {', '.join(absent)}, which this trial did not log" if absent else ""
            return (f"combined: predicted final {self.metric}={mine:.4g} from epoch {epoch} is in the worst "
                    f"{self.quantile:.0%} of {len(reached)} trials that reached it (fit on {len(done)} completed "
                    f"trials: {coef[0]:.3g} {terms}{without})")
        return None


PRUNERS: dict[str, type[PruningRule]] = {
    "none": NoPruning,
    "median": MedianRule,
    "successive_halving": SuccessiveHalvingRule,
    "hyperband": HyperbandRule,
    "wasserstein": WassersteinRule,
    "combined": CombinedRule,
}


def make_rule(name: str, metric: str, direction: str, warmup_epochs: int, *, epochs: int = 10,
              reduction_factor: int = 3, quantile: float = 0.5, score_direction: str = "learned",
              fallback: str = "median", alpha: float = 0.05, min_finished: int = 5,
              combined_features: Sequence[str] = (SCORE,)) -> PruningRule:
    """The rule ``name`` of ``PRUNERS`` with the options it takes (the others are ignored).

    Example:
        >>> rule = make_rule("wasserstein", "val_accuracy", "maximize", 2, quantile=0.5)
        >>> rule.decide(1, {"val_accuracy": 0.5, "sb_score": 0.1}, peers=[])  # before the warm-up: None
    """
    cls = PRUNERS[name]
    if cls is HyperbandRule:
        return HyperbandRule(metric, direction, warmup_epochs, reduction_factor=reduction_factor, epochs=epochs)
    if cls is SuccessiveHalvingRule:
        return SuccessiveHalvingRule(metric, direction, warmup_epochs, reduction_factor=reduction_factor)
    if cls is WassersteinRule:
        return WassersteinRule(metric, direction, warmup_epochs, quantile=quantile, score_direction=score_direction,
                               fallback=fallback, alpha=alpha, min_finished=min_finished)
    if cls is CombinedRule:
        return CombinedRule(metric, direction, warmup_epochs, quantile=quantile, fallback=fallback,
                            min_finished=min_finished, features=tuple(combined_features))
    return cls(metric, direction, warmup_epochs)


def rule_for(spec: Spec, metric: str, direction: str) -> PruningRule:
    """The spec's rule (``search.pruner`` and its options) for an objective ``metric`` to ``direction``."""
    s = spec.search
    return make_rule(s.pruner, metric, direction, s.warmup_epochs, epochs=spec.train.epochs,
                     reduction_factor=s.reduction_factor, quantile=s.prune_quantile,
                     score_direction=s.score_direction, fallback=s.fallback, alpha=s.alpha,
                     min_finished=s.min_finished, combined_features=s.combined_features)
