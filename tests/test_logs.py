"""The console stays the sweep's: the frameworks' log lines and Python warnings go to ``OUT/sbsearch.log``."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import yaml

from sbsearch.backends.optuna import sampler as optuna_sampler
from sbsearch.spec import parse_spec
from tests.conftest import ROOT, tiny_spec_dict

# What the frameworks print when left alone: level names, warnings, and Alembic's migrations.
_NOISE = re.compile(r"Warning|INFO|WARNING|alembic|Creating initial MLflow database tables")

_SCRIPT = textwrap.dedent("""
    import logging, multiprocessing, sys, warnings
    from pathlib import Path
    from sbsearch.logs import log_to_file

    def worker(out):
        log_to_file(Path(out))
        warnings.warn("from a worker", FutureWarning)
        logging.getLogger("optuna.samplers").warning("worker framework line")

    if __name__ == "__main__":
        out = Path(sys.argv[1])
        # A framework that set up its own logger to print, as MLflow and Ray do when imported.
        chatty = logging.getLogger("chatty")
        chatty.addHandler(logging.StreamHandler(sys.stderr))
        chatty.propagate = False
        path = log_to_file(out)
        assert log_to_file(out) == path and len(logging.getLogger().handlers) == 1, logging.getLogger().handlers
        logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
        chatty.warning("chatty line")
        warnings.warn("a deprecated argument", FutureWarning)
        process = multiprocessing.get_context("spawn").Process(target=worker, args=(str(out),))
        process.start()
        process.join()
        print("error: sbsearch's own line", file=sys.stderr)
        print("the table")
""")


def test_log_to_file_takes_framework_lines_and_warnings_off_the_terminal(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(_SCRIPT, encoding="utf-8")
    (tmp_path / "sbsearch.log").write_text("an earlier run\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "the table\n"
    assert proc.stderr == "error: sbsearch's own line\n"
    log = (tmp_path / "sbsearch.log").read_text(encoding="utf-8")
    assert log.startswith("an earlier run\n")  # appended, as on resume
    for line in ("INFO mlflow.store.db.utils: Creating initial MLflow database tables...",
                 "WARNING chatty: chatty line", "FutureWarning: a deprecated argument", "FutureWarning: from a worker",
                 "WARNING optuna.samplers: worker framework line"):
        assert line in log


@pytest.mark.parametrize("sampler", ["tpe", "random", "grid"])
def test_samplers_are_built_and_sample_without_warnings(sampler: str) -> None:
    import optuna

    from sbsearch.backends.optuna import OptunaSuggest
    from sbsearch.space import sample_config

    spec = parse_spec(tiny_spec_dict(search__sampler=sampler, search__trials=6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecated argument raises FutureWarning, an experimental one a UserWarning
        study = optuna.create_study(direction="maximize", sampler=optuna_sampler(spec, 0))
        for value in range(6):
            trial = study.ask()
            sample_config(spec, OptunaSuggest(trial))
            study.tell(trial, float(value % 3))


@pytest.mark.slow
def test_a_parallel_sweep_shows_only_its_own_lines(tmp_path: Path) -> None:
    spec, out = tmp_path / "s.yaml", tmp_path / "out"
    spec.write_text(yaml.safe_dump(tiny_spec_dict(search__trials=4, search__parallel=2, search__sampler="tpe",
                                                  train__epochs=1)), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "sbsearch.cli", "run", str(spec), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    terminal = proc.stdout + proc.stderr
    assert not _NOISE.search(terminal), _NOISE.search(terminal)
    assert proc.stderr == ""
    assert len(re.findall(r"^trial +\d+ COMPLETE", proc.stdout, flags=re.MULTILINE)) == 4
    log = (out / "sbsearch.log").read_text(encoding="utf-8")
    assert "INFO mlflow.store.db.utils: Creating initial MLflow database tables..." in log
    assert "alembic.runtime.migration" in log
    assert len(set(re.findall(r" pid=(\d+) ", log))) >= 2  # the worker processes' lines too

    # sbsearch's own error line still reaches the terminal, and the log file is appended to.
    spec.write_text(yaml.safe_dump(tiny_spec_dict(seed=1)), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "sbsearch.cli", "run", str(spec), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.startswith(f"error: --out: {out} holds a different sweep"), proc.stderr
    assert (out / "sbsearch.log").read_text(encoding="utf-8").startswith(log)

    with open(out / "trials.csv", newline="", encoding="utf-8") as handle:
        startup = [float(row["startup_seconds"]) for row in csv.DictReader(handle)]
    assert 1 <= sum(s > 0 for s in startup) <= 2  # each worker's first trial, and no other
