"""The spec: a YAML file validated once, at the edge, into frozen typed objects.

Every rule lives next to its field (``_f(default, doc, rule)``, ``errors.spec_field``) so that validation,
the resolved spec and the README's reference come from one place. A user's mistake becomes one
``Problem`` line (``key.path: rule, but got value``); all of them are collected before anything runs.

The validated sections are what the stages consume: the data section is ``data.DataSpec``, declared
where the loaders read it; the model and train sections become ``ModelDesc`` and ``trainer.TrainPlan``
by ``stage_config``, which adds only what the spec does not say (the data's input shape, the seed).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from sbsearch.data import DATASETS, DataSpec
from sbsearch.errors import Problem, SpecError, did_you_mean
from sbsearch.errors import spec_field as _f  # short: every field below is declared with it
from sbsearch.models import INPUT_KINDS, MODELS, TORCHVISION_MODELS, input_problem
from sbsearch.strategies import STRATEGIES, Knob, ModelDesc, apply_model_edits

__all__ = [
    "Spec", "DataSpec", "ModelSpec", "TrainSpec", "SearchSpec", "TrackingSpec", "RaySpec", "ParamSpec",
    "load_spec", "read_spec_yaml", "parse_spec", "check_sweep", "spec_notes", "spec_to_dict", "spec_reference",
    "with_overrides", "stage_config", "resolve_pi",
]


def _positive(x: Any) -> bool:
    return bool(x > 0)


def _is_regex(x: Any) -> bool:
    try:
        re.compile(x)
    except re.error:
        return False
    return True


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class ModelSpec:
    name: str = _f("small_cnn", "registered architecture", choices=lambda: MODELS)
    width: int = _f(16, "channels of the first conv block (doubling per block, up to 4x) or hidden units of the mlp",
                    ("must be >= 1", lambda x: x >= 1))
    depth: int = _f(2, "number of conv blocks or hidden layers", ("must be between 1 and 16", lambda x: 1 <= x <= 16))
    first_bias: str = _f("default", "the first layer's bias at initialisation: PyTorch's default or zero",
                         choices=lambda: ("default", "zero"))
    cifar_stem: bool = _f(False, "torchvision models: a 3x3 stride-1 first conv and no stem max-pool, for small "
                                 "(e.g. 32x32) images; width and depth apply to mlp and small_cnn only")


@dataclass(frozen=True)
class TrainSpec:
    epochs: int = _f(10, "epochs per trial", ("must be >= 1", lambda x: x >= 1))
    optimizer: str = _f("adam", "optimiser; lbfgs takes one full-batch step of up to 20 iterations per epoch "
                        "(strong-Wolfe line search; replicas train one after another)",
                        choices=lambda: ("adam", "adamw", "sgd", "lbfgs"))
    lr: float = _f(0.003, "learning rate", ("must be > 0", _positive))
    momentum: float = _f(0.9, "SGD momentum", ("must be in [0, 1)", lambda x: 0 <= x < 1))
    weight_decay: float = _f(0.0, "L2 weight decay", ("must be >= 0", lambda x: x >= 0))
    nesterov: bool = _f(False, "SGD: Nesterov momentum (needs train.optimizer: sgd and momentum > 0)")
    schedule: str = _f("constant", "learning-rate schedule, stepped after every optimiser step over epochs x steps per "
                       "epoch (or max_steps): constant; cosine (annealed to 0, torch CosineAnnealingLR); onecycle "
                       "(torch OneCycleLR, linear rise to lr over the warmup share, then linear fall to lr/1e6; "
                       "momentum is not cycled); minibatch optimisers only",
                       choices=lambda: ("constant", "cosine", "onecycle"))
    warmup: Union[float, None] = _f(None, "share of all steps spent rising linearly from lr/100 to lr, before the "
                                    "schedule (onecycle: its rising part); null = 0.3 under onecycle (PyTorch's "
                                    "pct_start), 0 otherwise",
                                    ("must be in [0, 1)", lambda x: 0 <= x < 1))
    label_smoothing: float = _f(0.0, "classification: label smoothing of the training loss (validation and test "
                                "losses stay unsmoothed)", ("must be in [0, 1)", lambda x: 0 <= x < 1))
    precision: str = _f("fp32", "arithmetic of the forward pass (torch.autocast; parameters, losses and metrics stay "
                        "fp32): fp32; bf16; fp16 (CUDA only, with a gradient scaler and a fused optimiser). On the "
                        "CPU, PyTorch's autocast does not reach convolutions inside batched replicas (replicas >= 2 "
                        "and replica_mode batched): they stay fp32 there",
                        choices=lambda: ("fp32", "bf16", "fp16"))
    channels_last: bool = _f(False, "image data: models and inputs in torch.channels_last memory format (faster "
                             "convolutions on GPUs)")
    compile: bool = _f(False, "torch.compile the network the trainer calls (the first epoch pays for the compilation); "
                       "minibatch optimisers only")
    replicas: int = _f(3, "models per trial that differ only in their initialisation seed, trained together; the trial's "
                          "metric is their mean, and sb_score compares their weights (needs 2 or more)",
                       ("must be between 1 and 16", lambda x: 1 <= x <= 16))
    replica_mode: str = _f("auto", "how a trial's replicas train: batched (one torch.func.vmap pass over their stacked "
                           "parameters), sequential (one model after another), or auto: the faster of the two for the "
                           "trial's model, input, batch, optimiser, precision and device, timed over a few training steps "
                           "the first time this machine meets that combination and remembered in "
                           "$XDG_CACHE_HOME/sbsearch/replica_modes.json (~/.cache), so every trial and rerun of it runs "
                           "the same way. Each way trains every replica as if alone; they differ in float rounding and "
                           "dropout masks. L-BFGS, and models that cannot be batched, run sequentially",
                           choices=lambda: ("auto", "batched", "sequential"))
    score_layers: Union[str, None] = _f(None, "regular expression choosing the weights sb_score compares "
                                              "(null = every weight that connects units: conv, linear and group-conv weights; biases and norm "
                                              "parameters excluded)",
                                        ("must be a valid regular expression", _is_regex))
    device: str = _f("auto", "where to train: auto picks cuda when available", choices=lambda: ("auto", "cpu", "cuda"))
    threads: int = _f(0, "torch threads per trial (0 = share the machine's cores among parallel trials)",
                      ("must be >= 0", lambda x: x >= 0))


def backend_names() -> tuple[str, ...]:
    """The search backends: each module of ``sbsearch/backends/`` but ``base`` is one, named by its file.

    Read from the folder rather than imported, since a backend imports its framework (Ray) when loaded:
    adding a backend is adding its module (``sbsearch.backends.get_backend`` loads it).
    """
    folder = Path(__file__).with_name("backends")
    return tuple(sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_") and p.stem != "base"))


@dataclass(frozen=True)
class SearchSpec:
    backend: str = _f("optuna", "search backend: optuna (this machine) or ray (a Ray cluster, see the ray section)",
                      choices=lambda: backend_names())
    storage: Union[str, None] = _f(None, "where the sweep's trials are kept: null = OUT/optuna.journal; a journal file's "
                                   "path; or an RDB URL (postgresql://user@host/db, mysql://..., sqlite:///file.db). "
                                   "Processes on several machines that name the same storage (each with its own --out) "
                                   "run one sweep between them. A password in the URL is never written to files or "
                                   "MLflow: prefer PGPASSWORD or ~/.pgpass. --storage overrides it",
                                   ("must be a journal file's path or an RDB URL (sqlite://, postgresql://, mysql://)",
                                    lambda x: isinstance(x, str) and x.strip() != "" and (
                                        "://" not in x or x.partition("://")[0].partition("+")[0].lower()
                                        in ("sqlite", "postgresql", "mysql"))))
    stale_after: float = _f(120.0, "seconds a process that runs trials of a shared storage may stay silent before "
                                   "another process takes its running trials over and runs them again (each process "
                                   "says it is alive every few seconds; clocks must agree to well within this)",
                            ("must be >= 5", lambda x: x >= 5))
    sampler: str = _f("tpe", "how trials pick values: tpe (Bayesian), random, or grid (every combination)",
                      choices=lambda: ("tpe", "random", "grid"))
    trials: int = _f(20, "finished trials the sweep aims for (completed, pruned or failed)",
                     ("must be >= 1", lambda x: x >= 1))
    repeat: bool = _f(False, "with a space that searches no knob: run its one configuration search.trials times on "
                             "purpose (with the same seeds: to time it, or to check that the trials agree); without it "
                             "such a spec must set search.trials: 1")
    parallel: int = _f(1, "trials run at the same time, each in its own process",
                       ("must be between 1 and 64", lambda x: 1 <= x <= 64))
    devices: Union[tuple[int, ...], None] = _f(None, "optuna backend, trials on CUDA: the GPUs (indices as this process "
                                               "sees them) that the trials' processes are pinned to, each through its "
                                               "own CUDA_VISIBLE_DEVICES, so that cuda in a trial means its GPU; worker "
                                               "i gets the i-th in turn (round robin, a restarted worker the same one), "
                                               "and each trial records its GPU in the user attribute sbsearch.device; "
                                               "null = every visible GPU. Trials on the CPU ignore it",
                                               ("must be a non-empty list of distinct device indices >= 0",
                                                lambda x: len(x) > 0 and len(set(x)) == len(x) and min(x) >= 0))
    trials_per_gpu: int = _f(1, "optuna backend, trials on CUDA: how many trials (worker processes) share one GPU; "
                                "search.parallel may be at most the number of devices times this. The ray backend "
                                "shares GPUs by a fraction in ray.gpus_per_trial instead",
                             ("must be between 1 and 64", lambda x: 1 <= x <= 64))
    schedule: Union[str, None] = _f(None, "what each trial's sampler and pruning rule see: fixed (trial n waits until "
                                    "trials 0..n-lag have finished and sees exactly those, so the same spec gives the "
                                    "same sweep) or free (each trial sees whatever has finished when it starts: no "
                                    "waiting, but runs at parallel > 1 differ); null = fixed with the optuna backend, "
                                    "free with ray (Ray Tune starts trials as slots free up)",
                                    ("must be fixed, free or null", lambda x: x in ("fixed", "free")))
    lag: Union[int, None] = _f(None, "fixed schedule: trial n sees trials 0..n-lag (null = search.parallel, so no "
                               "worker waits while the trials take similar times); set it to get the same sweep at "
                               "any search.parallel (1 sees every earlier trial, as a serial sweep does)",
                               ("must be >= 1", lambda x: x >= 1))
    pruner: str = _f("none", "early stopping rule, judged after each epoch from warmup_epochs on: none; median (worse than "
                     "the median of completed trials at that epoch); successive_halving or hyperband (keep the best "
                     "1/reduction_factor at rungs warmup*reduction_factor^k); wasserstein (sb_score in the worst "
                     "prune_quantile of the trials that reached the epoch, see score_direction); combined (the final "
                     "metric predicted from the metric and combined_features by least squares over completed trials, "
                     "in the worst prune_quantile); asha or ray_hyperband: Ray Tune's schedulers (search.backend: ray)",
                     choices=lambda: PRUNER_NAMES)
    warmup_epochs: int = _f(2, "epochs every trial runs before it may be pruned", ("must be >= 0", lambda x: x >= 0))
    prune_quantile: float = _f(0.5, "wasserstein, combined: stop a trial in this worst share of the trials that reached "
                               "the epoch (0.5: worse than more than half of them)",
                               ("must be in (0, 1)", lambda x: 0 < x < 1))
    score_direction: str = _f("learned", "wasserstein: which sb_score is good; learned = the sign of the Spearman "
                              "correlation between sb_score at the epoch and the final metric over completed trials, "
                              "once p < alpha (fallback until then)",
                              choices=lambda: ("learned", "low_is_good", "high_is_good"))
    fallback: str = _f("median", "wasserstein, combined: the rule used until the direction or fit is known",
                       choices=lambda: ("none", "median"))
    alpha: float = _f(0.05, "wasserstein: significance level of the learned direction",
                      ("must be in (0, 1)", lambda x: 0 < x < 1))
    min_finished: int = _f(5, "wasserstein, combined: completed trials needed to learn the direction or fit",
                           ("must be >= 3", lambda x: x >= 3))
    combined_features: tuple[str, ...] = _f(("sb_score",), "combined: the metrics fitted beside the objective: "
                                            "sb_score (the replicas against each other; a trial with one replica has "
                                            "none and is fitted without it), sb_drift (each replica against its own "
                                            "initialisation); [] = the objective alone, the control that shows what "
                                            "they add. Replaces combined_score (true is [sb_score], false is [])",
                                            ("must not name a metric twice", lambda x: len(set(x)) == len(x)),
                                            choices=lambda: COMBINED_FEATURES)
    reduction_factor: int = _f(3, "successive_halving, hyperband: keep 1/reduction_factor of the trials at each rung",
                               ("must be >= 2", lambda x: x >= 2))
    timeout: Union[float, None] = _f(None, "stop starting new trials after this many seconds (null = no limit)",
                                     ("must be > 0", _positive))
    on_divergence: str = _f("fail", "how a trial whose loss became NaN or infinite is recorded: fail, or prune",
                            choices=lambda: ("fail", "prune"))
    max_consecutive_failures: int = _f(5, "stop the sweep after this many failed trials in a row (0 = never stop)",
                                       ("must be >= 0", lambda x: x >= 0))

    @property
    def fixed_schedule(self) -> bool:
        """Whether trials follow the fixed schedule (``schedule: null`` is fixed with optuna, free with ray)."""
        return (self.schedule or ("free" if self.backend == "ray" else "fixed")) == "fixed"

    @property
    def schedule_lag(self) -> int:
        """The fixed schedule's lag: trial n sees trials 0..n-lag."""
        return self.lag or self.parallel


