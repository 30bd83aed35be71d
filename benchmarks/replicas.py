"""Throughput of training R seed-replicas together versus one after another, and the score's cost.

On sklearn's digits (8x8) with a small CNN, batch 64 and Adam, in one run:
    (a) one model,
    (b) R models trained one after another,
    (c) R models trained together with ReplicaStack,
then the time of `replica_score` on the R replicas' weights as a share of one epoch of (c).

Throughput counts replica-samples: one sample seen by one replica. (b) and (c) start from the same
seeds and see the same batches, so their final weights should agree; the script prints how closely.

    python benchmarks/replicas.py --replicas 3 --epochs 3
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

from sbsearch.replicas import ReplicaStack
from sbsearch.score import default_score_layers, replica_score

WARMUP_BATCHES = 5


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3),  # (B, 16, 6, 6)
        nn.ReLU(),
        nn.Conv2d(16, 32, 3),  # (B, 32, 4, 4)
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),  # (B, 32, 1, 1)
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def seeded_models(seeds: range) -> list[nn.Module]:
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(small_cnn())
    return models


def digits() -> tuple[Tensor, Tensor]:
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0  # (N, 1, 8, 8)
    return x, torch.tensor(labels, dtype=torch.long)


def epoch_batches(x: Tensor, y: Tensor, batch_size: int, epochs: int, seed: int) -> list[list[tuple[Tensor, Tensor]]]:
    """The same shuffled batches for every variant, built before any timing starts."""
    generator = torch.Generator().manual_seed(seed)
    schedule = []
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        schedule.append([(x[idx], y[idx]) for idx in torch.split(order, batch_size)])
    return schedule


def train_model(model: nn.Module, schedule: list[list[tuple[Tensor, Tensor]]]) -> list[float]:
    """Trains one model; returns the seconds of each epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()

    def step(x: Tensor, y: Tensor) -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
        optimizer.step()

    return timed_epochs(step, schedule)


def train_stack(stack: ReplicaStack, schedule: list[list[tuple[Tensor, Tensor]]]) -> list[float]:
    """Trains every replica of the stack at once; returns the seconds of each epoch."""
    optimizer = torch.optim.Adam(stack.parameters(), lr=1e-3)
    stack.train()

    def step(x: Tensor, y: Tensor) -> None:
        optimizer.zero_grad()
        logits = stack(x)  # (R, B, 10)
        # Summed, not averaged, over replicas: each replica gets exactly its own gradient.
        loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(logits)), reduction="sum") / len(y)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()

    return timed_epochs(step, schedule)


def timed_epochs(step: Callable[[Tensor, Tensor], None], schedule: list[list[tuple[Tensor, Tensor]]]) -> list[float]:
    seconds = []
    for batches in schedule:
        start = time.perf_counter()
        for x, y in batches:
            step(x, y)
        seconds.append(time.perf_counter() - start)
    return seconds


def warm_up(step_model: nn.Module, stack: ReplicaStack, schedule: list[list[tuple[Tensor, Tensor]]]) -> None:
    """Runs a few untimed steps on throwaway copies so one-off costs (allocations, vmap setup) are not timed."""
    warmup = [schedule[0][:WARMUP_BATCHES]]
    train_model(step_model, warmup)
    train_stack(stack, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=3, help="R, the number of seed-replicas")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of (a), (b), (c); the fastest of each counts")
    parser.add_argument("--score-repeats", type=int, default=20, help="timings of replica_score; the fastest counts")
    args = parser.parse_args()
    if args.replicas < 2 or args.epochs < 1 or args.repeats < 1:
        parser.error(f"needs --replicas >= 2, --epochs >= 1, --repeats >= 1, but got {args}")
    replicas, epochs = args.replicas, args.epochs
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    x, y = digits()
    schedule = epoch_batches(x, y, args.batch_size, epochs, args.seed)
    samples = len(x) * epochs
    warm_up(small_cnn(), ReplicaStack(seeded_models(range(100, 100 + replicas))), schedule)

    # Other work on the machine slows single runs at random; the fastest of a few repeats is the
    # closest to the code's own cost.
    single_seconds = sequential_seconds = batched_seconds = [math.inf]
    for _ in range(args.repeats):
        seconds = train_model(seeded_models(range(1))[0], schedule)
        single_seconds = min(single_seconds, seconds, key=sum)

        sequential_models = seeded_models(range(replicas))
        seconds = [0.0] * epochs
        for model in sequential_models:
            for epoch, model_seconds in enumerate(train_model(model, schedule)):
                seconds[epoch] += model_seconds
        sequential_seconds = min(sequential_seconds, seconds, key=sum)

        stack = ReplicaStack(seeded_models(range(replicas)))
        assert stack.batched, "the benchmark CNN should take the batched path"
        seconds = train_stack(stack, schedule)
        batched_seconds = min(batched_seconds, seconds, key=sum)

    throughput_single = samples / sum(single_seconds)
    throughput_sequential = replicas * samples / sum(sequential_seconds)
    throughput_batched = replicas * samples / sum(batched_seconds)

    layers = default_score_layers(sequential_models[0])
    score_seconds = []
    for _ in range(args.score_repeats):
        start = time.perf_counter()
        result = replica_score(stack.replica_weights(), layers)
        score_seconds.append(time.perf_counter() - start)
    score_time = min(score_seconds)
    batched_epoch = statistics.median(batched_seconds)

    disagreement = max(
        (batched[name] - dict(model.named_parameters())[name].detach()).abs().max().item()
        for batched, model in zip(stack.replica_weights(), sequential_models, strict=True)
        for name in batched
    )

    a, b, c = throughput_single, throughput_sequential, throughput_batched
    print(f"digits: {len(x)} samples, batch {args.batch_size}, {epochs} epochs, R={replicas}, ", end="")
    print(f"torch threads {torch.get_num_threads()}, fastest of {args.repeats} repeats")
    print(f"(a) one model               {a:8.0f} samples/s         ({sum(single_seconds):.2f} s)")
    print(f"(b) R models in sequence    {b:8.0f} replica-samples/s ({sum(sequential_seconds):.2f} s)")
    print(f"(c) R models, ReplicaStack  {c:8.0f} replica-samples/s ({sum(batched_seconds):.2f} s)")
    print(f"ratios: b/a {b / a:.2f}   c/a {c / a:.2f}   c/b {c / b:.2f}")
    print(
        f"replica_score ({len(layers)} layers, snapshot included): {score_time * 1e3:.2f} ms = "
        f"{100 * score_time / batched_epoch:.2f}% of one (c) epoch ({batched_epoch * 1e3:.0f} ms); "
        f"score {result.value:.4f}"
    )
    print(f"max |weight (b) - weight (c)| after training: {disagreement:.2e}")


if __name__ == "__main__":
    main()
