"""Measures where the direct and the efficient algorithm cross on this device, and the cost-model
weight that csrc/crossover.cpp uses for it.

For each head dim it times forward+backward of both algorithms over a sweep of N (M = N, e = d,
B=1, H=8), in interleaved rounds (medians), prints the times, the measured crossover (first N where efficient is faster) and the
ratio  (efficient seconds per model FLOP) / (direct seconds per model FLOP)  at each N, with model
FLOPs the forward counts of taylorshift.flops (the cost model's own). The ratio that matters for a
head dim is the one at its crossover: the geometric mean of the ratios at the two sweep points
around it. The device's `efficient_flop_cost` is a + b / d fitted to those (least squares).

    python benchmarks/crossover.py --device cpu
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import attention_fn, forward_backward, interleaved_ms, make_inputs

import taylorshift


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--head-dims", default="16,32,64")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--statistic", choices=("median", "min"), default="median")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="see common.interleaved_ms"
    )
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(
        f"device {args.device}, {args.dtype}, forward+backward, B=1, H={args.heads}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.statistic} of {args.rounds} interleaved rounds, "
        f"{args.clock} clock\n"
    )
    print("| d | N | direct ms | efficient ms | cost ratio |")
    print("|---|---|---|---|---|")
    summary, at_crossover = [], {}
    for head_dim in (int(d) for d in args.head_dims.split(",")):
        predicted = taylorshift.crossover(head_dim, args.device)
        sweep = [n for n in (64, 128, 256, 512, 1024, 2048, 4096, 8192) if n <= 8 * predicted]
        measured, previous_ratio = None, None
        for tokens in sweep:
            q, k, v = make_inputs(1, args.heads, tokens, head_dim, dtype=dtype, device=args.device)
            grad_out = torch.randn_like(v)
            runs = {
                mode: functools.partial(
                    forward_backward, attention_fn("taylorshift", mode), q, k, v, grad_out
                )
                for mode in ("direct", "efficient")
            }
            for run in runs.values():  # warm-up
                run()
            seconds = {
                mode: ms * 1e-3
                for mode, ms in interleaved_ms(
                    runs, args.rounds, args.statistic, args.clock
                ).items()
            }
            model = {
                mode: taylorshift.flops(mode, tokens, tokens, head_dim, backward=False)
                for mode in seconds
            }
            ratio = (seconds["efficient"] / model["efficient"]) / (
                seconds["direct"] / model["direct"]
            )
            if measured is None and seconds["efficient"] < seconds["direct"]:
                measured = tokens
                at_crossover[head_dim] = (ratio * (previous_ratio or ratio)) ** 0.5
            previous_ratio = ratio
            print(
                f"| {head_dim} | {tokens} | {seconds['direct'] * 1e3:.2f} | "
                f"{seconds['efficient'] * 1e3:.2f} | {ratio:.2f} |",
                flush=True,
            )
        summary.append((head_dim, measured, predicted))
    print(
        "\n| d | measured crossover (first N in the sweep where efficient wins) | taylorshift.crossover(d) now |"
    )
    print("|---|---|---|")
    for head_dim, measured, predicted in summary:
        print(f"| {head_dim} | {measured} | {predicted} |")
    print("\n| d | cost ratio at the crossover |")
    print("|---|---|")
    for head_dim, ratio in at_crossover.items():
        print(f"| {head_dim} | {ratio:.3f} |")
    if len(at_crossover) >= 2:
        a, b = fit_inverse_dim(at_crossover)
        print(f"\nefficient_flop_cost for {args.device}: {a:.3f} + {b:.2f} / d")


def fit_inverse_dim(ratios: dict[int, float]) -> tuple[float, float]:
    """Least-squares a, b of ratio = a + b / d."""
    xs = [1.0 / d for d in ratios]
    ys = list(ratios.values())
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum(
        (x - mean_x) ** 2 for x in xs
    )
    return mean_y - slope * mean_x, slope


if __name__ == "__main__":
    main()