@dataclass(frozen=True)
class TrackingSpec:
    uri: Union[str, None] = _f(None, "MLflow tracking URI (null = sqlite:///mlflow.db in the working directory, "
                                     "or under --out when given)")
    experiment: Union[str, None] = _f(None, "MLflow experiment name (null = the spec's name)")


# Pruners that are Ray Tune's own schedulers (search.backend: ray only).
RAY_SCHEDULERS = ("asha", "ray_hyperband")
# sbsearch.pruning.PRUNERS (backend-neutral rules, hyperband among them) and Ray's schedulers.
PRUNER_NAMES: tuple[str, ...] = ("none", "median", "successive_halving", "hyperband", "wasserstein", "combined", *RAY_SCHEDULERS)
# The metrics every trial logs after each epoch (sbsearch.trainer) that the combined rule may fit on.
COMBINED_FEATURES: tuple[str, ...] = ("sb_score", "sb_drift")


@dataclass(frozen=True)
class RaySpec:
    address: Union[str, None] = _f(None, "Ray cluster to join (host:port, or auto for the cluster this machine is a node of); "
                                         "null starts Ray on this machine. --address overrides it")
    cpus_per_trial: float = _f(1.0, "CPUs Ray reserves for each trial (also its torch threads unless train.threads is set)",
                               ("must be > 0", _positive))
    gpus_per_trial: float = _f(0.0, "GPUs Ray reserves for each trial; a fraction such as 0.25 lets trials share a GPU",
                               ("must be >= 0, and a whole number above 1", lambda x: x >= 0 and (x <= 1 or float(x).is_integer())))
    max_failures: int = _f(2, "times Ray re-runs a trial whose worker process or node died", ("must be >= 0", lambda x: x >= 0))


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

    @property
    def extremes(self) -> tuple[Any, ...]:
        """The values validation tries: every listed value, or a range's two ends."""
        return self.values if self.kind != "range" else (self.low, self.high)

    def first(self, default: Any) -> Any:
        """The value a check assumes when it varies another knob: a fixed value, else ``default``."""
        return self.values[0] if self.kind == "fixed" else default

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
    ray: RaySpec = field(default_factory=RaySpec, metadata={"doc": "the Ray cluster and each trial's resources (search.backend: ray)"})

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

