"""The sweep report: its sections and plots from a tiny real sweep, its intervals, and the control flags."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from sbsearch.report import (
    CONTROLS,
    REPRODUCED_FRACTION,
    TrialData,
    check_controls,
    difference_interval,
    interval,
    load_sweep,
    write_report,
)
from sbsearch.report.page import render
from sbsearch.report.stats import knob_groups
from sbsearch.spec import parse_spec
from sbsearch.sweep import run_sweep
from sbsearch.tracking import Tracker, TrackingTarget

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("best", "top-trials", "effects", "importance", "curves", "score", "compute", "mlflow")


def tiny_spec(name: str = "report-tiny", trials: int = 6) -> Any:
    return parse_spec({
        "name": name, "seed": 0,
        "data": {"dataset": "digits", "batch_size": 128},
        "model": {"name": "small_cnn", "width": 4, "depth": 1},
        "train": {"epochs": 2, "lr": 0.01},
        "space": {"expansion": {"factor": [1, 2], "layout": ["grid", "upsample"]},
                  "dropout": {"rate": {"low": 0.0, "high": 0.3}}},
        "search": {"sampler": "random", "trials": trials, "parallel": 1},
    })


@pytest.fixture(scope="module")
def sweep_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "out"
    with open(os.devnull, "w") as quiet:
        run_sweep(tiny_spec(), out, console=Console(file=quiet))
    return out


def test_report_has_every_section_and_valid_pngs(sweep_out: Path) -> None:
    page = write_report(sweep_out)
    text = page.read_text(encoding="utf-8")
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in text, anchor
    for knob in ("expansion.factor", "expansion.layout", "dropout.rate"):
        assert f"effect-{knob}.png" in text
    images = sorted(page.parent.glob("*.png"))
    names = {p.name for p in images}
    assert {"effect-expansion.factor.png", "curves.png", "importance.png"} <= names
    for png in images:
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC, png.name
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width > 100 and height > 100, png.name
        assert f'src="{png.name}"' in text, f"{png.name} is written but not shown"
    # Trials train 3 replicas by default, so they log sb_score and the report plots it against the metric.
    assert 'src="sb_score.png"' in text and "Spearman" in text


def test_report_is_logged_to_the_parent_run(sweep_out: Path) -> None:
    data = load_sweep(sweep_out)
    assert data.parent_run_id is not None and data.tracking_uri is not None
    write_report(sweep_out)
    tracker = Tracker(TrackingTarget(data.tracking_uri, data.spec.name, (sweep_out / "mlartifacts").as_uri()))
    logged = {a.path for a in tracker.client.list_artifacts(data.parent_run_id, "report")}
    assert "report/index.html" in logged and "report/curves.png" in logged


def test_loaded_trials_match_the_sweep(sweep_out: Path) -> None:
    data = load_sweep(sweep_out)
    assert len(data.trials) == 6
    assert all("expansion.stem" in t.params for t in data.trials)  # fixed knobs are filled in
    done = data.completed()
    assert done and all(t.curve for t in done)
    assert all(max(t.curve) == t.epochs_run for t in done)
    assert data.importances is not None and math.isclose(sum(data.importances.values()), 1.0, rel_tol=1e-6)


def test_a_folder_without_its_study_says_so(sweep_out: Path, tmp_path: Path) -> None:
    from sbsearch.errors import SbsearchError

    folder = tmp_path / "out"
    shutil.copytree(sweep_out, folder, ignore=shutil.ignore_patterns("optuna.journal"))
    assert (folder / "trials.csv").exists()  # the study is where the report reads trials from, not trials.csv
    with pytest.raises(SbsearchError, match="its study .* was not found"):
        load_sweep(folder)


def test_page_escapes_what_trials_and_stores_say(sweep_out: Path, tmp_path: Path) -> None:
    data = load_sweep(sweep_out)
    failed = dataclasses.replace(data.trials[0], state="FAIL", reason="<script>alert('x')</script> & more")
    data = dataclasses.replace(data, trials=(failed, *data.trials[1:]), tracking_note="store <b>down</b>")
    text = render(data, tmp_path)
    assert "<script>" not in text and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; more" in text
    assert "<p>store &lt;b&gt;down&lt;/b&gt;</p>" in text


def test_report_of_a_folder_without_a_sweep_names_it(tmp_path: Path) -> None:
    from sbsearch.errors import SbsearchError

    with pytest.raises(SbsearchError, match="spec.yaml"):
        write_report(tmp_path)


# --- intervals on a handful of numbers ------------------------------------------------------------
def test_interval_matches_the_t_table() -> None:
    iv = interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, n 3: t(0.975, 2) = 4.302653 -> half width 4.302653 / sqrt(3)
    assert iv.mean == 2.0 and iv.n == 3
    assert iv.high - iv.mean == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert iv.mean - iv.low == pytest.approx(iv.high - iv.mean)


def test_interval_of_one_value_has_no_bounds_and_of_equal_values_has_zero_width() -> None:
    one = interval([0.7])
    assert one.mean == 0.7 and not one.known
    same = interval([0.5, 0.5, 0.5, 0.5])
    assert same.low == same.high == 0.5
    assert interval([]).n == 0


def test_difference_interval_is_welch() -> None:
    a, b = [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 2.0]
    iv = difference_interval(a, b)
    assert iv.mean == pytest.approx(2.5 - 4 / 3)
    va, vb = (5 / 3) / 4, (1 / 3) / 3
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    from scipy import stats

    assert iv.high - iv.mean == pytest.approx(stats.t.ppf(0.975, df) * math.sqrt(va + vb))


# --- control flags on synthetic trials ------------------------------------------------------------
def _trial(number: int, value: float, factor: int = 1, layout: str = "grid", width_matched: bool = False,
           bias: Any = 1.0, scale: Any = 1.0) -> TrialData:
    params = {"expansion.factor": factor, "expansion.layout": layout, "controls.width_matched": width_matched,
              "controls.bias_lr_multiplier": bias, "controls.bias_scale": scale}
    return TrialData(number, "COMPLETE", params, {"val_accuracy": value}, epochs_run=3)


KNOBS = ["expansion.factor", "expansion.layout", "controls.width_matched", "controls.bias_lr_multiplier",
         "controls.bias_scale"]


def _checks(trials: list[TrialData], direction: str = "maximize") -> dict[str, Any]:
    return {c.name: c for c in check_controls(trials, "val_accuracy", direction, KNOBS)}


def test_a_control_that_matches_the_gain_is_flagged() -> None:
    trials = [_trial(0, 0.80), _trial(1, 0.82), _trial(2, 0.90, factor=2), _trial(3, 0.92, factor=2),
              _trial(4, 0.89, factor=2, layout="upsample"), _trial(5, 0.91, factor=2, layout="upsample"),
              _trial(6, 0.81, factor=2, width_matched=True), _trial(7, 0.82, factor=2, width_matched=True)]
    checks = _checks(trials)
    assert checks["upsample"].gain.mean == pytest.approx(0.10)
    assert checks["upsample"].control_gain.mean == pytest.approx(0.09)
    assert checks["upsample"].reproduces is True and "REPRODUCES" in checks["upsample"].verdict
    assert checks["width_matched"].reproduces is False  # recovers 5% of the gain
    assert checks["bias_lr"].reproduces is None and "not in this sweep" in checks["bias_lr"].verdict


def test_the_flag_threshold_is_a_share_of_the_gain() -> None:
    just_below = REPRODUCED_FRACTION * 0.10 - 0.001
    trials = [_trial(0, 0.80), _trial(1, 0.90, factor=3), _trial(2, 0.80 + just_below, bias="auto", factor=3)]
    assert _checks(trials)["bias_lr"].reproduces is False
    trials[2] = _trial(2, 0.80 + REPRODUCED_FRACTION * 0.10 + 0.001, bias="auto", factor=3)
    assert _checks(trials)["bias_lr"].reproduces is True


def test_a_bias_scale_control_that_reproduces_the_gain_is_flagged() -> None:
    # 1-D function fit, val_mse: the expansion lowers it by 0.1, the bias-scale control by 0.08.
    trials = [_trial(0, 0.30), _trial(1, 0.20, factor=5), _trial(2, 0.22, factor=5, scale="auto"),
              _trial(3, 0.29, factor=5, bias="auto"), _trial(4, 0.10, factor=5, bias="auto", scale="auto")]
    checks = _checks(trials, direction="minimize")
    scale, bias = checks["bias_scale"], checks["bias_lr"]
    assert scale.gain.mean == pytest.approx(0.1) and scale.control_gain.mean == pytest.approx(0.08)
    assert scale.reproduces is True and "REPRODUCES" in scale.verdict
    assert bias.control_gain.mean == pytest.approx(0.01) and bias.reproduces is False  # trial 4 is in neither
    # A fixed scale on the unexpanded input is the control too; on an expanded input it is neither.
    trials[2] = _trial(2, 0.22, scale=13.6)
    trials.append(_trial(5, 0.0, factor=5, scale=13.6))
    again = _checks(trials, direction="minimize")["bias_scale"]
    assert again.gain.mean == pytest.approx(0.1) and again.control_gain.mean == pytest.approx(0.08)


def test_no_gain_means_nothing_to_explain_and_direction_is_respected() -> None:
    worse = [_trial(0, 0.9), _trial(1, 0.8, factor=2), _trial(2, 0.85, factor=2, layout="upsample")]
    assert _checks(worse)["upsample"].reproduces is None
    # For a loss (minimize), the same numbers are a gain of 0.1 and the control recovers half of it.
    as_loss = _checks(worse, direction="minimize")["upsample"]
    assert as_loss.gain.mean == pytest.approx(0.1) and as_loss.reproduces is True


def test_controls_are_offered_only_where_the_spec_has_their_knob() -> None:
    trials = [_trial(0, 0.8), _trial(1, 0.9, factor=2)]
    names = {c.name for c in check_controls(trials, "val_accuracy", "maximize", ["expansion.factor", "expansion.layout"])}
    assert names == {"upsample"}
    assert set(CONTROLS) == {"upsample", "width_matched", "bias_lr", "bias_scale"}
    # A sweep that never expanded its input has no gain for any control to explain.
    assert check_controls([_trial(0, 0.8)], "val_accuracy", "maximize", KNOBS) == []


def test_trials_with_a_bias_multiplier_on_an_expanded_input_belong_to_no_group() -> None:
    trials = [_trial(0, 0.8), _trial(1, 0.9, factor=2), _trial(2, 0.5, factor=2, bias=3.0)]
    check = _checks(trials)["upsample"]
    assert check.gain.mean == pytest.approx(0.1)  # trial 2 is neither the treatment nor the baseline


# --- a network met twice ---------------------------------------------------------------------------
def test_trials_with_the_same_numbers_are_marked_as_repeats_of_the_first() -> None:
    from sbsearch.report.load import mark_repeats

    final = {"val_accuracy": 0.9, "val_loss": 0.31, "sb_score": 0.05}
    trials = [TrialData(3, "COMPLETE", {"k": "b"}, final, epochs_run=2),
              TrialData(1, "COMPLETE", {"k": "a"}, final, epochs_run=2),
              TrialData(2, "COMPLETE", {"k": "c"}, {**final, "val_loss": 0.32}, epochs_run=2),
              TrialData(4, "COMPLETE", {"k": "d"}, final, epochs_run=1),  # stopped at another epoch: not the same run
              TrialData(5, "COMPLETE", {"k": "e"}, {"val_accuracy": 0.9}, epochs_run=1),
              TrialData(6, "COMPLETE", {"k": "f"}, {"val_accuracy": 0.9}, epochs_run=1),  # one metric: a tie, not proof
              TrialData(7, "PRUNED", {"k": "g"}, final, epochs_run=2)]
    marked = {t.number: t.same_as for t in mark_repeats(trials)}
    assert marked == {1: None, 2: None, 3: 1, 4: None, 5: None, 6: None, 7: None}


def test_a_grid_cell_that_repeats_a_network_counts_once_in_every_statistic(tmp_path: Path) -> None:
    # At factor 1 the layout does not apply: (1, grid) and (1, upsample) train one network with the same seeds.
    spec = parse_spec({
        "name": "report-repeats", "seed": 0,
        "data": {"dataset": "digits", "batch_size": 128},
        "model": {"name": "small_cnn", "width": 4, "depth": 1},
        "train": {"epochs": 1, "lr": 0.01},
        "space": {"expansion": {"factor": [1, 2], "layout": ["grid", "upsample"]}},
        "search": {"sampler": "grid", "trials": 4, "parallel": 1, "pruner": "none"},
    })
    out = tmp_path / "out"
    with open(os.devnull, "w") as quiet:
        result = run_sweep(spec, out, console=Console(file=quiet))
    data = load_sweep(out)
    assert [r.number for r in result.chosen] == [t.number for t in data.ranked()]  # the summary shows it once too
    factor = {t.number: t.params["expansion.factor"] for t in data.trials}
    repeats = data.repeats()
    assert len(data.completed()) == 4 and len(repeats) == 1, [(t.number, t.final) for t in data.trials]
    assert factor[repeats[0].number] == factor[repeats[0].network] == 1
    assert len(data.ranked()) == 3 and repeats[0].number not in {t.number for t in data.ranked()}
    groups = {g.label: g for g in knob_groups(data, spec.param("expansion.factor"))}
    assert (len(groups["1"].values), len(groups["2"].values)) == (1, 2)  # not two "samples" of one network
    assert not groups["1"].interval.known  # one network: no interval, rather than a zero-width one
    text = write_report(out).read_text(encoding="utf-8")
    assert f"repeated trial {repeats[0].network}" in text
