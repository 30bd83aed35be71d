"""Training throughput of sbsearch's trainer against a plain PyTorch loop for the same recipe.

For each model (``resnet18`` with the CIFAR stem, ``resnet9`` at Page's width 64), each input (CIFAR-shaped
``fakedata`` at 3x32x32, and the same images expanded by K = 2: the expansion's default ``grid`` layout
makes them 3x64x64; images have no channel layout) and each replica count R, one row of training
replica-images per second (an image seen by one replica; R = 3 trains 3x the images of R = 1 per step):

- sbsearch: ``sbsearch.trainer.train`` on the data and model description of ``trial.build_trial``,
  with the plan of ``trial.train_plan`` bounded by ``max_steps``.
- plain: the loop a PyTorch user writes for the same recipe: the model built by sbsearch's builder from
  the same seed, per batch sbsearch's ``random_crop`` and ``random_flip``, the expansion, normalisation,
  forward, cross-entropy, backward, SGD step (Nesterov momentum, weight decay), ``OneCycleLR`` step;
  same batch size, precision (autocast) and memory format. At R > 1 the replicas are one torch.func
  ensemble (``stack_module_state`` + ``vmap`` over ``functional_call``, as in PyTorch's model-ensembling
  tutorial).
- plain seq (R > 1): R plain R = 1 trainings, one after another. sbsearch runs its replicas as
  ``train.replica_mode: auto`` chooses (the faster of batched and sequential, timed on this machine in the
  row's warm-up run; the script keeps those timings in a fresh cache folder, so each run measures anew): the
  row prints that choice beside the faster of the two plain ways, and sbsearch against that faster one.

Only training images are counted. Both sides train ``--steps`` steps within one epoch and then evaluate
once (sbsearch's trainer evaluates after every epoch), on a validation split of about one image per class
(10 images; no test split, no sb_score: ``score=False, test=False``). That evaluation is not subtracted:
it is the same on both sides, well under 1% of a run at the CUDA defaults, and about a sixth of the compute
at the CPU defaults (10 images forward against 16 forward and backward). Each timed call starts from the
prepared data on the host, so both sides also pay for building their models and optimiser and moving the
data to the device (sbsearch's trainer does all of that inside ``train``). The variants are interleaved in
a rotating order, repeated ``--repeats`` times after a discarded warm-up of each, and the median is printed.

Time is wall time between ``torch.cuda.synchronize()`` calls on CUDA, and process CPU time
(``time.process_time``) on the CPU: on a shared machine other processes stretch the wall time of either
side at random, not the CPU time each needs (as ``benchmarks/overhead.py``). The CPU default is one thread:
threads that spin while they wait for each other on a busy machine would add CPU time that is not work.

    python benchmarks/throughput.py --device cuda [--precision bf16] [--memory-format channels_last]
    python benchmarks/throughput.py --device cpu   # about 5 minutes of one core

Defaults: on CUDA 200 steps of batch 128, median of 3; on the CPU 2 steps of batch 8, median of 2, one
thread: one core trains ResNet-9 at 3x64x64 at about 5 images/s, so a few dozen steps of batch 128 would
take hours for the whole table. Those CPU figures are fit for the ratios, not for absolute speeds: building
a ResNet-18 (about 0.2 s of CPU) is a tenth of such a run, on both sides, and on a loaded machine single
runs vary by about 10%.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from sbsearch.data import Split, random_crop, random_flip
from sbsearch.models import build_model
from sbsearch.space import config_from_params
from sbsearch.spec import Spec, parse_spec
from sbsearch.strategies import ModelDesc
from sbsearch.strategies.expansion import expand
from sbsearch.trainer import PRECISIONS, TrainPlan, device_name, replica_seeds, resolve_device, train
from sbsearch.trial import build_trial, train_plan

MODELS: dict[str, dict[str, Any]] = {
    "resnet18": {"name": "resnet18", "cifar_stem": True},  # torchvision's, 3x3 stride-1 stem, no max-pool
    "resnet9": {"name": "resnet9", "width": 64},  # Page's DAWNBench network
}
"""The ``model`` section of each benchmarked model; both with batch norm (``space.norm.kind``)."""

FACTORS = (1, 2)
"""Expansion factors: the 3x32x32 images as they are, and expanded to 3x64x64."""

CLASSES = 10
CROP_PADDING = 4  # the CIFAR recipe's
DEFAULTS = {"cpu": {"steps": 2, "batch_size": 8, "repeats": 2}, "cuda": {"steps": 200, "batch_size": 128, "repeats": 3}}
WARMUP_STEPS = {"cpu": 1, "cuda": 10}
"""Steps of the discarded warm-up run of each variant: its first-call costs (allocator, kernels, imports)."""


def benchmark_spec(model: str, factor: int, replicas: int, args: argparse.Namespace) -> Spec:
    """The spec of one row: enough fakedata images for ``args.steps`` batches within one epoch, and a
    validation split of about one image per class."""
    samples = max(300, args.steps * args.batch_size + 5 * CLASSES)
    return parse_spec({
        "name": "throughput",
        "seed": 0,
        "data": {"dataset": "fakedata", "image_size": 32, "fake_samples": samples, "fake_classes": CLASSES,
                 "val_fraction": CLASSES / samples,
                 "test_fraction": 0.0, "batch_size": args.batch_size, "augment_crop": CROP_PADDING,
                 "augment_flip": True},
        "model": MODELS[model],
        "train": {"epochs": 1, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True,
                  "weight_decay": 5e-4, "schedule": "onecycle", "precision": args.precision,
                  "channels_last": args.memory_format == "channels_last", "replicas": replicas,
                  "device": args.device},
        "space": {"expansion": {"factor": factor}, "norm": {"kind": "batch"}},
    })


def plain_inputs(x: torch.Tensor, expansion: dict[str, object], mean: torch.Tensor, std: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
    """A plain loop's training batch: crop and flip, then expand (constants in raw units) and normalise."""
    x = random_flip(random_crop(x, CROP_PADDING, generator), generator)  # (B, 3, 32, 32)
    return (expand(x, expansion) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)  # (B, 3, 32K, 32K)