_SECTIONS = {"data": DataSpec, "model": ModelSpec, "train": TrainSpec, "search": SearchSpec, "tracking": TrackingSpec,
             "ray": RaySpec}


_PI_MULTIPLE = re.compile(r"^\s*(-?)\s*(\d+(?:\.\d*)?|\.\d+)?\s*\*?\s*(?:pi|π)\s*(?:/\s*(\d+(?:\.\d*)?))?\s*$")
PI_WORDS = "a multiple of pi (pi, -pi, 2pi, pi/2)"


def resolve_pi(value: Any) -> Any:
    """``"pi"``, ``"2pi"``, ``"-pi/2"`` (or ``π``) as floats; any other value unchanged.

    The follow-up study of vector expansion found c = pi the best constant, so pi is a preset that
    specs can write by name instead of as 3.14159...
    """
    if not isinstance(value, str) or len(value) > 64:  # a pi expression is short; a long string would cost
        return value                                    # the pattern quadratic time (a 1 MB value: minutes)
    m = _PI_MULTIPLE.match(value)
    if m is None:
        return value
    sign, factor, divisor = m.groups()
    denominator = float(divisor or 1)
    if denominator == 0:
        return value
    return (-1 if sign else 1) * float(factor or 1) * math.pi / denominator


def _finite_number(value: Any) -> bool:
    """An int or float that is finite as a float (an integer past 1e308 is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _number_pair(value: Any, n: int) -> tuple[bool, Any]:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        return False, value
    items = [resolve_pi(v) for v in value]
    ok = all(_finite_number(v) for v in items)
    return ok, tuple(float(v) for v in items) if ok else value


def _type_ok(tp: Any, value: Any) -> tuple[bool, Any, str]:
    """Check and coerce ``value`` against a field type; returns (ok, value, type words)."""
    optional = get_origin(tp) is Union and type(None) in get_args(tp)
    if optional:
        if value is None:
            return True, None, ""
        tp = next(a for a in get_args(tp) if a is not type(None))
    if get_origin(tp) is tuple and get_args(tp)[-1] is Ellipsis:  # integers (search.devices), names (combined_features)
        item = get_args(tp)[0]
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, item) and not isinstance(v, bool) for v in value)
        words = {int: "a list of integers", str: "a list of names"}[item]
        return ok, tuple(value) if ok else value, words + (" or null" if optional else "")
    if get_origin(tp) is tuple:  # a fixed-length list of numbers, such as data.domain
        n = len(get_args(tp))
        ok, value = _number_pair(value, n)
        return ok, value, f"a list of {n} finite numbers, each may be {PI_WORDS}"
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]
    if optional:
        words += " or null"
    if tp is bool:
        return isinstance(value, bool), value, words
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value, words
    if tp is float:
        ok = _finite_number(value)
        return ok, float(value) if ok else value, ("a finite number" + (" or null" if optional else ""))
    return isinstance(value, str), value, words


def _parse_section(cls: type, raw: Any, path: str, problems: list[Problem], only: tuple[str, ...] = ()) -> Any:
    """Validate one section's keys into ``cls``; ``only`` limits it to some fields (the spec's top level)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.append(Problem(path, "must be a mapping of keys to values", raw))
        return cls()
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if not only or f.name in only}
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
        if choices is not None:
            allowed = choices()
            # A list of names (search.combined_features) is checked name by name.
            named = list(enumerate(value)) if isinstance(value, tuple) else [(None, value)]
            wrong = [(i, v) for i, v in named if v not in allowed]
            if wrong:
                i, v = wrong[0]
                problems.append(Problem(key_path if i is None else f"{key_path}[{i}]", "must be a registered name", v,
                                        did_you_mean(v, allowed)))
                continue
        rule = f.metadata.get("rule")
        if rule is not None and value is not None and not rule[1](value):
            problems.append(Problem(key_path, rule[0], value))
            continue
        values[name] = value
    return cls(**values)


