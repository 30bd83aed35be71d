"""The report's page: the values each section shows, laid out by the ``page.html.j2`` template.

``write_report(out_dir)`` loads the sweep, draws the plots into ``OUT/report/``, writes ``index.html`` beside
them and logs the folder to the sweep's MLflow parent run.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

from sbsearch.logs import metric_text
from sbsearch.report.controls import EXPANSION_CONTROLS, check_controls
from sbsearch.report.load import SCORE, SweepData, load_sweep
from sbsearch.report.plots import CURVES, controls_plot, curves_plot, effect_plot, importance_plot, score_plot
from sbsearch.report.stats import CONFIDENCE, compute_spent, fmt, knob_groups, score_points, spearman, stopped_by_value
from sbsearch.sweep import HELD_OUT_TOP
from sbsearch.tracking import Tracker, TrackingTarget

TOP_TRIALS = 10

_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent), autoescape=True, undefined=jinja2.StrictUndefined,
    trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
_TEMPLATES.filters["fmt"] = fmt
# A number cell is right-aligned; a bool is a knob value like any other.
_TEMPLATES.tests["numeric"] = lambda c: isinstance(c, (int, float)) and not isinstance(c, bool)


def _with_spread(values: Mapping[str, float], key: str) -> str:
    spread = values.get(key + "_std")
    return metric_text(values[key]) + ("" if spread is None else f" ± {metric_text(spread)}")


def _best(data: SweepData) -> dict[str, Any] | None:
    ranked = data.ranked()
    if not ranked:
        return None
    best = ranked[0]
    return {"trial": best, "searched": [(p.name, best.params.get(p.name)) for p in data.searched],
            "fixed": [(p.name, p.values[0]) for p in data.spec.space if not p.searched],
            "test": _with_spread(best.test, data.test_metric) if data.test_metric in best.test else None}


def _top(data: SweepData) -> dict[str, Any]:
    searched = [p.name for p in data.searched]
    extra = [k for k in (SCORE, f"{data.metric}_std") if any(k in t.final for t in data.completed())]
    test = data.test_metric
    chosen = {t.number for t in data.chosen()}
    has_test = any(test in t.test for t in data.chosen())
    rows = [(t.number, t.final[data.metric], *[t.final.get(k, "") for k in extra],
             *([_with_spread(t.test, test) if t.number in chosen and test in t.test else ""] if has_test else []),
             t.epochs_run, round(t.seconds, 1), *[t.params.get(k) for k in searched]) for t in data.ranked()[:TOP_TRIALS]]
    header = ["trial", data.metric, *extra, *([f"{test} (held out)"] if has_test else []), "epochs", "seconds", *searched]
    return {"header": header, "rows": rows, "has_test": has_test, "held_out": HELD_OUT_TOP}


def _effects(data: SweepData, folder: Path) -> dict[str, Any]:
    checks = check_controls(data.trials, data.metric, data.direction, [p.name for p in data.spec.space])
    controls = None
    if checks:
        image = controls_plot(checks, EXPANSION_CONTROLS.treatment, data.metric, folder)
        controls = {"image": image, "checks": checks}
    # The controls sit beside the expansion's factor, else beside another knob of the expansion or controls.
    beside = next((p.name for p in data.searched if p.name == "expansion.factor"),
                  next((p.name for p in data.searched if p.strategy in ("expansion", "controls")), None))
    knobs = []
    for p in data.searched:
        groups = knob_groups(data, p)
        image = effect_plot(data, p, groups, folder)
        stopped = stopped_by_value(data, p)
        header = ["value", f"mean {data.metric} [{CONFIDENCE:.0%} interval] (n)"] + (["not completed"] if stopped else [])
        rows = [(g.label, str(g.interval), *([stopped.get(g.label, "")] if stopped else [])) for g in groups]
        knobs.append({"name": p.name, "image": image, "header": header, "rows": rows,
                      "controls": p.name == beside and controls is not None})
    repeats: dict[int, list[int]] = {}
    for t in data.repeats():
        repeats.setdefault(t.network, []).append(t.number)
    return {"n_done": len(data.completed()), "knobs": knobs, "controls": controls, "controls_apart": beside is None,
            "repeats": sorted(repeats.items()), "n_repeats": len(data.repeats())}


def _importance(data: SweepData, folder: Path) -> dict[str, Any]:
    if not data.importances:
        return {"rows": [], "note": data.importance_note}
    return {"rows": sorted(data.importances.items(), key=lambda kv: -kv[1]),
            "image": importance_plot(data.importances, folder)}


def _curves(data: SweepData, folder: Path) -> dict[str, Any]:
    if not any(t.curve for t in data.trials):
        return {"image": None}
    return {"image": curves_plot(data, folder), "shown": min(CURVES, len(data.ranked()))}


def _score(data: SweepData, folder: Path) -> dict[str, Any]:
    what, points = score_points(data, SCORE)
    if not points:
        return {"name": SCORE, "image": None,
                "sentence": (f"No completed trial logged {SCORE} (the replica Wasserstein score), so there is nothing "
                             "to compare with the final metric.")}
    corr = spearman([pt[1] for pt in points], [pt[2] for pt in points])
    if corr is None:
        sentence = title = f"Too few distinct completed trials ({len(points)}) for a Spearman correlation."
    else:
        sentence = (f"Spearman correlation between {what} and the final {data.metric}: ρ = {corr.rho:+.2f} "
                    f"(p = {corr.pvalue:.2g}, n = {corr.n} completed trials).")
        title = f"Spearman ρ = {corr.rho:+.2f} (n = {corr.n})"
    return {"name": SCORE, "image": score_plot(points, what, data.metric, title, folder), "sentence": sentence}


def _compute(data: SweepData) -> dict[str, Any]:
    c = compute_spent(data)
    return {"counts": c.counts, "epochs_run": c.epochs_run, "epochs_full": c.epochs_full,
            "share": c.epochs_run / c.epochs_full if c.epochs_full else 0.0, "seconds_run": c.seconds_run,
            "epochs_saved": c.epochs_saved, "seconds_saved": c.seconds_saved,
            "failed": [(t.number, t.reason[:200]) for t in data.trials if t.state == "FAIL"]}


def render(data: SweepData, folder: Path) -> str:
    """Write the plots into ``folder`` and return the page that shows them."""
    return _TEMPLATES.get_template("page.html.j2").render(
        data=data, spec=data.spec, when=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        confidence=f"{CONFIDENCE:.0%}", best=_best(data), top=_top(data), effects=_effects(data, folder),
        importance=_importance(data, folder), curves=_curves(data, folder), score=_score(data, folder),
        compute=_compute(data))


def write_report(out_dir: Path, tracking_uri: str | None = None, parent_run_id: str | None = None) -> Path:
    """Write ``out_dir/report/index.html`` with its PNG plots, and log them to the sweep's MLflow parent run.

    Args:
        out_dir: the sweep's ``--out`` folder.
        tracking_uri: the MLflow store (default: the spec's, else ``mlflow.db`` under ``out_dir`` or here).
        parent_run_id: the sweep's parent run (default: found by the sweep's key).

    Returns:
        The path of ``index.html``.

    Example:
        >>> page = write_report(Path("out"))
        >>> page.name
        'index.html'
    """
    data = load_sweep(Path(out_dir), tracking_uri, parent_run_id)
    folder = data.out_dir / "report"
    folder.mkdir(exist_ok=True)
    for old in folder.glob("*.png"):  # a knob no longer searched leaves no stale plot behind
        old.unlink()
    page = folder / "index.html"
    tmp = folder / "index.html.tmp"
    tmp.write_text(render(data, folder), encoding="utf-8")
    tmp.replace(page)
    if data.parent_run_id is not None and data.tracking_uri is not None:
        tracker = Tracker(TrackingTarget(data.tracking_uri, data.spec.tracking.experiment or data.spec.name,
                                         (data.out_dir / "mlartifacts").as_uri()))
        tracker.log_artifacts(data.parent_run_id, folder, "report")
    return page
