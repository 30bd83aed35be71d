"""sbsearch's training loop against a plain PyTorch loop, and the fixed cost of a trial.

Times are process CPU seconds (``time.process_time``): on a shared machine other processes change the
wall time of both loops, not the CPU time each needs. Both loops train the same model (built by sbsearch's builder from the same seed) on the same
prepared digits tensors with the same batch size and optimiser, interleaved and repeated, so machine
noise hits both alike. Prints samples/s of each and their ratio (sbsearch / plain), then the fixed
cost of one trial: what ``run_trial`` adds around training — the data set-up and the MLflow child run
with its per-epoch metrics — each timed directly.

    python benchmarks/overhead.py [--epochs 5] [--repeats 5] [--factor 2] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sbsearch.data import load_dataset, prepare
from sbsearch.models import build_model
from sbsearch.space import config_from_params
from sbsearch.spec import parse_spec
from sbsearch.strategies import STRATEGIES, ModelDesc, apply_model_edits
from sbsearch.tracking import Tracker, TrackingTarget
from sbsearch.trainer import TrainPlan, train
from sbsearch.trial import SweepContext, TrialRecord, TrialState, _TrialLog, build_trial


def plain_loop(x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor, desc: ModelDesc,
               epochs: int, batch: int, lr: float, seed: int) -> float:
    """The loop a PyTorch user would write by hand, with the usual validation pass after each epoch;
    returns seconds spent."""
    model = build_model(desc, seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    start = time.process_time()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            out = model(xv)
            _ = (F.cross_entropy(out, yv).item(), (out.argmax(1) == yv).float().mean().item())
    return time.process_time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--factor", type=int, default=2, help="expansion factor of the benchmarked model")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    settings = {name: s.defaults() for name, s in STRATEGIES.items()}
    settings["expansion"]["factor"] = args.factor
    split = prepare(load_dataset("digits", 0.25, 0), settings["expansion"])
    desc = apply_model_edits(ModelDesc("small_cnn", (1, 8, 8), 10), settings)
    plan = TrainPlan(epochs=args.epochs, batch_size=args.batch_size, lr=3e-3, seed=0, test=False)  # as the plain loop
    n = split.x_train.shape[0] * args.epochs

    plain_s, ours_s = [], []
    data = (split.x_train, split.y_train, split.x_val, split.y_val)
    plain_loop(*data, desc, 1, args.batch_size, 3e-3, 0)  # warm-up
    for _ in range(args.repeats):
        plain_s.append(plain_loop(*data, desc, args.epochs, args.batch_size, 3e-3, 0))
        start = time.process_time()
        result = train(split, desc, plan)
        ours_s.append(time.process_time() - start)
    plain, ours = statistics.median(plain_s), statistics.median(ours_s)
    print(f"model: small_cnn K={args.factor} ({result.num_parameters} parameters), {args.epochs} epochs, "
          f"batch {args.batch_size}, {args.threads} thread(s), median of {args.repeats}")
    print(f"plain PyTorch loop : {n / plain:10.0f} training samples/s  (with a validation pass per epoch)")
    print(f"sbsearch trainer   : {n / ours:10.0f} training samples/s  (with its per-epoch metrics)")
    print(f"throughput ratio   : {plain / ours:.3f}  (sbsearch / plain; 1.0 = no overhead)")

    with tempfile.TemporaryDirectory() as tmp:
        raw = {"name": "overhead", "train": {"epochs": args.epochs, "lr": 3e-3},
               "data": {"batch_size": args.batch_size}, "space": {"expansion": {"factor": args.factor}}}
        spec = parse_spec(raw)
        target = TrackingTarget(f"sqlite:///{tmp}/mlflow.db", "overhead", Path(tmp, "art").as_uri())
        tracker = Tracker(target)
        tracker.check_reachable()
        parent = tracker.start_sweep("overhead", raw, sweep_key="overhead")
        config = config_from_params(spec, {})
        ctx = SweepContext(spec, Path(tmp), target, parent, threads=1)
        setup, logging = [], []
        metrics = {"val_accuracy": 0.9, "val_loss": 0.3, "train_loss": 0.2, "sb_score": 0.1, "sb_drift": 0.5}
        for number in range(args.repeats):
            t0 = time.perf_counter()
            build_trial(spec, config)  # data split, expansion, model description
            setup.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            # The writes run_trial makes, through its own logger: epochs this quick go out with the final
            # metrics in one batch (an epoch of 2 s or more would be a batch of its own).
            record = TrialRecord(number, TrialState.COMPLETE, {})
            log = _TrialLog(ctx, record, config, first_attempt=True)
            for epoch in range(1, args.epochs + 1):
                log.epoch(epoch, metrics)
            record.final = dict(metrics)
            log.end()
            assert record.logged, record.tracking_error
            logging.append(time.perf_counter() - t0)
        # Timed directly rather than as (whole trial - training): on a shared machine the training
        # time varies by more than the whole fixed cost.
        fixed = statistics.median(setup) + statistics.median(logging)
        print(f"fixed cost per trial: {fixed:.3f} s = set-up {statistics.median(setup):.3f} s + MLflow child run with "
              f"{args.epochs} epochs of metrics {statistics.median(logging):.3f} s (SQLite store; median of {args.repeats})")
        print(f"  as a share of that trial's training time ({plan.replicas} replica, {args.epochs} epochs): "
              f"{fixed / statistics.median(ours_s):.1%}")

if __name__ == "__main__":
    main()