def _parse_param(name: str, knob: Knob, raw: Any, path: str, problems: list[Problem]) -> ParamSpec | None:
    def bad_value(value: Any, where: str) -> bool:
        try:
            if knob.accepts(knob.coerce(value)):
                return False
        except OverflowError:  # an integer past what a float holds: refused below like any other
            pass
        hint = did_you_mean(str(value), [str(c) for c in knob.choices]) if knob.kind == "choice" else ""
        rule = knob.rule() + (f" or {PI_WORDS}" if knob.kind == "float" and isinstance(value, str) else "")
        problems.append(Problem(where, rule, value, hint))
        return True

    if knob.kind == "float":  # "pi", "2pi", "pi/2" stand for their values wherever a number may go
        if isinstance(raw, list):
            raw = [resolve_pi(v) for v in raw]
        elif isinstance(raw, Mapping):
            raw = {k: resolve_pi(v) if k in ("low", "high") else v for k, v in raw.items()}
        else:
            raw = resolve_pi(raw)
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
        for end in ("low", "high"):
            if isinstance(raw[end], str):  # a preset such as "auto" is a value, not a number to range over
                problems.append(Problem(f"{path}.{end}", "must be a number; list presets as choices instead", raw[end]))
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
            ok = _finite_number(step) and step > 0
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


def _parse_space(raw: Any, problems: list[Problem], input_kind: str = "image") -> tuple[ParamSpec, ...]:
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
                params.append(ParamSpec(name, "fixed", (knob.default_for(input_kind),)))
    return tuple(params)


def _cross_checks(spec: Spec, input_kind: str, problems: list[Problem]) -> None:
    if input_kind not in INPUT_KINDS[spec.model.name]:
        problems.append(Problem("model.name", f"needs {' or '.join(INPUT_KINDS[spec.model.name])} inputs, "
                                f"and data set {spec.data.dataset!r} has {input_kind} inputs", spec.model.name))
    by_name = {p.name: p for p in spec.space}
    # Every strategy's knobs at their fixed value or default: what a check holds still.
    bases = {name: {k.name: by_name[f"{name}.{k.name}"].first(k.default) for k in strategy.knobs}
             for name, strategy in STRATEGIES.items()}
    for sname, strategy in STRATEGIES.items():
        if strategy.incompatible is None:
            continue
        params = [by_name[f"{sname}.{k.name}"] for k in strategy.knobs]
        base = bases[sname]
        why = strategy.incompatible(base, spec.model.name, input_kind)
        if why is not None:
            # Blame the fixed knob the user set away from its default (the last one, as in "kind: channel").
            culprit = next((p for p in reversed(params) if p.kind == "fixed"
                            and p.values[0] != strategy.knob_by_name[p.knob].default_for(input_kind)), params[0])
            problems.append(Problem(f"space.{culprit.name}", why, culprit.values[0]))
            continue
        for p in params:
            for value in p.extremes:
                why = strategy.incompatible({**base, p.knob: value}, spec.model.name, input_kind)
                if why is not None:
                    problems.append(Problem(f"space.{p.name}", why, value))
                    break
    _model_checks(spec, by_name, problems)
    _train_checks(spec, input_kind, problems)
    _input_checks(spec, by_name, input_kind, problems)
    _augmentation_checks(spec, input_kind, problems)
    _physics_checks(spec, by_name, problems)
    shape = DATASETS[spec.data.dataset].image_shape(spec.data)
    if not problems and shape is not None and spec.model.name in TORCHVISION_MODELS:  # needs a buildable model
        _input_size_checks(spec, shape, bases, by_name, problems)
    _device_checks(spec, problems)
    if spec.search.pruner in RAY_SCHEDULERS and spec.search.backend != "ray":
        problems.append(Problem("search.pruner", "is a Ray Tune scheduler and needs search.backend: ray", spec.search.pruner))
    if spec.search.schedule == "fixed" and spec.search.backend == "ray":
        problems.append(Problem("search.schedule", "needs search.backend: optuna; Ray Tune starts each trial as a slot "
                                "frees up, so the ray backend runs free (leave it null or set free)", spec.search.schedule))
    if spec.search.repeat and spec.searched:
        problems.append(Problem("search.repeat", "applies to a space that searches no knob (this one searches "
                                + ", ".join(p.name for p in spec.searched) + ")", spec.search.repeat))
    elif spec.search.repeat and spec.search.sampler == "grid":
        problems.append(Problem("search.repeat", "needs a sampler that can repeat a configuration (random or tpe); "
                                "the grid sampler runs each one once", spec.search.repeat))
    if spec.search.lag is not None and not spec.search.fixed_schedule:
        problems.append(Problem("search.lag", "applies to the fixed schedule only (search.schedule: fixed, the optuna "
                                "backend)", spec.search.lag))
    if spec.search.sampler == "grid":
        for p in spec.space:
            if p.kind == "range" and not (p.integer or p.step):
                problems.append(Problem(f"space.{p.name}", "the grid sampler needs a list of values or a range with a step", p.to_yaml()))


