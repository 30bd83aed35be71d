"""How the Ray backend scales across nodes, and what it costs per trial against the Optuna backend.

One small seeded sweep (the digits, a small CNN, no pruning), run four ways in one go:
    (a) the Optuna backend, one trial at a time;
    (b) the Ray backend on a local Ray, one trial at a time;
    (c) the Ray backend on a one-node cluster with 1 CPU (``ray.cluster_utils.Cluster``);
    (d) the Ray backend on a two-node cluster, 1 CPU per node, two trials at a time.
Each runs as users start it (``sbsearch run``, with token authentication on) into its own folder.

Figures, all from the sweep's MLflow child runs (each trial's run opens when the trial starts and
closes when it ends):
    trials per minute = the steady rate of finishing trials, after each worker's first trial (which
        pays for the imports and the data loading);
    in trial = the median time of a trial from its run's start to its end (training, reports, logging);
    gap = the median time between one trial's end and the next one's start on the same worker
        (one trial at a time only): the backend's own work between trials;
    per trial = in trial + gap: what one trial costs, one at a time;
    wall = the whole command, start-up of Ray and MLflow included.

    python benchmarks/scaling.py --trials 12 --epochs 3
"""

from __future__ import annotations

import argparse
import itertools
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

_CLUSTER = """
import sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
for _ in range(int(sys.argv[1]) - 1):
    cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
print(cluster.address, flush=True)
sys.stdin.readline()
cluster.shutdown()
"""


@dataclass
class Figures:
    label: str
    parallel: int
    trials: int
    wall_s: float
    starts: list[float]
    ends: list[float]

    @property
    def per_minute(self) -> float:
        ends = sorted(self.ends)[self.parallel - 1:]  # from the end of each worker's first trial
        return 60.0 * (len(ends) - 1) / (ends[-1] - ends[0])

    @property
    def in_trial_s(self) -> float:
        return statistics.median(e - s for s, e in zip(self.starts, self.ends))

    @property
    def gap_s(self) -> float | None:
        if self.parallel != 1:
            return None
        order = sorted(zip(self.starts, self.ends))
        return statistics.median(nxt[0] - cur[1] for cur, nxt in itertools.pairwise(order))

    @property
    def per_trial_s(self) -> float:
        return self.in_trial_s + (self.gap_s or 0.0)


def _spec(trials: int, epochs: int, backend: str, parallel: int) -> dict[str, Any]:
    return {
        "name": "scaling",
        "seed": 0,
        "data": {"dataset": "digits", "batch_size": 64},
        "model": {"name": "small_cnn", "width": 8, "depth": 2},
        "train": {"epochs": epochs, "lr": 0.01, "threads": 1},
        "space": {"expansion": {"factor": [1, 2]}, "norm": {"kind": ["none", "batch"]}, "dropout": {"rate": [0.0, 0.1]}},
        "search": {"backend": backend, "sampler": "random", "trials": trials, "parallel": parallel, "pruner": "none"},
    }


def _env(token: str) -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PYTHONUNBUFFERED": "1"}


def _measure(label: str, workdir: Path, spec: dict[str, Any], token: str, *extra: str) -> Figures:
    from mlflow.tracking import MlflowClient

    out = workdir / label.replace(" ", "-")
    out.mkdir(parents=True)
    path = out / "spec.in.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sbsearch.cli", "run", str(path), "--out", str(out), *extra],
                          check=False, capture_output=True, text=True, env=_env(token), cwd=out)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{label}: sbsearch failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("scaling")
    assert experiment is not None
    runs = [r for r in client.search_runs([experiment.experiment_id], max_results=1000)
            if r.data.tags.get("sbsearch.role") == "trial"]
    return Figures(label, spec["search"]["parallel"], len(runs), wall, [r.info.start_time / 1000.0 for r in runs],
                   [r.info.end_time / 1000.0 for r in runs])


def _with_cluster(nodes: int, token: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", _CLUSTER, str(nodes)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=_env(token))
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def _stop(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    proc.wait(180)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    token = secrets.token_hex(16)
    rows: list[Figures] = []
    with tempfile.TemporaryDirectory(prefix="sbsearch-scaling-") as tmp:
        work = Path(tmp)
        rows.append(_measure("optuna 1 worker", work, _spec(args.trials, args.epochs, "optuna", 1), token))
        rows.append(_measure("ray local 1 trial", work, _spec(args.trials, args.epochs, "ray", 1), token))
        for nodes in (1, 2):
            proc, address = _with_cluster(nodes, token)
            try:
                rows.append(_measure(f"ray {nodes}-node cluster", work, _spec(args.trials, args.epochs, "ray", nodes),
                                     token, "--address", address))
            finally:
                _stop(proc)
    print(f"\n{args.trials} trials x {args.epochs} epochs, small CNN on digits, {os.cpu_count()} CPU cores\n")
    print("| setup | trials/min | in trial (s) | gap (s) | per trial (s) | wall (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        gap = "-" if r.gap_s is None else f"{r.gap_s:.2f}"
        per = f"{r.per_trial_s:.2f}" if r.gap_s is not None else "-"
        print(f"| {r.label} | {r.per_minute:.1f} | {r.in_trial_s:.2f} | {gap} | {per} | {r.wall_s:.0f} |")
    optuna, local, one, two = rows
    assert optuna.gap_s is not None and local.gap_s is not None
    print(f"\ntwo-node / one-node trials per minute: {two.per_minute / one.per_minute:.2f}x (ideal 2.00x)")
    print(f"Ray / Optuna time per trial, one at a time: {local.per_trial_s / optuna.per_trial_s:.2f}x "
          f"(Ray {(local.per_trial_s - optuna.per_trial_s) * 1000:+.0f} ms per trial: "
          f"{(local.in_trial_s - optuna.in_trial_s) * 1000:+.0f} ms inside the trial, "
          f"{(local.gap_s - optuna.gap_s) * 1000:+.0f} ms between trials)")
    print(f"Ray / Optuna wall time of the whole command: {local.wall_s / optuna.wall_s:.2f}x")


if __name__ == "__main__":
    main()
