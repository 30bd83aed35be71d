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


def test_every_test_benchmark_result_and_spec_the_readme_names_exists() -> None:
    """A claim in the README names the test or run behind it; a renamed test or a moved result breaks it."""
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    tests = set(re.findall(r"(tests/\w+\.py)::(\w+)", readme))
    paths = set(re.findall(r"\b((?:benchmarks|search_spaces|tests|docker)/[\w/.-]*\w\.(?:py|md|yaml))\b", readme))
    paths -= {"search_spaces/my.yaml"}  # the README's example of a user's own spec
    assert len(tests) >= 10 and len(paths) >= 20, (tests, paths)
    missing = sorted(path for path in paths if not (ROOT / path).is_file())
    missing += sorted(f"{file}::{name}" for file, name in tests
                      if not (ROOT / file).is_file() or f"def {name}(" not in (ROOT / file).read_text(encoding="utf-8"))
    assert not missing, f"the README names what does not exist: {missing}"


@pytest.mark.parametrize("case", ["file", "under_a_file", "uncreatable", "unknown_scheme"])
def test_an_environment_that_cannot_be_used_gives_one_line_and_exit_2(tmp_path: Path, tiny_spec_file: Path,
                                                                      case: str) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder", encoding="utf-8")
    out, extra, expected = {
        "file": (a_file, [], "error: --out: must be a folder that sbsearch can create and write, but got "
                 f"'{a_file}' (it is an existing file; choose a folder)"),
        "under_a_file": (a_file / "out", [], "error: --out: must be a folder that sbsearch can create and write, but got "
                         f"'{a_file / 'out'}' (NotADirectoryError: Not a directory)"),
        "uncreatable": (Path("/proc/sbsearch-out"), [], "error: --out: must be a folder that sbsearch can create and "
                        "write, but got '/proc/sbsearch-out' (FileNotFoundError: No such file or directory)"),
        "unknown_scheme": (tmp_path / "out", ["--tracking-uri", "foo://bar"], "error: tracking.uri: must be a URI of a "
                           "store MLflow can open (a path, file:, sqlite:///, http(s)://, postgresql://, mysql://), but got "
                           "'foo://bar' (MLflow has no store for 'foo')"),
    }[case]
    proc = sbsearch("run", str(tiny_spec_file), "--out", str(out), *extra)
    assert (proc.returncode, proc.stderr.strip()) == (2, expected), proc.stderr
    assert a_file.read_text(encoding="utf-8") == "not a folder"


def test_rank_without_out_writes_under_the_working_directory(tmp_path: Path) -> None:
    # The default output folder is relative: MLflow's artifact location needs it absolute.
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(tiny_spec_dict()), encoding="utf-8")
    proc = sbsearch("rank", "s.yaml", "--configs", "2", "--steps", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "sbsearch-runs" / "tiny" / "rank" / "ranking.csv").exists()
    assert "MLflow run" in proc.stdout


def test_a_folder_holding_the_users_own_spec_is_not_taken_for_a_sweep(tmp_path: Path, tiny_spec_file: Path) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "spec.yaml").write_text("name: mine\n", encoding="utf-8")
    proc = sbsearch("run", str(tiny_spec_file), "--out", str(folder))
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"error: --out: {folder} is not an sbsearch output folder (it holds a spec.yaml that "
                                   f"sbsearch did not write); choose a new or empty folder for --out, for example {folder / 'runs'}")
    assert (folder / "spec.yaml").read_text(encoding="utf-8") == "name: mine\n"


def _boom(args: object) -> int:
    raise RuntimeError("the disk\nwent away " + "x" * 500)


def test_an_unexpected_error_gives_one_line_naming_the_file_with_its_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import sbsearch.cli as cli

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setitem(cli.COMMANDS, "relog", (_boom, "raises"))
    assert main(["relog", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 400, err
    log = out / "sbsearch.log"
    assert err.startswith("error: unexpected RuntimeError: the disk went away xxx")
    assert err.rstrip().endswith(f"the full traceback is in {log} (rerun with --debug to print it)")
    assert "Traceback (most recent call last)" in log.read_text(encoding="utf-8")
    assert "_boom" in log.read_text(encoding="utf-8")
    # --debug raises instead, given before or after the subcommand.
    for argv in (["--debug", "relog", str(out)], ["relog", str(out), "--debug"]):
        with pytest.raises(RuntimeError, match="the disk"):
            main(argv)


def test_version_is_the_installed_one() -> None:
    from importlib.metadata import version

    proc = sbsearch("--version")
    assert (proc.returncode, proc.stdout.strip()) == (0, f"sbsearch {version('sbsearch')}")


def test_python_dash_m_sbsearch_is_the_command_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "sbsearch", "validate", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr, proc.stderr


def _complete_in_bash(line: str, cwd: Path) -> list[str]:
    """What bash offers after ``line`` once ``sbsearch completion bash`` is loaded, as a user's shell does."""
    script = ('eval "$(sbsearch completion bash)"\n'
              f'COMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}; read -ra COMP_WORDS <<< "$COMP_LINE"\n'
              '[[ "$COMP_LINE" == *" " ]] && COMP_WORDS+=("")\n'
              'COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))\n'
              '_python_argcomplete sbsearch\n'
              'printf "%s\\n" "${COMPREPLY[@]}"\n')
    env = {**__import__("os").environ, "PATH": f"{Path(sys.executable).parent}:{__import__('os').environ['PATH']}"}
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return sorted(x.strip() for x in proc.stdout.splitlines() if x.strip())


def test_bash_completes_subcommands_options_and_spec_paths(tmp_path: Path) -> None:
    (tmp_path / "quick.yaml").write_text("name: q\n", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("", encoding="utf-8")
    (tmp_path / "specs").mkdir()
    assert _complete_in_bash("sbsearch re", tmp_path) == ["relog", "report"]
    assert "--trials" in _complete_in_bash("sbsearch run quick.yaml --tr", tmp_path)
    offered = _complete_in_bash("sbsearch validate ", tmp_path)
    assert {"quick.yaml", "specs/", "--trials"} <= set(offered) and "notes.txt" not in offered, offered
    assert _complete_in_bash("sbsearch report s", tmp_path) == ["specs/"]


@pytest.mark.parametrize(("text", "args", "code"), [
    ("", [], 2), ("space: {expansion: {factor: 2}}\n", [], 2), ("", ["--trials", "1"], 0),
    ("search: {trials: 1}\n", [], 0), ("search: {repeat: true}\n", [], 0), ("", ["--trials", "5"], 2),
])
def test_validate_refuses_a_spec_that_searches_nothing(text: str, args: list[str], code: int, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    assert main(["validate", str(path), *args]) == code
    err = capsys.readouterr().err
    trials = args[1] if args else "20"
    assert err == ("" if code == 0 else "error: search.trials: must be 1 when the space searches nothing (no knob "
                   "lists values or a range), as every trial would train the same configuration; list values or a "
                   f"range for a knob under space, or set search.repeat: true to repeat it on purpose, but got {trials}\n")


def test_run_refuses_an_empty_spec_before_it_writes_anything(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("", encoding="utf-8")
    proc = sbsearch("run", str(tmp_path / "empty.yaml"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "search.trials: must be 1" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_rank_still_takes_a_spec_that_searches_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("train: {replicas: 2}\nmodel: {width: 4, depth: 1}\n", encoding="utf-8")
    assert main(["rank", str(path), "--configs", "1", "--steps", "1", "--subset", "0.1", "--out", str(tmp_path / "r")]) == 0
    assert "(fixed)" in capsys.readouterr().err