def _device_checks(spec: Spec, problems: list[Problem]) -> None:
    """``search.devices`` and ``search.trials_per_gpu`` against the backend and this machine's GPUs (checked
    where the sweep runs: a machine without CUDA trains on the CPU and pins nothing)."""
    search = spec.search
    if search.backend != "optuna":
        changed = {"devices": search.devices is not None, "trials_per_gpu": search.trials_per_gpu != 1}
        for key in (key for key, differs in changed.items() if differs):
            problems.append(Problem(f"search.{key}", "applies to search.backend: optuna; Ray places each trial on a "
                                    "GPU itself (ray.gpus_per_trial, a fraction such as 0.5 to share one)",
                                    getattr(search, key)))
        return
    count = _cuda_device_count()
    if spec.train.device == "cpu" or (spec.train.device == "auto" and count == 0):
        return
    if search.devices is not None and count > 0 and max(search.devices) >= count:
        problems.append(Problem("search.devices", f"must list GPUs this machine has (indices 0 to {count - 1})",
                                list(search.devices)))
        return
    gpus = len(search.devices) if search.devices is not None else count
    if gpus > 0 and search.parallel > gpus * search.trials_per_gpu:
        problems.append(Problem("search.parallel", f"must be at most {gpus * search.trials_per_gpu} on {gpus} GPU(s) "
                                f"with search.trials_per_gpu {search.trials_per_gpu} (raise it to let more trials "
                                "share a GPU)", search.parallel))


def _cuda_device_count() -> int:
    """The GPUs this process sees (0 without CUDA); it does not create a CUDA context."""
    import torch  # the data sets' module has imported it already

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _model_checks(spec: Spec, by_name: Mapping[str, ParamSpec], problems: list[Problem]) -> None:
    """What one strategy's ``incompatible`` hook cannot see: other strategies and the model section."""
    def candidates(name: str) -> tuple[Any, ...]:
        return by_name[name].extremes

    if spec.model.cifar_stem and spec.model.name not in TORCHVISION_MODELS:
        problems.append(Problem("model.cifar_stem", "applies to torchvision models only (" +
                                ", ".join(TORCHVISION_MODELS) + ")", spec.model.cifar_stem))
    if spec.train.optimizer == "lbfgs":
        # L-BFGS takes one full-batch step per epoch: no per-parameter learning rates, and a line
        # search that needs the same objective on every evaluation. (controls.bias_scale, a fixed factor in
        # the forward pass, is the bias control that works here.)
        multiplier = next((m for m in candidates("controls.bias_lr_multiplier") if m != 1.0), None)
        if multiplier is not None:
            problems.append(Problem("space.controls.bias_lr_multiplier", "needs a minibatch optimiser; "
                                    "train.optimizer lbfgs has no per-parameter learning rates", multiplier))
        how = next((h for h in candidates("equivariance.how") if h in ("augment", "penalty")), None)
        if how is not None:
            problems.append(Problem("space.equivariance.how", "random augmentation and penalty elements need a "
                                    "minibatch optimiser, not train.optimizer lbfgs (use layers or none)", how))
    if spec.model.name == "small_cnn" and any(n != "none" for n in candidates("norm.kind")):
        for knob in ("bias_lr_multiplier", "bias_scale"):
            value = next((m for m in candidates(f"controls.{knob}") if m != 1.0), None)
            if value is not None:
                problems.append(Problem(f"space.controls.{knob}", "needs a first-layer bias, which small_cnn has only "
                                        "with norm.kind: none (a norm layer makes a conv bias redundant)", value))


def _train_checks(spec: Spec, input_kind: str, problems: list[Problem]) -> None:
    """The training recipe's keys against each other, the optimiser, the data's task and the device."""
    train = spec.train
    if train.nesterov and train.optimizer != "sgd":
        problems.append(Problem("train.nesterov", f"applies to train.optimizer: sgd only, and train.optimizer is "
                                f"{train.optimizer}", train.nesterov))
    elif train.nesterov and train.momentum == 0:
        problems.append(Problem("train.nesterov", "needs train.momentum > 0", train.nesterov))
    if train.optimizer == "lbfgs":
        # One full-batch step per epoch with its own line search: there is no step size to schedule,
        # the line search compares losses that reduced precision would blur, and its closure runs the
        # replicas' own modules rather than the network the trainer compiles.
        changed = {"schedule": train.schedule != "constant", "warmup": bool(train.warmup),
                   "precision": train.precision != "fp32", "compile": train.compile}
        for key in [key for key, differs in changed.items() if differs]:
            problems.append(Problem(f"train.{key}", "needs a minibatch optimiser (train.optimizer lbfgs takes one "
                                    "full-batch step per epoch)", getattr(train, key)))
    if train.schedule == "onecycle" and train.warmup == 0:
        problems.append(Problem("train.warmup", "must be > 0 under train.schedule: onecycle (its rising part; "
                                "null = 0.3)", train.warmup))
    if train.label_smoothing > 0 and DATASETS[spec.data.dataset].task != "classification":
        problems.append(Problem("train.label_smoothing", f"applies to classification only, and data set "
                                f"{spec.data.dataset!r} is {DATASETS[spec.data.dataset].task}", train.label_smoothing))
    if train.channels_last and input_kind != "image":
        problems.append(Problem("train.channels_last", f"applies to image inputs only, and data set "
                                f"{spec.data.dataset!r} has {input_kind} inputs", train.channels_last))
    if train.precision == "fp16" and (train.device == "cpu" or train.device == "auto" and _cuda_device_count() == 0):
        problems.append(Problem("train.precision", "fp16 needs a CUDA device (train.device: "
                                f"{train.device} trains on the CPU here; use bf16)", train.precision))


def _input_checks(spec: Spec, by_name: Mapping[str, ParamSpec], input_kind: str, problems: list[Problem]) -> None:
    """Rules of the input pipeline that span the data section and the expansion."""
    if input_kind == "vector" and spec.data.normalize and "raw" in by_name["expansion.fill_space"].extremes:
        problems.append(Problem("space.expansion.fill_space", "raw places the constant in raw input units, which "
                                "normalised vector data does not have (each feature is standardised on its own); use "
                                "normalized, or data.normalize: false", "raw"))


