"""``sbsearch``: run, validate and inspect sweeps over symmetry-breaking strategies.

Exit codes: 0 done, 1 a run-time problem (named in one line), 2 a bad spec or argument,
130 stopped by Ctrl-C (SIGINT), 143 stopped by SIGTERM (the same command resumes the sweep).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from sbsearch.errors import Problem, SbsearchError, SpecError

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_SIGNALLED = 128  # plus the signal's number, as a shell reports a process a signal ended (130 is SIGINT's)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument exits with the same code and shape as a bad spec."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"search.trials": args.trials, "train.epochs": args.epochs, "seed": args.seed,
            "search.backend": args.backend, "search.parallel": getattr(args, "parallel", None),
            "ray.address": getattr(args, "address", None), "search.storage": getattr(args, "storage", None)}


def _load(args: argparse.Namespace) -> Any:
    from sbsearch.spec import load_spec, with_overrides

    spec = load_spec(args.spec)
    try:
        return with_overrides(spec, _overrides(args))
    except SpecError as exc:  # name the flag, not only the key it sets
        flags = {"search.trials": "--trials", "train.epochs": "--epochs", "seed": "--seed",
                 "search.backend": "--backend", "search.parallel": "--parallel", "ray.address": "--address",
                 "search.storage": "--storage"}
        raise SpecError([Problem(f"{flags.get(p.path, p.path)}", p.rule, p.value, p.hint) for p in exc.problems]) from None


def _load_sweep(args: argparse.Namespace) -> Any:
    """The spec of a sweep (``run``, ``validate``): refused when it would search nothing."""
    from sbsearch.spec import check_sweep

    spec = _load(args)
    check_sweep(spec)  # outside _load: its flag names are for keys a flag set
    return spec


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from sbsearch.backends import SweepInterrupted
    from sbsearch.sweep import default_out_dir, prepare_out_dir, print_summary, run_sweep

    spec = _load_sweep(args)
    _print_notes(spec)
    console = Console()
    if not console.is_terminal:  # a log file or CI: wide lines rather than wrapped ones
        console = Console(width=160)
    out = Path(args.out) if args.out else None
    args.log_dir = prepare_out_dir(out if out is not None else default_out_dir(spec))
    try:
        result = run_sweep(spec, out, args.tracking_uri, console)
    except SweepInterrupted as stopped:
        where = args.out or str(default_out_dir(spec))
        console.print(f"\nStopped. Finished trials are saved in {where}; run the same command to resume:\n"
                      f"  sbsearch {' '.join(sys.argv[1:]) if sys.argv[1:] else 'run ' + args.spec}", highlight=False)
        return EXIT_SIGNALLED + stopped.signum
    print_summary(result, console)
    try:  # the sweep's results are safe on disk already; a report that fails must not fail the sweep
        from sbsearch.report import write_report

        page = write_report(result.out_dir, result.tracking_uri, result.parent_run_id)
        console.print(f"Report:  {page}", highlight=False)
    except Exception as exc:
        console.print(f"Report:  not written ({type(exc).__name__}: {str(exc)[:200]}); retry with "
                      f"sbsearch report {result.out_dir}", highlight=False)
    if result.stopped_because:
        print(f"error: {result.stopped_because}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from sbsearch.report import write_report

    _log_under(Path(args.out_dir))
    page = write_report(Path(args.out_dir), args.tracking_uri)
    print(f"Report: {page}")
    return EXIT_OK


def _log_under(folder: Path) -> None:
    """Send the frameworks' log lines and warnings to ``folder/sbsearch.log``, as a sweep does, when the
    folder exists; a folder that is not there is the command's to report."""
    from sbsearch.logs import log_to_file

    if folder.is_dir():
        with contextlib.suppress(OSError):  # a read-only folder: the lines stay on the terminal
            log_to_file(folder)


