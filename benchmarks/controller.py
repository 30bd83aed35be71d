"""The sweep controller at scale: its own time per trial, how that grows, and the driver's memory.

One sweep of many trials whose training takes milliseconds (iris, an MLP with one hidden layer of 8
units, one epoch, one replica, so no ``sb_score``, the random sampler, no pruning), run as users start
it (``sbsearch run``) on each chosen storage, one after another:

    journal     the Optuna backend on the default journal file (OUT/optuna.journal);
    postgresql  the Optuna backend on a PostgreSQL server that this script starts (Debian's binaries,
                127.0.0.1, a free port, a throw-away data folder, trust authentication), like tests/pg.py;
    ray         the Ray backend (local Ray, token authentication on) on the journal file;
    journal-no-mlflow   the journal row again with MLflow turned off (``run_sweep(track=False)``, which
                the CLI does not offer): the controller's own floor, and by difference what MLflow's
                per-trial writes cost.
MLflow stays on SQLite under each sweep's own --out in every other case, so those rows differ in the
trial store (and backend) only.

What is measured, from the sweep's store (each trial's ``datetime_start`` / ``datetime_complete``) and
its trials.csv (each trial's own ``seconds`` and its worker's one-time ``startup_seconds``):

    window   = the last trial's completion - the first trial's start: the command's start-up before the
               first trial and its wrap-up after the last one (trials.csv, the report) are left out;
    busy     = sum over trials of (seconds + startup_seconds) / parallel: the window the trials alone
               would fill with every worker busy all the time;
    controller per trial = (window - busy) / trials: everything else per trial (claiming, sampling,
               the store's writes and reads, MLflow's child run, which lies outside ``seconds``, the
               progress display, waiting for a turn in the fixed schedule, worker processes idle);
    first / last block = the same over the first and the last ``--block`` trials by completion time
               (a block's window runs from the completion before it, or the first start);
    RSS      = resident memory polled from /proc every ``--poll`` s: of the ``sbsearch run`` process
               (the driver) and of its whole process tree (spawned workers, Ray's processes; a sum, so
               shared pages count more than once). Growth = the peak after the first trial completed
               minus the value at that moment; also its slope per trial (least squares of RSS against
               trials completed);
    CPU      = user + system CPU seconds of the command and every descendant it waited for
               (getrusage of children), per trial: what the whole thing costs the machine, which the
               neighbours' load on a shared machine does not change as much as the wall time.

    python benchmarks/controller.py [--trials 10000] [--storages journal,postgresql,ray] [--parallel 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.pg import NotInstalled, postgres

STORAGES = ("journal", "postgresql", "ray", "journal-no-mlflow")
TARGETS = {"controller_ms": 20.0, "growth_ms": 0.0, "rss_mb": 100.0}


def _spec(trials: int, parallel: int, backend: str) -> dict[str, Any]:
    return {
        "name": "controller",
        "seed": 0,
        "data": {"dataset": "iris", "batch_size": 256},  # 90 training samples: one step per epoch
        "model": {"name": "mlp", "width": 8, "depth": 1},
        "train": {"epochs": 1, "replicas": 1, "threads": 1},  # one replica: no sb_score to compute
        "space": {"dropout": {"rate": [0.0, 0.1]}},
        "search": {"backend": backend, "sampler": "random", "trials": trials, "parallel": parallel, "pruner": "none"},
        "ray": {"cpus_per_trial": 1},
    }


# --- resident memory, polled from /proc ----------------------------------------------------------------


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(root: int) -> set[int]:
    parent: dict[int, int] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                text = f.read()
        except OSError:
            continue
        fields_ = text.rpartition(")")[2].split()
        parent[int(stat.split("/")[2])] = int(fields_[1])
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in tree} - tree
        grew = bool(more)
        tree |= more
    return tree


@dataclass
class MemoryPoll:
    pid: int
    every: float
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (time.time(), driver kB, tree kB)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            tree = _descendants(self.pid)
            driver = _rss_kb(self.pid)
            if driver:
                self.samples.append((time.time(), driver, sum(_rss_kb(p) for p in tree)))

    def stop(self) -> None:
        self._stop.set()


# --- one sweep, and its figures ------------------------------------------------------------------------


@dataclass
class Trial:
    number: int
    start: float
    complete: float
    busy: float  # seconds + startup_seconds, from trials.csv


@dataclass
class Figures:
    label: str
    trials: list[Trial]  # by completion time
    parallel: int
    command_s: float
    cpu_s: float
    memory: list[tuple[float, int, int]]
    block: int
    load_after: str  # the machine's load average (1, 5, 15 min) when the sweep ended

    def controller_ms(self, lo: int, hi: int) -> float:
        """Controller time per trial over trials lo..hi-1 (by completion), in ms."""
        begin = self.trials[lo - 1].complete if lo > 0 else min(t.start for t in self.trials)
        window = self.trials[hi - 1].complete - begin
        busy = sum(t.busy for t in self.trials[lo:hi]) / self.parallel
        return 1000.0 * (window - busy) / (hi - lo)

    @property
    def window_s(self) -> float:
        return self.trials[-1].complete - min(t.start for t in self.trials)

    @property
    def in_trials_s(self) -> float:
        return sum(t.busy for t in self.trials) / self.parallel

    def rss(self, which: int) -> tuple[float, float]:
        """(growth in MB from the first completion to the peak, slope in kB per trial) of column ``which``
        (1: the driver, 2: the process tree)."""
        first, last = self.trials[0].complete, self.trials[-1].complete
        after = [s for s in self.memory if first <= s[0] <= last]  # the report written afterwards is not the sweep
        if len(after) < 2:
            return float("nan"), float("nan")
        growth = (max(s[which] for s in after) - after[0][which]) / 1024.0
        done = sorted(t.complete for t in self.trials)
        import bisect

        xs = [float(bisect.bisect_right(done, s[0])) for s in after]
        ys = [float(s[which]) for s in after]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else float("nan")
        return growth, slope


def _env(token: str) -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PYTHONUNBUFFERED": "1"}


def _load_trials(storage: str, name: str) -> list[tuple[int, float, float]]:
    """(number, start, complete) of every counted, finished trial in the sweep's store."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    opened: Any = storage if "://" in storage else JournalStorage(JournalFileBackend(storage))
    study = optuna.load_study(study_name=name, storage=opened)
    out = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("sbsearch.interrupted") or t.datetime_complete is None or t.datetime_start is None:
            continue
        out.append((t.number, _ts(t.datetime_start), _ts(t.datetime_complete)))
    return out


