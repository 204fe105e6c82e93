"""Accuracy per Taylor order: orders 1-4 and softmax on the main job's generated ListOps.

    python -m experiments.order.accuracy --runs runs/order --out experiments/results/order

The main job's setting (experiments/lra/main_job.py): 5000/500/500 generated items of
20 < length < 128 tokens, configs/listops_smoke.json, CPU, fp32, one thread. The data is generated
once (seed 0, as the main job); the seeds vary the initialisation and the batch order. Runs go one
at a time through experiments.lra.train; a finished run (results.json) is kept and an interrupted
one resumed, so the command can simply be run again.
"""

import json
import statistics
from pathlib import Path

import torch

from ..lra import train
from ..lra.data import load_task
from ..lra.generators.listops import write_listops
from ..lra.main_job import SMOKE_CONFIG
from ..lra.models import build_model
from . import study_parser
from .plots import bar_plot

ARMS = ("softmax", "order 1", "order 2", "order 3", "order 4")
SEEDS = (0, 1, 2)


def run_dir(runs: Path, arm: str, seed: int) -> Path:
    return runs / arm.replace(" ", "") / f"seed{seed}"


def generate_data(runs: Path) -> Path:
    root = runs / "data"
    if not (root / "listops-1000" / "basic_test.tsv").is_file():
        write_listops(root / "listops-1000", 5000, 500, 500, min_length=20, max_length=128, seed=0)
    return root


def train_arm(runs: Path, data_root: Path, arm: str, seed: int, max_steps: int | None) -> None:
    out = run_dir(runs, arm, seed)
    if (out / "results.json").is_file():
        return
    argv = ["--task", "listops", "--data-root", str(data_root), "--config", str(SMOKE_CONFIG)]
    argv += ["--out", str(out), "--seed", str(seed), "--threads", "1"]
    if arm == "softmax":
        argv += ["--attention", "softmax"]
    else:
        argv += ["--attention", "taylorshift", "--order", arm.split()[1]]
    if max_steps:
        argv += ["--max-steps", str(max_steps)]
    if (out / "last.pt").is_file():
        argv.append("--resume")
    print(f"\n== {arm}, seed {seed} ==", flush=True)
    train.main(argv)


def load_trained_model(folder: Path) -> torch.nn.Module:
    """The best-validation model of a finished run, in eval mode."""
    config = json.loads((folder / "config.json").read_text())
    results = json.loads((folder / "results.json").read_text())
    data = load_task("listops", results["data_root"], **config["data"])
    model = build_model(
        config["model"], data.vocab_size, data.max_len, data.num_classes, data.pads, data.pair
    )
    checkpoint = torch.load(folder / "best.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(checkpoint["model"])
    return model.eval()


def learnt_temperatures(model: torch.nn.Module) -> list[list[float]]:
    """Per layer, each head's temperature as the attention uses it (odd orders: clamped)."""
    return [
        module.temperature.detach().tolist()
        for module in model.modules()
        if hasattr(module, "temperature") and isinstance(module, torch.nn.MultiheadAttention)
    ]


def collect(runs: Path) -> list[dict]:
    rows = []
    for arm in ARMS:
        for seed in SEEDS:
            folder = run_dir(runs, arm, seed)
            if not (folder / "results.json").is_file():
                continue
            result = json.loads((folder / "results.json").read_text())
            temperatures = (
                learnt_temperatures(load_trained_model(folder)) if arm != "softmax" else None
            )
            rows.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "test_accuracy": result["test_accuracy"],
                    "best_val_accuracy": result["best_val_accuracy"],
                    "best_step": result["best_step"],
                    "steps": result["steps"],
                    "train_seconds": result["train_seconds"],
                    "temperatures": temperatures,
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| attention | test accuracy % (mean ± std) | per seed | best val % | train s / run | "
        + "learnt \\|τ\\| (min – max) |",
        "|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        arm_rows = [row for row in rows if row["arm"] == arm]
        if not arm_rows:
            continue
        accuracies = [100 * row["test_accuracy"] for row in arm_rows]
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        per_seed = ", ".join(f"{accuracy:.1f}" for accuracy in accuracies)
        val = statistics.mean(100 * row["best_val_accuracy"] for row in arm_rows)
        seconds = statistics.mean(row["train_seconds"] for row in arm_rows)
        temperature = "—"
        if arm_rows[0]["temperatures"]:
            learnt = [abs(t) for r in arm_rows for layer in r["temperatures"] for t in layer]
            temperature = f"{min(learnt):.2f} – {max(learnt):.2f}"
        lines.append(
            f"| {arm} | {statistics.mean(accuracies):.2f} ± {spread:.2f} (n={len(accuracies)}) "
            f"| {per_seed} | {val:.2f} | {seconds:.0f} | {temperature} |"
        )
    return "\n".join(lines)


def write_summary(rows: list[dict], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(rows, indent=2))
    markdown = table(rows)
    (out / "accuracy.md").write_text(
        "Test accuracy on generated ListOps (main-job smoke setting, CPU, fp32), best-validation "
        "checkpoint\n\n" + markdown + "\n"
    )
    arms = [arm for arm in ARMS if any(row["arm"] == arm for row in rows)]
    bar_plot(
        out / "accuracy.png",
        arms,
        [[100 * row["test_accuracy"] for row in rows if row["arm"] == arm] for arm in arms],
        ylabel="test accuracy (%)",
        title="Generated ListOps (smoke size): test accuracy per attention, mean ± std over seeds",
    )
    return markdown


def parse_args(argv=None):
    parser = study_parser(__doc__)
    parser.add_argument("--max-steps", type=int, help="default: the smoke config's 1500")
    parser.add_argument("--summary-only", action="store_true", help="tabulate finished runs")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.summary_only:
        data_root = generate_data(args.runs)
        for seed in SEEDS:
            for arm in ARMS:
                train_arm(args.runs, data_root, arm, seed, args.max_steps)
    print(write_summary(collect(args.runs), args.out))


if __name__ == "__main__":
    main()
