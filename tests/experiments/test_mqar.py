"""The MQAR study: the generator's format and determinism, the model's causality per attention,
and the trainer (outputs, exact resume) and sweep tables at toy size."""

import csv
import json

import pytest
import torch

from experiments.mqar import sweep, train
from experiments.mqar.data import IGNORE_INDEX, MQARDataset, generate_mqar
from experiments.mqar.model import ATTENTIONS, CausalLM


def test_generator_format():
    vocab, length, pairs = 32, 44, 6
    inputs, targets = generate_mqar(50, vocab, length, pairs, torch.Generator().manual_seed(1))
    assert inputs.shape == targets.shape == (50, length)
    assert inputs.dtype == targets.dtype == torch.int64
    half = vocab // 2
    for row, target in zip(inputs.tolist(), targets.tolist()):
        keys, values = row[0 : 2 * pairs : 2], row[1 : 2 * pairs : 2]
        assert len(set(keys)) == pairs and all(1 <= key < half for key in keys)
        assert len(set(values)) == pairs and all(half <= value < vocab for value in values)
        queried = [i for i, t in enumerate(target) if t != IGNORE_INDEX]
        # One query per key, in the slots of two after the pairs, answered by its pair's value.
        assert len(queried) == pairs
        assert all(i >= 2 * pairs and (i - 2 * pairs) % 2 == 0 for i in queried)
        assert sorted(row[i] for i in queried) == sorted(keys)
        paired = dict(zip(keys, values))
        assert all(target[i] == paired[row[i]] for i in queried)
        # Fillers are values, so a key occurs only in its pair and its query.
        fillers = [row[i] for i in range(2 * pairs, length) if i not in queried]
        assert all(half <= token < vocab for token in fillers)


def test_generator_queries_follow_the_power_law():
    # Slot weights (s + 1)^-0.99: the first query slot is taken far more often than the last.
    _, targets = generate_mqar(2000, 64, 128, 4, torch.Generator().manual_seed(0))
    queried = (targets != IGNORE_INDEX).sum(dim=0)
    first_slot, last_slot = 2 * 4, 126
    assert queried[first_slot] == 2000 or queried[first_slot] > 10 * queried[last_slot]
    assert int(queried.sum()) == 2000 * 4


def test_generator_is_deterministic():
    def make(seed):
        return generate_mqar(8, 64, 64, 8, torch.Generator().manual_seed(seed))

    first, again, other = make(5), make(5), make(6)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    dataset = MQARDataset(8, 64, 64, 8, seed=5)
    assert len(dataset) == 8
    assert torch.equal(dataset[3][0], first[0][3]) and torch.equal(dataset[3][1], first[1][3])


@pytest.mark.parametrize(
    ("vocab", "length", "pairs", "message"),
    [(32, 64, 16, "distinct keys"), (128, 30, 8, "too short"), (32, 64, 0, "at least 1")],
)
def test_generator_rejects_impossible_sizes(vocab, length, pairs, message):
    with pytest.raises(ValueError, match=message):
        generate_mqar(1, vocab, length, pairs, torch.Generator())


@pytest.mark.parametrize("mlp_ratio", [0, 4])
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_model_is_causal(attention, mlp_ratio):
    # float64, so that "unchanged" can be asked to 1e-12 whatever order the kernels sum in.
    torch.manual_seed(0)
    model = CausalLM(32, 24, 16, attention, heads=2, short_conv=2, mlp_ratio=mlp_ratio)
    model = model.double().eval()
    # mlp_ratio 0 leaves the MLP out: no parameter of it exists.
    assert any("mlp" in name for name, _ in model.named_parameters()) == bool(mlp_ratio)
    tokens = torch.randint(32, (2, 24))
    changed_at = 13
    altered = tokens.clone()
    altered[:, changed_at] = (tokens[:, changed_at] + 1) % 32
    with torch.no_grad():
        before, after = model(tokens), model(altered)
    torch.testing.assert_close(after[:, :changed_at], before[:, :changed_at], rtol=0, atol=1e-12)
    # The change does reach its own position and the later ones: the test can fail.
    assert (after[:, changed_at:] - before[:, changed_at:]).abs().amax(dim=-1).min() > 1e-6


def test_model_rejects_bad_configuration():
    with pytest.raises(ValueError, match="attention must be one of"):
        CausalLM(32, 16, 16, "elu")
    with pytest.raises(ValueError, match="longer than max_len"):
        CausalLM(32, 16, 16, "softmax")(torch.zeros(1, 17, dtype=torch.int64))