def _augmentation_checks(spec: Spec, input_kind: str, problems: list[Problem]) -> None:
    """The data's own augmentation (``data.augment_crop``, ``data.augment_flip``): images only, minibatches only,
    and a crop smaller than the image."""
    data = spec.data
    asked = {"augment_crop": data.augment_crop, "augment_flip": data.augment_flip}
    for key, value in asked.items():
        if not value:
            continue
        if input_kind != "image":
            problems.append(Problem(f"data.{key}", f"applies to image data sets only, and data set {data.dataset!r} "
                                    f"has {input_kind} inputs", value))
        elif spec.train.optimizer == "lbfgs":
            problems.append(Problem(f"data.{key}", "random augmentation needs a minibatch optimiser, not "
                                    "train.optimizer lbfgs (one full-batch step per epoch)", value))
    shape = DATASETS[data.dataset].image_shape(data)
    if shape is not None and data.augment_crop >= min(shape[1:]):
        problems.append(Problem("data.augment_crop", f"must be smaller than the image side ({min(shape[1:])} for data "
                                f"set {data.dataset!r})", data.augment_crop))


def _physics_checks(spec: Spec, by_name: Mapping[str, ParamSpec], problems: list[Problem]) -> None:
    """What a physics-informed data set's training cannot have: it differentiates the network twice with respect
    to each point's coordinates and trains on that (``DatasetInfo.physics_informed``)."""
    if not DATASETS[spec.data.dataset].physics_informed:
        return
    if "batch" in by_name["norm.kind"].extremes:
        problems.append(Problem("space.norm.kind", "batch normalisation mixes the points of a batch and has no third "
                                f"derivative, which data set {spec.data.dataset!r} trains on (a PDE residual's second "
                                "derivatives, then their gradient); use none, layer or group", "batch"))
    # The residual trains through double backward in fp32 on the uncompiled network: these keys would change only
    # the evaluation, which is not what a user setting them asks for.
    if spec.train.precision != "fp32":
        problems.append(Problem("train.precision", f"must be fp32 on data set {spec.data.dataset!r}: its residual's "
                                "second derivatives are trained in fp32 (reduced precision would blur them)",
                                spec.train.precision))
    if spec.train.compile:
        problems.append(Problem("train.compile", f"must be false on data set {spec.data.dataset!r}: torch.compile "
                                "cannot differentiate twice, which its residual needs", spec.train.compile))


def _factors(p: ParamSpec) -> list[int]:
    """Every expansion factor a parameter can take (a range's integers too)."""
    if p.kind == "range":
        assert p.low is not None and p.high is not None
        return list(range(int(p.low), int(p.high) + 1, int(p.step or 1)))
    return [int(v) for v in p.values]


def spec_notes(spec: Spec) -> list[str]:
    """What a valid spec does that its user may not expect, one line each (``validate`` and ``run`` print them).

    Today: with ``equivariance.how: layers, where: all`` the logits are exactly invariant to rotating
    (and, for D4, flipping) the *expanded canvas*; they are invariant to rotating the original image
    only when the expansion commutes with the group (``why_not_rotation_symmetric``). Otherwise the
    constants break the symmetry the layers build, which may be the experiment, but is not invariance.
    """
    from sbsearch.strategies.expansion import why_not_rotation_symmetric

    by_name = {p.name: p for p in spec.space}
    shape = DATASETS[spec.data.dataset].image_shape(spec.data)
    if shape is None or "layers" not in by_name["equivariance.how"].extremes or \
            "all" not in by_name["equivariance.where"].extremes:
        return []
    for layout in by_name["expansion.layout"].extremes:
        for offset in by_name["expansion.offset"].extremes:
            for factor in _factors(by_name["expansion.factor"]):
                why = why_not_rotation_symmetric(str(layout), factor, str(offset), shape[1])
                if why is not None:
                    return [f"space.equivariance.where: all makes the logits invariant to rotating the expanded input, "
                            f"not the original image, when {why} (the constants then break the symmetry the layers "
                            "build)"]
    return []


def _input_size_checks(spec: Spec, shape: tuple[int, int, int], base: Mapping[str, Mapping[str, Any]],
                       by_name: Mapping[str, ParamSpec], problems: list[Problem]) -> None:
    """A torchvision network pools its input many times: too small an image leaves nothing to pool.

    Checks the smallest and largest expansion factor with each stem adaptation in the space (the other
    strategies at their first value), by a forward pass of shapes only.
    """
    factors = sorted({int(f) for f in by_name["expansion.factor"].extremes})

    def problem(side: int, factor: int, stem: str) -> str | None:
        plain = stage_config(spec.model, ModelDesc, input_shape=(shape[0], side, side), num_outputs=2)
        settings = {name: dict(values) for name, values in base.items()}
        settings["expansion"].update(factor=factor, stem=stem)
        return input_problem(apply_model_edits(plain, settings))

    for factor in dict.fromkeys((factors[0], factors[-1])):
        for stem in dict.fromkeys(by_name["expansion.stem"].extremes):
            if problem(shape[1], factor, stem) is None:
                continue
            # The smallest side that works, for the message: bisect between a side that fails and one that works.
            low, high = shape[1], 1024
            if problem(high, factor, stem) is None:
                while high - low > 1:
                    mid = (low + high) // 2
                    low, high = (mid, high) if problem(mid, factor, stem) is not None else (low, mid)
                need = f"images of at least {high}x{high}"
            else:
                need = "larger images"
            where = spec.model.name if factor == 1 else f"{spec.model.name} at expansion.factor {factor} (stem {stem})"
            rule = (f"{where} needs {need}, and data set {spec.data.dataset!r} gives {shape[1]}x{shape[2]}: "
                    "set data.image_size" + ("" if spec.model.cifar_stem else ", or model.cifar_stem: true"))
            if factor == 1:
                problems.append(Problem("model.name", rule, spec.model.name))
            else:
                problems.append(Problem("space.expansion.factor", rule, factor))
            return


