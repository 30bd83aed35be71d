"""The command line: exit codes, one line per problem, no traceback unless --debug."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sbsearch.cli import main
from sbsearch.docs import update_readme
from tests.conftest import ROOT, tiny_spec_dict


def sbsearch(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sbsearch.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_validate_prints_the_resolved_spec_and_space_size(tiny_spec_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tiny_spec_file)]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out)
    assert resolved["train"]["optimizer"] == "adam"  # a default, filled in
    assert "# search space: 8 configurations over 3 searched knobs" in out


def test_bad_spec_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": {"datset": "digits"}, "space": {"expansion": {"factor": 0}}}), encoding="utf-8")
    proc = sbsearch("run", str(bad), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: data.datset: is not a known key, but got 'digits' (did you mean 'dataset'?)",
        "error: space.expansion.factor: must be an integer in [1, 8], but got 0",
    ]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing started


def test_bad_override_names_the_flag(tiny_spec_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tiny_spec_file), "--trials", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --trials: must be >= 1, but got 0"
    assert main(["validate", str(tiny_spec_file), "--backend", "optunaa"]) == 2
    assert "error: --backend: must be a registered name, but got 'optunaa' (did you mean 'optuna'?)" in capsys.readouterr().err


def test_unknown_flag_and_missing_file_exit_2(tmp_path: Path) -> None:
    proc = sbsearch("run", "spec.yaml", "--trails", "3")
    assert proc.returncode == 2 and "unrecognized arguments: --trails 3" in proc.stderr
    proc = sbsearch("validate", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: spec: must be an existing file, but got '{tmp_path / 'nope.yaml'}'"


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    proc = sbsearch("--debug", "validate", str(tmp_path / "nope.yaml"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_strategies_lists_every_knob(capsys: pytest.CaptureFixture[str]) -> None:
    from sbsearch.strategies import STRATEGIES

    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    for name, strategy in STRATEGIES.items():
        for knob in strategy.knobs:
            assert f"{name}.{knob.name}" in out


def test_run_end_to_end_prints_summary_and_exits_0(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec_dict(search__trials=2, train__epochs=1)), encoding="utf-8")
    proc = sbsearch("run", str(spec), "--out", str(tmp_path / "out"), "--seed", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Best configuration" in proc.stdout and "trials.csv" in proc.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in proc.stdout
    assert (tmp_path / "out" / "trials.csv").exists() and (tmp_path / "out" / "mlflow.db").exists()
    assert yaml.safe_load((tmp_path / "out" / "spec.yaml").read_text())["seed"] == 3


def test_unreachable_tracking_store_fails_fast_before_training(tmp_path: Path, tiny_spec_file: Path) -> None:
    proc = sbsearch("run", str(tiny_spec_file), "--out", str(tmp_path / "out"), "--tracking-uri", "http://127.0.0.1:9")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tracking.uri: the MLflow store must be reachable, but 'http://127.0.0.1:9' failed")
    assert not (tmp_path / "out" / "trials.csv").exists()


def test_readme_reference_is_current(tmp_path: Path) -> None:
    copy = tmp_path / "README.md"
    copy.write_text((ROOT / "README.md").read_text(encoding="utf-8"), encoding="utf-8")
    assert not update_readme(copy), "README's reference is stale: run `python -m sbsearch.docs --write README.md`"
