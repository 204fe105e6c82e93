"""A seeded CPU reproduction of LRA's ListOps and Pathfinder-32 setups at a size one thread can run.

    python -m experiments.lra.reproduce_cpu --out experiments/results/cpu_reproduction

Generates ListOps with LRA's generator and Pathfinder-32 with this project's re-implementation of
its generator, then trains LRA's published models (the `lra` preset) with both attentions and
three seeds, one thread each, one run after another, and writes the table (test accuracy, mean ±
std over seeds), the training curves and the exact commands.

REDUCED SIZE, said plainly: ListOps lengths 100 < L < 300 (LRA: 500 < L < 2000), 3,000 training
trees; models 2 layers deep (LRA: 4) and ListOps 64 wide (LRA: 512); 150 steps (LRA: 5,000 and
62,400); Pathfinder batch 16 (LRA: 512); warmup shortened with the same peak learning rate;
attention dropout off in both arms (on one CPU thread softmax's dropout on the L x L weights made
its attention 8x slower, and TaylorShift cannot drop weights at all); Pathfinder on the easy split
(curv_baseline) from 1,600 images.
Accuracies are therefore far below LRA's (at this size, chance level): the run compares the two
attentions under the published recipe seed for seed; it does not reproduce the published numbers.
"""

import argparse
import csv
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from . import train
from .data.pathfinder import DIFFICULTIES
from .generators.listops import write_listops
from .generators.pathfinder import write_pathfinder
from .training.config import load_config

SEEDS = (0, 1, 2)
ATTENTIONS = ("taylorshift", "softmax")
# task: (model overrides, train overrides) applied to the lra preset's config.
REDUCTIONS = {
    "listops": (
        {"dim": 64, "qkv_dim": 64, "mlp_dim": 128, "heads": 4, "depth": 2, "attention_dropout": 0.0},
        # LRA's peak rate 0.05 / sqrt(1000) reached after 50 warmup steps: constant 0.05 sqrt(50/1000).
        {"lr": 0.05 * (50 / 1000) ** 0.5, "warmup_steps": 50, "max_steps": 150, "eval_every": 50,
         "eval_batch_size": 100},
    ),
    "pathfinder": (
        {"depth": 2, "attention_dropout": 0.0},
        # One epoch of warmup (1,280 images at batch 16), cosine over the run, as LRA's recipe.
        {"batch_size": 16, "eval_batch_size": 80, "warmup_steps": 80, "max_steps": 150,
         "steps_per_cycle": 150, "eval_every": 50},
    ),
}  # fmt: skip
LISTOPS_DATA = {"num_train": 3000, "num_val": 200, "num_test": 200, "min_length": 100,
                "max_length": 300}  # fmt: skip
PATHFINDER_DATA = {"num_images": 1600, "contour_length": 6}


def write_configs(directory: Path) -> dict[str, Path]:
    paths = {}
    for task, (model, training) in REDUCTIONS.items():
        config = load_config(task, preset="lra")
        config.pop("source")
        config["_about"] = (
            "REDUCED for one CPU thread (experiments/lra/reproduce_cpu.py); " + config["_about"]
        )
        config["model"].update(model)
        config["train"].update(training)
        if task == "listops":
            config["data"]["max_len"] = LISTOPS_DATA["max_length"]
        else:
            config["data"]["difficulty"] = DIFFICULTIES[PATHFINDER_DATA["contour_length"]]
        paths[task] = directory / f"{task}.json"
        paths[task].write_text(json.dumps(config, indent=2) + "\n")
    return paths


