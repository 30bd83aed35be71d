"""The spec: a YAML file validated once, at the edge, into frozen typed objects.

Every rule lives next to its field (``_f(default, doc, rule)``) so that validation, the resolved spec
and the README's reference come from one place. A user's mistake becomes one ``Problem`` line
(``key.path: rule, but got value``); all of them are collected before anything runs.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from sbsearch.data import DATASETS
from sbsearch.errors import Problem, SpecError, did_you_mean
from sbsearch.models import INPUT_KINDS, MODELS
from sbsearch.strategies import STRATEGIES, Knob

__all__ = [
    "Spec", "DataSpec", "ModelSpec", "TrainSpec", "SearchSpec", "TrackingSpec", "ParamSpec",
    "load_spec", "parse_spec", "spec_to_dict", "spec_reference", "with_overrides",
]

Rule = Callable[[Any], bool]


def _f(default: Any, doc: str, rule: tuple[str, Rule] | None = None, choices: Callable[[], Any] | None = None) -> Any:
    return field(default=default, metadata={"doc": doc, "rule": rule, "choices": choices})


def _positive(x: Any) -> bool:
    return x > 0


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class DataSpec:
    dataset: str = _f("digits", "registered data set", choices=lambda: DATASETS)
    val_fraction: float = _f(0.25, "share of the data held out for validation (stratified, fixed by seed)",
                             ("must be in (0, 1)", lambda x: 0 < x < 1))
    batch_size: int = _f(64, "training batch size", ("must be >= 1", lambda x: x >= 1))
    normalize: bool = _f(True, "standardise inputs with the training set's per-channel mean and std")


@dataclass(frozen=True)
class ModelSpec:
    name: str = _f("small_cnn", "registered architecture", choices=lambda: MODELS)
    width: int = _f(16, "channels of the first conv block (doubling per block, up to 4x) or hidden units of the mlp",
                    ("must be >= 1", lambda x: x >= 1))
    depth: int = _f(2, "number of conv blocks or hidden layers", ("must be between 1 and 16", lambda x: 1 <= x <= 16))


@dataclass(frozen=True)
class TrainSpec:
    epochs: int = _f(10, "epochs per trial", ("must be >= 1", lambda x: x >= 1))
    optimizer: str = _f("adam", "optimiser", choices=lambda: ("adam", "adamw", "sgd"))
    lr: float = _f(0.003, "learning rate", ("must be > 0", _positive))
    momentum: float = _f(0.9, "SGD momentum", ("must be in [0, 1)", lambda x: 0 <= x < 1))
    weight_decay: float = _f(0.0, "L2 weight decay", ("must be >= 0", lambda x: x >= 0))
    replicas: int = _f(1, "models per trial that differ only in their initialisation seed; the trial's metric is their mean",
                       ("must be between 1 and 16", lambda x: 1 <= x <= 16))
    device: str = _f("auto", "where to train: auto picks cuda when available", choices=lambda: ("auto", "cpu", "cuda"))
    threads: int = _f(0, "torch threads per trial (0 = share the machine's cores among parallel trials)",
                      ("must be >= 0", lambda x: x >= 0))


@dataclass(frozen=True)
class SearchSpec:
    backend: str = _f("optuna", "search backend", choices=lambda: ("optuna",))
    sampler: str = _f("tpe", "how trials pick values: tpe (Bayesian), random, or grid (every combination)",
                      choices=lambda: ("tpe", "random", "grid"))
    trials: int = _f(20, "finished trials the sweep aims for (completed, pruned or failed)",
                     ("must be >= 1", lambda x: x >= 1))
    parallel: int = _f(1, "trials run at the same time, each in its own process",
                       ("must be between 1 and 64", lambda x: 1 <= x <= 64))
    pruner: str = _f("none", "early stopping rule: none, or median (stop a trial below the median of others at the same epoch)",
                     choices=lambda: ("none", "median"))
    warmup_epochs: int = _f(2, "epochs every trial runs before it may be pruned", ("must be >= 0", lambda x: x >= 0))
    timeout: Union[float, None] = _f(None, "stop starting new trials after this many seconds (null = no limit)",
                                     ("must be > 0", _positive))


@dataclass(frozen=True)
class TrackingSpec:
    uri: Union[str, None] = _f(None, "MLflow tracking URI (null = sqlite:///mlflow.db in the working directory, "
                                     "or under --out when given)")
    experiment: Union[str, None] = _f(None, "MLflow experiment name (null = the spec's name)")


@dataclass(frozen=True)
class ParamSpec:
    """One knob of the search space: fixed, a list of choices, or a numeric range."""

    name: str  # "<strategy>.<knob>"
    kind: str  # "fixed" | "choice" | "range"
    values: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    @property
    def strategy(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def knob(self) -> str:
        return self.name.split(".", 1)[1]

    @property
    def searched(self) -> bool:
        return self.kind != "fixed" and not (self.kind == "choice" and len(self.values) == 1)

    def size(self) -> float:
        """How many distinct values this parameter can take (``inf`` for a continuous range)."""
        if self.kind == "fixed":
            return 1
        if self.kind == "choice":
            return len(self.values)
        assert self.low is not None and self.high is not None
        if self.integer:
            step = self.step or 1
            return int((self.high - self.low) // step) + 1
        if self.step:
            return int(round((self.high - self.low) / self.step)) + 1
        return math.inf

    def to_yaml(self) -> Any:
        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "choice":
            return list(self.values)
        out: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass(frozen=True)
class Spec:
    """A validated sweep specification. Build it with ``load_spec`` or ``parse_spec``."""

    name: str = _f("sweep", "sweep name: names the Optuna study, the MLflow parent run and the output folder",
                   ("must be 1-100 letters, digits, '_', '.', '-', starting with a letter or digit",
                    lambda x: bool(_NAME.match(x))))
    seed: int = _f(0, "seed of the data split, the sampler and every initialisation", ("must be >= 0", lambda x: x >= 0))
    data: DataSpec = field(default_factory=DataSpec, metadata={"doc": "what to train on"})
    model: ModelSpec = field(default_factory=ModelSpec, metadata={"doc": "the network before strategies edit it"})
    train: TrainSpec = field(default_factory=TrainSpec, metadata={"doc": "how each trial trains"})
    space: tuple[ParamSpec, ...] = field(default=(), metadata={"doc": "searched knobs: <strategy>: {<knob>: value | [choices] | {low, high, log, step}}"})
    search: SearchSpec = field(default_factory=SearchSpec, metadata={"doc": "how trials are chosen, run and stopped"})
    tracking: TrackingSpec = field(default_factory=TrackingSpec, metadata={"doc": "where MLflow records go"})

    def param(self, name: str) -> ParamSpec:
        return next(p for p in self.space if p.name == name)

    @property
    def searched(self) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.space if p.searched)

    def space_size(self) -> float:
        size: float = 1
        for p in self.space:
            size *= p.size()
        return size


# --- parsing -----------------------------------------------------------------------------------

_SECTIONS = {"data": DataSpec, "model": ModelSpec, "train": TrainSpec, "search": SearchSpec, "tracking": TrackingSpec}


def _type_ok(tp: Any, value: Any) -> tuple[bool, Any, str]:
    """Check and coerce ``value`` against a field type; returns (ok, value, type words)."""
    optional = get_origin(tp) is Union and type(None) in get_args(tp)
    if optional:
        if value is None:
            return True, None, ""
        tp = next(a for a in get_args(tp) if a is not type(None))
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]
    if optional:
        words += " or null"
    if tp is bool:
        return isinstance(value, bool), value, words
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value, words
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return ok, float(value) if ok else value, ("a finite number" + (" or null" if optional else ""))
    return isinstance(value, str), value, words


def _parse_section(cls: type, raw: Any, path: str, problems: list[Problem]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.append(Problem(path, "must be a mapping of keys to values", raw))
        return cls()
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in known:
            problems.append(Problem(f"{path}.{key}", "is not a known key", raw[key], did_you_mean(str(key), known)))
    values: dict[str, Any] = {}
    for name, f in known.items():
        if name not in raw:
            continue
        value, key_path = raw[name], f"{path}.{name}"
        ok, value, words = _type_ok(hints[name], value)
        if not ok:
            problems.append(Problem(key_path, f"must be {words}", raw[name]))
            continue
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices():
            problems.append(Problem(key_path, "must be a registered name", value, did_you_mean(value, choices())))
            continue
        rule = f.metadata.get("rule")
        if rule is not None and value is not None and not rule[1](value):
            problems.append(Problem(key_path, rule[0], value))
            continue
        values[name] = value
    return cls(**values)


def _parse_param(name: str, knob: Knob, raw: Any, path: str, problems: list[Problem]) -> ParamSpec | None:
    def bad_value(value: Any, where: str) -> bool:
        if knob.accepts(knob.coerce(value)):
            return False
        hint = did_you_mean(str(value), [str(c) for c in knob.choices]) if knob.kind == "choice" else ""
        problems.append(Problem(where, knob.rule(), value, hint))
        return True

    if isinstance(raw, list):
        if not raw:
            problems.append(Problem(path, "must list at least one value", raw))
            return None
        if any(bad_value(v, f"{path}[{i}]") for i, v in enumerate(raw)):
            return None
        values = tuple(knob.coerce(v) for v in raw)
        if len(set(map(repr, values))) != len(values):
            problems.append(Problem(path, "must not repeat a value", raw))
            return None
        return ParamSpec(name, "choice", values)
    if isinstance(raw, Mapping):
        if knob.kind not in ("int", "float"):
            problems.append(Problem(path, "a range {low, high} needs a numeric knob; give a list of choices", dict(raw)))
            return None
        unknown = set(raw) - {"low", "high", "log", "step"}
        for key in sorted(unknown, key=str):
            problems.append(Problem(f"{path}.{key}", "is not a known key", raw[key], did_you_mean(str(key), ["low", "high", "log", "step"])))
        if unknown:
            return None
        if "low" not in raw or "high" not in raw:
            problems.append(Problem(path, "a range needs both low and high", dict(raw)))
            return None
        if bad_value(raw["low"], f"{path}.low") | bad_value(raw["high"], f"{path}.high"):
            return None
        low, high = float(raw["low"]), float(raw["high"])
        log, step = raw.get("log", False), raw.get("step")
        if low >= high:
            problems.append(Problem(f"{path}.high", f"must be greater than low={raw['low']!r}", raw["high"]))
            return None
        if not isinstance(log, bool):
            problems.append(Problem(f"{path}.log", "must be true or false", log))
            return None
        if log and low <= 0:
            problems.append(Problem(f"{path}.low", "must be > 0 when log is true", raw["low"]))
            return None
        if step is not None:
            ok = isinstance(step, (int, float)) and not isinstance(step, bool) and math.isfinite(step) and step > 0
            if not ok or (knob.kind == "int" and not isinstance(step, int)):
                problems.append(Problem(f"{path}.step", "must be a positive " + ("integer" if knob.kind == "int" else "number"), step))
                return None
            if log:
                problems.append(Problem(f"{path}.step", "cannot be combined with log: true", step))
                return None
        return ParamSpec(name, "range", low=low, high=high, log=log, step=None if step is None else float(step),
                         integer=knob.kind == "int")
    if bad_value(raw, path):
        return None
    return ParamSpec(name, "fixed", (knob.coerce(raw),))


def _parse_space(raw: Any, problems: list[Problem]) -> tuple[ParamSpec, ...]:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.append(Problem("space", "must be a mapping of strategy names to knobs", raw))
        raw = {}
    for key in raw:
        if key not in STRATEGIES:
            problems.append(Problem(f"space.{key}", "is not a registered strategy", raw[key], did_you_mean(str(key), STRATEGIES)))
    params: list[ParamSpec] = []
    for sname, strategy in STRATEGIES.items():
        knobs_raw = raw.get(sname) or {}
        if not isinstance(knobs_raw, Mapping):
            problems.append(Problem(f"space.{sname}", "must be a mapping of knob names to values", knobs_raw))
            knobs_raw = {}
        for key in knobs_raw:
            if key not in strategy.knob_by_name:
                problems.append(Problem(f"space.{sname}.{key}", "is not a knob of this strategy", knobs_raw[key],
                                        did_you_mean(str(key), strategy.knob_by_name)))
        for knob in strategy.knobs:
            name = f"{sname}.{knob.name}"
            if knob.name in knobs_raw:
                p = _parse_param(name, knob, knobs_raw[knob.name], f"space.{name}", problems)
                if p is not None:
                    params.append(p)
            else:
                params.append(ParamSpec(name, "fixed", (knob.default,)))
    return tuple(params)


def _cross_checks(spec: Spec, input_kind: str, problems: list[Problem]) -> None:
    if input_kind not in INPUT_KINDS[spec.model.name]:
        problems.append(Problem("model.name", f"needs {' or '.join(INPUT_KINDS[spec.model.name])} inputs, "
                                f"and data set {spec.data.dataset!r} has {input_kind} inputs", spec.model.name))
    by_name = {p.name: p for p in spec.space}
    for sname, strategy in STRATEGIES.items():
        if strategy.incompatible is None:
            continue
        base = {k.name: by_name[f"{sname}.{k.name}"].values[0] if by_name[f"{sname}.{k.name}"].kind == "fixed"
                else k.default for k in strategy.knobs}
        for knob in strategy.knobs:
            p = by_name[f"{sname}.{knob.name}"]
            candidates = p.values if p.kind != "range" else (p.low, p.high)
            for value in candidates:
                why = strategy.incompatible({**base, knob.name: value}, spec.model.name, input_kind)
                if why is not None:
                    problems.append(Problem(f"space.{p.name}", why, value))
                    break
    if spec.search.sampler == "grid":
        for p in spec.space:
            if p.kind == "range" and not (p.integer or p.step):
                problems.append(Problem(f"space.{p.name}", "the grid sampler needs a list of values or a range with a step", p.to_yaml()))


def parse_spec(raw: Any) -> Spec:
    """Validate a spec given as plain data (what ``yaml.safe_load`` returns).

    Raises:
        SpecError: listing every problem found, one line each.
    """
    problems: list[Problem] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise SpecError([Problem("", "a spec must be a mapping with the sections " + ", ".join(f.name for f in fields(Spec)), raw)])
    top = {f.name for f in fields(Spec)}
    for key in raw:
        if key not in top:
            problems.append(Problem(str(key), "is not a known section", raw[key], did_you_mean(str(key), top)))
    head = _parse_section(_Head, {k: raw[k] for k in ("name", "seed") if k in raw}, "", problems)
    sections = {name: _parse_section(cls, raw.get(name), name, problems) for name, cls in _SECTIONS.items()}
    space = _parse_space(raw.get("space"), problems)
    spec = Spec(name=head.name, seed=head.seed, space=space, **sections)
    if not problems:
        _cross_checks(spec, DATASETS[spec.data.dataset].input_kind, problems)
    if problems:
        for p in problems:
            p.path = p.path.lstrip(".")
        raise SpecError(problems)
    return spec


@dataclass(frozen=True)
class _Head:
    name: str = Spec.__dataclass_fields__["name"].default
    seed: int = Spec.__dataclass_fields__["seed"].default


for _f_name in ("name", "seed"):
    _Head.__dataclass_fields__[_f_name].metadata = Spec.__dataclass_fields__[_f_name].metadata  # type: ignore[misc]


def load_spec(path: str | Path) -> Spec:
    """Read and validate a YAML spec file.

    Example:
        >>> spec = load_spec("search_spaces/quickstart.yaml")
        >>> spec.search.trials
        20
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([Problem("spec", "must be an existing file", str(path))]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([Problem("spec", f"must be a readable UTF-8 file ({type(exc).__name__})", str(path))]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        reason = getattr(exc, "problem", None) or "malformed"
        raise SpecError([Problem("spec", f"must be valid YAML ({reason} at {where})", str(path))]) from None
    return parse_spec(raw)


def spec_to_dict(spec: Spec) -> dict[str, Any]:
    """The resolved spec as plain data (defaults filled in), fit to write as YAML and parse again."""
    out: dict[str, Any] = {"name": spec.name, "seed": spec.seed}
    for name in _SECTIONS:
        out[name] = dataclasses.asdict(getattr(spec, name))
    space: dict[str, dict[str, Any]] = {}
    for p in spec.space:
        space.setdefault(p.strategy, {})[p.knob] = p.to_yaml()
    out["space"] = space
    order = [f.name for f in fields(Spec)]
    return {k: out[k] for k in order}


def with_overrides(spec: Spec, overrides: Mapping[str, Any]) -> Spec:
    """Apply command-line overrides given as ``{"search.trials": 5, "seed": 3}``, re-validated."""
    raw = spec_to_dict(spec)
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return parse_spec(raw)


def spec_reference() -> list[tuple[str, str, str, str]]:
    """Every spec key as (key, type, default, meaning): the README's reference is generated from it."""
    rows: list[tuple[str, str, str, str]] = []

    def type_words(tp: Any) -> str:
        if get_origin(tp) is Union:
            return " or ".join("null" if a is type(None) else a.__name__ for a in get_args(tp))
        return str(getattr(tp, "__name__", tp))

    hints = get_type_hints(Spec)
    for f in fields(Spec):
        if f.name in _SECTIONS:
            sub_hints = get_type_hints(_SECTIONS[f.name])
            for g in fields(_SECTIONS[f.name]):
                choices = g.metadata.get("choices")
                meaning = g.metadata["doc"] + (f" (one of: {', '.join(choices())})" if choices else "")
                rule = g.metadata.get("rule")
                if rule:
                    meaning += f"; {rule[0]}"
                rows.append((f"{f.name}.{g.name}", type_words(sub_hints[g.name]), yaml.safe_dump(g.default).split("\n")[0], meaning))
        elif f.name == "space":
            for sname, strategy in STRATEGIES.items():
                for knob in strategy.knobs:
                    rows.append((f"space.{sname}.{knob.name}", knob.kind, repr(knob.default), f"{knob.doc}; {knob.rule()}"))
        else:
            rule = f.metadata.get("rule")
            rows.append((f.name, type_words(hints[f.name]), repr(f.default), f.metadata["doc"] + (f"; {rule[0]}" if rule else "")))
    return rows
