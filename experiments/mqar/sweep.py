"""The MQAR study in one command: softmax, TaylorShift (order 2) and linear attention (order 1)
over sequence lengths 64-512 and model widths 64 and 128, three seeds each, on the CPU.

    python -m experiments.mqar.sweep --runs runs/mqar --out experiments/results/mqar

Runs `--workers` training processes at a time, one thread each (experiments.mqar.train, each in
<runs>/<attention>-L<length>-d<width>-s<seed>/). A run whose results.json exists is skipped and
one with a last.pt is resumed, so an interrupted sweep continues where it stopped. Runs go seed by
seed (every cell's seed 0 first), so a sweep stopped early still fills every cell it can.

Writes to --out: runs.csv (one row per finished run), accuracy.md and accuracy.csv (test accuracy
on held-out queries, mean ± std over seeds, per attention x length x width; marked PARTIAL when
runs are missing), accuracy.png (accuracy against length, one line per attention, one panel per
width) and sweep.md (the command, the settings, the wall time of this call and the machine's
load average before and after).
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from .model import ATTENTIONS

# The training processes run from here, so that `-m experiments.mqar.train` finds this package.
REPOSITORY = Path(__file__).resolve().parents[2]

LENGTHS = (64, 128, 256, 512)
WIDTHS = (64, 128)
SEEDS = (0, 1, 2)
VOCAB_SIZE = 128
# Key-value pairs per sequence length: one pair per 16 tokens, so that longer sequences hold more
# associations, as in Zoology (see README.md for why these).
PAIRS = {length: length // 16 for length in LENGTHS}
# Sequences per training batch: 2048 tokens and 128 queries in every step at every length.
BATCH = {length: 2048 // length for length in LENGTHS}
# 1500 steps: in pilots softmax left the 1/P plateau between steps 600 and 1000 at L = 128
# (width 64), and needs a learning rate still high then; 1000 steps (the cosine near 0 by then)
# left it on the plateau. See README.md.
MAX_STEPS = 1500
HEADS = 2
SHORT_CONV = 2
# No MLP, as in Zoology's MQAR models: recall is the attention's work, and in pilots at L = 128
# softmax with a 4x MLP stayed on the 1/P plateau (800-1600 steps, lr 1e-3 to 1e-2), while
# without one it learned by step 1000 of 1500.
MLP_RATIO = 0
# Held-out sequences: validation every MAX_STEPS / 5 steps, and the test of the last model.
NUM_VAL, NUM_TEST = 128, 500
# Evaluation batches of 16384 tokens, so that softmax's (batch, heads, L, L) weights stay small.
EVAL_TOKENS = 16384


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=Path, default=Path("runs/mqar"), help="run folders")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/mqar"))
    parser.add_argument("--workers", type=int, default=2, help="training processes at a time")
    parser.add_argument("--max-steps", type=int, default=MAX_STEPS)
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS, choices=LENGTHS)
    parser.add_argument("--widths", type=int, nargs="+", default=WIDTHS)
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--attentions", nargs="+", default=ATTENTIONS, choices=ATTENTIONS)
    parser.add_argument(
        "--summarize-only", action="store_true", help="tabulate the finished runs, train nothing"
    )
    return parser.parse_args(argv)


def run_name(attention: str, length: int, width: int, seed: int) -> str:
    return f"{attention}-L{length}-d{width}-s{seed}"


def train_argv(args, attention: str, length: int, width: int, seed: int) -> list[str]:
    folder = args.runs / run_name(attention, length, width, seed)
    argv = [
        "--attention", attention, "--seq-len", str(length), "--num-pairs", str(PAIRS[length]),
        "--vocab-size", str(VOCAB_SIZE), "--dim", str(width), "--heads", str(HEADS),
        "--short-conv", str(SHORT_CONV), "--mlp-ratio", str(MLP_RATIO),
        "--batch-size", str(BATCH[length]), "--max-steps", str(args.max_steps),
        "--eval-every", str(max(1, args.max_steps // 5)), "--num-val", str(NUM_VAL),
        "--num-test", str(NUM_TEST), "--eval-batch-size", str(EVAL_TOKENS // length),
        "--seed", str(seed), "--threads", "1", "--no-progress", "--out", str(folder),
    ]  # fmt: skip
    if (folder / "last.pt").is_file():
        argv.append("--resume")
    return argv


def train_one(args, attention: str, length: int, width: int, seed: int) -> str:
    folder = args.runs / run_name(attention, length, width, seed)
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "experiments.mqar.train"]
    command += train_argv(args, attention, length, width, seed)
    with (folder / "log.txt").open("a") as log:
        completed = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=REPOSITORY, check=False
        )
    if completed.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({completed.returncode}); see {log.name}")
    return folder.name


def grid(args) -> list[tuple[str, int, int, int]]:
    """Every run, seed by seed, the longest sequences first within a seed (they take longest:
    started first, they leave the short ones to fill the workers at the end)."""
    return [
        (attention, length, width, seed)
        for seed in args.seeds
        for length in sorted(args.lengths, reverse=True)
        for width in sorted(args.widths, reverse=True)
        for attention in args.attentions
    ]


def read_results(args) -> list[dict]:
    results = []
    for attention, length, width, seed in grid(args):
        path = args.runs / run_name(attention, length, width, seed) / "results.json"
        if path.is_file():
            results.append(json.loads(path.read_text()))
    return results


def _accuracies(results, attention, length, width) -> list[float]:
    return [
        r["test_accuracy"]
        for r in results
        if (r["attention"], r["seq_len"], r["dim"]) == (attention, length, width)
    ]


def _cell(accuracies: list[float], expected: int) -> str:
    if not accuracies:
        return "—"
    mean = 100 * statistics.mean(accuracies)
    spread = f" ± {100 * statistics.stdev(accuracies):.1f}" if len(accuracies) > 1 else ""
    count = "" if len(accuracies) == expected else f" (n={len(accuracies)})"
    return f"{mean:.1f}{spread}{count}"


def write_tables(args, results: list[dict]) -> bool:
    """Writes runs.csv, accuracy.csv and accuracy.md; True when every run of the grid finished."""
    expected = len(args.seeds)
    missing = [
        run_name(*run)
        for run in grid(args)
        if not any((r["attention"], r["seq_len"], r["dim"], r["seed"]) == run for r in results)
    ]
    fields = ["attention", "seq_len", "num_pairs", "dim", "seed", "steps", "batch_size",
              "test_accuracy", "test_loss", "parameters", "train_seconds"]  # fmt: skip
    with (args.out / "runs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(
            sorted(results, key=lambda r: (r["attention"], r["seq_len"], r["dim"], r["seed"]))
        )
    with (args.out / "accuracy.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["attention", "seq_len", "num_pairs", "dim", "runs", "mean", "std"])
        for attention in args.attentions:
            for width in sorted(args.widths):
                for length in sorted(args.lengths):
                    values = _accuracies(results, attention, length, width)
                    writer.writerow([
                        attention, length, PAIRS[length], width, len(values),
                        f"{statistics.mean(values):.4f}" if values else "",
                        f"{statistics.stdev(values):.4f}" if len(values) > 1 else "",
                    ])  # fmt: skip
    lengths = sorted(args.lengths)
    lines = []
    if missing:
        lines += [
            f"**PARTIAL**: {len(missing)} of {len(grid(args))} runs missing: " + ", ".join(missing),
            "",
        ]
    lines += [
        (
            "MQAR test accuracy (%) on held-out queries, mean ± std over "
            f"{expected} seeds (n = runs where fewer); vocabulary {VOCAB_SIZE}, "
            f"{args.max_steps} training steps."
        ),
        "",
        "| attention | width | "
        + " | ".join(f"L={length} ({PAIRS[length]} pairs)" for length in lengths)
        + " |",
        "|---|---|" + "---|" * len(lengths),
    ]
    for attention in args.attentions:
        for width in sorted(args.widths):
            cells = [
                _cell(_accuracies(results, attention, length, width), expected)
                for length in lengths
            ]
            lines.append(f"| {attention} | {width} | " + " | ".join(cells) + " |")
    (args.out / "accuracy.md").write_text("\n".join(lines) + "\n")
    return not missing


def plot(args, results: list[dict], complete: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths, lengths = sorted(args.widths), sorted(args.lengths)
    figure, axes = plt.subplots(
        1, len(widths), figsize=(4.5 * len(widths), 3.6), sharey=True, squeeze=False
    )
    for axis, width in zip(axes[0], widths):
        for attention in args.attentions:
            points = [
                (length, _accuracies(results, attention, length, width)) for length in lengths
            ]
            points = [(length, values) for length, values in points if values]
            if not points:
                continue
            means = [100 * statistics.mean(values) for _, values in points]
            stds = [
                100 * statistics.stdev(values) if len(values) > 1 else 0.0 for _, values in points
            ]
            axis.errorbar(
                [length for length, _ in points], means, yerr=stds, marker="o", capsize=3,
                label=attention,
            )  # fmt: skip
        axis.set_xscale("log", base=2)
        axis.set_xticks(lengths, [f"{length}\n({PAIRS[length]} pairs)" for length in lengths])
        axis.set_title(f"width {width}")
        axis.set_xlabel("sequence length")
        axis.set_ylim(-2, 102)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%), mean ± std")
    axes[0][-1].legend()
    figure.suptitle("MQAR" + ("" if complete else " (PARTIAL: see accuracy.md)"))
    figure.tight_layout()
    figure.savefig(args.out / "accuracy.png", dpi=120)
    plt.close(figure)


def _loads(loads: tuple[float, float, float]) -> str:
    return ", ".join(f"{load:.1f}" for load in loads)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.runs, args.out = args.runs.resolve(), args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    started, load_before = time.perf_counter(), os.getloadavg()
    if not args.summarize_only:
        pending = [
            run for run in grid(args) if not (args.runs / run_name(*run) / "results.json").is_file()
        ]
        with ThreadPoolExecutor(args.workers) as pool:
            futures = [pool.submit(train_one, args, *run) for run in pending]
            for future in tqdm(as_completed(futures), total=len(futures), desc="mqar runs"):
                future.result()
    wall, load_after = time.perf_counter() - started, os.getloadavg()
    results = read_results(args)
    complete = write_tables(args, results)
    plot(args, results, complete)
    if not args.summarize_only:
        settings = ", ".join(
            f"L={length}: {PAIRS[length]} pairs, batch {BATCH[length]}"
            for length in sorted(args.lengths)
        )
        (args.out / "sweep.md").write_text(
            f"Command: `python -m experiments.mqar.sweep {' '.join(argv or sys.argv[1:])}`\n\n"
            f"Wall time of this call: {wall:.0f} s ({len(pending)} runs trained, "
            f"{args.workers} processes of one thread).\n\n"
            # The machine's load says whether the wall time is that of a quiet machine.
            f"Load average (1, 5, 15 min) at the start: {_loads(load_before)}; at the end: "
            f"{_loads(load_after)}.\n\n"
            f"Settings: vocabulary {VOCAB_SIZE}, {args.max_steps} steps, {HEADS} heads, short "
            f"convolution {SHORT_CONV}, MLP ratio {MLP_RATIO}, validation on {NUM_VAL} sequences "
            f"every {max(1, args.max_steps // 5)} steps, test on {NUM_TEST}; {settings}.\n"
        )
    print((args.out / "accuracy.md").read_text())


if __name__ == "__main__":
    main()
