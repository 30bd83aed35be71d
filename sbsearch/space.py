"""The search space: turns a validated spec into trial configurations, whatever backend samples them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from sbsearch.spec import ParamSpec, Spec
from sbsearch.strategies import STRATEGIES

__all__ = ["Suggest", "TrialConfig", "sample_config", "grid_values", "config_from_params", "trial_budget"]


class Suggest(Protocol):
    """What a backend offers to draw one value (Optuna's trial fits it through a thin adapter)."""

    def categorical(self, name: str, choices: tuple[Any, ...]) -> Any: ...

    def float(self, name: str, low: float, high: float, log: bool, step: float | None) -> float: ...

    def int(self, name: str, low: int, high: int, log: bool, step: int) -> int: ...


@dataclass(frozen=True)
class TrialConfig:
    """Every knob's value for one trial, by ``<strategy>.<knob>`` name.

    ``searched`` names the knobs the space varies; the others hold their fixed or default value.
    """

    params: Mapping[str, Any]
    searched: tuple[str, ...]

    def settings(self, strategy: str) -> dict[str, object]:
        prefix = strategy + "."
        return {k[len(prefix):]: v for k, v in self.params.items() if k.startswith(prefix)}

    def all_settings(self) -> dict[str, dict[str, object]]:
        return {name: self.settings(name) for name in STRATEGIES}

    def label(self) -> str:
        """A short human label of the searched values (``K=2 fill=0.5 norm=batch``)."""
        parts = []
        for name in self.searched:
            value = self.params[name]
            short = _SHORT.get(name, name.split(".", 1)[1])
            parts.append(f"{short}={_fmt(value)}")
        return " ".join(parts)


_SHORT = {"expansion.factor": "K", "expansion.fill": "fill", "dropout.rate": "drop", "norm.kind": "norm",
          "expansion.stem": "stem", "expansion.layout": "layout", "dropout.kind": "drop_kind"}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def sample_config(spec: Spec, suggest: Suggest) -> TrialConfig:
    """Draw one trial configuration: searched knobs from ``suggest``, the rest from the spec."""
    params: dict[str, Any] = {}
    for p in spec.space:
        params[p.name] = _draw(p, suggest) if p.searched else p.values[0]
    return TrialConfig(params, tuple(p.name for p in spec.space if p.searched))


def config_from_params(spec: Spec, values: Mapping[str, Any]) -> TrialConfig:
    """Rebuild a trial's configuration from the searched values a backend stored."""
    params = {p.name: values[p.name] if p.searched else p.values[0] for p in spec.space}
    return TrialConfig(params, tuple(p.name for p in spec.space if p.searched))


def _draw(p: ParamSpec, suggest: Suggest) -> Any:
    if p.kind == "choice":
        return suggest.categorical(p.name, p.values)
    assert p.low is not None and p.high is not None
    if p.integer:
        return suggest.int(p.name, int(p.low), int(p.high), p.log, int(p.step or 1))
    return suggest.float(p.name, p.low, p.high, p.log, p.step)


def grid_values(spec: Spec) -> dict[str, list[Any]]:
    """Every searched knob with the full list of its values, for grid search."""
    out: dict[str, list[Any]] = {}
    for p in spec.searched:
        if p.kind == "choice":
            out[p.name] = list(p.values)
            continue
        assert p.low is not None and p.high is not None
        n = int(p.size())
        step = p.step or 1
        values = [p.low + i * step for i in range(n)]
        out[p.name] = [int(v) for v in values] if p.integer else [round(v, 12) for v in values]
    return out


def trial_budget(spec: Spec) -> int:
    """Trials a sweep finishes: the spec's count, capped by the grid's size for grid search."""
    if spec.search.sampler == "grid":
        return int(min(spec.search.trials, spec.space_size()))
    return spec.search.trials
