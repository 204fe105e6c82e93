"""The Taylor-order study in one command: accuracy (trains), approximation, cost.

    python -m experiments.order.sweep --runs runs/order --out experiments/results/order

Writes to --out: accuracy.{md,json,png}, approximation.{md,csv} and approximation_*.png,
cost.{md,csv} and cost_*.png, and timings.md (wall seconds of each part in this call: training runs
that finished before are skipped, so then the accuracy part only tabulates). The approximation reads
the models the accuracy part trained, so it runs after it. One process, one thread throughout.
"""

import time

from . import accuracy, approximation, cost, study_parser


def parse_args(argv=None):
    parser = study_parser(__doc__)
    parser.add_argument("--max-steps", type=int, help="training steps (default: 1500)")
    parser.add_argument("--cost-rounds", type=int, default=5)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    parts = {
        "accuracy": ["--runs", str(args.runs), "--out", str(args.out)]
        + (["--max-steps", str(args.max_steps)] if args.max_steps else []),
        "approximation": ["--runs", str(args.runs), "--out", str(args.out)],
        "cost": ["--out", str(args.out), "--rounds", str(args.cost_rounds)],
    }
    modules = {"accuracy": accuracy, "approximation": approximation, "cost": cost}
    seconds = {}
    for name, part_argv in parts.items():
        started = time.perf_counter()
        modules[name].main(part_argv)
        seconds[name] = time.perf_counter() - started
    (args.out / "timings.md").write_text(
        "| part | wall seconds |\n|---|---|\n"
        + "\n".join(f"| {name} | {value:.0f} |" for name, value in seconds.items())
        + "\n"
    )


if __name__ == "__main__":
    main()
