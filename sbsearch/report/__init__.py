"""The sweep report: what a sweep found, as one HTML page with PNG plots beside it.

``write_report(out_dir)`` reads the sweep's folder (``spec.yaml`` and the sweep's study) and, where it can
reach it, the sweep's MLflow store (per-epoch histories such as ``sb_score``), then writes
``OUT/report/index.html`` with its plots and logs the folder to the sweep's MLflow parent run.

Sections: the best configuration and the top trials; for each searched knob the final metric by value with
a 95% interval, and beside the expansion the gain of each control (``upsample``, width-matched, bias
learning rate, bias scale) with a flag where a control reproduces the gain; Optuna's parameter importance;
learning curves; ``sb_score`` against the final metric; trial counts and the compute spent and saved by
pruning.

Modules, each importing only the ones before it: ``load`` (the sweep's trials), ``stats`` (intervals,
correlation, per-value groups), ``controls`` (the controls analysis), ``plots`` (the PNGs), ``page`` (the
HTML, from ``page.html.j2``).
"""

from __future__ import annotations

from sbsearch.report.controls import CONTROLS, REPRODUCED_FRACTION, Control, ControlCheck, check_controls
from sbsearch.report.load import SweepData, TrialData, load_sweep
from sbsearch.report.page import write_report
from sbsearch.report.stats import Interval, difference_interval, interval

__all__ = [
    "CONTROLS", "REPRODUCED_FRACTION", "Control", "ControlCheck", "Interval", "SweepData", "TrialData",
    "check_controls", "difference_interval", "interval", "load_sweep", "write_report",
]