def _data_checks(data: DataSpec, problems: list[Problem]) -> None:
    """Data that is not there is the user's to fix: say so before any training starts."""
    info = DATASETS[data.dataset]
    if not info.own_test_split and data.val_fraction + data.test_fraction >= 1:
        problems.append(Problem("data.test_fraction", f"must leave training data: val_fraction + test_fraction must "
                                f"be < 1 (val_fraction is {data.val_fraction})", data.test_fraction))
    if not info.needs_root:
        return
    if data.root is None:
        problems.append(Problem("data.root", f"must name the folder holding data set {data.dataset!r}", None))
        return
    if not data.download and not Path(data.root).is_dir():
        problems.append(Problem("data.root", f"must be an existing folder for data set {data.dataset!r} "
                                "(or set data.download: true)", data.root))
        return
    why = info.missing(data) if info.missing is not None else None
    if why is not None:
        problems.append(Problem("data.root", f"must hold data set {data.dataset!r} ({why})", data.root))


Stage = TypeVar("Stage")


def stage_config(section: Any, stage: Callable[..., Stage], **extra: Any) -> Stage:
    """What a stage consumes, built from a validated spec section: every field of the section under its own
    name, and ``extra``: what the stage needs that the section does not say (the data's input shape, the
    seed), or a value the stage needs resolved (``train.device: auto``).

    Every field of the section must be a field of ``stage`` (``TypeError`` otherwise), so no key a user
    set is lost on the way.

    Example:
        >>> desc = stage_config(spec.model, ModelDesc, input_shape=(1, 8, 8), num_outputs=10)
        >>> desc.name, desc.width
        ('small_cnn', 16)
    """
    return stage(**{**{f.name: getattr(section, f.name) for f in fields(section)}, **extra})


# Keys a later version replaced: (section, old key) -> (the key that replaced it, what an old value means
# there). A spec that still writes the old key validates, and a sweep it started resumes
# (sbsearch.study.same_sweep_changes reads the stored spec through replace_old_keys).
REPLACED_KEYS: dict[tuple[str, str], tuple[str, Callable[[bool], Any]]] = {
    ("search", "combined_score"): ("combined_features", lambda on: ["sb_score"] if on else []),
}


def replace_old_keys(raw: Mapping[str, Any], problems: list[Problem] | None = None) -> Mapping[str, Any]:
    """``raw`` (a spec as plain data) with each old key of ``REPLACED_KEYS`` written as the key that replaced
    it; ``raw`` itself is left alone. An old key whose value is not true or false, or that comes with the
    key that replaced it, is dropped and, given ``problems``, is one problem there."""
    out = dict(raw)
    for (section, old), (new, meaning) in REPLACED_KEYS.items():
        keys = out.get(section)
        if not isinstance(keys, Mapping) or old not in keys:
            continue
        value = keys[old]
        out[section] = {k: v for k, v in keys.items() if k != old}
        if isinstance(value, bool) and new not in keys:
            out[section][new] = meaning(value)
        elif problems is not None:
            rule = "must be true or false" if not isinstance(value, bool) else f"was replaced by {new}: give only that key"
            problems.append(Problem(f"{section}.{old}", rule, value))
    return out


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
    raw = replace_old_keys(raw, problems)
    head = _parse_section(Spec, {k: raw[k] for k in ("name", "seed") if k in raw}, "", problems, only=("name", "seed"))
    sections = {name: _parse_section(cls, raw.get(name), name, problems) for name, cls in _SECTIONS.items()}
    space = _parse_space(raw.get("space"), problems, DATASETS[sections["data"].dataset].input_kind)
    if sections["data"].root is not None:  # trials may run in other working directories (Ray)
        sections["data"] = dataclasses.replace(sections["data"], root=str(Path(sections["data"].root).expanduser().resolve()))
    spec = Spec(name=head.name, seed=head.seed, space=space, **sections)
    if not problems:
        _cross_checks(spec, DATASETS[spec.data.dataset].input_kind, problems)
        _data_checks(spec.data, problems)
    if problems:
        for p in problems:
            p.path = p.path.lstrip(".")
        raise SpecError(problems)
    return spec


def check_sweep(spec: Spec) -> None:
    """Refuse a valid spec whose sweep would search nothing: every trial the same configuration.

    ``sbsearch run`` and ``validate`` ask it of the spec with the command-line overrides applied, so
    ``--trials 1`` meets it; a spec that only builds a trial, or that ``rank`` samples, need not.

    Raises:
        SpecError: one line saying how to search something, or to repeat on purpose.
    """
    if spec.searched or spec.search.trials == 1 or spec.search.repeat:
        return
    raise SpecError([Problem("search.trials", "must be 1 when the space searches nothing (no knob lists values or a "
                             "range), as every trial would train the same configuration; list values or a range "
                             "for a knob under space, or set search.repeat: true to repeat it on purpose",
                             spec.search.trials)])


# --- reading the YAML ------------------------------------------------------------------------------

# Bounds far above any real spec (a few kB, nested 5 deep, a few hundred values) that stop a file made
# to exhaust memory or time: each is refused with one line before it costs much.
MAX_SPEC_BYTES = 1_000_000
MAX_SPEC_DEPTH = 20
MAX_SPEC_VALUES = 20_000  # scalars, lists and mappings, each YAML alias counted in full