def generate(data_root: Path, log) -> None:
    started = time.perf_counter()
    write_listops(data_root / "listops-1000", **LISTOPS_DATA, seed=0)
    log(f"generated ListOps in {time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    write_pathfinder(data_root, images_per_batch=400, seed=0, **PATHFINDER_DATA)
    log(f"generated Pathfinder-32 in {time.perf_counter() - started:.0f} s")


def train_argv(task, attention, seed, data_root, config, out) -> list[str]:
    return [
        "--task", task, "--preset", "lra", "--config", str(config), "--data-root", str(data_root),
        "--attention", attention, "--seed", str(seed), "--threads", "1", "--no-progress",
        "--log-every", "10", "--out", str(out),
    ]  # fmt: skip


def read_curves(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def results_table(runs: dict) -> str:
    """runs: {(task, attention): [results dicts]} -> markdown table of test accuracy (%)."""
    header = "| task | attention | test accuracy (%) mean ± std | per seed | best val (%) | train s / run |"
    lines = [
        header,
        "|---|---|---|---|---|---|",
    ]
    for (task, attention), results in runs.items():
        accuracies = [100 * r["test_accuracy"] for r in results]
        vals = [100 * r["best_val_accuracy"] for r in results]
        seconds = statistics.mean(r["train_seconds"] for r in results)
        lines.append(
            f"| {task} | {attention} | {statistics.mean(accuracies):.2f} ± "
            f"{statistics.stdev(accuracies):.2f} | "
            + ", ".join(f"{a:.2f}" for a in accuracies)
            + f" | {statistics.mean(vals):.2f} | {seconds:.0f} |"
        )
    return "\n".join(lines)


def plot_curves(out: Path, runs_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(REDUCTIONS)
    figure, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 7), squeeze=False)
    colors = {"taylorshift": "tab:blue", "softmax": "tab:orange"}
    for column, task in enumerate(tasks):
        for attention in ATTENTIONS:
            for seed in SEEDS:
                rows = read_curves(runs_dir / f"{task}-{attention}-seed{seed}")
                for row_index, (split, metric) in enumerate(
                    [("train", "loss"), ("val", "accuracy")]
                ):
                    points = [
                        (int(r["step"]), float(r[metric])) for r in rows if r["split"] == split
                    ]
                    axes[row_index][column].plot(
                        *zip(*points, strict=True),
                        color=colors[attention],
                        alpha=0.8,
                        label=attention if seed == SEEDS[0] else None,
                    )
        axes[0][column].set_title(f"{task}: train loss (mean of 10 steps)")
        axes[1][column].set_title(f"{task}: validation accuracy")
        axes[1][column].set_xlabel("step")
        axes[0][column].legend()
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="experiments/results/cpu_reproduction")
    parser.add_argument("--work", default="runs/cpu_reproduction", help="data and checkpoints")
    args = parser.parse_args(argv)
    # One thread for everything, data generation included (the machine is shared).
    torch.set_num_threads(1)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(exist_ok=True)
    log_file = (out / "log.txt").open("a")

    def log(message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S', time.gmtime())} UTC] {message}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    log(
        "command: "
        + " ".join([sys.executable, "-m", "experiments.lra.reproduce_cpu", *(argv or sys.argv[1:])])
    )
    configs = write_configs(out)
    data_root = work / "data"
    generate(data_root, log)
    commands, runs = [], {}
    for task in REDUCTIONS:
        for seed in SEEDS:
            for attention in ATTENTIONS:
                name = f"{task}-{attention}-seed{seed}"
                argv_run = train_argv(task, attention, seed, data_root, configs[task], work / name)
                commands.append("python -m experiments.lra.train " + " ".join(argv_run))
                log("start " + name)
                results = train.run(train.parse_args(argv_run))
                runs.setdefault((task, attention), []).append(results)
                kept = out / "runs" / name
                kept.mkdir(exist_ok=True)
                for file in ("metrics.csv", "config.json"):
                    shutil.copy(work / name / file, kept / file)
                (kept / "results.json").write_text(json.dumps(results, indent=2))
                log(
                    f"done {name}: test {100 * results['test_accuracy']:.2f}% "
                    f"(best val {100 * results['best_val_accuracy']:.2f}% at step "
                    f"{results['best_step']}), {results['train_seconds']:.0f} s training"
                )
    ordered = {key: runs[key] for key in sorted(runs)}
    table = results_table(ordered)
    (out / "results.md").write_text(table + "\n")
    (out / "commands.sh").write_text(
        "# Exact commands run by experiments/lra/reproduce_cpu.py, in order.\n"
        + "\n".join(commands)
        + "\n"
    )
    plot_curves(out / "curves.png", out / "runs")
    log("table:\n" + table)


if __name__ == "__main__":
    main()