def _print_notes(spec: Any) -> None:
    from sbsearch.spec import spec_notes

    for note in spec_notes(spec):
        print(f"note: {note}", file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    from sbsearch.sweep import public_spec

    spec = _load_sweep(args)
    _print_notes(spec)
    print(yaml.safe_dump(public_spec(spec), sort_keys=False), end="")  # a storage password stays unshown
    size = spec.space_size()
    searched = ", ".join(p.name for p in spec.searched) or "nothing"
    print(f"# search space: {'continuous (infinite)' if size == float('inf') else int(size)} configurations "
          f"over {len(spec.searched)} searched knobs ({searched})")
    return EXIT_OK


def cmd_strategies(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from sbsearch.strategies import STRATEGIES

    table = Table(header_style="bold", show_lines=False)
    for col in ("knob", "type", "default", "allowed values", "meaning"):
        table.add_column(col, overflow="fold", no_wrap=col == "knob")
    for name, strategy in STRATEGIES.items():
        for knob in strategy.knobs:
            table.add_row(f"{name}.{knob.name}", knob.kind, knob.default_words(), knob.rule().removeprefix("must be "), knob.doc)
    console = Console()
    Console(width=max(console.width, 160) if not console.is_terminal else None).print(table)
    return EXIT_OK


def _add_spec_args(p: argparse.ArgumentParser, run: bool) -> None:
    p.add_argument("spec", help="path to the spec YAML")
    p.add_argument("--trials", type=int, help="override search.trials")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--seed", type=int, help="override seed")
    p.add_argument("--backend", help="override search.backend (an error lists the backends there are)")
    if run:
        p.add_argument("--storage", help="override search.storage: where the trials are kept (a journal file or an RDB "
                                         "URL such as postgresql://user@host/db); processes naming the same storage "
                                         "run one sweep between them")
        p.add_argument("--parallel", type=int, help="override search.parallel")
        p.add_argument("--out", help="folder for the study, trials.csv and artifacts (default sbsearch-runs/<name>)")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db, under --out when given)")
        p.add_argument("--address", help="Ray cluster to join with --backend ray (host:port or auto; default: start Ray here)")


def cmd_rank(args: argparse.Namespace) -> int:
    from sbsearch.rank import check_rank_args, format_ranking, rank_configs, write_ranking
    from sbsearch.sweep import default_out_dir, prepare_out_dir

    check_rank_args(args.configs, args.steps, args.subset)
    spec = _load(args)
    out = args.log_dir = prepare_out_dir(Path(args.out) if args.out else default_out_dir(spec) / "rank")
    _log_under(out)

    def progress(done: int, row: Any) -> None:
        print(f"  {done}/{args.configs}  {row.label or '(fixed)'}: sb_score={row.score:.4f}  ({row.seconds:.1f} s)",
              file=sys.stderr)

    ranking = rank_configs(spec, args.configs, args.steps, args.subset, progress)
    path, run_id = write_ranking(ranking, spec, out, args.tracking_uri)
    print(format_ranking(ranking))
    print(f"\nRanking: {path}" + (f" (MLflow run {run_id})" if run_id else ""))
    return EXIT_OK


def cmd_relog(args: argparse.Namespace) -> int:
    from sbsearch.sweep import relog_sweep

    _log_under(Path(args.out_dir))
    written, present = relog_sweep(Path(args.out_dir), args.tracking_uri)
    print(f"relogged {written} trials to MLflow ({present} were there already)")
    return EXIT_OK


def cmd_completion(args: argparse.Namespace) -> int:
    from argcomplete.shell_integration import shellcode

    print(shellcode(["sbsearch"], shell=args.shell))
    return EXIT_OK


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "run": (cmd_run, "run (or resume) a sweep"),
    "validate": (cmd_validate, "check a spec and print it resolved, with the size of its search space"),
    "strategies": (cmd_strategies, "list the registered strategies with their knobs"),
    "report": (cmd_report, "write a sweep's HTML report with plots (OUT_DIR/report/index.html) and log it to MLflow"),
    "relog": (cmd_relog, "write to MLflow the trials a sweep holds that the store missed (after it was down)"),
    "rank": (cmd_rank, "rank sampled configurations by the replica score after a few steps on part of the data"),
    "completion": (cmd_completion, "print the shell code that completes sbsearch's commands, options and spec paths "
                   "(bash: eval \"$(sbsearch completion bash)\")"),
}
# What the shell completes for each positional or option that names a path (see ``_complete``).
_SPEC_PATHS, _FOLDERS = ("spec",), ("out", "out_dir")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sbsearch")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sbsearch", description="AutoML search over symmetry-breaking strategies.")
    parser.add_argument("--version", action="version", version=f"sbsearch {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also accepted after the subcommand)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # SUPPRESS: absent after the subcommand, --debug keeps the value it had before it.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        if name in ("run", "validate"):
            _add_spec_args(p, run=name == "run")
        if name == "relog":
            p.add_argument("out_dir", help="the sweep's output folder (its --out)")
            p.add_argument("--tracking-uri", help="the MLflow store (default: the one the sweep used)")
        if name == "rank":
            p.add_argument("spec", help="path to the spec YAML")
            p.add_argument("--configs", type=int, default=10, help="configurations to sample (default 10)")
            p.add_argument("--steps", type=int, default=50, help="optimiser steps per configuration (default 50)")
            p.add_argument("--subset", type=float, default=0.25, help="share of the training data used (default 0.25)")
            p.add_argument("--seed", type=int, help="override seed (which configurations are drawn)")
            p.add_argument("--out", help="folder for ranking.csv (default sbsearch-runs/<name>/rank)")
            p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db under --out)")
            p.set_defaults(trials=None, epochs=None, backend=None)
        if name == "report":
            p.add_argument("out_dir", help="the sweep's output folder (its --out)")
            p.add_argument("--tracking-uri", help="the sweep's MLflow store (default: the spec's, else mlflow.db "
                           "under OUT_DIR or in the working directory)")
        if name == "completion":
            p.add_argument("shell", nargs="?", default="bash", choices=("bash", "zsh", "fish", "tcsh", "powershell"),
                           help="the shell (default bash)")
    return parser


