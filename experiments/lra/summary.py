"""Turn result folders into the accuracy table (test %, per task and attention), as markdown.

python -m experiments.lra.summary runs/            # every results.json below runs/
python -m experiments.lra.summary runs/a runs/b --runs --out table.md
"""

import argparse
import json
import statistics
from pathlib import Path

from .data import TASKS


def find_results(paths) -> list[dict]:
    results = []
    for path in map(Path, paths):
        files = [path] if path.is_file() else sorted(path.rglob("results.json"))
        for file in files:
            result = json.loads(file.read_text())
            result["folder"] = str(file.parent)
            results.append(result)
    return results


def attention_label(result: dict) -> str:
    """The row a run belongs to: its attention, and its preset when not the project's own
    (results of different presets are different experiments and are never averaged together)."""
    label = result["attention"]
    if label == "taylorshift":
        label = f"taylorshift ({result.get('mode') or 'auto'})"
    preset = result.get("preset", "project")
    return label if preset == "project" else f"{label}, {preset} preset"


def _cell(accuracies: list[float]) -> str:
    if not accuracies:
        return "—"
    mean = 100 * statistics.mean(accuracies)
    if len(accuracies) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {100 * statistics.stdev(accuracies):.2f} (n={len(accuracies)})"


def accuracy_table(results: list[dict]) -> str:
    """Rows: attention; columns: the five tasks; cells: mean test accuracy over seeds."""
    labels = sorted({attention_label(result) for result in results})
    lines = ["| attention | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
    for label in labels:
        cells = [
            _cell(
                [
                    r["test_accuracy"]
                    for r in results
                    if attention_label(r) == label and r["task"] == task
                ]
            )
            for task in TASKS
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def runs_table(results: list[dict]) -> str:
    """One row per run, for the details behind the table."""
    lines = [
        "| task | attention | seed | steps | best val % | test % | parameters | train s | folder |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["task"], attention_label(r), r["seed"])):
        lines.append(
            f"| {r['task']} | {attention_label(r)} | {r['seed']} | {r['steps']} | "
            f"{100 * r['best_val_accuracy']:.2f} | {100 * r['test_accuracy']:.2f} | "
            f"{r['parameters']:,} | "
            f"{r['train_seconds']:.0f} | {r['folder']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("paths", nargs="+", help="result folders or results.json files")
    parser.add_argument("--runs", action="store_true", help="also list every run")
    parser.add_argument("--out", help="also write the markdown here")
    args = parser.parse_args(argv)
    results = find_results(args.paths)
    if not results:
        raise SystemExit(f"no results.json found under {', '.join(args.paths)}")
    text = "Test accuracy (%), best-validation checkpoint\n\n" + accuracy_table(results)
    if args.runs:
        text += "\n\n" + runs_table(results)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
