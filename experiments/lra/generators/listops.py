"""ListOps generator faithful to LRA's lra_benchmarks/data/listops.py (spec: lra.md section 2.1).

Writes <output-dir>/<task-name>_{train,val,test}.tsv with a 'Source<TAB>Target' header and csv's
\\r\\n line endings, exactly as LRA does; by default <data-root>/listops-1000/basic_*.tsv.

    python -m experiments.lra.generators.listops --data-root data --seed 0
"""

import argparse
import csv
import random
from pathlib import Path

import numpy as np

MIN, MAX, MED, SUM_MOD = "[MIN", "[MAX", "[MED", "[SM"
# LRA defines [FIRST and [LAST but leaves them out of OPERATORS.
OPERATORS = [MIN, MAX, MED, SUM_MOD]
VALUES = range(10)
VALUE_P = 0.25
END = "]"


def generate_tree(rng: random.Random, depth: int, max_depth: int, max_args: int):
    """Returns (tree as left-nested binary tuples, length without parentheses).

    The order of random draws (children before the operator) follows LRA, so a seeded run draws the
    same trees as LRA's code would with the same random stream.
    """
    r = rng.random() if depth < max_depth else 1
    if r > VALUE_P:
        return rng.choice(VALUES), 1
    length = 2
    values = []
    for _ in range(rng.randint(2, max_args)):
        subtree, sublength = generate_tree(rng, depth + 1, max_depth, max_args)
        values.append(subtree)
        length += sublength
    tree = (rng.choice(OPERATORS), values[0])
    for value in values[1:]:
        tree = (tree, value)
    return (tree, END), length


def to_string(tree) -> str:
    if isinstance(tree, (str, int)):
        return str(tree)
    return "( " + to_string(tree[0]) + " " + to_string(tree[1]) + " )"


def _operator_and_arguments(tree):
    """Unfolds ((((op, a), b), c), ']') into (op, [a, b, c])."""
    node, arguments = tree[0], []
    while isinstance(node, tuple):
        node, argument = node
        arguments.append(argument)
    return node, arguments[::-1]


def to_value(tree) -> int:
    if isinstance(tree, int):
        return tree
    operator, arguments = _operator_and_arguments(tree)
    values = [to_value(argument) for argument in arguments]
    if operator == MIN:
        return min(values)
    if operator == MAX:
        return max(values)
    if operator == MED:
        # np.median averages the two middle values of an even count; int() then truncates.
        return int(np.median(values))
    if operator == SUM_MOD:
        return sum(values) % 10
    raise ValueError(f"unknown operator {operator!r}")


def generate_dataset(
    num_samples: int,
    min_length: int,
    max_length: int,
    max_depth: int = 10,
    max_args: int = 10,
    seed: int = 0,
) -> list[tuple[str, int]]:
    """Rejection-samples distinct trees with min_length < length < max_length (strict, as LRA).

    LRA dedupes with a set, whose order is arbitrary; an insertion-ordered dict keeps the split
    reproducible while still guaranteeing the splits never share a tree.
    """
    if max_length - min_length < 2:
        raise ValueError("need max_length - min_length >= 2 for any length to be accepted")
    rng = random.Random(seed)
    trees: dict = {}
    while len(trees) < num_samples:
        tree, length = generate_tree(rng, 1, max_depth, max_args)
        if min_length < length < max_length:
            trees.setdefault(tree, None)
    return [(to_string(tree), to_value(tree)) for tree in trees]


def write_tsv(path: Path, rows: list[tuple[str, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["Source", "Target"])
        writer.writerows(rows)


def write_listops(
    output_dir,
    num_train: int,
    num_val: int,
    num_test: int,
    task_name: str = "basic",
    **generator_options,
) -> dict[str, Path]:
    """Generates train+val+test together (so they never overlap) and writes the three TSVs."""
    rows = generate_dataset(num_train + num_val + num_test, **generator_options)
    cuts = {
        "train": rows[:num_train],
        "val": rows[num_train : num_train + num_val],
        "test": rows[num_train + num_val :],
    }
    paths = {}
    for split, split_rows in cuts.items():
        paths[split] = Path(output_dir) / f"{task_name}_{split}.tsv"
        write_tsv(paths[split], split_rows)
    return paths


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-root", default="data", help="writes <data-root>/listops-1000/ unless --output-dir"
    )
    parser.add_argument("--output-dir", help="directory for the TSVs (overrides --data-root)")
    parser.add_argument("--task-name", default="basic")
    parser.add_argument("--num-train", type=int, default=96000)
    parser.add_argument("--num-val", type=int, default=2000)
    parser.add_argument("--num-test", type=int, default=2000)
    parser.add_argument(
        "--min-length", type=int, default=500, help="exclusive lower bound on tokens"
    )
    parser.add_argument(
        "--max-length", type=int, default=2000, help="exclusive upper bound on tokens"
    )
    parser.add_argument("--max-depth", type=int, default=10)
    parser.add_argument("--max-args", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    output_dir = Path(args.output_dir) if args.output_dir else Path(args.data_root) / "listops-1000"
    paths = write_listops(
        output_dir,
        args.num_train,
        args.num_val,
        args.num_test,
        task_name=args.task_name,
        min_length=args.min_length,
        max_length=args.max_length,
        max_depth=args.max_depth,
        max_args=args.max_args,
        seed=args.seed,
    )
    for split, path in paths.items():
        print(f"wrote {split}: {path}")


if __name__ == "__main__":
    main()