def _complete(parser: argparse.ArgumentParser) -> None:
    """Answer the shell's completion request (``_ARGCOMPLETE`` set by ``sbsearch completion``'s code) and
    exit; spec arguments complete to YAML files, output folders to folders."""
    import argcomplete
    from argcomplete.completers import DirectoriesCompleter, FilesCompleter

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                for arg in sub._actions:
                    if arg.dest in _SPEC_PATHS:
                        setattr(arg, "completer", FilesCompleter(("yaml", "yml")))
                    elif arg.dest in _FOLDERS:
                        setattr(arg, "completer", DirectoriesCompleter())
    argcomplete.autocomplete(parser)


def _traceback_file(args: argparse.Namespace) -> Path:
    """Where the full traceback of an unexpected error goes: the sweep's log under its output folder
    when there is one, else a new file in the temporary folder."""
    folder = getattr(args, "log_dir", None) or getattr(args, "out_dir", None) or getattr(args, "out", None)
    if folder is not None and Path(folder).is_dir():
        return Path(folder).resolve() / "sbsearch.log"
    handle, name = tempfile.mkstemp(prefix="sbsearch-error-", suffix=".log")
    os.close(handle)
    return Path(name)


def _unexpected(args: argparse.Namespace, exc: BaseException) -> None:
    """One line for an error sbsearch did not foresee, the full traceback in a file that the line names."""
    text = " ".join(str(exc).split())
    text = f"{text[:200]}… ({len(text)} characters)" if len(text) > 200 else text
    where = "nowhere (no file could be written); rerun with --debug to see it"
    try:
        path = _traceback_file(args)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"--- sbsearch {' '.join(sys.argv[1:])} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n")
            handle.write("".join(traceback.format_exception(exc)))
        where = f"{path} (rerun with --debug to print it)"
    except OSError:
        pass
    print(f"error: unexpected {type(exc).__name__}{': ' + text if text else ''}; the full traceback is in {where}",
          file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        # A script's `sbsearch run ... &` starts it with Ctrl-C ignored: Ctrl-C works from the first line
        # (the backends install their own handlers for SIGINT and SIGTERM while a sweep runs).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:
        _complete(parser)
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][0](args)
    except SpecError as exc:
        if args.debug:
            raise
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SbsearchError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # the last resort: a bug or an environment sbsearch did not foresee
        if args.debug:
            raise
        _unexpected(args, exc)
        return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
