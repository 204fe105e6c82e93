"""ListOps: the TSV loader, and the generator against an independent evaluator."""

import statistics

import pytest
import torch
from conftest import LISTOPS_ROWS, write_listops_rows

from experiments.lra.data import DataLayoutError, load_task
from experiments.lra.data.encoding import LISTOPS_IDS
from experiments.lra.generators import listops as generator


def evaluate_string(source: str) -> int:
    """A stack evaluator over the serialised tokens, sharing no code with the generator."""
    stack = []
    for token in source.replace("(", " ").replace(")", " ").split():
        if token == "]":
            arguments = []
            while not isinstance(stack[-1], str):
                arguments.append(stack.pop())
            operator = stack.pop()
            value = {
                "[MIN": min,
                "[MAX": max,
                "[SM": lambda values: sum(values) % 10,
                "[MED": lambda values: int(statistics.median(values)),
            }[operator](arguments)
            stack.append(value)
        elif token.startswith("["):
            stack.append(token)
        else:
            stack.append(int(token))
    assert len(stack) == 1
    return stack[0]


def test_loader_reads_crlf_rows_and_strips_parentheses(tmp_path):
    write_listops_rows(tmp_path / "listops-1000", LISTOPS_ROWS)
    data = load_task("listops", tmp_path, max_len=8)
    assert (len(data.train), len(data.val), len(data.test)) == (4, 4, 4)
    assert data.num_classes == 10 and data.pads
    tokens, label = data.train[0]
    expected = [LISTOPS_IDS[t] for t in ["[MED", "3", "4", "]"]] + [0] * 4
    assert tokens.tolist() == expected and int(label) == 3
    assert [int(data.train[i][1]) for i in range(4)] == [target for _, target in LISTOPS_ROWS]
    # The fourth row has 7 tokens; with max_len 5 it is truncated, not rejected.
    assert load_task("listops", tmp_path, max_len=5).train[3][0].tolist()[-1] == LISTOPS_IDS["6"]


def test_hand_written_answers_match_the_independent_evaluator():
    assert [evaluate_string(source) for source, _ in LISTOPS_ROWS] == [t for _, t in LISTOPS_ROWS]


def test_missing_and_malformed_files_name_the_file(tmp_path):
    with pytest.raises(DataLayoutError, match="basic_train.tsv") as error:
        load_task("listops", tmp_path)
    assert "listops-1000/basic_val.tsv" in str(error.value)
    write_listops_rows(tmp_path / "listops-1000", [("( [MAX 1 ) ]", "eleven")])
    with pytest.raises(DataLayoutError, match="line 2"):
        load_task("listops", tmp_path)


def test_generator_is_deterministic_and_faithful(tmp_path):
    options = {"min_length": 5, "max_length": 60, "seed": 7}
    paths = generator.write_listops(tmp_path / "a", 20, 5, 5, **options)
    again = generator.write_listops(tmp_path / "b", 20, 5, 5, **options)
    other = generator.write_listops(tmp_path / "c", 20, 5, 5, **{**options, "seed": 8})
    rows = {}
    for split, path in paths.items():
        raw = path.read_bytes()
        assert raw == again[split].read_bytes()
        assert raw != other[split].read_bytes()
        assert raw.startswith(b"Source\tTarget\r\n")
        rows[split] = [line.split("\t") for line in raw.decode().splitlines()[1:]]
    assert [len(rows[s]) for s in ("train", "val", "test")] == [20, 5, 5]
    sources = [source for split_rows in rows.values() for source, _ in split_rows]
    assert len(set(sources)) == len(sources), "splits overlap or repeat"
    for source, target in (row for split_rows in rows.values() for row in split_rows):
        length = len(source.replace("(", " ").replace(")", " ").split())
        assert 5 < length < 60
        assert evaluate_string(source) == int(target)
        assert source.startswith("( ") and source.endswith(" )")


def test_generated_trees_follow_lra_shape():
    rng = generator.random.Random(0)
    lengths, roots = [], []
    for _ in range(400):
        tree, length = generator.generate_tree(rng, 1, max_depth=10, max_args=10)
        assert len(generator.to_string(tree).replace("(", " ").replace(")", " ").split()) == length
        lengths.append(length)
        roots.append(isinstance(tree, int))
    # The root is a bare digit with probability 0.75 (VALUE_P = 0.25 for an operator).
    assert 0.65 < sum(roots) / len(roots) < 0.85
    assert max(lengths) > 20


def test_generated_files_round_trip_through_the_loader(tmp_path):
    paths = generator.write_listops(
        tmp_path / "listops-1000", 10, 3, 3, min_length=5, max_length=40, seed=2
    )
    data = load_task("listops", tmp_path, max_len=40)
    rows = [line.split("\t") for line in paths["train"].read_text().splitlines()[1:]]
    for (source, target), (tokens, label) in zip(rows, data.train, strict=True):
        expected = [LISTOPS_IDS[t] for t in source.replace("(", " ").replace(")", " ").split()]
        assert tokens[: len(expected)].tolist() == expected
        assert torch.all(tokens[len(expected) :] == 0) and int(label) == int(target)


def test_cli_writes_the_release_layout(tmp_path):
    sizes = ["--num-train", "4", "--num-val", "2", "--num-test", "2"]
    generator.main(
        ["--data-root", str(tmp_path), *sizes, "--min-length", "5", "--max-length", "30"]
    )
    assert len(load_task("listops", tmp_path).train) == 4


def test_default_lengths_and_labels_match_lra_statistics():
    # lra.md: with LRA's defaults, mean ~1080 tokens and labels skewed to 0 and 9 (MIN and MAX).
    rows = generator.generate_dataset(300, min_length=500, max_length=2000, seed=0)
    lengths = [len(source.replace("(", " ").replace(")", " ").split()) for source, _ in rows]
    assert 950 < statistics.mean(lengths) < 1250 and 500 < min(lengths) and max(lengths) < 2000
    counts = [sum(target == label for _, target in rows) for label in range(10)]
    assert min(counts[0], counts[9]) > max(counts[1:9])