def run_train(out, *extra):
    argv = ["--out", str(out), "--vocab-size", "16", "--seq-len", "16", "--num-pairs", "2",
            "--dim", "16", "--heads", "2", "--short-conv", "2", "--batch-size", "4",
            "--num-val", "8", "--num-test", "8", "--max-steps", "6", "--eval-every", "3",
            "--log-every", "2", "--warmup-steps", "2", "--threads", "1", "--no-progress"]  # fmt: skip
    train.main([*argv, *extra])


def read_metrics(out):
    with (out / "metrics.csv").open(newline="") as handle:
        return [
            {k: v for k, v in row.items() if k != "elapsed_s"} for row in csv.DictReader(handle)
        ]


@pytest.mark.parametrize("attention", ["taylorshift", "linear"])
def test_train_writes_results_and_resumes_exactly(tmp_path, attention):
    run_train(tmp_path / "straight", "--attention", attention, "--seed", "3")
    run_train(tmp_path / "resumed", "--attention", attention, "--seed", "3", "--stop-at-step", "4")
    assert not (tmp_path / "resumed" / "results.json").exists()
    run_train(tmp_path / "resumed", "--attention", attention, "--seed", "3", "--resume")

    results = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert results["attention"] == attention and results["steps"] == 6
    assert results["order"] == {"taylorshift": 2, "linear": 1}[attention]
    assert 0.0 <= results["test_accuracy"] <= 1.0 and results["test_queries"] == 16
    rows = read_metrics(tmp_path / "straight")
    assert [(r["step"], r["split"]) for r in rows] == [
        ("2", "train"), ("3", "val"), ("4", "train"), ("6", "train"), ("6", "val"),
    ]  # fmt: skip
    assert all(float(r["loss"]) > 0 for r in rows)

    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert read_metrics(tmp_path / "straight") == read_metrics(tmp_path / "resumed")
    second = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert second["test_accuracy"] == results["test_accuracy"]
    assert not list((tmp_path / "resumed").glob(".*.tmp")), "a temporary checkpoint was left"


def test_resume_without_checkpoint_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="last.pt"):
        run_train(tmp_path, "--resume")


def test_sweep_tables_and_plot_mark_missing_runs(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    for seed, accuracy in [(0, 0.5), (1, 0.7)]:
        folder = runs / sweep.run_name("softmax", 64, 64, seed)
        folder.mkdir(parents=True)
        result = {"attention": "softmax", "seq_len": 64, "num_pairs": sweep.PAIRS[64], "dim": 64,
                  "seed": seed, "test_accuracy": accuracy}  # fmt: skip
        (folder / "results.json").write_text(json.dumps(result))
    sweep.main(["--runs", str(runs), "--out", str(out), "--summarize-only", "--seeds", "0", "1",
                "--lengths", "64", "128", "--widths", "64", "--attentions", "softmax", "linear"])  # fmt: skip
    table = (out / "accuracy.md").read_text()
    assert table.startswith("**PARTIAL**: 6 of 8 runs missing")
    assert "| softmax | 64 | 60.0 ± 14.1 | — |" in table
    assert "| linear | 64 | — | — |" in table
    assert (out / "accuracy.png").stat().st_size > 0
    with (out / "accuracy.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0] == {"attention": "softmax", "seq_len": "64", "num_pairs": str(sweep.PAIRS[64]), "dim": "64",
                       "runs": "2", "mean": "0.6000", "std": "0.1414"}  # fmt: skip


def test_sweep_trains_a_toy_grid(tmp_path):
    out = tmp_path / "out"
    argv = ["--runs", str(tmp_path / "runs"), "--out", str(out), "--max-steps", "2",
            "--lengths", "64", "--widths", "16", "--seeds", "0", "--attentions", "softmax",
            "taylorshift"]  # fmt: skip
    sweep.main(argv)
    table = (out / "accuracy.md").read_text()
    assert "PARTIAL" not in table and "| taylorshift | 16 |" in table
    assert "Wall time of this call" in (out / "sweep.md").read_text()
    # The runs were trained with the sweep's settings, not train.py's defaults.
    config = json.loads((tmp_path / "runs" / "taylorshift-L64-d16-s0" / "config.json").read_text())
    assert config["mlp_ratio"] == sweep.MLP_RATIO and config["num_test"] == sweep.NUM_TEST
    assert config["eval_batch_size"] * 64 == sweep.EVAL_TOKENS
    # A second call finds every run finished and trains nothing.
    sweep.main(argv)
    assert "(0 runs trained" in (out / "sweep.md").read_text()
