"""The controls analysis: is the expansion's gain symmetry breaking, or a confounder that a control rebuilds?

The gain is the mean final metric of the expanded trials minus that of the unexpanded baseline; each control's
gain is its own trials' mean minus the same baseline. A control that recovers at least ``REPRODUCED_FRACTION``
of the gain is flagged. What is compared is the ``ControlSet`` a strategy offers the report (its
``report_controls`` hook): ``EXPANSION_CONTROLS``, the controls strategy's, by default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sbsearch.report.load import TrialData, one_per_network
from sbsearch.report.stats import Interval, difference_interval
from sbsearch.strategies import STRATEGIES, ControlSet, ReportControl
from sbsearch.strategies.base import Params

REPRODUCED_FRACTION = 0.5
"""A control 'reproduces' the gain when it recovers at least this share of it: then half or more of what
looked like symmetry breaking is explained by the confounder the control rebuilds."""

def _expansion_controls() -> ControlSet:
    control_set = STRATEGIES["controls"].report_controls
    assert control_set is not None, "the controls strategy offers the report its baselines"
    return control_set


EXPANSION_CONTROLS = _expansion_controls()
"""The expansion's gain and the baselines that rebuild its confounders without constants in the input, as
the controls strategy offers them (``sbsearch.strategies.controls``)."""

Control = ReportControl
CONTROLS: dict[str, Control] = {c.name: c for c in EXPANSION_CONTROLS.controls}


@dataclass(frozen=True)
class ControlCheck:
    """The treatment's gain over the baseline next to one control's gain (both signed so that positive is
    better, whatever the metric's direction)."""

    name: str
    label: str
    gain: Interval
    control_gain: Interval
    verdict: str
    reproduces: bool | None  # None: nothing to decide (no gain, or no trials of the control)


def check_controls(trials: Iterable[TrialData], metric: str, direction: str, knobs: Iterable[str],
                   control_set: ControlSet = EXPANSION_CONTROLS) -> list[ControlCheck]:
    """Compare the treatment's gain with each control's, for the controls whose knob ``knobs`` has.

    Example:
        >>> checks = check_controls(data.completed(), "val_accuracy", "maximize", [p.name for p in spec.space])
        >>> [c.verdict for c in checks if c.reproduces]
    """
    sign = 1.0 if direction == "maximize" else -1.0
    done = [t for t in trials if t.state == "COMPLETE" and math.isfinite(t.final.get(metric, math.nan))]
    if not any(control_set.tried(t.params) for t in done):
        return []  # the treatment was not tried: there is no gain for a control to explain
    value = {t.number: sign * t.final[metric] for t in done}

    def group(member: Callable[[Params], bool]) -> list[float]:
        # Each network once: a repeat within a group (same seeds, knobs that do not apply) is no new sample.
        return [value[t.number] for t in one_per_network(t for t in done if member(t.params))]

    base = group(control_set.baseline)
    treated = group(control_set.treated)
    gain = difference_interval(treated, base)
    knobs = set(knobs)
    checks = []
    for control in control_set.controls:
        if control.knob not in knobs:
            continue
        ctl = group(control.member)
        control_gain = difference_interval(ctl, base)
        reproduces: bool | None = None
        if not ctl:
            verdict = f"not in this sweep ({control.how})"
        elif not base or not treated:
            verdict = "needs completed trials of both the unexpanded baseline (factor 1) and the expansion"
        elif gain.mean <= 0:
            verdict = f"the expansion did not help here (gain {gain.mean:+.4g}); nothing for the control to explain"
        else:
            share = control_gain.mean / gain.mean
            reproduces = share >= REPRODUCED_FRACTION
            if reproduces:
                verdict = (f"CONTROL REPRODUCES THE GAIN: it recovers {share:.0%} of it, so the gain is likely "
                           f"{control.rebuilds}, not symmetry breaking")
            else:
                verdict = f"the control does not reproduce the gain (it recovers {share:.0%} of it)"
        checks.append(ControlCheck(control.name, control.label, gain, control_gain, verdict, reproduces))
    return checks