def load_spec(path: str | Path) -> Spec:
    """Read and validate a YAML spec file.

    Example:
        >>> spec = load_spec("search_spaces/quickstart.yaml")
        >>> spec.search.trials
        20
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:  # no more than the limit is read, whatever the file is
            data = handle.read(MAX_SPEC_BYTES + 1)
        if len(data) > MAX_SPEC_BYTES:
            size = path.stat().st_size
            raise SpecError([_too_large(str(path), f"{size} bytes" if size > MAX_SPEC_BYTES else
                                        f"more than {MAX_SPEC_BYTES} bytes")])
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise SpecError([Problem("spec", "must be an existing file", str(path))]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([Problem("spec", f"must be a readable UTF-8 file ({type(exc).__name__})", str(path))]) from None
    return parse_spec(read_spec_yaml(text, str(path)))


def read_spec_yaml(text: str, source: str = "<text>") -> Any:
    """The plain data of a spec's YAML text, what ``parse_spec`` takes, read within bounds.

    Refused with one line each: text over ``MAX_SPEC_BYTES`` (before it is parsed), YAML that is
    invalid or tagged as something other than plain data, lists and mappings nested deeper than
    ``MAX_SPEC_DEPTH``, more than ``MAX_SPEC_VALUES`` values with every alias expanded (counted as
    the text is read, so an alias bomb never expands), an alias inside the node it names, and a key
    given twice in one mapping (YAML would keep the last value without a word).

    Args:
        text: the YAML.
        source: what the text came from (the file's path), named by problems with the text as a whole.

    Raises:
        SpecError: naming the key, or ``spec`` with ``source``.
    """
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_SPEC_BYTES:
        raise SpecError([_too_large(source, f"{size} bytes")])
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        reason = " ".join(str(getattr(exc, "problem", None) or "malformed").split())
        reason = reason if len(reason) <= 200 else reason[:200] + "…"  # PyYAML may quote a tag of any length
        raise SpecError([Problem("spec", f"must be valid YAML ({reason} at {where})", source)]) from None
    finally:
        loader.dispose()


def _too_large(source: str, size: str) -> Problem:
    return Problem("spec", f"must be at most {MAX_SPEC_BYTES} bytes (1 MB; real specs are a few kB)", source, size)


def _line(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


class _BoundedLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML has no type hints
    """PyYAML's safe loader with the bounds of ``read_spec_yaml``, checked as each node is composed.

    Composing links an alias to the node it names instead of copying it, so counting each node's
    values (aliases expanded) as it is composed refuses an alias bomb before anything is expanded.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.steps: list[str] = []  # from the root to the node being composed: ".key" or "[3]" each
        self.values_in: dict[int, int] = {}  # id(node) -> the values it holds, aliases expanded
        self.values = 0  # values composed so far, aliases expanded
        self.depth = 0  # lists and mappings open around the node being composed

    def key_path(self) -> str:
        return "".join(self.steps).lstrip(".")

    def compose_node(self, parent: Any, index: Any) -> Any:
        if isinstance(parent, yaml.SequenceNode):
            self.steps.append(f"[{index}]")
        elif isinstance(index, yaml.ScalarNode):
            self.steps.append(f".{index.value}")
        else:  # the root, a key, or the value of a key that is itself a list or mapping
            self.steps.append("")
        try:
            return self._compose_counted(parent, index)
        finally:
            self.steps.pop()

    def _compose_counted(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)  # the node the alias names (PyYAML refuses an unknown one)
            values = self.values_in.get(id(node))
            if values is None:  # still being composed: the alias is inside it
                raise SpecError([Problem(self.key_path(), "must not be a YAML alias to a list or mapping that "
                                         "holds it", f"*{event.anchor}", _line(event.start_mark))])
            self.values += values
            if self.values > MAX_SPEC_VALUES:
                raise SpecError([Problem(self.key_path(), f"must not expand the spec past {MAX_SPEC_VALUES} values "
                                         "(scalars, lists and mappings, each YAML alias counted in full; a guard "
                                         "against alias bombs)", f"*{event.anchor}",
                                         f"{_line(event.start_mark)}, where the count reaches {self.values}")])
            return node
        self.values += 1
        if self.values > MAX_SPEC_VALUES:
            raise SpecError([Problem("", f"must hold at most {MAX_SPEC_VALUES} values (scalars, lists and mappings, "
                                     "each YAML alias counted in full)", self.values,
                                     f"counting stopped at {self.key_path() or 'the top'}, {_line(event.start_mark)}")])
        if not isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            node = super().compose_node(parent, index)
            self.values_in[id(node)] = 1
            return node
        self.depth += 1
        if self.depth > MAX_SPEC_DEPTH:
            raise SpecError([Problem(self.key_path(), f"must nest lists and mappings at most {MAX_SPEC_DEPTH} deep",
                                     self.depth, _line(event.start_mark))])
        node = super().compose_node(parent, index)
        self.depth -= 1
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value
        self.values_in[id(node)] = 1 + sum(self.values_in[id(child)] for child in children)
        if isinstance(node, yaml.MappingNode):
            self._refuse_repeated_keys(node)
        return node

    def _refuse_repeated_keys(self, node: Any) -> None:
        first_of: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a list or mapping as a key is refused when built; "<<" merges in another mapping's keys
            key = self.construct_object(key_node)
            first = first_of.setdefault(key, key_node)
            if first is not key_node:
                path = f"{self.key_path()}.{key}".lstrip(".")
                raise SpecError([Problem(path, "must appear only once in its mapping (YAML would keep the last "
                                         "value without a word)", key, f"at line {first.start_mark.line + 1} and "
                                         f"again at line {key_node.start_mark.line + 1}")])

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:  # a date such as 2024-02-30, an integer of 5000 digits
            kind = str(node.tag).rsplit(":", 1)[-1]
            why = f"{len(str(node.value))} characters are too many to read" if kind == "int" else str(exc)
            raise yaml.constructor.ConstructorError(None, None, f"cannot read this {kind}: {why}",
                                                    node.start_mark) from None


def spec_to_dict(spec: Spec) -> dict[str, Any]:
    """The resolved spec as plain data (defaults filled in), fit to write as YAML and parse again."""
    out: dict[str, Any] = {"name": spec.name, "seed": spec.seed}
    for name in _SECTIONS:
        # Tuples (data.domain) become lists: YAML's safe dumper writes lists only.
        out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(getattr(spec, name)).items()}
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
            return " or ".join("null" if a is type(None) else type_words(a) for a in get_args(tp))
        if get_origin(tp) is tuple and get_args(tp)[-1] is Ellipsis:
            return f"list of {get_args(tp)[0].__name__}"
        if get_origin(tp) is tuple:
            return f"list of {len(get_args(tp))} float"
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
                rows.append((f"{f.name}.{g.name}", type_words(sub_hints[g.name]), yaml.safe_dump(list(g.default) if isinstance(g.default, tuple) else g.default, default_flow_style=True).split("\n")[0], meaning))
        elif f.name == "space":
            for sname, strategy in STRATEGIES.items():
                for knob in strategy.knobs:
                    rows.append((f"space.{sname}.{knob.name}", knob.kind, knob.default_words(), f"{knob.doc}; {knob.rule()}"))
        else:
            rule = f.metadata.get("rule")
            rows.append((f.name, type_words(hints[f.name]), repr(f.default), f.metadata["doc"] + (f"; {rule[0]}" if rule else "")))
    return rows
