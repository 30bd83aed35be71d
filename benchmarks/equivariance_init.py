"""Do the group-convolution models start and train on an equal footing with the plain small_cnn?

On sklearn's digits (8x8), small_cnn at the spec's default width (16), three checks:

1. Parameters: the plain model and `equivariance.how: layers` at stem / early / all for C4 and D4, at
   depth 2 (the default, where early is stem) and 3, with the group blocks' channels
   (`models.equivariant_block_widths`) and the count the group blocks would give at the plain widths.
2. Scale at initialisation: the std of every conv-like layer's output, then of the logits, on a batch of
   standardised digits, mean over seeds, as a ratio to the plain model's.
3. Convergence: validation accuracy per epoch with sbsearch's trainer (Adam, lr 0.003, batch 64; the
   seeds are the trainer's replicas, trained together), plain against layers at stem / early / all (C4),
   on digits and on digits_c4 (each digit turned by a seeded random multiple of 90 degrees), and the
   epochs each needs to reach a few accuracies on the mean curve.

    python benchmarks/equivariance_init.py                # full: 8 epochs, 3 seeds; a few minutes on 2 idle cores
    python benchmarks/equivariance_init.py --quick        # 2 epochs, 2 seeds: checks that it runs
    python benchmarks/equivariance_init.py --depth 2 3 --out benchmarks/results/equivariance_init.md
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from sbsearch.data import DATASETS, Split, load_dataset, prepare
from sbsearch.group_conv import GroupConv2d, LiftingConv2d
from sbsearch.models import (  # the private two: what the group blocks would cost at the plain widths
    _plain_block_widths,
    _small_cnn_parameters,
    build_model,
    count_parameters,
    equivariant_block_widths,
)
from sbsearch.strategies import STRATEGIES, ModelDesc, apply_model_edits
from sbsearch.trainer import TrainPlan, train

GROUPS = ("c4", "d4")
WHERE = ("stem", "early", "all")
THRESHOLDS = {"digits": (0.90, 0.95), "digits_c4": (0.80, 0.90)}


def settings(**equivariance: object) -> dict[str, dict[str, object]]:
    out = {name: strategy.defaults() for name, strategy in STRATEGIES.items()}
    out["equivariance"].update(equivariance)
    return out


def with_layers(plain: ModelDesc, where: str, group: str) -> ModelDesc:
    return apply_model_edits(plain, settings(how="layers", where=where, group=group))


def group_blocks(desc: ModelDesc) -> int:
    return {"none": 0, "stem": 1, "early": math.ceil(desc.depth / 2), "all": desc.depth}[desc.equivariant_layers]


def standardised(name: str) -> Split:
    assert name in DATASETS, name
    return prepare(load_dataset(name, 0.25, 0), STRATEGIES["expansion"].defaults())


# --- 1. parameters -------------------------------------------------------------------------------


def parameter_table(depths: tuple[int, ...]) -> list[str]:
    lines = ["## Parameters (small_cnn, digits 1x8x8, width 16)", "",
             "| depth | model | block widths | parameters | vs plain | at the plain widths | vs plain |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for depth in depths:
        plain = ModelDesc("small_cnn", (1, 8, 8), 10, depth=depth)
        plain_count = count_parameters(build_model(plain, 0))
        lines.append(f"| {depth} | plain | {_plain_block_widths(plain)} | {plain_count} | 1.000 | | |")
        for group in GROUPS:
            for where in WHERE:
                desc = with_layers(plain, where, group)
                count = count_parameters(build_model(desc, 0))
                unmatched = _small_cnn_parameters(desc, _plain_block_widths(desc))
                lines.append(f"| {depth} | {where} {group} | {equivariant_block_widths(desc)} | {count} | "
                             f"{count / plain_count:.3f} | {unmatched} | {unmatched / plain_count:.2f} |")
    return lines


# --- 2. scale at initialisation ------------------------------------------------------------------


def activation_stds(desc: ModelDesc, x: torch.Tensor, seeds: range) -> list[float]:
    """Std of every conv-like layer's output, then of the logits, in forward order; mean over seeds."""
    per_seed = []
    for seed in seeds:
        model = build_model(desc, seed).eval()
        seen: list[float] = []

        def record(_module: nn.Module, _inputs: object, out: torch.Tensor, seen: list[float] = seen) -> None:
            seen.append(float(out.std()))

        for module in model.modules():
            if isinstance(module, (nn.Conv2d, LiftingConv2d, GroupConv2d)):
                module.register_forward_hook(record)
        with torch.no_grad():
            seen.append(float(model(x).std()))
        per_seed.append(seen)
    return torch.tensor(per_seed).mean(dim=0).tolist()


