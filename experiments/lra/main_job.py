"""The main job: generate short ListOps, train TaylorShift and softmax on the CPU, compare.

    python -m experiments.lra.main_job --out runs/main

SMOKE SIZE: a 64-dim, 2-layer model on generated ListOps of under 128 tokens
(configs/listops_smoke.json), so that each run takes a few minutes on two CPU cores. This checks the
whole pipeline end to end; it is not the paper's setting (see experiments/README.md for those runs).
"""

import argparse
import time
from pathlib import Path

from . import summary, train
from .generators.listops import write_listops
from .training.config import CONFIG_DIR

SMOKE_CONFIG = CONFIG_DIR / "listops_smoke.json"
NOTICE = (
    "SMOKE-SIZE RUN: generated ListOps with 20 < length < 128 tokens, a 64-dim 2-layer\n"
    "4-head model, CPU, fp32. It exercises the whole pipeline; accuracies are not comparable\n"
    "to LRA's (see experiments/README.md for the full-size GPU runs)."
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/main")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=5000)
    parser.add_argument("--num-eval", type=int, default=500, help="items in each of val and test")
    parser.add_argument("--max-steps", type=int, help="default: the smoke config's")
    parser.add_argument("--mode", default="auto", choices=("auto", "direct", "efficient"))
    # One thread: with a model this small, spinning OpenMP threads slowed training several-fold
    # whenever the machine was busy with anything else (measured: 11 s vs 72 s per 100 steps).
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per training run")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    print(NOTICE, flush=True)
    timings = {}

    started = time.perf_counter()
    write_listops(
        out / "data" / "listops-1000",
        args.num_train,
        args.num_eval,
        args.num_eval,
        min_length=20,
        max_length=128,
        seed=args.seed,
    )
    timings["generate ListOps"] = time.perf_counter() - started

    for attention in ("taylorshift", "softmax"):
        print(f"\n== training {attention} ==", flush=True)
        started = time.perf_counter()
        train_argv = [
            "--task", "listops",
            "--data-root", str(out / "data"),
            "--attention", attention,
            "--mode", args.mode,
            "--config", str(SMOKE_CONFIG),
            "--out", str(out / attention),
            "--seed", str(args.seed),
            "--threads", str(args.threads),
        ]  # fmt: skip
        if args.max_steps:
            train_argv += ["--max-steps", str(args.max_steps)]
        train.main(train_argv)
        timings[f"train + test {attention}"] = time.perf_counter() - started

    results = summary.find_results([out / "taylorshift", out / "softmax"])
    table = (
        "Test accuracy (%) on generated ListOps, SMOKE SIZE (not LRA)\n\n"
        + summary.accuracy_table(results)
        + "\n\n"
        + summary.runs_table(results)
        + "\n\n| phase | seconds |\n|---|---|\n"
        + "\n".join(f"| {phase} | {seconds:.1f} |" for phase, seconds in timings.items())
    )
    (out / "summary.md").write_text(NOTICE + "\n\n" + table + "\n")
    print("\n" + table)
    print(f"\nwritten to {out / 'summary.md'}")


if __name__ == "__main__":
    main()
