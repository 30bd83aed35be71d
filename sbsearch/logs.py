"""Where the frameworks' chatter goes: a log file under the sweep's output folder, not the terminal.

MLflow, Alembic, Optuna and Ray log to the terminal by default, and Python warnings print there too;
during a sweep those lines land in the middle of the live table and break its redraw. ``log_to_file``
sends every logger's records and every warning to ``OUT/sbsearch.log`` instead, in the controller and
again in each worker process. sbsearch's own lines (the table, each finished trial, ``error: ...``,
``note: ...``) are printed, not logged, so they stay on the terminal.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

__all__ = ["LOG_FILE", "log_to_file", "metric_text", "reroute_framework_loggers"]

LOG_FILE = "sbsearch.log"
"""The log file's name inside the output folder; kept after the sweep and appended to on resume."""



def metric_text(value: float) -> str:
    """A metric as sbsearch prints it: four significant digits, so an accuracy reads 0.9556 and a PDE's mean
    squared error 1.6e-07 (a fixed four decimals would print it as 0.0000)."""
    return f"{value:.4g}"


_FORMAT = "%(asctime)s pid=%(process)d %(levelname)s %(name)s: %(message)s"


class _SweepLogFile(logging.FileHandler):
    """The one handler ``log_to_file`` puts on the root logger of a process."""


def log_to_file(out_dir: Path) -> Path:
    """Send third-party logging and Python warnings to ``out_dir/sbsearch.log``, for the rest of the process.

    Safe to call again, in the same process (the same folder changes nothing, another one takes
    over) and in every worker process, where the frameworks were imported anew.

    Args:
        out_dir: the sweep's output folder; it must exist.

    Returns:
        The log file's path.

    Example:
        >>> log_to_file(Path("sbsearch-runs/quickstart"))
        PosixPath('/home/me/sbsearch-runs/quickstart/sbsearch.log')
    """
    path = (out_dir / LOG_FILE).resolve()
    # MLflow configures its loggers (to the terminal) when imported, unless told not to; it is imported
    # later, here or in a worker process, which inherits the environment.
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _SweepLogFile)), None)
    if handler is not None and handler.baseFilename != str(path):
        root.removeHandler(handler)
        handler.close()
        handler = None
    if handler is None:
        handler = _SweepLogFile(path, mode="a", encoding="utf-8")
        handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    # A logger that neither has handlers nor propagates would fall back to printing on stderr.
    logging.lastResort = handler
    logging.captureWarnings(True)
    reroute_framework_loggers()
    return path


def reroute_framework_loggers() -> None:
    """Take the terminal handlers off the loggers that frameworks configured for themselves (Ray, Optuna,
    MLflow), so that their records reach the root logger and its log file.

    ``log_to_file`` calls it; call it again after importing a framework that sets up its loggers on
    import (Ray), before it has anything to say.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if _prints_to_terminal(h)]:  # logging.basicConfig's
        root.removeHandler(handler)
    for logger in list(logging.root.manager.loggerDict.values()):
        if not isinstance(logger, logging.Logger) or logger.name.split(".")[0] == "sbsearch":
            continue
        console = [h for h in logger.handlers if isinstance(h, logging.StreamHandler)
                   and not isinstance(h, logging.FileHandler)]
        for handler in console:
            logger.removeHandler(handler)
        if console:
            logger.propagate = True


def _prints_to_terminal(handler: logging.Handler) -> bool:
    # Only the process's own streams: a test harness's capturing handlers on the root logger stay.
    stream = getattr(handler, "stream", None)
    return stream is not None and any(stream is s for s in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__))