def scale_table(depths: tuple[int, ...], x: torch.Tensor, seeds: range) -> list[str]:
    lines = ["## Activation std at initialisation, ratio to the plain model",
             "",
             (f"{len(x)} standardised training digits (input std {float(x.std()):.3f}), mean over {len(seeds)} "
              "seeds. Columns: the output of each conv block's conv (lifting / group / plain), then the logits. "
              "`*` marks the layers after the last group block: with stem and early they read its maps with "
              "the group axis folded into the channels (GroupFold), with all the invariant head reads their "
              "max over the group (GroupPool)."), ""]
    for depth in depths:
        plain = ModelDesc("small_cnn", (1, 8, 8), 10, depth=depth)
        plain_stds = activation_stds(plain, x, seeds)
        header = [f"conv {i + 1}" for i in range(depth)] + ["logits"]
        lines += [f"| depth {depth} | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header),
                  "| plain (std) | " + " | ".join(f"{s:.3f}" for s in plain_stds) + " |"]
        for group in GROUPS:
            for where in WHERE:
                desc = with_layers(plain, where, group)
                ratios = [s / p for s, p in zip(activation_stds(desc, x, seeds), plain_stds, strict=True)]
                blocks = group_blocks(desc)
                cells = [f"{r:.2f}" + ("*" if i >= blocks else "") for i, r in enumerate(ratios)]
                lines.append(f"| {where} {group} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


# --- 3. convergence ------------------------------------------------------------------------------


def epochs_to(curve: list[float], level: float) -> str:
    return next((str(epoch) for epoch, accuracy in enumerate(curve, 1) if accuracy >= level), "-")


def convergence_table(dataset: str, depth: int, epochs: int, seeds: int) -> list[str]:
    split = standardised(dataset)
    plain = ModelDesc("small_cnn", tuple(split.x_train.shape[1:]), split.num_outputs, depth=depth)
    plan = TrainPlan(epochs=epochs, batch_size=64, lr=0.003, replicas=seeds, score=False, test=False)
    variants = [("plain", plain)]
    for where in WHERE:
        if where == "early" and group_blocks(with_layers(plain, "early", "c4")) == 1:
            continue  # the same network as stem
        variants.append((f"{where} c4", with_layers(plain, where, "c4")))
    levels = THRESHOLDS[dataset]
    lines = [f"### {dataset} ({len(split.x_train)} train / {len(split.x_val)} validation, {split.num_outputs} "
             f"classes), depth {depth}" + (" (early is stem at this depth)" if depth <= 2 else ""), "",
             "| model | parameters | " + " | ".join(f"epoch {e}" for e in range(1, epochs + 1)) + " | "
             + " | ".join(f"epochs to {level:.0%}" for level in levels) + " | s/epoch | CPU s/epoch |",
             "|---|---:|" + "---:|" * (epochs + len(levels) + 2)]
    for name, desc in variants:
        start, cpu_start = time.perf_counter(), time.process_time()
        result = train(split, desc, plan)
        seconds, cpu_seconds = (time.perf_counter() - start) / epochs, (time.process_time() - cpu_start) / epochs
        curve = [row["val_accuracy"] for row in result.history]
        spread = [row.get("val_accuracy_std", 0.0) for row in result.history]
        cells = [f"{a:.3f} ± {s:.3f}" for a, s in zip(curve, spread, strict=True)]
        lines.append(f"| {name} | {result.num_parameters} | " + " | ".join(cells) + " | "
                     + " | ".join(epochs_to(curve, level) for level in levels) + f" | {seconds:.1f} | {cpu_seconds:.1f} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs, 2 seeds: checks that the script runs")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 8, 2 with --quick)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds = replicas (default 3, 2 with --quick)")
    parser.add_argument("--depth", type=int, nargs="+", default=[2],
                        help="small_cnn depth(s) of the training runs (default 2)")
    parser.add_argument("--out", default=None, help="also write the report to this markdown file")
    args = parser.parse_args()
    epochs = args.epochs or (2 if args.quick else 8)
    seeds = args.seeds or (2 if args.quick else 3)
    start, cpu_start = time.perf_counter(), time.process_time()
    x = standardised("digits").x_train[:512]  # (512, 1, 8, 8)
    lines = ["# Group-convolution models against the plain small_cnn: size, initial scale, convergence", "",
             (f"`python benchmarks/equivariance_init.py{' --quick' if args.quick else ''}"
              f"{' --depth ' + ' '.join(map(str, args.depth)) if args.depth != [2] else ''}` "
              f"(torch {torch.__version__}, {torch.get_num_threads()} threads)"), ""]
    lines += parameter_table((2, 3)) + [""]
    lines += scale_table((2, 3), x, range(4 if args.quick else 8))
    lines += ["## Validation accuracy per epoch (mean ± std over seeds)", "",
              (f"Adam, lr 0.003, batch 64, {seeds} seeds (the trainer's replicas), no augmentation; "
               "'epochs to' reads the mean curve ('-': not within the run)."), ""]
    for depth in args.depth:
        for dataset in ("digits", "digits_c4"):
            lines += convergence_table(dataset, depth, epochs, seeds)
    lines.append(f"Wall time: {time.perf_counter() - start:.0f} s; CPU time of this process: "
                 f"{time.process_time() - cpu_start:.0f} s (the machine's other jobs slow the first, not the second).")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as file:
            file.write(report)


if __name__ == "__main__":
    main()
