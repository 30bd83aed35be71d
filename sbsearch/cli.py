"""``sbsearch``: run, validate and inspect sweeps over symmetry-breaking strategies.

Exit codes: 0 done, 1 a run-time problem (named in one line), 2 a bad spec or argument,
130 interrupted (the same command resumes the sweep).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from sbsearch.errors import Problem, SbsearchError, SpecError

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument exits with the same code and shape as a bad spec."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"search.trials": args.trials, "train.epochs": args.epochs, "seed": args.seed,
            "search.backend": args.backend, "search.parallel": getattr(args, "parallel", None),
            "ray.address": getattr(args, "address", None)}


def _load(args: argparse.Namespace) -> Any:
    from sbsearch.spec import load_spec, with_overrides

    spec = load_spec(args.spec)
    try:
        return with_overrides(spec, _overrides(args))
    except SpecError as exc:  # name the flag, not only the key it sets
        flags = {"search.trials": "--trials", "train.epochs": "--epochs", "seed": "--seed",
                 "search.backend": "--backend", "search.parallel": "--parallel", "ray.address": "--address"}
        raise SpecError([Problem(f"{flags.get(p.path, p.path)}", p.rule, p.value, p.hint) for p in exc.problems]) from None


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from sbsearch.backends import SweepInterrupted
    from sbsearch.sweep import default_out_dir, print_summary, run_sweep

    spec = _load(args)
    _print_notes(spec)
    console = Console()
    if not console.is_terminal:  # a log file or CI: wide lines rather than wrapped ones
        console = Console(width=160)
    out = Path(args.out) if args.out else None
    try:
        result = run_sweep(spec, out, args.tracking_uri, console)
    except SweepInterrupted:
        where = args.out or str(default_out_dir(spec))
        console.print(f"\nStopped. Finished trials are saved in {where}; run the same command to resume:\n"
                      f"  sbsearch {' '.join(sys.argv[1:]) if sys.argv[1:] else 'run ' + args.spec}", highlight=False)
        return EXIT_INTERRUPTED
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

    page = write_report(Path(args.out_dir), args.tracking_uri)
    print(f"Report: {page}")
    return EXIT_OK


def _print_notes(spec: Any) -> None:
    from sbsearch.spec import spec_notes

    for note in spec_notes(spec):
        print(f"note: {note}", file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    from sbsearch.spec import spec_to_dict

    spec = _load(args)
    _print_notes(spec)
    print(yaml.safe_dump(spec_to_dict(spec), sort_keys=False), end="")
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
    p.add_argument("--backend", help="override search.backend (optuna or ray)")
    if run:
        p.add_argument("--parallel", type=int, help="override search.parallel")
        p.add_argument("--out", help="folder for the study, trials.csv and artifacts (default sbsearch-runs/<name>)")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db, under --out when given)")
        p.add_argument("--address", help="Ray cluster to join with --backend ray (host:port or auto; default: start Ray here)")


def cmd_rank(args: argparse.Namespace) -> int:
    from sbsearch.rank import check_rank_args, format_ranking, rank_configs, write_ranking
    from sbsearch.sweep import default_out_dir

    check_rank_args(args.configs, args.steps, args.subset)
    spec = _load(args)
    out = Path(args.out) if args.out else default_out_dir(spec) / "rank"

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

    written, present = relog_sweep(Path(args.out_dir), args.tracking_uri)
    print(f"relogged {written} trials to MLflow ({present} were there already)")
    return EXIT_OK


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "run": (cmd_run, "run (or resume) a sweep"),
    "validate": (cmd_validate, "check a spec and print it resolved, with the size of its search space"),
    "strategies": (cmd_strategies, "list the registered strategies with their knobs"),
    "report": (cmd_report, "write a sweep's HTML report with plots (OUT_DIR/report/index.html) and log it to MLflow"),
    "relog": (cmd_relog, "write to MLflow the trials a sweep holds that the store missed (after it was down)"),
    "rank": (cmd_rank, "rank sampled configurations by the replica score after a few steps on part of the data"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sbsearch", description="AutoML search over symmetry-breaking strategies.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main())