def _ts(when: dt.datetime) -> float:
    return when.timestamp()


def measure(label: str, work: Path, args: argparse.Namespace, token: str, storage: str | None = None) -> Figures:
    import csv

    out = work / label
    out.mkdir(parents=True)
    backend = "ray" if label == "ray" else "optuna"
    trials = args.ray_trials if label == "ray" and args.ray_trials else args.trials
    path = out / "spec.in.yaml"
    path.write_text(yaml.safe_dump(_spec(trials, args.parallel, backend)), encoding="utf-8")
    command = [sys.executable, "-m", "sbsearch.cli", "run", str(path), "--out", str(out)]
    if label == "journal-no-mlflow":
        command = [sys.executable, "-c", "import sys, yaml; from pathlib import Path; from sbsearch.spec import parse_spec; "
                   "from sbsearch.sweep import run_sweep; "
                   "run_sweep(parse_spec(yaml.safe_load(open(sys.argv[1]))), Path(sys.argv[2]), track=False)",
                   str(path), str(out)]
    if storage is not None:
        command += ["--storage", storage]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(out / "command.log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_env(token), cwd=out)
        poll = MemoryPoll(proc.pid, args.poll)
        poll.start()
        code = proc.wait()
        poll.stop()
    command_s = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        tail = (out / "command.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"{label}: sbsearch run failed ({code}):\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    with open(out / "trials.csv", newline="") as f:
        busy = {int(r["number"]): float(r["seconds"]) + float(r["startup_seconds"]) for r in csv.DictReader(f)}
    stamps = _load_trials(storage or str(out / "optuna.journal"), "controller")
    rows = sorted((Trial(n, s, c, busy[n]) for n, s, c in stamps), key=lambda t: t.complete)
    assert len(rows) == len(busy), f"{label}: {len(rows)} trials in the store, {len(busy)} in trials.csv"
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return Figures(label, rows, args.parallel, command_s, cpu, poll.samples, min(args.block, len(rows)), load)


# --- the table -----------------------------------------------------------------------------------------


def report(rows: list[Figures], args: argparse.Namespace) -> None:
    n = rows[0].block
    print(f"\niris, mlp 8 units, 1 epoch, 1 replica, random sampler, parallel {args.parallel}, {os.cpu_count()} CPU cores; "
          f"load average before: {args.load_before}, after each: " + ", ".join(f"{r.label} {r.load_after}" for r in rows))
    print("controller per trial = (window - sum(seconds + startup_seconds) / parallel) / trials; "
          f"first/last = the first/last {n} trials by completion\n")
    print("| storage | trials | command (s) | window (s) | in trials (s) | controller per trial (ms) | "
          f"first {n} (ms) | last {n} (ms) | last/first | driver RSS growth (MB) | driver kB/trial | "
          "tree RSS growth (MB) | tree kB/trial | CPU per trial (ms) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        k = len(r.trials)
        first, last = r.controller_ms(0, n), r.controller_ms(k - n, k)
        (dg, ds), (tg, ts) = r.rss(1), r.rss(2)
        print(f"| {r.label} | {k} | {r.command_s:.0f} | {r.window_s:.1f} | {r.in_trials_s:.1f} | "
              f"{r.controller_ms(0, k):.1f} | {first:.1f} | {last:.1f} | {last / first:.2f} | {dg:.1f} | {ds:.1f} | "
              f"{tg:.1f} | {ts:.1f} | {1000 * r.cpu_s / k:.1f} |")
    print(f"\ntargets: controller <= {TARGETS['controller_ms']:.0f} ms per trial; last block no slower than the first; "
          f"driver RSS growth <= {TARGETS['rss_mb']:.0f} MB over 10,000 trials")
    for r in rows:
        k = len(r.trials)
        ctrl, first, last = r.controller_ms(0, k), r.controller_ms(0, n), r.controller_ms(k - n, k)
        growth = r.rss(1)[0] * (10_000 / k)
        misses = [f"controller {ctrl:.1f} ms"] if ctrl > TARGETS["controller_ms"] else []
        if last > first * 1.1 and last - first > 1.0:  # within noise: 10% or 1 ms
            misses.append(f"grows {first:.1f} -> {last:.1f} ms")
        if growth > TARGETS["rss_mb"]:
            misses.append(f"driver RSS {growth:.0f} MB per 10,000 trials")
        print(f"  {r.label}: " + ("meets all three" if not misses else "misses: " + "; ".join(misses)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--storages", default=",".join(STORAGES), help="comma-separated, among: " + ", ".join(STORAGES))
    parser.add_argument("--parallel", type=int, default=2, help="search.parallel (Ray: trials at once)")
    parser.add_argument("--ray-trials", type=int, help="trials of the ray sweep (default --trials)")
    parser.add_argument("--block", type=int, default=1000, help="trials in the first and last block")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between RSS polls")
    parser.add_argument("--out", help="keep the sweeps' folders here (default: a temporary folder)")
    args = parser.parse_args()
    chosen = [s.strip() for s in args.storages.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(STORAGES))
    if unknown:
        parser.error(f"--storages: must be among {', '.join(STORAGES)}, but got {', '.join(unknown)}")
    args.load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    token = secrets.token_hex(16)
    rows: list[Figures] = []
    with tempfile.TemporaryDirectory(prefix="sbsearch-controller-") as tmp:
        work = Path(args.out).resolve() if args.out else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for label in chosen:
            print(f"{label}: {args.ray_trials if label == 'ray' and args.ray_trials else args.trials} trials ...", flush=True)
            if label == "postgresql":
                try:
                    with postgres(Path(tmp) / "postgres") as new_database:
                        rows.append(measure(label, work, args, token, storage=new_database("controller")))
                except NotInstalled as e:
                    raise SystemExit(f"postgresql: {e}") from None
            else:
                rows.append(measure(label, work, args, token))
            r = rows[-1]
            k, b = len(r.trials), r.block
            # Each sweep's figures as soon as it ends: a long run stopped later keeps them.
            print(f"{label}: {r.command_s:.0f} s, controller {r.controller_ms(0, k):.1f} ms per trial (first {b} "
                  f"{r.controller_ms(0, b):.1f}, last {b} {r.controller_ms(k - b, k):.1f}), driver RSS growth "
                  f"{r.rss(1)[0]:.1f} MB ({r.rss(1)[1]:.1f} kB/trial), CPU {1000 * r.cpu_s / k:.1f} ms per trial",
                  flush=True)
    report(rows, args)


if __name__ == "__main__":
    main()