def plain_training(split: Split, desc: ModelDesc, plan: TrainPlan, expansion: dict[str, object],
                   seeds: Sequence[int], steps: int) -> None:
    """The loop a PyTorch user writes for the plan's recipe, with one validation pass at the end;
    several ``seeds`` train together as one torch.func ensemble."""
    device = torch.device(plan.device)
    models = [build_model(desc, seed).to(device) for seed in seeds]
    if plan.channels_last:
        models = [model.to(memory_format=torch.channels_last) for model in models]
    if len(models) == 1:
        model = models[0]
        params: list[torch.Tensor] = list(model.parameters())
        set_mode: Callable[[bool], Any] = model.train

        def forward(x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = model(x).unsqueeze(0)  # (1, B, classes)
            return out
    else:
        stacked, buffers = stack_module_state(models)  # each (R, ...)
        skeleton = copy.deepcopy(models[0]).to("meta")
        params, set_mode = list(stacked.values()), skeleton.train

        def one_replica(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = functional_call(skeleton, (p, b), (x,))
            return out

        ensemble = vmap(one_replica, in_dims=(0, 0, None), randomness="different")

        def forward(x: torch.Tensor) -> torch.Tensor:
            return ensemble(stacked, buffers, x)  # (R, B, classes)

    optimizer = torch.optim.SGD(params, lr=plan.lr, momentum=plan.momentum, nesterov=plan.nesterov,
                                weight_decay=plan.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=plan.lr, total_steps=steps, pct_start=0.3,
                                                   anneal_strategy="linear", cycle_momentum=False, div_factor=100)
    dtype = PRECISIONS.get(plan.precision)
    memory_format = torch.channels_last if plan.channels_last else torch.contiguous_format
    mean, std = split.mean.to(device), split.std.to(device)
    x_train, y_train = split.x_train.to(device), split.y_train.to(device)
    x_val, y_val = split.x_val.to(device), split.y_val.to(device)
    order, augment = torch.Generator().manual_seed(plan.seed), torch.Generator().manual_seed(plan.seed + 1)
    perm = torch.randperm(x_train.shape[0], generator=order).to(device)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return forward(x.contiguous(memory_format=memory_format)).float()

    set_mode(True)
    loss_sum = torch.zeros((), device=device)
    for step in range(steps):
        idx = perm[step * plan.batch_size : (step + 1) * plan.batch_size]
        out = run(plain_inputs(x_train[idx], expansion, mean, std, augment))  # (R, B, classes)
        loss = F.cross_entropy(out.flatten(0, 1), y_train[idx].repeat(out.shape[0])) * out.shape[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        schedule.step()
        loss_sum += loss.detach()
    set_mode(False)
    with torch.inference_mode():
        out = run(x_val)
        _ = (loss_sum.item(), F.cross_entropy(out.flatten(0, 1), y_val.repeat(out.shape[0])).item(),
             (out.argmax(-1) == y_val).float().mean().item())


def timed(device: torch.device, work: Callable[[], object]) -> float:
    """Seconds ``work`` takes: wall time of the device's work on CUDA, process CPU time on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        work()
        torch.cuda.synchronize(device)
        return time.perf_counter() - start
    start = time.process_time()
    work()
    return time.process_time() - start

def assert_same_inputs(split: Split, expansion: dict[str, object], device: torch.device) -> None:
    """The plain loop's training batches are the ones sbsearch's trainer makes: the same crop and flip
    drawn from the same generator, then sbsearch's own pipeline (expansion, normalisation), run on the device
    as the trainer runs it."""
    assert split.train_pipeline is not None, "augmentation defers the training inputs"
    x = split.x_train[:8].to(device)
    ours = plain_inputs(x, expansion, split.mean.to(device), split.std.to(device), torch.Generator().manual_seed(1))
    theirs, generator = x, torch.Generator().manual_seed(1)
    for step in split.augment:
        theirs = step.apply(theirs, generator)
    torch.testing.assert_close(ours, split.train_pipeline(theirs))


def measure_row(model: str, factor: int, replicas: int, args: argparse.Namespace) -> dict[str, Any]:
    """Median seconds of each variant of one row, with the row's input shape and any note."""
    spec = benchmark_spec(model, factor, replicas, args)
    config = config_from_params(spec, {})
    split, desc = build_trial(spec, config)
    device = torch.device(train_plan(spec).device)
    note = ""
    assert split.x_train.shape[0] >= args.steps * args.batch_size, "max_steps must end within the first epoch"
    assert 0 < split.x_val.shape[0] <= 3 * CLASSES, split.x_val.shape
    expansion = config.settings("expansion")
    assert expansion["fill_space"] == "raw", "the plain loop expands before it normalises"
    seeds = replica_seeds(spec.seed, replicas)
    assert_same_inputs(split, expansion, device)

    def plan_for(steps: int) -> TrainPlan:
        return replace(train_plan(spec), max_steps=steps, score=False, test=False)

    def variants(steps: int) -> dict[str, Callable[[], object]]:
        def sequential() -> None:
            for seed in seeds:
                plain_training(split, desc, plan_for(steps), expansion, [seed], steps)

        out: dict[str, Callable[[], object]] = {
            "sbsearch": lambda: train(split, desc, plan_for(steps), strategies=config.all_settings()),
            "plain": lambda: plain_training(split, desc, plan_for(steps), expansion, seeds, steps),
        }
        if replicas > 1:
            out["sequential"] = sequential
        return out

    # The warm-up run of sbsearch's trainer is where replica_mode auto measures (once: later runs read it back).
    warm = variants(min(args.steps, WARMUP_STEPS[device.type]))
    chose = train(split, desc, plan_for(min(args.steps, WARMUP_STEPS[device.type])),
                  strategies=config.all_settings()).replicas_ran.split(" ")[0]
    for work in warm.values():
        timed(device, work)
    seconds: dict[str, list[float]] = {name: [] for name in variants(args.steps)}
    for repeat in range(args.repeats):
        names = list(seconds)
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:  # rotated: no side always first
            seconds[name].append(timed(device, variants(args.steps)[name]))
    return {"shape": "x".join(map(str, desc.input_shape)), "note": note, "chose": chose,
            **{name: statistics.median(times) for name, times in seconds.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 2 on CPU, 200 on CUDA)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 8 on CPU, 128 on CUDA")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--memory-format", choices=("contiguous", "channels_last"), default="contiguous")
    ap.add_argument("--models", default="resnet18,resnet9", help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--replicas", default="1,3", help="comma-separated replica counts")
    ap.add_argument("--repeats", type=int, default=None, help="default 2 on CPU, 3 on CUDA")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 1 on CPU, torch's own on CUDA)")
    args = ap.parse_args()
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="sbsearch-throughput-")  # replica_mode auto measures anew
    device = resolve_device(args.device)
    args.device = device.type
    for key, value in DEFAULTS[device.type].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    models = args.models.split(",")
    unknown = [name for name in models if name not in MODELS]
    if unknown:
        ap.error(f"--models: must name {', '.join(MODELS)}, but got {', '.join(unknown)}")
    replica_counts = [int(r) for r in args.replicas.split(",")]

    clock = "wall time between CUDA synchronisations" if device.type == "cuda" else "process CPU time"
    print(f"device: {device_name(device)} | torch {torch.__version__} | {torch.get_num_threads()} thread(s) | "
          f"precision {args.precision} | {args.memory_format}")
    print(f"{args.steps} steps of batch {args.batch_size}, SGD nesterov + onecycle, crop {CROP_PADDING} + flip; "
          f"median of {args.repeats} after a warm-up; {clock}; replica-images/s")
    header = (f"{'model':<9} {'input':<8} {'R':>2} {'sbsearch':>9} {'plain':>9} {'sb/plain':>8} "
              f"{'plain seq':>10} {'sb/best':>8}  {'auto chose':<10}  faster plain")
    print(header)
    print("-" * len(header))
    notes: set[str] = set()
    for model in models:
        for factor in FACTORS:
            for replicas in replica_counts:
                row = measure_row(model, factor, replicas, args)
                images = args.steps * args.batch_size * replicas
                ours, plain = images / row["sbsearch"], images / row["plain"]
                line = (f"{model:<9} {row['shape']:<8} {replicas:>2} {ours:>9.1f} {plain:>9.1f} "
                        f"{ours / plain:>7.3f}{'*' if ours / plain < 0.95 else ' '}")
                if "sequential" in row:
                    sequential = images / row["sequential"]
                    best = max(plain, sequential)
                    line += (f" {sequential:>10.1f} {ours / best:>7.3f}{'*' if ours / best < 0.95 else ' '}  "
                             f"{row['chose']:<10}  {'batched' if plain > sequential else 'sequential'}")
                print(line, flush=True)
                if row["note"]:
                    notes.add(row["note"])
    print("* below the target >= 0.95. plain: one plain model (R = 1) or a torch.func ensemble of R (batched); plain "
          "seq: R plain models one after another; sb/best: sbsearch over the faster plain way; auto chose: how "
          "sbsearch's train.replica_mode auto ran the replicas (timed in the warm-up run).")
    for note in sorted(notes):
        print("note:", note)


if __name__ == "__main__":
    main()
